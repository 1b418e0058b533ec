"""A client that leaves a running job: the GPU stays held until the service stopped.

The real broker (locked, capacity 1) in front of the simulated services and
the simulated nvidia-smi, over loopback. The simulated ollama goes on
computing after its client left (it notices only at its next write, and not
at all while it evaluates a prompt, as ollama#11889 describes), so a GPU
given back when the connection closes lets the next job onto a card that
still computes: the simulated card records that as an overlap.
"""

from __future__ import annotations

import io
import json

import pytest_twisted
from twisted.internet import defer, reactor
from twisted.web.client import Agent, FileBodyProducer, ResponseNeverReceived
from twisted.web.http_headers import Headers

from gpumgr.testing import world_config
from tests.helpers import AUDIO, Collector, wait_for

STREAM = json.dumps({"model": "llama3", "prompt": "a long prompt"}).encode()
JSON = Headers({b"Content-Type": [b"application/json"]})


async def locked_broker(world, start_broker, **consumers):
    config = world_config(world, scheduler={"mode": "locked"}, health={"interval_s": 0.5},
                          gpu={"interval_s": 0.5}, consumers=consumers or None)
    service, url = await start_broker(config)
    await service.health.probe_all_now()
    return service, url


def post(url: str, body: bytes) -> defer.Deferred:
    return Agent(reactor).request(b"POST", url.encode(), JSON, FileBodyProducer(io.BytesIO(body)))


def transcription(url: str) -> defer.Deferred:
    """A transcription whose client may leave (cancel it)."""
    pending = Agent(reactor).request(
        b"POST", (url + "/v1/stt").encode(),
        Headers({b"Content-Type": [b"multipart/form-data; boundary=b"]}),
        FileBodyProducer(io.BytesIO(AUDIO)))
    return pending.addErrback(lambda f: f.trap(defer.CancelledError, ResponseNeverReceived))


async def whisper_client_leaves(world, service, client, url: str):
    """A transcription starts, a TTS queues behind it, and the transcription's
    client leaves; returns the TTS's reply, pending."""
    pending = transcription(url)
    await wait_for(lambda: world.active_jobs == 1)
    after = defer.ensureDeferred(tts(client, url))
    await wait_for(lambda: service.scheduler.stats().queue_depth == 1)
    pending.cancel()
    return after


async def tts(client, url: str):
    return await client.request("POST", url + "/v1/tts", b'{"text":"next"}',
                                {"Content-Type": "application/json"})


@pytest_twisted.ensureDeferred
async def test_a_client_leaving_mid_prompt_never_lets_the_next_job_overlap(world, start_broker,
                                                                            client):
    ollama = world["ollama"]
    ollama.behaviour.prompt_eval_s = 1.5
    ollama.behaviour.working_mib = 1000
    service, url = await locked_broker(world, start_broker)
    pending = post(url + "/v1/llm", STREAM)
    pending.addErrback(lambda f: f.trap(defer.CancelledError, ResponseNeverReceived))
    await wait_for(lambda: world.active_jobs == 1)
    after = defer.ensureDeferred(tts(client, url))
    await wait_for(lambda: service.scheduler.stats().queue_depth == 1)
    pending.cancel()  # the client leaves while ollama evaluates its prompt

    # Status and metrics show the job draining while ollama computes on.
    await wait_for(lambda: service.status()["scheduler"]["draining"])
    status = service.status()["scheduler"]
    (holder,) = status["holders"]
    assert (holder["consumer"], holder["state"]) == ("ollama", "draining after the client left")
    assert status["draining"][0]["consumer"] == "ollama" and status["queue_depth"] == 1
    metrics = (await client.request("GET", url + "/metrics")).body.decode()
    assert "gpumgr_abandoned_draining_jobs 1.0" in metrics

    reply = await after
    assert reply.code == 200
    await wait_for(lambda: world.active_jobs == 0)
    assert ollama.jobs_cancelled == 1  # it did notice, at its first write
    assert world.gpu.overlaps == []
    assert world.gpu.oom_count == 0
    status = service.status()["scheduler"]
    assert status["drains"] == {"gpu_idle": 1} and status["draining"] == []
    (event,) = [e for e in status["recent_events"] if e["event"].startswith("abandoned")]
    assert event["event"] == "abandoned_settled" and event["consumer"] == "ollama"
    metrics = (await client.request("GET", url + "/metrics")).body.decode()
    assert 'gpumgr_abandoned_drain_seconds_count{consumer="ollama"} 1.0' in metrics
    assert 'gpumgr_abandoned_drains_total{outcome="gpu_idle"} 1.0' in metrics


