"""A small RFC 6455 WebSocket, server side and client side, with no dependency
beyond Twisted.

The simulated ComfyUI serves ``/ws`` with it, and tests talk to that (directly
or through gpumgr) with its client. Twisted 26.10's own `twisted.web.websocket`
needs wsproto, which gpumgr does not depend on.

Server side, inside a twisted.web ``render_GET``::

    conn = WebSocketConnection(reactor, on_message=..., on_close=...)
    result = accept(request, conn)      # NOT_DONE_YET, or an error body
    if conn.is_open:
        conn.send_json({"hello": 1})
    return result

Client side::

    conn = await connect(reactor, "ws://127.0.0.1:8188/ws?clientId=me")
    message = await conn.next_json(timeout_s=5)
    await conn.close()
"""

from __future__ import annotations

import base64
import enum
import hashlib
import json
import os
import struct
from typing import Any, Callable
from urllib.parse import urlsplit

import attrs
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.web.server import NOT_DONE_YET

__all__ = [
    "CloseInfo",
    "ConnectionClosed",
    "Frame",
    "FrameDecoder",
    "HandshakeError",
    "Opcode",
    "ProtocolError",
    "WebSocketConnection",
    "accept",
    "accept_key",
    "connect",
    "encode_frame",
]

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: Close codes an endpoint may put on the wire (RFC 6455 7.4; 1004-1006 and 1015 are reserved).
_SENDABLE_CODES = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011})
NO_STATUS = 1005
ABNORMAL = 1006


class Opcode(enum.IntEnum):
    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


class ProtocolError(Exception):
    """The peer broke RFC 6455; `code` is the close code to fail the connection with."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


class HandshakeError(Exception):
    """The server did not switch protocols; its status, headers and body say why."""

    def __init__(self, code: int, headers: dict[str, str], body: bytes, why: str = "") -> None:
        super().__init__(f"WebSocket handshake failed: {code} {why}".rstrip())
        self.code = code
        self.headers = headers
        self.body = body


@attrs.frozen
class CloseInfo:
    """How a connection ended. `clean` is true when close frames went both ways."""

    code: int
    reason: str
    clean: bool


class ConnectionClosed(Exception):
    def __init__(self, info: CloseInfo | None) -> None:
        super().__init__(f"WebSocket closed: {info}")
        self.info = info


def accept_key(key: str | bytes) -> str:
    """The Sec-WebSocket-Accept value for a client's Sec-WebSocket-Key."""
    if isinstance(key, str):
        key = key.encode("ascii")
    return base64.b64encode(hashlib.sha1(key.strip() + _GUID).digest()).decode("ascii")


def _abort(transport: Any) -> None:
    """abortConnection is ITCPTransport's, which a TCP or wrapped transport provides."""
    transport.abortConnection()


# -- frames ----------------------------------------------------------------


@attrs.frozen
class Frame:
    fin: bool
    opcode: int
    payload: bytes


def _apply_mask(data: bytes, key: bytes) -> bytes:
    if not data:
        return b""
    n = len(data)
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


def encode_frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bytes | None = None,
                 rsv: int = 0) -> bytes:
    """One frame on the wire; clients pass a 4-byte `mask`, servers none."""
    head = bytearray([(0x80 if fin else 0) | (rsv & 0x7) << 4 | opcode & 0xF])
    mask_bit = 0x80 if mask is not None else 0
    n = len(payload)
    if n < 126:
        head.append(mask_bit | n)
    elif n < 1 << 16:
        head.append(mask_bit | 126)
        head += struct.pack("!H", n)
    else:
        head.append(mask_bit | 127)
        head += struct.pack("!Q", n)
    if mask is not None:
        return bytes(head) + mask + _apply_mask(payload, mask)
    return bytes(head) + payload


