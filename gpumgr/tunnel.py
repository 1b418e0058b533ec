"""WebSocket pass-through: after the upstream's `101 Switching Protocols`,
a byte tunnel between the client and the consumer.

gpumgr does not speak WebSocket; it relays the upgrade request, the 101 and
then bytes both ways, with backpressure (each side's transport is the other's
producer), until either side closes, which closes the other. A consumer that
refuses the upgrade has its (small) answer relayed as an ordinary response.
Tunnels are never scheduled: a ComfyUI progress socket must not wait for the
GPU, or hold it. They are capped (`limits.max_tunnels`, in the broker) and
closed after `limits.tunnel_idle_timeout_s` without a byte either way.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable
from urllib.parse import urlsplit

from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from gpumgr.errors import (
    GpumgrError,
    TooManyConnections,
    UpgradeNotSupported,
    UpstreamTimeout,
    UpstreamUnreachable,
    describe_failure,
)
from gpumgr.config import ConsumerConfig, LimitsConfig
from gpumgr.proxy import forward_request_headers
from gpumgr.target import Target

log = Logger()

#: The upstream's answer head must fit in this; an error body is read up to it too.
_HEAD_LIMIT = 64 * 1024
#: Kept for the upgrade: the rest of the hop-by-hop set is dropped as usual.
_UPGRADE_HEADERS = (b"upgrade", b"connection")


def is_upgrade(request: Any) -> bool:
    return bool(request.getHeader(b"upgrade"))


def check_upgrade(request: Any) -> None:
    """Only WebSocket upgrades are relayed; anything else is a 501."""
    value = (request.getHeader(b"upgrade") or b"").strip().lower()
    if value != b"websocket":
        raise UpgradeNotSupported(
            f"only 'Upgrade: websocket' is relayed, not {value.decode('latin-1')!r}")
    if request.method != b"GET":
        raise UpgradeNotSupported("a WebSocket upgrade must be a GET")


def upgrade_request_head(request: Any, host_header: bytes, path_and_query: bytes,
                         client_ip: str | None) -> bytes:
    """The upgrade request as sent upstream (pure but for reading `request`)."""
    headers: Headers = forward_request_headers(request.requestHeaders, client_ip)
    headers.setRawHeaders(b"Upgrade", [request.getHeader(b"upgrade")])
    headers.setRawHeaders(b"Connection", [b"Upgrade"])
    lines = [b"GET " + path_and_query + b" HTTP/1.1", b"Host: " + host_header]
    for name, values in headers.getAllRawHeaders():
        if name.lower() == b"host":
            continue
        lines += [name + b": " + v for v in values]
    return b"\r\n".join(lines) + b"\r\n\r\n"


_TOKEN = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def parse_response_head(head: bytes) -> tuple[int, list[tuple[bytes, bytes]]]:
    """Status code and headers of an HTTP/1.1 response head (pure); ValueError
    for anything that is not one (a bad header name included)."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP response: {lines[0][:80]!r}")
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.match(name) or b"\n" in value or b"\r" in value:
            raise ValueError(f"bad header line {line[:80]!r}")
        headers.append((name.strip(), value.strip()))
    return int(parts[1]), headers


class _Side(Protocol):
    """One end of a tunnel: what it receives goes to the other end.

    On the client's end, `then` is the HTTP channel's own connectionLost: the
    upgrade took over its bytes, but the channel still has to leave the
    connection table and finish its request (which gives its spool back).
    """

    def __init__(self, tunnel: Tunnel, then: Callable[[Failure], None] | None = None) -> None:
        self._tunnel = tunnel
        self._then = then
        self.peer: Any = None  # the other side's transport

    def dataReceived(self, data: bytes) -> None:
        self._tunnel.touched()
        if self.peer is not None:
            self.peer.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._tunnel.side_closed(self)
        if self._then is not None:
            then, self._then = self._then, None
            then(reason)


