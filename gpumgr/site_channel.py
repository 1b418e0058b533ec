"""One HTTP/1.1 connection with deadlines, size limits and a place in the cap.

The head and keep-alive deadlines, the body deadline (checked lazily by one
timer), the request line and header limits, the connection cap with its
shedding and reserved connections, and every refusal: a JSON error written
straight to the socket, then a half-close (see gpumgr.site for the whole
picture). The decisions themselves are pure, in gpumgr.limits.
"""

from __future__ import annotations

import collections
import math
import re
from typing import Any, Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure
from twisted.web import http

from gpumgr.config import LimitsConfig
from gpumgr.errors import (
    BadRequest,
    GpumgrError,
    HeadersTooLarge,
    RequestTimeout,
    TooManyConnections,
    UriTooLong,
    raw_error_response,
)
from gpumgr.limits import ConnectionTable, Phase, body_deadline, refusing_allowance
from gpumgr.site_request import LimitedRequest, SiteLimits

#: How long a refused client may go on sending before the connection is cut;
#: enough for it to read the answer.
_LINGER_S = 2.0

_METHOD_RE = re.compile(rb"\A[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
#: What an HTTP client (twisted.web's Agent included) can send on: visible ASCII.
_TARGET_RE = re.compile(rb"\A[\x21-\x7e]+\Z")


def request_line_problem(line: bytes, max_bytes: int) -> GpumgrError | None:
    """Why a request line is refused, or None (pure)."""
    if len(line) > max_bytes:
        return UriTooLong(f"request line of {len(line)} bytes exceeds the {max_bytes}-byte limit")
    parts = line.split(b" ")
    if len(parts) != 3:
        return BadRequest("malformed request line; expected 'METHOD target HTTP/1.1'")
    method, target, version = parts
    if not _METHOD_RE.match(method):
        return BadRequest("malformed request method")
    if not _TARGET_RE.match(target):
        return BadRequest("the request target must be printable ASCII without spaces "
                          "(percent-encode anything else)")
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        return BadRequest("only HTTP/1.0 and HTTP/1.1 are spoken here")
    return None



class ChannelSite(SiteLimits, Protocol):
    """What a channel reads from its Site (gpumgr.site.GpumgrSite)."""

    clock: IReactorTime
    limits: LimitsConfig
    connections: ConnectionTable[GpumgrChannel]
    refusals: collections.Counter[str]


#: twisted.web.http is a deprecation proxy: every attribute read through it is slow.
_HTTPChannel = http.HTTPChannel


class GpumgrChannel(_HTTPChannel):
    """An HTTP/1.1 connection with deadlines, size limits and a place in the cap."""

    site: ChannelSite  # set by Site.buildProtocol before connectionMade
    #: A TCP transport (write, loseWriteConnection, abortConnection, bufferSize).
    transport: Any

    _clock: IReactorTime
    _limits: LimitsConfig
    _phase = Phase.HEAD
    #: When the current phase runs out (inf: never). The one timer below fires
    #: at or before it and re-checks, so a phase change rarely touches the
    #: timer: on a busy kept-alive connection, about once per header_timeout_s.
    _deadline_at = math.inf
    _timer: IDelayedCall | None = None
    _timer_at = math.inf
    _abort_call: IDelayedCall | None = None
    _refusing = False
    _saw_request_line = False
    _header_bytes = 0
    _header_count = 0
    _body_started = 0.0
    _body_last = 0.0
    _body_received = 0

    # -- connection life --------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()  # type: ignore[no-untyped-call]
        self._clock = self.site.clock
        self._limits = limits = self.site.limits
        # LineReceiver cuts any line longer than this (lineLengthExceeded);
        # HTTPChannel's own limits are set above ours so ours speak first.
        self.MAX_LENGTH = max(limits.max_request_line_bytes, limits.max_header_bytes)
        self.totalHeadersSize = (limits.max_request_line_bytes + limits.max_header_bytes
                                 + 2 * limits.max_headers + 2)
        self.maxHeaders = limits.max_headers + 1
        table = self.site.connections
        admitted, victim = table.admit(self, self._clock.seconds())
        if victim is not None:
            self.site.refusals["shed"] += 1
            victim.shed()
        if admitted:
            self._start_head()
            return
        self._phase = Phase.CLOSING
        self.site.refusals[TooManyConnections.code] += 1
        if table.refusing >= refusing_allowance(table.max_connections):
            self.transport.abortConnection()  # a flood: free the descriptor now, no answer
            return
        table.refusing += 1
        self._refusing = True
        self._close_with(TooManyConnections(
            f"gpumgr is serving its limit of {table.max_connections} connections",
            retry_after_s=1))

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._phase = Phase.CLOSING
        self._stop_timer()
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self.site.connections.forget(self)
        if self._refusing:
            self._refusing = False
            self.site.connections.refusing -= 1
        super().connectionLost(reason)  # type: ignore[no-untyped-call]

    def shed(self) -> None:
        """Give up this idle or dawdling connection so a newcomer fits under the cap.

        A close, not a reset: the tail of an earlier response may still be
        on its way to a slow reader. With nothing left to send, the
        descriptor is freed at once; otherwise within the linger.
        """
        self._set_phase(Phase.CLOSING)
        self.persistent = False
        self.loseConnection()  # type: ignore[no-untyped-call]
        self._abort_after(_LINGER_S)

    # -- phases and their deadlines ---------------------------------------

    def _set_phase(self, phase: Phase) -> None:
        now = self._clock.seconds()
        self._phase = phase
        self.site.connections.moved(self, phase, now)
        limits = self._limits
        if phase is Phase.HEAD:
            self._deadline_at = now + limits.header_timeout_s
        elif phase is Phase.IDLE:
            self._deadline_at = now + limits.keepalive_timeout_s
        elif phase is Phase.BODY:
            self._body_started = self._body_last = now
            self._body_received = 0
            self._deadline_at = self._body_deadline()[0]
        else:
            self._deadline_at = math.inf
            if phase is Phase.CLOSING:
                self._stop_timer()
            return
        if self._deadline_at < self._timer_at:
            self._arm(self._deadline_at)

    def _start_head(self) -> None:
        self._saw_request_line = False
        self._header_bytes = 0
        self._header_count = 0
        self._set_phase(Phase.HEAD)

    def _body_deadline(self) -> tuple[float, str]:
        limits = self._limits
        return body_deadline(self._body_started, self._body_last, self._body_received,
                             limits.body_idle_timeout_s, limits.min_body_rate_grace_s,
                             limits.min_body_rate_bytes_s, limits.max_upload_s)

    def body_progress(self, n: int) -> None:
        """Body bytes arrived; the deadline is re-checked lazily when its timer fires."""
        self._body_received += n
        self._body_last = self._clock.seconds()

    def _arm(self, at: float) -> None:
        self._stop_timer()
        self._timer_at = at
        self._timer = self._clock.callLater(max(0.0, at - self._clock.seconds()), self._tick)

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._timer_at = math.inf

    def _tick(self) -> None:
        """The timer fired: act if the current phase has run out, else wait for it."""
        self._timer = None
        self._timer_at = math.inf
        why = ""
        if self._phase is Phase.BODY:
            self._deadline_at, why = self._body_deadline()
        if self._deadline_at == math.inf:
            return  # busy or closing: a later phase change arms the timer again
        if self._clock.seconds() < self._deadline_at:
            self._arm(self._deadline_at)
            return
        limits = self._limits
        if self._phase is Phase.HEAD:
            self.refuse(RequestTimeout(
                f"the request head did not arrive within {limits.header_timeout_s:g} s"))
        elif self._phase is Phase.IDLE:
            self._set_phase(Phase.CLOSING)
            self.persistent = False
            self.loseConnection()  # type: ignore[no-untyped-call]
            self._abort_after(_LINGER_S)
        elif why == "idle":
            self.refuse(RequestTimeout(
                f"no request body bytes for {limits.body_idle_timeout_s:g} s"))
        elif why == "long":
            self.refuse(RequestTimeout(
                f"the request body did not arrive within limits.max_upload_s "
                f"({limits.max_upload_s:g} s)"))
        else:
            self.refuse(RequestTimeout(
                f"the request body arrived slower than {limits.min_body_rate_kib_s:g} KiB/s"))

    # -- refusing ------------------------------------------------------------

    def refuse(self, error: GpumgrError) -> None:
        """Answer `error` instead of the request being read, and close."""
        if self._phase is Phase.CLOSING:
            return
        self.site.refusals[error.code] += 1
        for request in self.requests:
            if isinstance(request, LimitedRequest):
                request.abandon()
        table = self.site.connections
        if self in table:
            # Its place goes to the next client at once: it lingers to read its
            # answer as a refused connection, so a stream of refused requests
            # cannot hold the reserved connections either.
            table.forget(self)
            if table.refusing >= refusing_allowance(table.max_connections):
                self._set_phase(Phase.CLOSING)
                self.transport.abortConnection()
                return
            table.refusing += 1
            self._refusing = True
        self._close_with(error)

    def _close_with(self, error: GpumgrError) -> None:
        self._set_phase(Phase.CLOSING)
        self.persistent = False
        transport = self.transport
        transport.write(raw_error_response(error))
        self._abort_after(_LINGER_S)
        # Half-close and keep reading (and discarding): closing with unread
        # input would send a reset, and the client might lose the answer.
        if hasattr(transport, "loseWriteConnection"):
            transport.loseWriteConnection()
        else:  # pragma: no cover - non-TCP transports
            transport.loseConnection()

    def _abort_after(self, seconds: float) -> None:
        if self._abort_call is None or not self._abort_call.active():
            self._abort_call = self._clock.callLater(seconds, self.transport.abortConnection)

    def _respondToBadRequestAndDisconnect(self) -> None:
        # twisted.web's answer is a bare "400 Bad Request" with no body.
        self.refuse(BadRequest("malformed request: a bad header line, Content-Length, "
                               "Transfer-Encoding or chunked body"))

    def _send100Continue(self) -> None:
        if self._phase is not Phase.CLOSING:
            super()._send100Continue()  # type: ignore[no-untyped-call]

    # -- parsing hooks ---------------------------------------------------------

    # Called for every line and every read: kept lean (the base class is
    # called directly, phases are compared by identity).

    def dataReceived(self, data: bytes) -> None:
        phase = self._phase
        if phase is not Phase.HEAD:
            if phase is Phase.CLOSING:
                return
            if phase is Phase.IDLE:
                self._start_head()
        _HTTPChannel.dataReceived(self, data)

    def rawDataReceived(self, data: bytes) -> None:
        if self._phase is not Phase.CLOSING:
            _HTTPChannel.rawDataReceived(self, data)

    def lineReceived(self, line: bytes) -> None:
        phase = self._phase
        if phase is not Phase.HEAD:
            if phase is Phase.CLOSING:
                return
            if phase is Phase.IDLE:  # pipelined bytes replayed after a response
                self._start_head()
        if self._saw_request_line:
            if line:
                # Every line counts, folded continuation lines too.
                self._header_bytes += len(line) + 2
                self._header_count += 1
                if (self._header_bytes > self._limits.max_header_bytes
                        or self._header_count > self._limits.max_headers):
                    self._refuse_headers()
                    return
        elif line:
            problem = request_line_problem(line, self._limits.max_request_line_bytes)
            if problem is not None:
                self.refuse(problem)
                return
            if not self.site.connections.claim(self, line.split(b" ")[1]):
                self._refuse_general()
                return
            self._saw_request_line = True
        _HTTPChannel.lineReceived(self, line)

    def _refuse_general(self) -> None:
        table = self.site.connections
        self.refuse(TooManyConnections(
            f"gpumgr is serving its limit of {table.general_cap} requests; the other "
            f"{table.max_connections - table.general_cap} connections are kept for "
            "/healthz, /v1/status, /metrics and admin", retry_after_s=1))

    def _refuse_headers(self) -> None:
        limits = self._limits
        if self._header_count > limits.max_headers:
            self.refuse(HeadersTooLarge(f"more than {limits.max_headers} request header lines"))
        else:
            self.refuse(HeadersTooLarge(
                f"request headers exceed the {limits.max_header_bytes}-byte limit"))

    def lineLengthExceeded(self, line: bytes) -> None:
        limits = self._limits
        if not self._saw_request_line:
            self.refuse(UriTooLong(
                f"request line exceeds the {limits.max_request_line_bytes}-byte limit"))
        else:
            self.refuse(HeadersTooLarge(
                f"a request header line exceeds the {limits.max_header_bytes}-byte limit"))

    def allHeadersReceived(self) -> None:
        if self._phase is Phase.CLOSING:
            return
        request = self.requests[-1]
        hosts = request.requestHeaders.getRawHeaders(b"host") or []
        if len(hosts) > 1:
            self.refuse(BadRequest("more than one Host header"))
            return
        if not hosts and self._version == b"HTTP/1.1":
            self.refuse(BadRequest("HTTP/1.1 requests must carry a Host header"))
            return
        if self.length != 0 and not self.site.connections.claim_body(self, self.length):
            self._refuse_general()
            return
        super().allHeadersReceived()  # type: ignore[no-untyped-call]
        if self._phase is Phase.HEAD and self.length != 0:
            self._set_phase(Phase.BODY)

    def allContentReceived(self) -> None:
        if self._phase is Phase.CLOSING:
            return
        self._set_phase(Phase.BUSY)
        super().allContentReceived()  # type: ignore[no-untyped-call]

    def requestDone(self, request: http.Request) -> None:
        if self.persistent:
            # Before super(): it replays pipelined bytes, which start the next head.
            self._set_phase(Phase.IDLE)
        else:
            self._set_phase(Phase.CLOSING)
            # The tail of the response may still be buffered; a client that
            # never reads it must not keep the descriptor for ever.
            self._abort_after(self._limits.client_stall_timeout_s)
        super().requestDone(request)  # type: ignore[no-untyped-call]