@pytest_twisted.ensureDeferred
async def test_a_client_leaving_mid_stream_never_lets_the_next_job_overlap(world, start_broker,
                                                                            client):
    ollama = world["ollama"]
    ollama.behaviour.stream_chunks = 4
    ollama.behaviour.chunk_interval_s = 1.5  # a slow token: the next write is far
    ollama.behaviour.working_mib = 1000
    service, url = await locked_broker(world, start_broker)
    response = await post(url + "/v1/llm", STREAM)
    first = defer.Deferred()

    def on_chunk(collector, data):
        if not first.called:
            first.callback(collector)

    collector = Collector(on_chunk)
    response.deliverBody(collector)
    await first
    after = defer.ensureDeferred(tts(client, url))
    await wait_for(lambda: service.scheduler.stats().queue_depth == 1)
    collector.transport.stopProducing()  # the client leaves after one token

    reply = await after
    assert reply.code == 200
    await wait_for(lambda: world.active_jobs == 0)
    assert ollama.jobs_cancelled == 1  # at its next write
    assert world.gpu.overlaps == []
    assert world.gpu.oom_count == 0


@pytest_twisted.ensureDeferred
async def test_the_grace_bounds_a_service_that_never_goes_idle(world, start_broker, client):
    ollama = world["ollama"]
    ollama.behaviour.stream_chunks = 3
    gate: defer.Deferred = defer.Deferred()
    ollama.behaviour.stream_gate = lambda i: gate  # after the first token it computes for ever
    service, url = await locked_broker(world, start_broker,
                                       ollama={"abandoned_grace_s": 1.0})
    try:
        response = await post(url + "/v1/llm", STREAM)
        first = defer.Deferred()
        collector = Collector(lambda c, data: None if first.called else first.callback(c))
        response.deliverBody(collector)
        await first
        after = defer.ensureDeferred(tts(client, url))
        await wait_for(lambda: service.scheduler.stats().queue_depth == 1)
        collector.transport.stopProducing()

        reply = await after  # once the grace ran out
        assert reply.code == 200
        assert world.active_jobs == 1  # ollama still computes: gpumgr gave up waiting
        status = service.status()["scheduler"]
        assert status["drains"] == {"grace_expired": 1}
        (event,) = [e for e in status["recent_events"] if e["event"].startswith("abandoned")]
        assert event["event"] == "abandoned_grace_expired"
        hold = service.broker.abandoned.durations_s["ollama"]
        assert hold.count == 1 and hold.total >= 1.0
    finally:
        gate.callback(None)
    await wait_for(lambda: world.active_jobs == 0)


@pytest_twisted.ensureDeferred
async def test_a_whisper_inference_whose_client_left_holds_the_gpu_until_it_ends(
        world, start_broker, client):
    whisper = world["whisper"]
    whisper.behaviour.job_s = 1.5  # it looks at its client only when it is done
    service, url = await locked_broker(world, start_broker)
    after = await whisper_client_leaves(world, service, client, url)
    assert (await after).code == 200
    await wait_for(lambda: world.active_jobs == 0)
    assert whisper.jobs_cancelled == 1
    assert world.gpu.overlaps == []


@pytest_twisted.ensureDeferred
async def test_without_utilisation_the_processes_memory_coming_back_is_the_evidence(
        world, start_broker, client):
    world.gpu.reports_utilization = False  # [N/A], as under MIG
    ollama = world["ollama"]
    ollama.behaviour.prompt_eval_s = 1.5
    ollama.behaviour.working_mib = 1000
    service, url = await locked_broker(world, start_broker, ollama={"gpu_process": "ollama"})
    pending = post(url + "/v1/llm", STREAM)
    pending.addErrback(lambda f: f.trap(defer.CancelledError, ResponseNeverReceived))
    await wait_for(lambda: world.active_jobs == 1)
    after = defer.ensureDeferred(tts(client, url))
    await wait_for(lambda: service.scheduler.stats().queue_depth == 1)
    pending.cancel()

    assert (await after).code == 200
    await wait_for(lambda: world.active_jobs == 0)
    assert world.gpu.overlaps == []
    assert service.status()["scheduler"]["drains"] == {"memory_back": 1}