class FrameDecoder:
    """Turns bytes into frames, however the bytes are split.

    `masked` says what the peer must do: a server requires masked frames and a
    client refuses them (RFC 6455 5.1).
    """

    def __init__(self, masked: bool, max_frame_bytes: int = 1 << 24) -> None:
        self.masked = masked
        self.max_frame_bytes = max_frame_bytes
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        self._buffer += data
        frames: list[Frame] = []
        while True:
            frame = self._next()
            if frame is None:
                return frames
            frames.append(frame)

    def _next(self) -> Frame | None:
        buf = self._buffer
        if len(buf) < 2:
            return None
        b0, b1 = buf[0], buf[1]
        if b0 & 0x70:
            raise ProtocolError(1002, "reserved bits set without an extension")
        opcode = b0 & 0xF
        if opcode not in Opcode._value2member_map_:
            raise ProtocolError(1002, f"unknown opcode {opcode:#x}")
        if bool(b1 & 0x80) != self.masked:
            raise ProtocolError(1002, "frames from a client must be masked, from a server not")
        n = b1 & 0x7F
        at = 2
        if n == 126:
            if len(buf) < 4:
                return None
            (n,) = struct.unpack_from("!H", buf, 2)
            at = 4
        elif n == 127:
            if len(buf) < 10:
                return None
            (n,) = struct.unpack_from("!Q", buf, 2)
            if n >> 63:
                raise ProtocolError(1002, "64-bit length with the top bit set")
            at = 10
        if n > self.max_frame_bytes:
            raise ProtocolError(1009, f"frame of {n} bytes is too big")
        key = b""
        if self.masked:
            if len(buf) < at + 4:
                return None
            key = bytes(buf[at:at + 4])
            at += 4
        if len(buf) < at + n:
            return None
        payload = bytes(buf[at:at + n])
        del buf[:at + n]
        if key:
            payload = _apply_mask(payload, key)
        return Frame(bool(b0 & 0x80), opcode, payload)


# -- one end of a connection ------------------------------------------------------


class _State(enum.Enum):
    CONNECTING = "connecting"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


def _close_payload(code: int | None, reason: str) -> bytes:
    if code is None:
        return b""
    return struct.pack("!H", code) + reason.encode("utf-8")[:123]


