"""The streaming hop: one client request relayed to one consumer, both ways.

This module is the exchange's orchestration and its values (`Timeouts`,
`Outcome`, `Result`); what crosses the proxy is filtered in
gpumgr.proxy_headers, the request goes out through gpumgr.proxy_request, and
the response body comes back through gpumgr.proxy_relay.

Invariants:
- Bodies are never buffered whole. The request body was spooled by
  twisted.web (memory under 100 kB, a temp file above); it is streamed out
  with FileBodyProducer. The response body is written through chunk by chunk,
  with the upstream transport registered as the client's push producer, so a
  slow client pauses the upstream.
- A client that leaves cancels the upstream request (before headers) or stops
  the upstream transport (during the body). The service may go on with the
  work all the same (`Result.abandoned`): the broker keeps the GPU until it
  stopped (gpumgr.abandoned).
- An upstream that breaks mid-body aborts the client connection; `finish()`
  is never called on a truncated body.
- `forward()` returns a Deferred that fires with an `Outcome` once the
  exchange is entirely over. It never errbacks, so a scheduler holding the GPU
  lock around it always gets its release.
"""

from __future__ import annotations

import enum
from typing import Any, Callable, Sequence

import attrs

from twisted.internet import defer
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IResponse

from gpumgr.errors import (
    GpumgrError,
    UpstreamTimeout,
    UpstreamUnreachable,
    describe_failure,
)
from gpumgr.proxy_headers import client_ip, copy_response_headers, forward_request_headers
from gpumgr.proxy_relay import Discard, Drain, Relay, WatchedProducer, abort_client, is_oom
from gpumgr.proxy_request import CachedEndpoints, SpooledBodyProducer, body_producer

__all__ = [
    "CachedEndpoints",
    "Outcome",
    "Result",
    "StreamingProxy",
    "Timeouts",
    "UpstreamErrorHook",
    "body_producer",
    "copy_response_headers",
    "forward_request_headers",
    "is_oom",
]

log = Logger()

@attrs.frozen
class Timeouts:
    """Deadlines of one exchange, in seconds."""

    request_s: float  # until the response headers
    body_idle_s: float  # between upstream body chunks
    client_stall_s: float  # the client not reading while we hold data for it


class Outcome(enum.Enum):
    COMPLETED = "completed"  # response relayed in full
    CLIENT_GONE = "client_gone"  # client left; upstream cancelled
    UPSTREAM_BROKE = "upstream_broke"  # upstream failed mid-body; client aborted
    REFUSED = "refused"  # gpumgr answered with its own error
    OOM = "oom"  # upstream said "out of memory"; nothing sent, the job may be replayed


@attrs.frozen
class Result:
    outcome: Outcome
    status: int | None = None  # the status the client got (or would have)
    #: The request went out and the consumer may have acted on it (it may now
    #: hold its memory), whatever the outcome.
    reached_consumer: bool = True
    #: The start of the response body, when the caller asked to capture it.
    body_head: bytes = b""
    #: Response body bytes relayed to the client.
    bytes_out: int = 0
    #: gpumgr itself ended the exchange (a job timeout, shutdown): the client
    #: did not leave, it was sent away.
    cancelled: bool = False
    #: REFUSED: the error the client is to get (written by gpumgr.web, where
    #: every error of a request is written).
    error: GpumgrError | None = None

    @property
    def abandoned(self) -> bool:
        """The client left while the consumer had the request: the work it
        started may go on without anyone to answer (gpumgr.abandoned)."""
        return self.outcome is Outcome.CLIENT_GONE and self.reached_consumer \
            and not self.cancelled


#: on_upstream_error(consumer, reachable, reason): `reachable` is False when
#: the consumer could not be reached at all (passive health marks it down).
UpstreamErrorHook = Callable[[str, bool, str], None]


