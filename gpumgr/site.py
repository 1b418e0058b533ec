"""The HTTP layer below the Resource tree: the Site, its channel and its Request.

What must hold before any Resource runs lives here, so that no client,
however slow, silent or malformed, can starve the others or `/healthz`:

- connections: at most `limits.max_connections`; at the cap, an idle or
  head-dawdling connection is shed for the newcomer, else it gets 503;
  `limits.reserved_connections` of them only serve /healthz, /v1/status,
  /metrics and admin, so tunnels and uploads never take the last one;
- time: a deadline for the whole request head, for an idle kept-alive
  connection, and for a request body that stalls, trickles or simply takes
  longer than `limits.max_upload_s` (408);
- size: request line (414), header count and bytes (431), the body (413)
  and all bodies spooled at once (507);
- hygiene: one Host header on HTTP/1.1, a printable request target (400),
  HEAD answered wherever GET is.

Every refusal is a JSON error (`errors.raw_error_response`) written straight
to the socket, then the connection is closed; nothing refused reaches a
Resource. twisted.web's own idle timeout (`Site.timeOut`) is switched off:
it restarts on every byte, so a client sending one byte a second is never
timed out, and it is off while a request is handled. The deadlines below
replace it, and while a request is handled there is none, so long streamed
responses are never cut (the proxy's client_stall_timeout_s covers those).
"""

from __future__ import annotations

import collections
import io
import math
import re
import resource as _resource
from typing import Any, Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource

from gpumgr.config import LimitsConfig
from gpumgr.errors import (
    BadRequest,
    BodyTooLarge,
    GpumgrError,
    HeadersTooLarge,
    MethodNotAllowed,
    RequestTimeout,
    SpoolFull,
    TooManyConnections,
    UriTooLong,
    raw_error_response,
    write_error,
)
from gpumgr.limits import ConnectionTable, Phase, SpoolLedger, body_deadline, plan_fds, \
    refusing_allowance

log = Logger()

#: How long a refused client may go on sending before the connection is cut;
#: enough for it to read the answer.
_LINGER_S = 2.0
#: Bodies above this (or of unknown length) are read in bigger gulps: Twisted
#: reads 64 KiB per recv(), and a 256 KiB read made a 256 MiB upload ~3x
#: faster in the bench; small requests keep the default, which suits them.
_BULK_BODY_BYTES = 1024 * 1024
_BULK_READ_BYTES = 256 * 1024

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


#: twisted.web.http is a deprecation proxy: every attribute read through it is slow.
_HTTPChannel = http.HTTPChannel


class GpumgrChannel(_HTTPChannel):
    """An HTTP/1.1 connection with deadlines, size limits and a place in the cap."""

    site: GpumgrSite  # set by Site.buildProtocol before connectionMade
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


class LimitedRequest(server.Request):
    """A Request that enforces the body limits and answers HEAD like GET.

    A declared Content-Length over `max_body_mib`, or that would take the
    spool past `max_spool_mib`, is refused before the body is read (and
    before any `100 Continue`); a chunked body is refused as soon as its
    running size passes either. The spool reservation is given back when
    the request finishes or its connection drops, whichever comes first.
    """

    channel: GpumgrChannel
    content: Any
    #: True for a HEAD request, routed as GET; twisted.web drops the body.
    answering_head = False
    _abandoned = False
    _received = 0
    _reserved = 0
    _spool: SpoolLedger | None = None

    def gotLength(self, length: int | None) -> None:
        channel = self.channel
        site = channel.site
        limit = site.max_body_bytes
        if length is not None and length > limit:
            channel.refuse(BodyTooLarge(
                f"request body of {length} bytes exceeds the {limit}-byte limit"))
            return
        if length and not self._reserve(site.spool, length):
            channel.refuse(SpoolFull(
                f"gpumgr is already holding {site.spool.used_bytes} bytes of uploads; "
                f"{length} more would pass limits.max_spool_mib", retry_after_s=5))
            return
        if length is None or length > _BULK_BODY_BYTES:
            transport = channel.transport
            if hasattr(transport, "bufferSize"):
                transport.bufferSize = _BULK_READ_BYTES
        super().gotLength(length)  # type: ignore[no-untyped-call]

    def handleContentChunk(self, data: bytes) -> None:
        if self._abandoned:
            return
        channel = self.channel
        self._received += len(data)
        channel.body_progress(len(data))
        site = channel.site
        limit = site.max_body_bytes
        if self._received > limit:
            channel.refuse(BodyTooLarge(f"request body exceeds the {limit}-byte limit"))
            return
        more = self._received - self._reserved
        if more > 0 and not self._reserve(site.spool, more):
            channel.refuse(SpoolFull(
                f"gpumgr is already holding {site.spool.used_bytes} bytes of uploads; "
                "this body would pass limits.max_spool_mib", retry_after_s=5))
            return
        super().handleContentChunk(data)  # type: ignore[no-untyped-call]

    def _reserve(self, spool: SpoolLedger, n: int) -> bool:
        if not spool.reserve(n):
            return False
        if self._spool is None:
            self._spool = spool
            self.notifyFinish().addBoth(self._release)
        self._reserved += n
        return True

    def _release(self, _: Any = None) -> None:
        if self._spool is not None and self._reserved:
            self._spool.release(self._reserved)
        self._reserved = 0

    def abandon(self) -> None:
        """The channel refused this request: drop what was spooled, at once."""
        self._abandoned = True
        if self.content is not None:
            self.content.close()
        self.content = io.BytesIO()
        self._release()

    def process(self) -> None:
        if self.method == b"HEAD":
            # Route as GET, so every GET route answers HEAD; the first write
            # turns the method back, and twisted.web then sends headers only.
            self.method = b"GET"
            self.answering_head = True
            self.write = self._write_head  # type: ignore[method-assign]
        super().process()  # type: ignore[no-untyped-call]

    def _write_head(self, data: bytes) -> None:
        del self.write  # back to the class's write
        self.method = b"HEAD"
        self.write(data)  # type: ignore[no-untyped-call]

    def processingFailed(self, reason: Failure) -> None:
        """A Resource raised: log it, and answer JSON rather than twisted.web's HTML page."""
        log.failure("rendering {method} {uri} failed", reason,
                    method=self.method, uri=self.uri)
        if self._disconnected or self.finished:
            return
        if self.startedWriting:
            # Half a response must never look complete.
            self.channel.transport.abortConnection()
            return
        write_error(self, GpumgrError("internal error; see the gpumgr log"))

    def _handleStar(self) -> None:
        if self.method == b"OPTIONS":
            super()._handleStar()  # type: ignore[no-untyped-call]
        else:
            write_error(self, MethodNotAllowed(self.method.decode("ascii", "replace"),
                                               ("OPTIONS",)))


