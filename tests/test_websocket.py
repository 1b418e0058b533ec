"""gpumgr.testing.websocket: frames, the protocol in memory, and real sockets end to end."""

from __future__ import annotations

import json
import struct

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.policies import WrappingFactory
from twisted.web import server
from twisted.web.resource import Resource

from gpumgr.testing.websocket import (
    CloseInfo,
    ConnectionClosed,
    FrameDecoder,
    HandshakeError,
    Opcode,
    ProtocolError,
    WebSocketConnection,
    accept,
    accept_key,
    connect,
    encode_frame,
)
from tests.helpers import Client, wait_for

MASK = b"\x01\x02\x03\x04"


# -- frames -------------------------------------------------------------------------


def test_accept_key_is_the_rfc_example():
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
@pytest.mark.parametrize("masked", [True, False])
def test_frames_round_trip_at_every_length_boundary(size, masked):
    payload = bytes(i % 251 for i in range(size))
    wire = encode_frame(Opcode.BINARY, payload, mask=MASK if masked else None)
    decoder = FrameDecoder(masked=masked)
    # Split awkwardly: a frame must come out whole however the bytes arrive.
    frames = decoder.feed(wire[:1]) + decoder.feed(wire[1:3]) + decoder.feed(wire[3:])
    assert len(frames) == 1
    assert frames[0].payload == payload and frames[0].fin and frames[0].opcode == Opcode.BINARY


def test_a_masked_frame_is_really_masked_on_the_wire():
    wire = encode_frame(Opcode.TEXT, b"hello", mask=MASK)
    assert b"hello" not in wire and wire[1] & 0x80


def test_two_frames_in_one_read_come_out_in_order():
    decoder = FrameDecoder(masked=False)
    frames = decoder.feed(encode_frame(Opcode.TEXT, b"a", fin=False)
                          + encode_frame(Opcode.CONTINUATION, b"b"))
    assert [(f.opcode, f.payload, f.fin) for f in frames] == [(1, b"a", False), (0, b"b", True)]


@pytest.mark.parametrize("masked,wire,code", [
    (True, encode_frame(Opcode.TEXT, b"x"), 1002),                     # server needs a mask
    (False, encode_frame(Opcode.TEXT, b"x", mask=MASK), 1002),         # client refuses one
    (False, encode_frame(Opcode.TEXT, b"x", rsv=4), 1002),             # no extension agreed
    (False, encode_frame(3, b"x"), 1002),                              # reserved opcode
    (False, b"\x82\x7f" + struct.pack("!Q", 1 << 63), 1002),           # 64-bit top bit
    (False, b"\x82\x7f" + struct.pack("!Q", 1 << 30), 1009),           # over the limit
])
def test_decoder_refuses_bad_frames(masked, wire, code):
    with pytest.raises(ProtocolError) as e:
        FrameDecoder(masked=masked, max_frame_bytes=1 << 20).feed(wire)
    assert e.value.code == code


# -- the protocol in memory --------------------------------------------------------------


def _server_side(**kw):
    clock = Clock()
    conn = WebSocketConnection(clock, **kw)
    transport = StringTransport()
    conn.makeConnection(transport)
    return conn, transport, clock


def _frames_written(transport, masked=False):
    return FrameDecoder(masked=masked).feed(transport.value())


def test_ping_is_answered_with_the_same_payload():
    conn, transport, _ = _server_side()
    conn.dataReceived(encode_frame(Opcode.PING, b"are you there", mask=MASK))
    [pong] = _frames_written(transport)
    assert pong.opcode == Opcode.PONG and pong.payload == b"are you there"


def test_fragments_are_joined_and_a_ping_may_come_between_them():
    got = []
    conn, transport, _ = _server_side(on_message=got.append)
    conn.dataReceived(encode_frame(Opcode.TEXT, "hé".encode()[:2], fin=False, mask=MASK)
                      + encode_frame(Opcode.PING, b"p", mask=MASK))
    assert got == []
    conn.dataReceived(encode_frame(Opcode.CONTINUATION, "hé".encode()[2:], mask=MASK))
    assert got == ["hé"]
    assert [f.opcode for f in _frames_written(transport)] == [Opcode.PONG]