class _Upstream(Protocol):
    """Sends the upgrade request, reads the answer's head, then becomes a side."""

    def __init__(self, tunnel: Tunnel, head: bytes) -> None:
        self._tunnel = tunnel
        self._head = head
        self._buffer = b""
        self.side: _Side | None = None
        #: A refused upgrade: (status, headers, declared length or None), body in _buffer.
        self._refusal: tuple[int, list[tuple[bytes, bytes]], int | None] | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self._head)

    def dataReceived(self, data: bytes) -> None:
        if self.side is not None:
            self.side.dataReceived(data)
            return
        self._buffer += data
        if self._refusal is not None:
            self._refusal_body()
            return
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > _HEAD_LIMIT:
                self._tunnel.failed("the upgrade answer's head is too large")
            return
        head, rest = self._buffer[: end + 4], self._buffer[end + 4:]
        self._buffer = b""
        try:
            status, headers = parse_response_head(head)
        except ValueError as e:
            self._tunnel.failed(str(e))
            return
        if status == 101:
            self._tunnel.upgraded(self, head, rest)
            return
        # A refusal: relay it once its (small) body is all here.
        lengths = [v for n, v in headers if n.lower() == b"content-length"]
        length = int(lengths[0]) if lengths and lengths[0].isdigit() else None
        self._refusal = (status, headers, length)
        self._buffer = rest
        self._refusal_body()

    def _refusal_body(self, closed: bool = False) -> None:
        assert self._refusal is not None
        status, headers, length = self._refusal
        if length is not None and len(self._buffer) >= length:
            self._tunnel.refused(status, headers, self._buffer[:length])
        elif len(self._buffer) > _HEAD_LIMIT:
            self._tunnel.failed("the answer refusing the upgrade is too large")
        elif closed:
            if length is None and not any(n.lower() == b"transfer-encoding" for n, _ in headers):
                self._tunnel.refused(status, headers, self._buffer)  # ended by close
            else:
                self._tunnel.failed("the connection closed in the middle of the answer "
                                    "refusing the upgrade")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.side is not None:
            self.side.connectionLost(reason)
        elif self._refusal is not None:
            self._refusal_body(closed=True)
        else:
            self._tunnel.upstream_closed_early()