class WebSocketConnection(Protocol):
    """One end of an open WebSocket: frames, ping/pong and the close handshake.

    Messages (`str` for text, `bytes` for binary) go to `on_message` if given,
    else into `messages` (read them with `next_message`). `on_close` gets the
    `CloseInfo` once the TCP connection is gone.
    """

    def __init__(
        self,
        clock: Any,
        *,
        client: bool = False,
        on_message: Callable[[str | bytes], None] | None = None,
        on_close: Callable[[CloseInfo], None] | None = None,
        close_timeout_s: float = 5.0,
        max_message_bytes: int = 1 << 24,
    ) -> None:
        self.clock = IReactorTime(clock)
        self.client = client
        self.on_message = on_message
        self.on_close = on_close
        self.close_timeout_s = close_timeout_s
        self.max_message_bytes = max_message_bytes
        self.messages: defer.DeferredQueue = defer.DeferredQueue()
        self.close_info: CloseInfo | None = None
        #: Client side: the server's handshake headers (lower-case names).
        self.response_headers: dict[str, str] = {}
        self._state = _State.CONNECTING
        self._decoder = FrameDecoder(masked=not client, max_frame_bytes=max_message_bytes)
        self._fragments: list[bytes] = []
        self._fragment_opcode: int | None = None
        self._close_sent = False
        self._close_received: tuple[int, str] | None = None
        self._failed: tuple[int, str] | None = None
        self._close_timer: Any = None
        self._closed_waiters: list[defer.Deferred] = []
        self._pings: dict[bytes, list[defer.Deferred]] = {}

    # -- state tests read --------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._state is _State.OPEN

    @property
    def is_closed(self) -> bool:
        return self._state is _State.CLOSED

    @property
    def _reading(self) -> bool:
        """Bytes still mean something: no close frame came in and we did not fail."""
        return (self._state is not _State.CLOSED and self._close_received is None
                and self._failed is None)

    # -- IProtocol -----------------------------------------------------------------

    def connectionMade(self) -> None:
        self._state = _State.OPEN

    def dataReceived(self, data: bytes) -> None:
        if not self._reading:
            return
        try:
            for frame in self._decoder.feed(data):
                self._frame_received(frame)
                if not self._reading:
                    return
        except ProtocolError as e:
            self._fail(e.code, e.reason)

    def connectionLost(self, reason: Any = None) -> None:
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        self._cancel_timer()
        if self._failed is not None:
            info = CloseInfo(*self._failed, clean=False)
        elif self._close_received is not None:
            code, text = self._close_received
            info = CloseInfo(code, text, clean=self._close_sent)
        else:
            info = CloseInfo(ABNORMAL, "", clean=False)
        self.close_info = info
        waiters, self._closed_waiters = self._closed_waiters, []
        for d in waiters:
            d.callback(info)
        pings, self._pings = self._pings, {}
        for ds in pings.values():
            for d in ds:
                d.errback(ConnectionClosed(info))
        while self.messages.waiting:
            self.messages.waiting.pop(0).errback(ConnectionClosed(info))
        if self.on_close is not None:
            self.on_close(info)

    # -- sending ---------------------------------------------------------------------

    def send_frame(self, opcode: int, payload: bytes, fin: bool = True) -> bool:
        """Write one raw frame (tests use it for fragments and bad frames)."""
        if self._state is not _State.OPEN or self.transport is None:
            return False
        mask = os.urandom(4) if self.client else None
        self.transport.write(encode_frame(opcode, payload, fin=fin, mask=mask))
        return True

    def send_text(self, text: str) -> bool:
        return self.send_frame(Opcode.TEXT, text.encode("utf-8"))

    def send_bytes(self, data: bytes) -> bool:
        return self.send_frame(Opcode.BINARY, data)

    def send_json(self, value: Any) -> bool:
        return self.send_text(json.dumps(value))

    def ping(self, payload: bytes = b"") -> defer.Deferred:
        """Fires with `payload` when the matching pong comes back."""
        d: defer.Deferred = defer.Deferred()
        if not self.send_frame(Opcode.PING, payload[:125]):
            return defer.fail(ConnectionClosed(self.close_info))
        self._pings.setdefault(payload[:125], []).append(d)
        return d

    def close(self, code: int = 1000, reason: str = "") -> defer.Deferred:
        """Start the close handshake; fires with the `CloseInfo` once the socket is gone.

        A peer that never answers is cut off after `close_timeout_s`.
        """
        d = self.when_closed()
        if self._state is _State.OPEN:
            self._send_close(code, reason)
            self._state = _State.CLOSING
            self._start_timer()
        return d

    def abort(self) -> None:
        """Drop the TCP connection without a close handshake."""
        if self.transport is not None and self._state is not _State.CLOSED:
            _abort(self.transport)

    def when_closed(self) -> defer.Deferred:
        if self.close_info is not None:
            return defer.succeed(self.close_info)
        d: defer.Deferred = defer.Deferred()
        self._closed_waiters.append(d)
        return d

    # -- receiving (when there is no on_message) -------------------------------------------

    async def next_message(self, timeout_s: float | None = None) -> str | bytes:
        """The next message; raises `ConnectionClosed` once none can come."""
        if not self.messages.pending and self._state is _State.CLOSED:
            raise ConnectionClosed(self.close_info)
        d = self.messages.get()
        if timeout_s is not None:
            d.addTimeout(timeout_s, self.clock)
        return await d

    async def next_json(self, timeout_s: float | None = None) -> Any:
        return json.loads(await self.next_message(timeout_s))

    # -- the protocol itself -----------------------------------------------------------

    def _frame_received(self, frame: Frame) -> None:
        if frame.opcode >= Opcode.CLOSE:
            if not frame.fin or len(frame.payload) > 125:
                raise ProtocolError(1002, "control frames must be whole and at most 125 bytes")
            if frame.opcode == Opcode.CLOSE:
                self._close_frame_received(frame.payload)
            elif frame.opcode == Opcode.PING:
                self.send_frame(Opcode.PONG, frame.payload)
            else:
                for d in self._pings.pop(frame.payload, []):
                    d.callback(frame.payload)
            return
        if frame.opcode == Opcode.CONTINUATION:
            if self._fragment_opcode is None:
                raise ProtocolError(1002, "continuation frame without a message to continue")
        else:
            if self._fragment_opcode is not None:
                raise ProtocolError(1002, "new message before the previous one ended")
            self._fragment_opcode = frame.opcode
        self._fragments.append(frame.payload)
        if sum(len(f) for f in self._fragments) > self.max_message_bytes:
            raise ProtocolError(1009, "message too big")
        if not frame.fin:
            return
        data = b"".join(self._fragments)
        opcode, self._fragment_opcode, self._fragments = self._fragment_opcode, None, []
        if opcode == Opcode.TEXT:
            try:
                message: str | bytes = data.decode("utf-8")
            except UnicodeDecodeError:
                raise ProtocolError(1007, "text message is not UTF-8") from None
        else:
            message = data
        if self._close_sent:
            return  # we are closing: the application no longer listens
        if self.on_message is not None:
            self.on_message(message)
        else:
            self.messages.put(message)

    def _close_frame_received(self, payload: bytes) -> None:
        if len(payload) == 1:
            raise ProtocolError(1002, "close frame with a one-byte payload")
        code: int | None = None
        text = ""
        if payload:
            (code,) = struct.unpack("!H", payload[:2])
            if code not in _SENDABLE_CODES and not 3000 <= code <= 4999:
                raise ProtocolError(1002, f"invalid close code {code}")
            try:
                text = payload[2:].decode("utf-8")
            except UnicodeDecodeError:
                raise ProtocolError(1007, "close reason is not UTF-8") from None
        self._close_received = (NO_STATUS if code is None else code, text)
        if not self._close_sent:
            self._send_close(code, "")
        self._state = _State.CLOSING
        if self.client:
            # The server closes TCP first (RFC 6455 7.1.1); don't wait forever.
            self._start_timer()
        elif self.transport is not None:
            self.transport.loseConnection()

    def _send_close(self, code: int | None, reason: str) -> None:
        if self._close_sent or self.transport is None:
            return
        self._close_sent = True
        mask = os.urandom(4) if self.client else None
        self.transport.write(encode_frame(Opcode.CLOSE, _close_payload(code, reason), mask=mask))

    def _fail(self, code: int, reason: str) -> None:
        """Fail the connection (RFC 6455 7.1.7): a close frame, then drop TCP."""
        self._send_close(code, reason)
        self._failed = (code, reason)
        self._state = _State.CLOSING
        if self.transport is not None:
            self.transport.loseConnection()

    def _start_timer(self) -> None:
        if self._close_timer is None:
            self._close_timer = self.clock.callLater(self.close_timeout_s, self._close_timed_out)

    def _close_timed_out(self) -> None:
        self._close_timer = None
        if self.transport is not None:
            _abort(self.transport)

    def _cancel_timer(self) -> None:
        if self._close_timer is not None and self._close_timer.active():
            self._close_timer.cancel()
        self._close_timer = None