class _Exchange:
    def __init__(
        self,
        clock: IReactorTime,
        cooperator: Cooperator,
        request: Any,
        consumer: str,
        agent: IAgent,
        url: bytes,
        timeouts: Timeouts,
        extra_headers: list[tuple[bytes, bytes]],
        on_upstream_error: UpstreamErrorHook,
        hold_oom: bool = False,
        capture_bytes: int = 0,
        finish_upstream: bool = False,
        on_head: Callable[[int], None] | None = None,
    ) -> None:
        self.request = request
        self._on_head = on_head
        self.finish_upstream = finish_upstream
        self._hold_oom = hold_oom
        self._capture_left = capture_bytes
        self._captured: list[bytes] = []
        self._reached = False
        self._bytes_out = 0
        self._status: int | None = None
        self._clock = clock
        self._cooperator = cooperator
        self._consumer = consumer
        self._agent = agent
        self._url = url
        self._timeouts = timeouts
        self._request_timeout_s = timeouts.request_s
        self._extra_headers = extra_headers
        self._on_upstream_error = on_upstream_error
        self.done: defer.Deferred[Result] = defer.Deferred(self._cancel)
        self._pending: defer.Deferred[IResponse] | None = None
        self._timer: Any = None
        self._timed_out = False
        self._client_gone = False
        self._cancelled = False
        self._error: GpumgrError | None = None
        #: The upstream's transport, once its body is read (stopped to abort it).
        self._upstream_transport: Any = None
        self._outcome: Outcome | None = None
        self._idle_timer: Any = None
        self._stall_timer: Any = None
        self._upstream_idle = False
        self._producer: IBodyProducer | None = None

    @property
    def client_gone(self) -> bool:
        return self._client_gone

    def start(self) -> None:
        self.request.notifyFinish().addErrback(self._client_left)
        if self._client_gone or self.request._disconnected:
            self._client_gone = True
            self._end(Outcome.CLIENT_GONE)
            return
        # The Site routes HEAD as GET; the consumer gets the HEAD it was sent.
        method = b"HEAD" if getattr(self.request, "answering_head", False) else self.request.method
        producer = body_producer(self.request.content, method, self._cooperator)
        headers = forward_request_headers(self.request.requestHeaders, client_ip(self.request))
        self._producer = producer
        self._reached = True
        self._pending = self._agent.request(method, self._url, headers, producer)
        self._timer = self._clock.callLater(self._request_timeout_s, self._time_out)
        self._pending.addCallbacks(self._got_response, self._request_failed)

    # -- before the response headers ---------------------------------------

    def _time_out(self) -> None:
        self._timer = None
        self._timed_out = True
        if self._pending is not None:
            self._pending.cancel()

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _request_failed(self, failure: Failure) -> None:
        self._pending = None
        self._stop_timer()
        if self._client_gone:
            self._end(Outcome.CLIENT_GONE)
            return
        if self._timed_out:
            reason = f"no response headers within {self._request_timeout_s:g}s"
            err: GpumgrError = UpstreamTimeout(
                f"{self._consumer} sent {reason}", consumer=self._consumer
            )
            self._on_upstream_error(self._consumer, True, reason)
        else:
            reason = describe_failure(failure)
            if isinstance(failure.value, (ConnectError, DNSLookupError)):
                self._reached = False  # never connected: the consumer saw nothing
            err = UpstreamUnreachable(
                f"{self._consumer} could not be reached: {reason}", consumer=self._consumer
            )
            self._on_upstream_error(self._consumer, False, reason)
        self._refuse(err)

    def _refuse(self, err: GpumgrError) -> None:
        self._status = err.status
        self._error = err
        self._end(Outcome.REFUSED)

    def _got_response(self, response: IResponse) -> None:
        self._pending = None
        self._stop_timer()
        self._status = response.code
        if self._on_head is not None:
            self._on_head(response.code)
        if self._client_gone and self.finish_upstream:
            response.deliverBody(Drain(self))
            return
        if self._client_gone:
            response.deliverBody(Discard())
            self._end(Outcome.CLIENT_GONE)
            return
        if self._hold_oom and response.code >= 500:
            response.deliverBody(Relay(self, response, holding=True))
            return
        self.send_head(response)
        response.deliverBody(Relay(self, response, holding=False))

    def send_head(self, response: IResponse) -> None:
        """Status and headers onto the client response (written with the first byte)."""
        request = self.request
        request.setResponseCode(response.code, response.phrase)
        # twisted.web would invent "Content-Type: text/html"; relay what upstream said.
        request.defaultContentType = None
        copy_response_headers(response.headers, request.responseHeaders)
        if response.length is not UNKNOWN_LENGTH:
            request.responseHeaders.setRawHeaders(
                b"Content-Length", [str(response.length).encode("ascii")]
            )
        for name, value in self._extra_headers:
            if name.lower() == b"set-cookie":  # the service's own cookies stay
                request.responseHeaders.addRawHeader(name, value)
            else:
                request.responseHeaders.setRawHeaders(name, [value])

    # -- during the body ---------------------------------------------------

    def hold_started(self, transport: Any) -> None:
        self._upstream_transport = transport
        self._idle_timer = self._clock.callLater(self._timeouts.body_idle_s, self._upstream_went_idle)

    def hold_data(self) -> None:
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.reset(self._timeouts.body_idle_s)

    def out_of_memory(self, body: bytes) -> None:
        self._stop_body_timers()
        self._upstream_transport = None
        if self._client_gone:
            self._end(Outcome.CLIENT_GONE)
            return
        log.warn("{consumer} answered out of memory: {body}",
                 consumer=self._consumer, body=body[:200].decode("utf-8", "replace"))
        self._end(Outcome.OOM)

    def body_started(self, transport: Any) -> None:
        self._upstream_transport = transport
        self.request.registerProducer(WatchedProducer(transport, self), True)
        self._idle_timer = self._clock.callLater(self._timeouts.body_idle_s, self._upstream_went_idle)

    def body_data(self, data: bytes) -> None:
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.reset(self._timeouts.body_idle_s)
        self._bytes_out += len(data)
        self.capture(data)
        if not self._client_gone:
            self.request.write(data)

    def capture(self, data: bytes) -> None:
        if self._capture_left > 0:
            self._captured.append(data[: self._capture_left])
            self._capture_left -= len(self._captured[-1])

    def client_paused(self) -> None:
        # The upstream cannot send while we are paused; that is not its idleness.
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.cancel()
        if self._stall_timer is None or not self._stall_timer.active():
            self._stall_timer = self._clock.callLater(
                self._timeouts.client_stall_s, self._client_stalled)

    def client_resumed(self) -> None:
        if self._stall_timer is not None and self._stall_timer.active():
            self._stall_timer.cancel()
        if self._outcome is None and self._upstream_transport is not None:
            if self._idle_timer is None or not self._idle_timer.active():
                self._idle_timer = self._clock.callLater(
                    self._timeouts.body_idle_s, self._upstream_went_idle)

    def _client_stalled(self) -> None:
        log.warn(
            "client of {consumer} read nothing for {s:g}s; dropping it to free the GPU",
            consumer=self._consumer, s=self._timeouts.client_stall_s,
        )
        self._client_gone = True
        abort_client(self.request)
        if self._upstream_transport is not None:
            self._upstream_transport.stopProducing()

    def _upstream_went_idle(self) -> None:
        reason = f"sent no body data for {self._timeouts.body_idle_s:g}s"
        log.warn("{consumer} {reason}; aborting the exchange",
                 consumer=self._consumer, reason=reason)
        self._upstream_idle = True
        self._on_upstream_error(self._consumer, True, reason)
        if self._upstream_transport is not None:
            self._upstream_transport.stopProducing()

    def _stop_body_timers(self) -> None:
        for timer in (self._idle_timer, self._stall_timer):
            if timer is not None and timer.active():
                timer.cancel()

    def body_ended(self, reason: Failure) -> None:
        self._stop_body_timers()
        if self.request.channel is not None and self.request.producer is not None:
            self.request.unregisterProducer()
        self._upstream_transport = None
        if self._client_gone:
            self._end(Outcome.CLIENT_GONE)
        elif self._upstream_idle:
            abort_client(self.request)
            self._end(Outcome.UPSTREAM_BROKE)
        elif isinstance(reason.value, (ResponseDone, PotentialDataLoss)):
            # PotentialDataLoss: no length, no chunking, ended by close -- the
            # normal end of an HTTP/1.0-style body.
            self.request.finish()
            self._end(Outcome.COMPLETED)
        else:
            why = describe_failure(reason)
            log.warn(
                "{consumer} broke mid-body ({why}); aborting the client",
                consumer=self._consumer,
                why=why,
            )
            self._on_upstream_error(self._consumer, True, f"broke mid-body: {why}")
            abort_client(self.request)
            self._end(Outcome.UPSTREAM_BROKE)

    # -- either phase ------------------------------------------------------

    def _client_left(self, failure: Failure) -> None:
        if self._outcome is not None:
            return
        self._client_gone = True
        if self.finish_upstream:
            return  # the answer is read to its end all the same (see forward)
        if self._pending is not None:
            self._pending.cancel()
        elif self._upstream_transport is not None:
            self._upstream_transport.stopProducing()

    def _cancel(self, _d: object) -> None:
        """The job was cancelled (shutdown): drop both sides now."""
        if self._outcome is not None:
            return
        self._client_gone = True
        self._cancelled = True
        abort_client(self.request)
        if self._pending is not None:
            self._pending.cancel()
        elif self._upstream_transport is not None:
            self._upstream_transport.stopProducing()
        self._end(Outcome.CLIENT_GONE)

    def _end(self, outcome: Outcome) -> None:
        if self._outcome is not None:
            return
        self._outcome = outcome
        self._stop_timer()
        self._stop_body_timers()
        producer = self._producer
        if isinstance(producer, SpooledBodyProducer) and producer.sending:
            producer.stopProducing()  # silent: its Deferred just never fires
        if not self.done.called:
            self.done.callback(Result(outcome, self._status, self._reached,
                                      b"".join(self._captured), self._bytes_out,
                                      self._cancelled, self._error))