@pytest_twisted.ensureDeferred
async def test_whisper_servers_own_lock_is_the_evidence_where_nothing_else_is(
        world, start_broker, client):
    """No utilisation (MIG) and no `gpu_process`: whisper-server answers an
    empty /inference only once it holds its inference lock, so once the
    inference the client left ended (the simulation, like the real server,
    takes the lock before it looks for the file)."""
    world.gpu.reports_utilization = False
    whisper = world["whisper"]
    whisper.behaviour.job_s = 1.5
    service, url = await locked_broker(world, start_broker, whisper={"abandoned_grace_s": 60})
    after = await whisper_client_leaves(world, service, client, url)
    await wait_for(lambda: service.status()["scheduler"]["drains"], timeout_s=30)
    assert service.status()["scheduler"]["drains"] == {"service_drained": 1}
    assert whisper.jobs_cancelled == 1  # the inference had ended when the drain did
    assert (await after).code == 200
    assert world.gpu.overlaps == []
    (probe,) = [r for r in whisper.requests if r.path == "/inference" and r.body_len == 0]
    assert probe.headers.getRawHeaders(b"user-agent")[0].startswith(b"gpumgr/")


@pytest_twisted.ensureDeferred
async def test_whisper_servers_lock_is_not_asked_while_another_job_of_it_runs(
        world, start_broker, client):
    """Found in review: its lock is not a queue (std::mutex is not fair), so
    with another of gpumgr's jobs waiting inside whisper its turn could come
    before the job the client left: then there is no such evidence."""
    world.gpu.reports_utilization = False
    whisper = world["whisper"]
    whisper.behaviour.job_s = 1.0
    config = world_config(world, scheduler={"mode": "locked", "capacity": 2},
                          health={"interval_s": 0.5}, gpu={"interval_s": 0.5},
                          consumers={"whisper": {"abandoned_grace_s": 1.5}})
    service, url = await start_broker(config)
    await service.health.probe_all_now()
    first = transcription(url)
    await wait_for(lambda: world.active_jobs == 1)
    second = defer.ensureDeferred(client.request(
        "POST", url + "/v1/stt", AUDIO, {"Content-Type": "multipart/form-data; boundary=b"}))
    await wait_for(lambda: service.scheduler.stats().in_flight == 2)
    first.cancel()
    assert (await second).code == 200
    await wait_for(lambda: service.status()["scheduler"]["drains"], timeout_s=10)
    assert service.status()["scheduler"]["drains"] == {"grace_expired": 1}
    assert [r for r in whisper.requests if r.path == "/inference" and r.body_len == 0] == []


@pytest_twisted.ensureDeferred
async def test_a_failing_health_check_is_not_evidence_that_abandoned_work_stopped(
        world, start_broker, client):
    """A service that answers its health route 503 (busy, flapping) may still
    compute: only a service that is gone (its port refuses, its process
    exited) is evidence. Found by the fault suite: mvoice flapped while it
    synthesised for a client that had left, and the next job overlapped."""
    mvoice = world["mvoice"]
    mvoice.behaviour.job_s = 2.0
    service, url = await locked_broker(world, start_broker)
    pending = post(url + "/v1/tts", b'{"text":"long"}')
    pending.addErrback(lambda f: f.trap(defer.CancelledError, ResponseNeverReceived))
    await wait_for(lambda: world.active_jobs == 1)
    pending.cancel()  # the client leaves while mvoice synthesises
    await wait_for(lambda: service.status()["scheduler"]["draining"])
    mvoice.behaviour.healthy = False  # its health route fails meanwhile
    await service.health.probe_now("mvoice")
    assert service.registry["mvoice"].health.value == "down"
    after = defer.ensureDeferred(client.request(
        "POST", url + "/v1/llm", json.dumps({"prompt": "next", "stream": False}).encode(),
        {"Content-Type": "application/json"}))
    await wait_for(lambda: world.active_jobs == 0, timeout_s=10)
    mvoice.behaviour.healthy = True
    assert (await after).code == 200
    assert world.gpu.overlaps == []
    assert service.status()["scheduler"]["drains"].get("service_down") is None


@pytest_twisted.ensureDeferred
async def test_a_service_that_is_gone_ends_the_drain(world, start_broker, client):
    """Its port refuses connections: the work is over, whatever was running."""
    mvoice = world["mvoice"]
    mvoice.behaviour.job_s = 30.0
    service, url = await locked_broker(world, start_broker)
    pending = post(url + "/v1/tts", b'{"text":"long"}')
    pending.addErrback(lambda f: f.trap(defer.CancelledError, ResponseNeverReceived))
    await wait_for(lambda: world.active_jobs == 1)
    pending.cancel()
    await wait_for(lambda: service.status()["scheduler"]["draining"])
    await world.stop_consumer("mvoice")
    await service.health.probe_now("mvoice")
    assert service.registry["mvoice"].refused is True
    await wait_for(lambda: not service.status()["scheduler"]["draining"])
    assert service.status()["scheduler"]["drains"] == {"service_down": 1}
    assert service.scheduler.stats().in_flight == 0