# -- the server's handshake, inside twisted.web ----------------------------------------


def _tokens(request: Any, name: bytes) -> set[str]:
    values = request.requestHeaders.getRawHeaders(name) or []
    return {t.strip().lower() for v in values for t in v.decode("latin-1").split(",")}


def _refuse(request: Any, code: int, message: str) -> bytes:
    body = json.dumps({"error": message}).encode("utf-8")
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
    request.setHeader(b"Content-Length", str(len(body)).encode("ascii"))
    return body


def accept(request: Any, connection: WebSocketConnection) -> bytes | int:
    """Answer a WebSocket handshake on a twisted.web `request`.

    On success `connection` owns the socket and this returns NOT_DONE_YET (the
    HTTP request never finishes); otherwise it returns a JSON error body with
    400, 405 or 426 already set.
    """
    if request.method != b"GET":
        request.setHeader(b"Allow", b"GET")
        return _refuse(request, 405, "a WebSocket handshake is a GET")
    if request.clientproto != b"HTTP/1.1":
        return _refuse(request, 400, "a WebSocket handshake needs HTTP/1.1")
    if "websocket" not in _tokens(request, b"upgrade") or "upgrade" not in _tokens(
            request, b"connection"):
        return _refuse(request, 400, "expected Upgrade: websocket and Connection: Upgrade")
    if (request.getHeader(b"sec-websocket-version") or b"").strip() != b"13":
        request.setHeader(b"Sec-WebSocket-Version", b"13")
        return _refuse(request, 426, "only WebSocket version 13 is supported")
    key = (request.getHeader(b"sec-websocket-key") or b"").strip()
    try:
        valid_key = len(base64.b64decode(key, validate=True)) == 16
    except ValueError:
        valid_key = False
    if not valid_key:
        return _refuse(request, 400, "Sec-WebSocket-Key must be 16 bytes in base64")
    channel = request.channel
    if channel is None or channel.transport is None:
        return NOT_DONE_YET  # the client already left
    channel.transport.write(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept_key(key).encode("ascii") + b"\r\n\r\n")
    _take_over(channel, connection)
    return NOT_DONE_YET


def _take_over(channel: Any, connection: WebSocketConnection) -> None:
    """Route the channel's bytes to `connection` from now on.

    This is what Twisted 26.10's own WebSocket support does
    (`HTTPChannel._protocolUpgradeForWebsockets`): it works whatever wraps the
    channel (TLS, `_GenericHTTPChannelProtocol`, a `WrappingFactory`). The
    channel's own `connectionLost` still runs afterwards, so the upgrade
    request learns the connection ended. The channel's idle timeout is already
    off while a request is being handled, and this request never finishes.
    """
    http_connection_lost = channel.connectionLost

    def connection_lost(reason: Any) -> None:
        try:
            connection.connectionLost(reason)
        finally:
            http_connection_lost(reason)

    channel.dataReceived = connection.dataReceived
    channel.connectionLost = connection_lost
    connection.makeConnection(channel.transport)