class StreamingProxy:
    def __init__(
        self, clock: IReactorTime, cooperator: Cooperator, on_upstream_error: UpstreamErrorHook
    ) -> None:
        self._clock = clock
        self._cooperator = cooperator
        self._on_upstream_error = on_upstream_error

    def forward(
        self,
        request: Any,
        consumer: str,
        agent: IAgent,
        url: bytes,
        timeouts: Timeouts,
        extra_headers: Sequence[tuple[bytes, bytes]] = (),
        hold_oom: bool = False,
        capture_bytes: int = 0,
        finish_upstream: bool = False,
        on_head: Callable[[int], None] | None = None,
    ) -> defer.Deferred[Result]:
        """Relay `request` to `url`. With `hold_oom`, an out-of-memory answer
        is not relayed: the Result's outcome is OOM and the caller may replay.
        With `capture_bytes`, the Result carries the body's first bytes (a
        copy; the body is streamed all the same). With `finish_upstream`, a
        client that leaves does not cancel the exchange: the answer is read
        to its end (under the same deadlines) so that the GPU work it names
        can be followed; the outcome is still CLIENT_GONE. `on_head` is told the
        status as soon as the answer's head arrives."""
        exchange = _Exchange(
            self._clock,
            self._cooperator,
            request,
            consumer,
            agent,
            url,
            timeouts,
            list(extra_headers),
            self._on_upstream_error,
            hold_oom,
            capture_bytes,
            finish_upstream,
            on_head,
        )
        exchange.start()
        return exchange.done