@pytest.mark.parametrize("wire,code", [
    (encode_frame(Opcode.TEXT, b"\xff\xfe", mask=MASK), 1007),
    (encode_frame(Opcode.CONTINUATION, b"x", mask=MASK), 1002),
    (encode_frame(Opcode.PING, b"x", fin=False, mask=MASK), 1002),
    (encode_frame(Opcode.CLOSE, b"\x03", mask=MASK), 1002),
    (encode_frame(Opcode.CLOSE, struct.pack("!H", 1005), mask=MASK), 1002),
    (encode_frame(Opcode.TEXT, b"x"), 1002),
])
def test_a_broken_peer_gets_a_close_frame_and_the_tcp_connection_dropped(wire, code):
    closed = []
    conn, transport, _ = _server_side(on_close=closed.append)
    conn.dataReceived(wire)
    [close] = _frames_written(transport)
    assert close.opcode == Opcode.CLOSE and struct.unpack("!H", close.payload[:2])[0] == code
    assert transport.disconnecting and not transport.disconnected  # dropped, not aborted
    conn.connectionLost(None)
    assert closed == [CloseInfo(code, closed[0].reason, clean=False)]


def test_a_peer_that_never_answers_our_close_is_cut_off_after_the_timeout():
    conn, transport, clock = _server_side(close_timeout_s=5)
    closed = conn.close(1001, "going away")
    [frame] = _frames_written(transport)
    assert frame.payload == struct.pack("!H", 1001) + b"going away"
    assert not conn.send_text("too late")  # nothing after our close
    clock.advance(4.9)
    assert not transport.disconnecting and not closed.called
    clock.advance(0.2)
    assert transport.disconnected  # StringTransport.abortConnection sets this
    conn.connectionLost(None)
    assert closed.result == CloseInfo(1006, "", clean=False)


def test_the_server_answers_a_close_and_drops_tcp_first():
    conn, transport, _ = _server_side()
    conn.dataReceived(encode_frame(Opcode.CLOSE, struct.pack("!H", 1000) + b"bye", mask=MASK))
    [echo] = _frames_written(transport)
    assert echo.opcode == Opcode.CLOSE and echo.payload == struct.pack("!H", 1000)
    assert transport.disconnecting
    conn.connectionLost(None)
    assert conn.close_info == CloseInfo(1000, "bye", clean=True)


@pytest_twisted.ensureDeferred
async def test_waiting_for_a_message_fails_when_the_connection_ends():
    conn, _, _ = _server_side()
    waiting = defer.ensureDeferred(conn.next_message())
    conn.connectionLost(None)
    with pytest.raises(ConnectionClosed):
        await waiting
    with pytest.raises(ConnectionClosed):
        await conn.next_message()


# -- real sockets: a twisted.web Site with an echo resource ------------------------------------