class Tunnel:
    """One relayed WebSocket. `done` fires when both sides are closed."""

    def __init__(self, clock: IReactorTime, request: Any, consumer: str,
                 on_close: Callable[[Tunnel], None], idle_timeout_s: float = math.inf) -> None:
        self._clock = clock
        #: No byte either way for this long closes both sides.
        self.idle_timeout_s = idle_timeout_s
        self.last_byte_at = clock.seconds()
        self._idle_timer: Any = None
        self.request = request
        self.consumer = consumer
        self._on_close = on_close
        self.done: defer.Deferred[None] = defer.Deferred()
        self._upstream: _Upstream | None = None
        self._client_side: _Side | None = None
        self._upstream_side: _Side | None = None
        self._connecting: defer.Deferred[Any] | None = None
        self._timer: Any = None
        self._open = False
        self._ended = False

    def start(self, reactor: Any, url: str, path_and_query: bytes, connect_timeout_s: float,
              answer_timeout_s: float, client_ip: str | None) -> None:
        parts = urlsplit(url)
        host = parts.hostname or "localhost"
        port = parts.port or (443 if parts.scheme == "https" else 80)
        endpoint: Any = HostnameEndpoint(reactor, host, port, timeout=connect_timeout_s)
        if parts.scheme == "https":
            endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
        host_header = (parts.netloc or host).encode("idna")
        head = upgrade_request_head(self.request, host_header, path_and_query, client_ip)
        self._upstream = _Upstream(self, head)
        self._timer = self._clock.callLater(answer_timeout_s, self._answer_timed_out,
                                            answer_timeout_s)
        self.request.notifyFinish().addErrback(lambda _: self.close())
        self._connecting = connectProtocol(endpoint, self._upstream)
        self._connecting.addErrback(self._connect_failed)

    def _connect_failed(self, failure: Failure) -> None:
        self._connecting = None
        if not failure.check(defer.CancelledError):
            why = describe_failure(failure)
            self._refuse(UpstreamUnreachable(f"{self.consumer} could not be reached: {why}",
                                             consumer=self.consumer))

    def _answer_timed_out(self, seconds: float) -> None:
        self._timer = None
        self._refuse(UpstreamTimeout(f"{self.consumer} did not answer the upgrade within "
                                     f"{seconds:g}s", consumer=self.consumer))

    def upgraded(self, upstream: _Upstream, head: bytes, rest: bytes) -> None:
        """The consumer answered 101: from now on, bytes both ways."""
        self._stop_timer()
        request = self.request
        if request._disconnected or request.channel is None:
            self.close()
            return
        client_transport = request.channel.transport
        assert upstream.transport is not None and client_transport is not None
        self._open = True
        client_side = _Side(self, then=request.channel.connectionLost)
        upstream_side = _Side(self)
        client_side.peer, upstream_side.peer = upstream.transport, client_transport
        self._client_side, self._upstream_side = client_side, upstream_side
        upstream.side = upstream_side
        request.channel.setTimeout(None)
        client_transport.write(head)
        request.channel._protocolUpgradeForWebsockets(client_side)
        # Backpressure both ways: each transport pauses the other. The HTTP
        # channel was the client transport's producer until now.
        client_transport.unregisterProducer()
        client_transport.registerProducer(upstream.transport, True)
        client_transport.resumeProducing()
        upstream.transport.registerProducer(client_transport, True)  # type: ignore[attr-defined]
        if rest:
            client_transport.write(rest)
        self.touched()
        self.watch_idle()

    def touched(self) -> None:
        """Bytes moved one way or the other: the idle clock restarts."""
        self.last_byte_at = self._clock.seconds()

    def watch_idle(self) -> None:
        """One timer per tunnel, re-armed lazily: bytes only move `last_byte_at`."""
        if self.idle_timeout_s == math.inf or self._ended:
            return
        due = self.last_byte_at + self.idle_timeout_s
        self._idle_timer = self._clock.callLater(max(0.0, due - self._clock.seconds()),
                                                 self._idle_check)

    def _idle_check(self) -> None:
        self._idle_timer = None
        if self._clock.seconds() < self.last_byte_at + self.idle_timeout_s:
            self.watch_idle()
            return
        log.info("closing the WebSocket tunnel to {consumer}: no bytes either way for "
                 "{seconds:g} s (limits.tunnel_idle_timeout_s)", consumer=self.consumer,
                 seconds=self.idle_timeout_s)
        self.close()

    def refused(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """The consumer answered the upgrade with a plain response: relay it whole."""
        self._stop_timer()
        request = self.request
        if self._ended:
            return
        if not request._disconnected and not request.finished:
            request.setResponseCode(status)
            request.defaultContentType = None
            for name, value in headers:
                if name.lower() not in (b"connection", b"upgrade", b"transfer-encoding",
                                        b"content-length", b"keep-alive"):
                    request.responseHeaders.addRawHeader(name, value)
            request.setHeader(b"Content-Length", str(len(body)).encode("ascii"))
            request.write(body)
            request.finish()
        self._end()

    def upstream_closed_early(self) -> None:
        self.failed("the consumer closed the connection before answering the upgrade")

    def failed(self, why: str) -> None:
        self._refuse(UpstreamUnreachable(f"{self.consumer}: {why}", consumer=self.consumer))

    def _refuse(self, error: GpumgrError) -> None:
        """Before the upgrade, `done` fails with `error` (gpumgr.web writes it)."""
        if self._ended:
            return
        self._end(None if self._open else error)

    def side_closed(self, side: _Side) -> None:
        """Either side closing closes the other."""
        self._end()

    def close(self) -> None:
        self._end()

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _stop_idle_timer(self) -> None:
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.cancel()
        self._idle_timer = None

    def _end(self, error: GpumgrError | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        self._stop_timer()
        self._stop_idle_timer()
        if self._connecting is not None and not self._connecting.called:
            self._connecting.cancel()
        upstream = self._upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.loseConnection()
        if self._open and self.request.channel is not None:
            transport = self.request.channel.transport
            if transport is not None:
                transport.loseConnection()
        self._on_close(self)
        if error is not None:
            self.done.errback(error)
        else:
            self.done.callback(None)


class Tunnels:
    """The WebSockets relayed now, capped by `limits.max_tunnels`."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self.open_now: set[Tunnel] = set()
        #: Opened since gpumgr started.
        self.total = 0

    def open(self, request: Any, c: ConsumerConfig, target: Target,
             limits: LimitsConfig) -> defer.Deferred[None]:
        """A WebSocket relayed as a byte tunnel; never scheduled."""
        if len(self.open_now) >= limits.max_tunnels:
            raise TooManyConnections(
                f"gpumgr is relaying its limit of {limits.max_tunnels} WebSocket tunnels "
                "(limits.max_tunnels)", retry_after_s=5)
        tunnel = Tunnel(self._reactor, request, c.name, self.open_now.discard,
                        idle_timeout_s=limits.tunnel_idle_timeout_s)
        self.open_now.add(tunnel)
        self.total += 1
        peer = request.getClientAddress()
        tunnel.start(self._reactor, c.url, target.origin_form(), c.connect_timeout_s,
                     c.request_timeout_s, getattr(peer, "host", None))
        return tunnel.done

    def close_all(self) -> None:
        for tunnel in list(self.open_now):
            tunnel.close()
