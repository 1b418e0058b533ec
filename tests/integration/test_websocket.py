"""gpumgr.testing.websocket: frames, the protocol in memory, and real sockets end to end."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.protocols.policies import WrappingFactory
from twisted.web import server
from twisted.web.resource import Resource

from gpumgr.testing.websocket import (
    CloseInfo,
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    accept,
    connect,
)
from tests.helpers import Client, wait_for


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