RlimitGetter = Callable[[int], tuple[int, int]]
RlimitSetter = Callable[[int, tuple[int, int]], None]


class GpumgrSite(server.Site):
    requestFactory = LimitedRequest
    protocol = GpumgrChannel  # type: ignore[assignment]

    def __init__(
        self,
        resource: Resource,
        clock: IReactorTime,
        limits: LimitsConfig,
        getrlimit: RlimitGetter = _resource.getrlimit,
        setrlimit: RlimitSetter = _resource.setrlimit,
    ) -> None:
        # parsePOSTFormSubmission: twisted.web would otherwise read a whole form
        # or multipart body into memory to fill request.args (and answer 400
        # itself when it is malformed). A proxy forwards bodies; never parses.
        super().__init__(resource, reactor=clock, parsePOSTFormSubmission=False)  # type: ignore[no-untyped-call]
        self.timeOut = None  # the channel's own deadlines replace it (module docstring)
        self.clock = clock
        self.limits = limits
        self.max_body_bytes = limits.max_body_bytes
        self.spool = SpoolLedger(limits.max_spool_bytes)
        self.connections: ConnectionTable[GpumgrChannel] = ConnectionTable(
            limits.max_connections, limits.reserved_connections)
        #: error code (or "shed") -> how many times; for status and tests.
        self.refusals: collections.Counter[str] = collections.Counter()
        self.displayTracebacks = False
        self._getrlimit = getrlimit
        self._setrlimit = setrlimit

    def startFactory(self) -> None:
        super().startFactory()
        self._fit_fd_limit()

    def _fit_fd_limit(self) -> None:
        """Keep the connection cap below the descriptor limit (see limits.plan_fds)."""
        kind = _resource.RLIMIT_NOFILE
        soft, hard = self._getrlimit(kind)
        configured = self.limits.max_connections
        plan = plan_fds(configured, soft, hard)
        if plan.raise_soft_to is not None:
            try:
                self._setrlimit(kind, (plan.raise_soft_to, hard))
                soft = plan.raise_soft_to
            except (ValueError, OSError) as e:
                log.warn("could not raise the open-file limit from {soft} to {want}: {e}",
                         soft=soft, want=plan.raise_soft_to, e=e)
                plan = plan_fds(configured, soft, soft)
        if plan.max_connections < configured:
            log.warn(
                "limits.max_connections {configured} does not fit the open-file limit "
                "{soft} (systemd: LimitNOFILE); serving at most {cap} connections",
                configured=configured, soft=soft, cap=plan.max_connections)
        self.connections.max_connections = plan.max_connections

    def log(self, request: Any) -> None:
        # twisted.web's access line is off: gpumgr writes its own, one per
        # proxied request with its consumer, wait and GPU time (gpumgr.accounting).
        pass