# -- the client --------------------------------------------------------------------------


class _ClientHandshake(Protocol):
    """Sends the opening handshake, checks the answer, then hands bytes to the connection."""

    def __init__(self, host: str, resource: str, headers: dict[str, str],
                 connection: WebSocketConnection) -> None:
        self.connection = connection
        self._key = base64.b64encode(os.urandom(16)).decode("ascii")
        lines = [f"GET {resource} HTTP/1.1", f"Host: {host}", "Upgrade: websocket",
                 "Connection: Upgrade", f"Sec-WebSocket-Key: {self._key}",
                 "Sec-WebSocket-Version: 13"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        self._request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self._buffer = b""
        self._upgraded = False
        self._refusal: tuple[int, dict[str, str], int | None] | None = None
        self.handshake: defer.Deferred = defer.Deferred(self._cancel)

    def _cancel(self, d: defer.Deferred) -> None:
        if self.transport is not None:
            _abort(self.transport)

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self._request)

    def dataReceived(self, data: bytes) -> None:
        if self._upgraded:
            self.connection.dataReceived(data)
            return
        self._buffer += data
        if self._refusal is not None:
            self._refusal_progress()
            return
        head, sep, rest = self._buffer.partition(b"\r\n\r\n")
        if not sep:
            if len(self._buffer) > 65536:
                self._fail(HandshakeError(0, {}, b"", "response headers too large"))
            return
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        parts = status_line.split(" ", 2)
        try:
            code = int(parts[1])
        except (IndexError, ValueError):
            self._fail(HandshakeError(0, {}, head, f"bad status line {status_line!r}"))
            return
        headers: dict[str, str] = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            key = name.strip().lower()
            headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
        self._buffer = rest
        if code != 101:
            length = headers.get("content-length")
            self._refusal = (code, headers, int(length) if length and length.isdigit() else None)
            self._refusal_progress()
            return
        expected = accept_key(self._key)
        if ("websocket" not in headers.get("upgrade", "").lower()
                or "upgrade" not in headers.get("connection", "").lower()
                or headers.get("sec-websocket-accept") != expected):
            self._fail(HandshakeError(code, headers, b"", "bad Upgrade or Sec-WebSocket-Accept"))
            return
        self._upgraded = True
        self.connection.response_headers = headers
        self.connection.makeConnection(self.transport)
        self.handshake.callback(self.connection)
        if rest:
            self.connection.dataReceived(rest)

    def _refusal_progress(self, closed: bool = False) -> None:
        assert self._refusal is not None
        code, headers, length = self._refusal
        if closed or (length is not None and len(self._buffer) >= length):
            body = self._buffer if length is None else self._buffer[:length]
            self._fail(HandshakeError(code, headers, body))

    def _fail(self, error: Exception) -> None:
        if not self.handshake.called:
            self.handshake.errback(error)
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        if self._upgraded:
            self.connection.connectionLost(reason)
        elif self._refusal is not None:
            self._refusal_progress(closed=True)
        elif not self.handshake.called:
            self.handshake.errback(ConnectionClosed(None))


def connect(reactor: Any, url: str, headers: dict[str, str] | None = None,
            timeout_s: float = 10.0, **options: Any) -> defer.Deferred:
    """Open a WebSocket to ``ws://host:port/path?query`` (``http://`` works too).

    Fires with an open client `WebSocketConnection` (`options` go to its
    constructor), or fails with `HandshakeError` when the server answers
    anything but 101, or with a timeout after `timeout_s`.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "http") or not parts.hostname:
        raise ValueError(f"expected a ws:// URL, got {url!r}")
    port = parts.port or 80
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    connection = WebSocketConnection(reactor, client=True, **options)
    handshake = _ClientHandshake(parts.netloc, resource, headers or {}, connection)
    endpoint = HostnameEndpoint(reactor, parts.hostname, port, timeout=timeout_s)
    d = connectProtocol(endpoint, handshake)
    d.addCallback(lambda _: handshake.handshake)
    d.addTimeout(timeout_s, reactor)
    return d
