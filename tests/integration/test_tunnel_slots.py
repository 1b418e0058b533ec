"""WebSocket tunnels give their connection slots and spools back; a refused upgrade is relayed whole; an h2c offer is ignored.

Found in review: each test is the smallest reproduction of one defect.
"""

from __future__ import annotations

import pytest_twisted
from twisted.internet import protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from gpumgr.config import parse_config
from gpumgr.testing import world_config_raw
from tests.helpers import PASS, RawClient, UPGRADE, wait_for


async def _tunnel_service(world, start_broker, ws_url, **sections):
    """A broker whose comfyui (pass-through on) is the fake WebSocket server."""
    raw = world_config_raw(world, consumers=PASS, health={"interval_s": 30}, **sections)
    raw["consumers"]["comfyui"]["url"] = ws_url
    service, url = await start_broker(parse_config(raw, "<review>"))
    return service, url, int(url.rsplit(":", 1)[1])


async def _open_and_close_tunnel(port, request=UPGRADE):
    client = RawClient()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    client.transport.write(request)
    await wait_for(lambda: b"hello" in client.data)
    client.transport.loseConnection()
    await client.closed


# -- WebSocket tunnels ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_closed_tunnels_give_their_connection_slots_back(world, start_broker, client,
                                                              ws_upstream):
    service, url, port = await _tunnel_service(world, start_broker, ws_upstream,
                                               limits={"max_connections": 2})
    for _ in range(2):
        await _open_and_close_tunnel(port)
    await wait_for(lambda: service.status()["broker"]["tunnels"]["open"] == 0)
    reply = await client.request("GET", url + "/healthz")
    assert reply.code == 200  # today: 503 too_many_connections, for every client, for ever


@pytest_twisted.ensureDeferred
async def test_a_tunnel_with_a_request_body_gives_its_spool_back(world, start_broker, client,
                                                                ws_upstream):
    service, url, port = await _tunnel_service(
        world, start_broker, ws_upstream, limits={"max_body_mib": 1, "max_spool_mib": 1})
    body = b"x" * 700_000
    head = UPGRADE.replace(b"\r\n\r\n", b"\r\nContent-Length: 700000\r\n\r\n")
    await _open_and_close_tunnel(port, head + body)
    await wait_for(lambda: service.status()["broker"]["tunnels"]["open"] == 0)
    reply = await client.request("POST", url + "/v1/tts", body)
    assert reply.code == 200  # today: 507 spool_full, for every upload, for ever


class _SlowRefusal(protocol.Protocol):
    """Refuses the upgrade with a 403 whose body follows its head a moment later."""

    BODY = b'{"error":"this socket needs a session cookie"}'

    def dataReceived(self, data):
        if b"upgrade: websocket" not in data.lower():
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                                 b"Connection: close\r\n\r\n{}")
            self.transport.loseConnection()
            return
        self.transport.write(b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n" % len(self.BODY))
        reactor.callLater(0.05, self.transport.write, self.BODY)


@pytest_twisted.ensureDeferred
async def test_a_refused_upgrade_is_relayed_with_its_whole_body(world, start_broker, client):
    port = reactor.listenTCP(0, protocol.Factory.forProtocol(_SlowRefusal),
                             interface="127.0.0.1")
    try:
        _, url, _ = await _tunnel_service(world, start_broker,
                                          f"http://127.0.0.1:{port.getHost().port}")
        reply = await client.request("GET", url + "/v1/image/ws",
                                     headers={b"Upgrade": b"websocket",
                                              b"Connection": b"Upgrade"})
        assert reply.code == 403 and reply.body == _SlowRefusal.BODY  # today: b""
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_an_h2c_upgrade_offer_is_ignored_on_a_work_route(broker, client):
    _, url = broker
    reply = await client.request("POST", url + "/v1/tts", b'{"text":"x"}', headers={
        b"Upgrade": b"h2c", b"Connection": b"Upgrade, HTTP2-Settings",
        b"HTTP2-Settings": b"AAMAAABkAAQCAAAAAAIAAAAA"})
    assert reply.code == 200  # today: 501 upgrade_not_supported
