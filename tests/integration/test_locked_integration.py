"""`scheduler.mode: locked` through the real broker against the simulated world."""

from __future__ import annotations

import json

import pytest_twisted
from twisted.internet import defer

from gpumgr.testing import world_config
from tests.helpers import HeldStream, RawClient, raw_open, url_port, wait_for


async def locked_broker(world, start_broker, **scheduler):
    config = world_config(world, health={"interval_s": 0.5},
                          scheduler={"mode": "locked", **scheduler})
    service, url = await start_broker(config)
    await service.health.probe_all_now()
    return service, url


@pytest_twisted.ensureDeferred
async def test_twenty_concurrent_requests_never_overlap_on_the_gpu(world, start_broker, client):
    service, url = await locked_broker(world, start_broker, max_queue=64)
    routes = [("/v1/tts", b'{"text":"hi"}'), ("/v1/stt", b"audio-bytes"),
              ("/v1/llm", b'{"model":"llama3","prompt":"hi"}')]
    replies = await defer.gatherResults([
        defer.ensureDeferred(client.request("POST", url + routes[i % 3][0], routes[i % 3][1]))
        for i in range(20)
    ])
    assert [r.code for r in replies] == [200] * 20
    assert all(r.complete for r in replies)
    assert world.total_jobs == 20
    assert world.max_active_jobs == 1  # the simulated GPU never saw two jobs at once
    stats = service.scheduler.stats()
    assert stats.total_jobs == 20 and stats.in_flight == 0 and stats.queue_depth == 0
    waits = sorted(int(r.header("X-Gpumgr-Wait-Ms")) for r in replies)
    assert waits[-1] > 0  # someone really waited, and the header says so


@pytest_twisted.ensureDeferred
async def test_streamed_response_holds_the_lock_until_its_last_byte(world, start_broker, client):
    service, url = await locked_broker(world, start_broker)
    gates: dict[int, defer.Deferred] = {}
    world["ollama"].behaviour.stream_chunks = 4
    world["ollama"].behaviour.stream_gate = lambda i: gates.setdefault(i, defer.Deferred())

    stream = defer.ensureDeferred(client.request("POST", url + "/v1/llm", b'{"prompt":"x"}'))
    await wait_for(lambda: 1 in gates)  # first chunk written, stream open
    tts = defer.ensureDeferred(client.request("POST", url + "/v1/tts", b'{"text":"x"}'))
    await wait_for(lambda: service.scheduler.stats().queue_depth == 1)
    for i in (1, 2):
        gates[i].callback(None)
        await wait_for(lambda i=i: i + 1 in gates)
        assert world["mvoice"].work_requests() == []  # still waiting for the lock
    gates[3].callback(None)
    llm_reply = await stream
    tts_reply = await tts
    assert llm_reply.code == 200 and llm_reply.body.count(b"\n") == 4
    assert tts_reply.code == 200
    assert int(tts_reply.header("X-Gpumgr-Wait-Ms")) >= 0
    assert world.max_active_jobs == 1


async def raw_post(url: str, path: str, body: bytes = b"{}") -> RawClient:
    request = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
               f"Connection: close\r\n\r\n").encode() + body
    return await raw_open(url_port(url), request, timeout_s=None)


@pytest_twisted.ensureDeferred
async def test_client_leaving_the_queue_never_reaches_its_consumer(world, start_broker, client):
    service, url = await locked_broker(world, start_broker)
    held = await HeldStream(world["ollama"]).start(client, url)

    leaver = await raw_post(url, "/v1/tts", b'{"text":"never"}')
    await wait_for(lambda: service.scheduler.stats().queue_depth == 1)
    leaver.transport.loseConnection()
    await wait_for(lambda: service.scheduler.stats().queue_depth == 0)

    held.release()
    assert (await held.reply).code == 200
    await wait_for(lambda: service.scheduler.stats().in_flight == 0)
    assert world["mvoice"].work_requests() == []
    assert service.scheduler.stats().total_jobs == 1


@pytest_twisted.ensureDeferred
async def test_queue_full_and_queue_timeout(world, start_broker, client):
    service, url = await locked_broker(world, start_broker, max_queue=1, queue_timeout_s=0.3)
    held = await HeldStream(world["ollama"]).start(client, url)

    queued = defer.ensureDeferred(client.request("POST", url + "/v1/tts", b'{"text":"q"}'))
    await wait_for(lambda: service.scheduler.stats().queue_depth == 1)
    full = await client.request("POST", url + "/v1/stt", b"audio")
    assert full.code == 503
    assert full.json()["error"]["code"] == "queue_full"
    assert full.json()["error"]["consumer"] == "whisper"
    assert full.header("Retry-After") is not None

    timed_out = await queued  # 0.3 s later, still behind the open stream
    assert timed_out.code == 503
    assert timed_out.json()["error"]["code"] == "queue_timeout"
    held.release()
    assert (await held.reply).code == 200
    assert world["mvoice"].work_requests() == [] and world["whisper"].work_requests() == []
    assert service.scheduler.stats().rejected == 2


@pytest_twisted.ensureDeferred
async def test_status_answers_while_hundreds_are_queued(world, start_broker, client):
    service, url = await locked_broker(world, start_broker, max_queue=1000)
    held = await HeldStream(world["ollama"]).start(client, url)
    n = 300
    waiters = [await raw_post(url, "/v1/tts" if i % 2 else "/v1/stt", b'{"text":"x"}')
               for i in range(n)]
    await wait_for(lambda: service.scheduler.stats().queue_depth == n, timeout_s=30)
    status = (await client.request("GET", url + "/v1/status")).json()
    assert status["scheduler"]["queue_depth"] == n
    assert status["scheduler"]["queued_by_kind"] == {"tts": n // 2, "stt": n // 2}
    assert status["scheduler"]["oldest_queued"] is not None
    health = await client.request("GET", url + "/healthz")
    assert health.code == 200
    audio = await client.request("GET", url + "/audio/sample.wav")  # /audio never queues
    assert audio.code == 200
    for w in waiters:
        w.transport.loseConnection()
    await wait_for(lambda: service.scheduler.stats().queue_depth == 0, timeout_s=30)
    held.release()
    assert (await held.reply).code == 200
    assert world["mvoice"].work_requests() == [] and world["whisper"].work_requests() == []
    assert json.loads((await client.request("GET", url + "/v1/status")).body)[
        "scheduler"]["in_flight"] == 0


@pytest_twisted.ensureDeferred
async def test_priority_order_through_the_broker(world, start_broker, client):
    service, url = await locked_broker(world, start_broker,
                                       priority={"tts": 10, "stt": 10, "llm": 5})
    held = await HeldStream(world["ollama"]).start(client, url)
    order = []
    pending = []
    for path, body in (("/v1/llm", b'{"prompt":"2"}'), ("/v1/tts", b'{"text":"x"}'),
                       ("/v1/stt", b"audio")):
        d = defer.ensureDeferred(client.request("POST", url + path, body))
        d.addCallback(lambda r, p=path: order.append(p) or r)
        pending.append(d)
        depth = len(pending)
        await wait_for(lambda depth=depth: service.scheduler.stats().queue_depth == depth)
    held.release()
    await held.reply
    await defer.gatherResults(pending)
    assert order == ["/v1/tts", "/v1/stt", "/v1/llm"]