class Echo(Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.server_sides: list[WebSocketConnection] = []
        self.closed: list[CloseInfo] = []

    def render_GET(self, request):
        if request.path == b"/plain":
            request.setHeader(b"Content-Type", b"text/plain")
            return b"plain HTTP still works"
        conn = WebSocketConnection(reactor, on_close=self.closed.append)
        conn.on_message = lambda m: conn.send_text(m) if isinstance(m, str) else conn.send_bytes(m)
        result = accept(request, conn)
        if conn.is_open:
            self.server_sides.append(conn)
            conn.send_json({"hello": request.args.get(b"clientId", [b""])[0].decode()})
        return result


@pytest_twisted.async_yield_fixture
async def echo_server():
    resource = Echo()
    site = server.Site(resource)
    site.log = lambda request: None
    wrapper = WrappingFactory(site)  # counts live TCP connections
    port = reactor.listenTCP(0, wrapper, interface="127.0.0.1")
    resource.connections = wrapper.protocols
    yield resource, f"ws://127.0.0.1:{port.getHost().port}"
    for p in list(wrapper.protocols):
        p.transport.abortConnection()
    await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_text_binary_and_ping_over_a_real_socket(echo_server):
    resource, url = echo_server
    conn = await connect(reactor, url + "/ws?clientId=abc")
    assert await conn.next_json(timeout_s=5) == {"hello": "abc"}
    conn.send_text("ünïcode " * 1000)  # > 125 and > 65535 bytes framing paths below
    assert await conn.next_message(timeout_s=5) == "ünïcode " * 1000
    conn.send_bytes(b"\x00" * 70000)
    assert await conn.next_message(timeout_s=5) == b"\x00" * 70000
    assert await conn.ping(b"x").addTimeout(5, reactor) == b"x"
    # The server pings too, and our client answers.
    assert await resource.server_sides[0].ping(b"y").addTimeout(5, reactor) == b"y"
    await conn.close()


@pytest_twisted.ensureDeferred
async def test_client_close_closes_both_ends_cleanly_and_leaks_nothing(echo_server):
    resource, url = echo_server
    conn = await connect(reactor, url + "/ws")
    await conn.next_json(timeout_s=5)
    info = await conn.close(1000, "done").addTimeout(5, reactor)
    assert info == CloseInfo(1000, "", clean=True)  # the server echoes the code, no reason
    await wait_for(lambda: resource.closed, timeout_s=5)
    assert resource.closed == [CloseInfo(1000, "done", clean=True)]
    await wait_for(lambda: not resource.connections, timeout_s=5)


@pytest_twisted.ensureDeferred
async def test_server_close_reaches_the_client(echo_server):
    resource, url = echo_server
    conn = await connect(reactor, url + "/ws")
    await conn.next_json(timeout_s=5)
    await resource.server_sides[0].close(1001, "shutting down").addTimeout(5, reactor)
    info = await conn.when_closed().addTimeout(5, reactor)
    assert info == CloseInfo(1001, "shutting down", clean=True)
    with pytest.raises(ConnectionClosed):
        await conn.next_message(timeout_s=5)
    await wait_for(lambda: not resource.connections, timeout_s=5)


@pytest_twisted.ensureDeferred
async def test_a_dropped_client_is_an_abnormal_close_on_the_server(echo_server):
    resource, url = echo_server
    conn = await connect(reactor, url + "/ws")
    await conn.next_json(timeout_s=5)
    conn.abort()
    await wait_for(lambda: resource.closed, timeout_s=5)
    assert resource.closed == [CloseInfo(1006, "", clean=False)]
    assert (await conn.when_closed()).code == 1006


@pytest_twisted.ensureDeferred
async def test_handshake_refusals_and_plain_http_beside_websockets(echo_server):
    resource, url = echo_server
    http_url = url.replace("ws://", "http://")
    client = Client()
    try:
        reply = await client.request("GET", http_url + "/ws")  # no Upgrade headers
        assert reply.code == 400 and "Upgrade" in reply.json()["error"]
        reply = await client.request("GET", http_url + "/ws", headers={
            "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "8",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
        assert reply.code == 426 and reply.header("Sec-WebSocket-Version") == b"13"
        reply = await client.request("GET", http_url + "/ws", headers={
            "Upgrade": "websocket", "Connection": "keep-alive, Upgrade",
            "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "c2hvcnQ="})
        assert reply.code == 400 and "16 bytes" in reply.json()["error"]
        reply = await client.request("GET", http_url + "/plain")
        assert reply.code == 200 and reply.body == b"plain HTTP still works"
    finally:
        await client.close()
    assert resource.server_sides == []


@pytest_twisted.ensureDeferred
async def test_the_client_reports_a_refused_handshake_with_its_status_and_body():
    class NotAWebSocket(Resource):
        isLeaf = True

        def render_GET(self, request):
            request.setResponseCode(404)
            return b'{"error": "no such route"}'

    port = reactor.listenTCP(0, server.Site(NotAWebSocket()), interface="127.0.0.1")
    try:
        with pytest.raises(HandshakeError) as e:
            await connect(reactor, f"ws://127.0.0.1:{port.getHost().port}/ws", timeout_s=5)
        assert e.value.code == 404 and e.value.body == b'{"error": "no such route"}'
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_connecting_to_a_closed_port_fails():
    probe = reactor.listenTCP(0, server.Site(Resource()), interface="127.0.0.1")
    url = f"ws://127.0.0.1:{probe.getHost().port}/ws"
    await probe.stopListening()
    with pytest.raises(Exception) as e:
        await connect(reactor, url, timeout_s=5)
    assert "refused" in str(e.value).lower()


@pytest_twisted.ensureDeferred
async def test_a_third_party_client_speaks_to_our_server(echo_server):
    """websocket-client (another RFC 6455 implementation) agrees with ours."""
    import websocket as websocket_client

    resource, url = echo_server

    def talk():
        ws = websocket_client.create_connection(url + "/ws?clientId=lib", timeout=5)
        try:
            hello = json.loads(ws.recv())
            ws.send("x" * 200)
            echoed = ws.recv()
            ws.ping(b"p")
            ws.send_binary(b"\x01\x02")
            binary = ws.recv()
            return hello, echoed, binary
        finally:
            ws.close()

    hello, echoed, binary = await threads.deferToThread(talk)
    assert hello == {"hello": "lib"} and echoed == "x" * 200 and binary == b"\x01\x02"
    await wait_for(lambda: resource.closed, timeout_s=5)
    assert resource.closed[0].code == 1000 and resource.closed[0].clean
