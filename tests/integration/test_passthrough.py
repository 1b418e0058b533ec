"""Pass-through to the consumers' native APIs: /v1/<kind>/<path>, what is
scheduled and what is not, and WebSockets relayed as byte tunnels."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from gpumgr.testing import world_config
from tests.helpers import (
    FakeWebSocketServer,
    HeldStream,
    PASS,
    RawClient,
    UPGRADE,
    locked_broker,
    wait_for,
)


@pytest_twisted.ensureDeferred
async def test_without_passthrough_subpaths_are_unknown_routes(broker, client):
    _, url = broker
    reply = await client.request("GET", url + "/v1/llm/api/tags")
    assert reply.code == 404 and reply.json()["error"]["code"] == "unknown_route"
    assert "passthrough" in reply.json()["error"]["message"]


@pytest_twisted.ensureDeferred
async def test_metadata_is_answered_while_a_generation_holds_the_gpu(world, start_broker, client):
    service, url = await locked_broker(world, start_broker)
    held = await HeldStream(world["ollama"]).start(client, url)
    assert service.scheduler.stats().in_flight == 1
    ps = await client.request("GET", url + "/v1/llm/api/ps")
    assert ps.code == 200 and ps.header("X-Gpumgr-Consumer") == b"ollama"
    assert [m["name"] for m in ps.json()["models"]] == ["llama3:latest"]
    version = await client.request("GET", url + "/v1/llm/api/version")
    assert version.code == 200 and "version" in version.json()
    # ...while GPU work through the same door waits for the lock.
    chat = defer.ensureDeferred(client.request(
        "POST", url + "/v1/llm/api/chat", b'{"model":"llama3","messages":[]}'))
    await wait_for(lambda: service.scheduler.stats().queue_depth == 1)
    assert not chat.called
    held.release()
    assert (await held.reply).code == 200
    assert (await chat).code == 200
    state = service.registry["ollama"]
    assert state.total_requests == 2 and state.active == 0  # scheduled ones only


@pytest_twisted.ensureDeferred
async def test_method_and_query_are_kept(world, start_broker, client):
    _, url = await locked_broker(world, start_broker)
    before = len(world["mvoice"].client_requests())
    reply = await client.request("GET", url + "/v1/tts/audio/sample-1.wav?x=1&y=%20")
    assert reply.code == 200 and reply.header("Content-Type") == b"audio/wav"
    seen = world["mvoice"].client_requests()[before]
    assert (seen.method, seen.path, seen.query) == ("GET", "/audio/sample-1.wav", b"x=1&y=%20")


@pytest_twisted.ensureDeferred
async def test_bad_subpaths_are_refused_and_never_forwarded(world, start_broker, client):
    _, url = await locked_broker(world, start_broker)
    before = len(world["ollama"].client_requests())
    for path in ("/v1/llm/../status", "/v1/llm/api/%2e%2e/x", "/v1/llm/api%2fps",
                 "/v1/llm/api//ps", "/v1/llm/api/ps%00"):
        reply = await client.request("GET", url + path)
        assert reply.code == 400, path
        assert reply.json()["error"]["code"] == "bad_path"
    assert len(world["ollama"].client_requests()) == before


@pytest_twisted.ensureDeferred
async def test_the_kind_root_stays_post_only(world, start_broker, client):
    _, url = await locked_broker(world, start_broker)
    reply = await client.request("GET", url + "/v1/llm")
    assert reply.code == 405 and reply.header("Allow") == b"POST"


@pytest_twisted.ensureDeferred
async def test_http_driver_schedules_writes_and_extra_scheduled_routes(world, start_broker,
                                                                      client):
    consumers = {**PASS, "mvoice": {"passthrough": True, "scheduled": ["GET /audio/"]}}
    service, url = await locked_broker(world, start_broker, consumers=consumers)
    assert (await client.request("POST", url + "/v1/tts/tts", b"hi")).code == 200
    assert service.registry["mvoice"].total_requests == 1  # POST: scheduled
    assert (await client.request("GET", url + "/v1/tts/health")).code == 200
    assert service.registry["mvoice"].total_requests == 1  # GET: not scheduled
    assert (await client.request("GET", url + "/v1/tts/audio/sample-2.wav")).code == 200
    assert service.registry["mvoice"].total_requests == 2  # listed in `scheduled`


# -- WebSockets -----------------------------------------------------------------


async def tunnel_broker(world, start_broker, ws_url):
    import attrs

    config = world_config(world, consumers=PASS, health={"interval_s": 30})
    consumers = dict(config.consumers)
    consumers["comfyui"] = attrs.evolve(consumers["comfyui"], url=ws_url)
    service, url = await start_broker(attrs.evolve(config, consumers=consumers))
    port = int(url.rsplit(":", 1)[1])
    return service, port


async def open_tunnel(port):
    client = RawClient()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    client.transport.write(UPGRADE)
    await wait_for(lambda: b"hello" in client.data)
    return client


@pytest_twisted.ensureDeferred
async def test_websocket_is_relayed_both_ways_and_closed_from_the_client(
        world, start_broker, ws_upstream):
    service, port = await tunnel_broker(world, start_broker, ws_upstream)
    client = await open_tunnel(port)
    assert client.data.startswith(b"HTTP/1.1 101 ")
    (upstream,) = FakeWebSocketServer.instances
    assert upstream.head.startswith(b"GET /ws?clientId=abc HTTP/1.1\r\n")
    head = upstream.head.lower()  # header names are case-insensitive
    assert b"upgrade: websocket" in head and b"sec-websocket-key: dghl" in head
    assert service.status()["broker"]["tunnels"]["open"] == 1
    assert service.scheduler.stats().total_jobs == 0  # never scheduled
    client.transport.write(b"ping")
    await wait_for(lambda: client.data.endswith(b"PING"))
    client.transport.loseConnection()
    await upstream.closed  # the client closing closed the upstream
    await wait_for(lambda: service.status()["broker"]["tunnels"]["open"] == 0)


@pytest_twisted.ensureDeferred
async def test_websocket_closed_by_the_upstream_closes_the_client(world, start_broker,
                                                                 ws_upstream):
    service, port = await tunnel_broker(world, start_broker, ws_upstream)
    client = await open_tunnel(port)
    client.transport.write(b"close")
    await client.closed
    assert service.status()["broker"]["tunnels"] == {"open": 0, "total": 1}


@pytest_twisted.ensureDeferred
async def test_a_refused_upgrade_is_relayed_as_a_response(world, start_broker, ws_upstream,
                                                         client):
    FakeWebSocketServer.refuse = True
    service, port = await tunnel_broker(world, start_broker, ws_upstream)
    reply = await client.request("GET", f"http://127.0.0.1:{port}/v1/image/ws",
                                 headers={b"Upgrade": b"websocket", b"Connection": b"Upgrade"})
    assert reply.code == 404 and reply.json() == {"error": "no such socket"}
    await wait_for(lambda: service.status()["broker"]["tunnels"]["open"] == 0)


@pytest_twisted.ensureDeferred
async def test_other_upgrades_get_501(world, start_broker, client):
    _, url = await locked_broker(world, start_broker)
    reply = await client.request("GET", url + "/v1/image/ws",
                                 headers={b"Upgrade": b"h2c", b"Connection": b"Upgrade"})
    assert reply.code == 501 and reply.json()["error"]["code"] == "upgrade_not_supported"
