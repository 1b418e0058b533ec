"""`scheduler.mode: evicting` through the real broker, on a simulated 10,000 MiB GPU.

The simulated consumers allocate VRAM when they load; the simulated
nvidia-smi (a real subprocess) reports it; a load that does not fit is a
simulated CUDA out-of-memory, counted in `world.gpu.oom_count`.
"""

from __future__ import annotations

import os

import pytest_twisted
from twisted.internet import defer, reactor

from gpumgr.testing import Behaviour, SimulatedGpu, SimulatedWorld, world_config
from tests.helpers import HeldStream, sleep, wait_for

GPU_MIB = 10000


def small_world(tmp_path, **consumers) -> SimulatedWorld:
    """consumers: name=(flavour, Behaviour)."""
    gpu = SimulatedGpu(os.path.join(str(tmp_path), "gpu.json"), total_mib=GPU_MIB,
                       baseline_mib=350)
    world = SimulatedWorld(reactor, gpu)
    for name, (flavour, behaviour) in consumers.items():
        world.add(flavour, name, behaviour)
    world.listen(reactor)
    return world


@pytest_twisted.async_yield_fixture
async def abc(tmp_path):
    """A (6000) serves tts, B (6000) stt, C (2000) llm; all mvoice-like with unload routes."""
    world = small_world(tmp_path, A=("mvoice", Behaviour(vram_mib=6000)),
                        B=("mvoice", Behaviour(vram_mib=6000)),
                        C=("mvoice", Behaviour(vram_mib=2000)))
    yield world
    await world.stop()


async def evicting(world, start_broker, kinds=None, consumers=None, **sections):
    sections.setdefault("scheduler", {})
    sections["scheduler"] = {"mode": "evicting", **sections["scheduler"]}
    sections.setdefault("health", {"interval_s": 5})
    config = world_config(world, kinds=kinds, consumers=consumers, **sections)
    service, url = await start_broker(config)
    await service.health.probe_all_now()
    return service, url


ABC_KINDS = {"A": "tts", "B": "stt", "C": "llm"}


@pytest_twisted.ensureDeferred
async def test_a_then_b_unloads_a_first_without_oom(abc, start_broker, client):
    service, url = await evicting(abc, start_broker, kinds=ABC_KINDS)
    assert (await client.request("POST", url + "/v1/tts", b"a")).code == 200
    assert service.registry["A"].loaded is True
    reply = await client.request("POST", url + "/v1/stt", b"b")
    assert reply.code == 200
    assert abc["A"].unloads == 1 and abc.gpu.oom_count == 0
    assert service.registry["A"].loaded is False and service.registry["B"].loaded is True
    status = (await client.request("GET", url + "/v1/status")).json()
    sched = status["scheduler"]
    assert sched["mode"] == "evicting" and sched["evictions"] == 1
    (event,) = [e for e in sched["recent_events"] if e["event"] == "eviction"]
    assert event["consumer"] == "A" and event["reason"] == "pressure" and event["mib"] == 6000


@pytest_twisted.ensureDeferred
async def test_coexisting_consumer_runs_without_eviction(abc, start_broker, client):
    service, url = await evicting(abc, start_broker, kinds=ABC_KINDS,
                                  consumers={"C": {"can_coexist_with": ["A"]}})
    await client.request("POST", url + "/v1/tts", b"a")
    assert (await client.request("POST", url + "/v1/llm", b"c")).code == 200
    assert abc["A"].unloads == 0 and abc.gpu.oom_count == 0
    assert service.registry["A"].loaded and service.registry["C"].loaded


@pytest_twisted.ensureDeferred
async def test_exclusivity_evicts_even_when_memory_fits(abc, start_broker, client):
    abc["B"].behaviour.vram_mib = 2000
    service, url = await evicting(abc, start_broker, kinds=ABC_KINDS,
                                  consumers={"C": {"can_coexist_with": ["A"]},
                                             "B": {"vram_resident_mib": 2000}})
    await client.request("POST", url + "/v1/stt", b"b")  # B loaded; 2000 + 2000 would fit
    before = len(service.admission.events)
    assert (await client.request("POST", url + "/v1/llm", b"c")).code == 200
    assert abc["B"].unloads == 1 and abc.gpu.oom_count == 0
    events = list(service.admission.events)[before:]
    assert [(e.consumer, e.reason) for e in events if e.kind == "eviction"] == [
        ("B", "exclusivity")]


@pytest_twisted.ensureDeferred
async def test_job_waits_for_memory_that_comes_back_late(abc, start_broker, client):
    abc["A"].behaviour.unload_settle_s = 1.0  # the unload answers at once, frees 1 s later
    service, url = await evicting(abc, start_broker, kinds=ABC_KINDS)
    await client.request("POST", url + "/v1/tts", b"a")
    reply = await client.request("POST", url + "/v1/stt", b"b")
    # Without the settle wait B's load would have found A's memory still taken.
    assert reply.code == 200 and abc.gpu.oom_count == 0
    b_started = abc["B"].work_requests()[0].at
    a_unload_asked = [r.at for r in abc["A"].requests if r.path == "/unload"][0]
    assert b_started - a_unload_asked >= 1.0
    # The settle is admission, not queueing: each header says what it measures.
    assert int(reply.header("X-Gpumgr-Admit-Ms")) >= 1000
    assert int(reply.header("X-Gpumgr-Wait-Ms")) < int(reply.header("X-Gpumgr-Admit-Ms"))


@pytest_twisted.ensureDeferred
async def test_failed_unload_gives_insufficient_vram_and_no_oom(abc, start_broker, client):
    abc["A"].behaviour.unload_fails = True
    service, url = await evicting(abc, start_broker, kinds=ABC_KINDS)
    await client.request("POST", url + "/v1/tts", b"a")
    reply = await client.request("POST", url + "/v1/stt", b"b")
    assert reply.code == 503
    err = reply.json()["error"]
    assert err["code"] == "insufficient_vram" and err["consumer"] == "B"
    assert "unload failed for A" in err["message"] and "short by" in err["message"]
    assert abc["B"].work_requests() == [] and abc.gpu.oom_count == 0
    assert service.registry["A"].loaded is None  # unknown after a failed unload
    status = (await client.request("GET", url + "/v1/status")).json()["scheduler"]
    assert status["eviction_failures"] == 1 and status["in_flight"] == 0


@pytest_twisted.ensureDeferred
async def test_abab_queued_runs_as_aabb(tmp_path, start_broker, client):
    world = small_world(tmp_path, A=("ollama", Behaviour(vram_mib=6000, stream_chunks=2)),
                        B=("mvoice", Behaviour(vram_mib=6000)))
    try:
        service, url = await evicting(world, start_broker)
        held = await HeldStream(world["A"]).start(client, url)
        pending = []
        for path, body in (("/v1/tts", b"b1"), ("/v1/llm", b'{"prompt":"2"}'), ("/v1/tts", b"b2")):
            pending.append(defer.ensureDeferred(client.request("POST", url + path, body)))
            depth = len(pending)
            await wait_for(lambda d=depth: service.scheduler.stats().queue_depth == d)
        held.release()
        replies = [await held.reply] + [await d for d in pending]
        assert [r.code for r in replies] == [200] * 4
        assert world.work_log == ["A", "A", "B", "B"]
        assert world["A"].unloads == 1 and world.gpu.oom_count == 0
    finally:
        await world.stop()


@pytest_twisted.ensureDeferred
async def test_idle_unload_fires_but_never_interrupts_a_job(tmp_path, start_broker, client):
    world = small_world(tmp_path, A=("ollama", Behaviour(vram_mib=6000, stream_chunks=2)))
    try:
        service, url = await evicting(world, start_broker, consumers={"A": {"idle_unload_s": 0.2}})
        await client.request("POST", url + "/v1/llm", b'{"prompt":"warm"}')
        held = await HeldStream(world["A"]).start(client, url)
        await sleep(0.6)  # three idle periods pass while the job runs
        assert world["A"].unloads == 0
        held.release()
        assert (await held.reply).code == 200
        await wait_for(lambda: service.registry["A"].loaded is False)
        assert world["A"].unloads == 1
        assert [e.reason for e in service.admission.events if e.kind == "eviction"] == ["idle"]
        assert service.registry["A"].total_requests == 2  # the unload is no request
    finally:
        await world.stop()


@pytest_twisted.ensureDeferred
async def test_oom_on_first_try_is_replayed_once_after_evicting(abc, start_broker, client):
    # No GPU sample and no gpu.total_mib: pressure cannot be checked, so B's
    # load meets A's memory and the consumer answers CUDA out of memory.
    service, url = await evicting(abc, start_broker, kinds=ABC_KINDS,
                                  gpu={"nvidia_smi": "/nonexistent/nvidia-smi"})
    await client.request("POST", url + "/v1/tts", b"a")
    reply = await client.request("POST", url + "/v1/stt", b"b")
    assert reply.code == 200, reply.body
    assert abc.gpu.oom_count == 1  # the first try, by construction
    assert abc["A"].unloads == 1
    assert len(abc["B"].work_requests()) == 2  # replayed once
    status = (await client.request("GET", url + "/v1/status")).json()["scheduler"]
    assert status["oom_retries"] == 1
    assert any(e["event"] == "oom_retry" for e in status["recent_events"])


@pytest_twisted.ensureDeferred
async def test_gpu_total_from_config_when_no_sample(abc, start_broker, client):
    service, url = await evicting(abc, start_broker, kinds=ABC_KINDS,
                                  gpu={"nvidia_smi": "/nonexistent/nvidia-smi",
                                       "total_mib": GPU_MIB - 350})
    await client.request("POST", url + "/v1/tts", b"a")
    assert (await client.request("POST", url + "/v1/stt", b"b")).code == 200
    assert abc.gpu.oom_count == 0 and abc["A"].unloads == 1


@pytest_twisted.ensureDeferred
async def test_admin_endpoints_with_token(abc, start_broker, client):
    service, url = await evicting(abc, start_broker, kinds=ABC_KINDS, admin_token="s3cret")
    no = await client.request("POST", url + "/v1/consumers/A/load")
    assert no.code == 401 and no.json()["error"]["code"] == "unauthorized"
    assert no.header("WWW-Authenticate") is not None
    wrong = await client.request("POST", url + "/v1/consumers/A/load",
                                 headers={"Authorization": "Bearer nope"})
    assert wrong.code == 401
    auth = {"Authorization": "Bearer s3cret"}
    ok = await client.request("POST", url + "/v1/consumers/A/load", headers=auth)
    assert ok.code == 200 and ok.json()["loaded"] is True
    assert abc["A"].loaded and abc["A"].work_requests() == []
    ok = await client.request("POST", url + "/v1/consumers/B/load", headers=auth)
    assert ok.code == 200 and abc["A"].unloads == 1  # made room for B
    ok = await client.request("POST", url + "/v1/consumers/B/unload", headers=auth)
    assert ok.code == 200 and ok.json()["loaded"] is False and not abc["B"].loaded
    missing = await client.request("POST", url + "/v1/consumers/ghost/load", headers=auth)
    assert missing.code == 404 and missing.json()["error"]["code"] == "unknown_consumer"
    get = await client.request("GET", url + "/v1/consumers/A/load", headers=auth)
    assert get.code == 405
    events = [(e.kind, e.consumer, e.reason) for e in service.admission.events]
    assert ("load", "A", "admin") in events and ("unload", "B", "admin") in events


@pytest_twisted.ensureDeferred
async def test_admin_without_token_serves_loopback_and_refuses_unsupported(
        world, start_broker, client):
    service, url = await evicting(world, start_broker)
    ok = await client.request("POST", url + "/v1/consumers/mvoice/unload")
    assert ok.code == 200
    pinned = await client.request("POST", url + "/v1/consumers/whisper/unload")
    assert pinned.code == 409 and pinned.json()["error"]["code"] == "not_supported"
    noload = await client.request("POST", url + "/v1/consumers/comfyui/load")
    assert noload.code == 409


@pytest_twisted.ensureDeferred
async def test_preload_loads_at_start_through_the_scheduler(abc, start_broker, client):
    service, url = await evicting(abc, start_broker, kinds=ABC_KINDS,
                                  consumers={"B": {"preload": True}})
    await wait_for(lambda: service.registry["B"].loaded is True)
    assert abc["B"].loaded and abc["B"].loads == 1 and abc["B"].work_requests() == []
    assert [(e.kind, e.reason) for e in service.admission.events] == [("load", "preload")]


@pytest_twisted.ensureDeferred
async def test_measured_residency_from_gpu_process(abc, start_broker, client):
    service, url = await evicting(abc, start_broker, kinds=ABC_KINDS,
                                  consumers={"A": {"gpu_process": "^A-process$"}})
    abc["A"].process_name = "A-process"
    await client.request("POST", url + "/v1/tts", b"a")
    await service.gpu.sample_now()
    assert service.registry["A"].loaded is True
    assert service.registry["A"].gpu_resident_mib == 6000
    abc.gpu.free("A")  # the process gave its memory back on its own
    await service.gpu.sample_now()
    assert service.registry["A"].loaded is False and service.registry["A"].gpu_resident_mib == 0


@pytest_twisted.ensureDeferred
async def test_capacity_two_never_evicts_a_consumer_under_a_running_job(tmp_path, start_broker,
                                                                         client):
    world = small_world(tmp_path, A=("ollama", Behaviour(vram_mib=6000)),
                        B=("mvoice", Behaviour(vram_mib=2000)))
    try:
        service, url = await evicting(world, start_broker, scheduler={"capacity": 2},
                                      consumers={"B": {"can_coexist_with": []}})
        held = await HeldStream(world["A"]).start(client, url)
        reply = await client.request("POST", url + "/v1/tts", b"b")
        assert reply.code == 503
        err = reply.json()["error"]
        assert err["code"] == "insufficient_vram" and "running a job" in err["message"]
        assert world["A"].unloads == 0
        held.release()
        assert (await held.reply).code == 200 and (await held.reply).complete
    finally:
        await world.stop()


@pytest_twisted.ensureDeferred
async def test_a_client_that_leaves_early_does_not_wedge_its_consumer(tmp_path, start_broker,
                                                                      client):
    """Regression (issue 8): after a client left mid-stream, ollama's model
    stayed resident but gpumgr kept it `unknown`; measured free memory no
    longer counted it, so every later request was refused insufficient_vram
    until an admin unload. A consumer that received a job may hold its memory,
    whatever the outcome."""
    world = small_world(tmp_path, ollama=("ollama", Behaviour(vram_mib=6000)),
                        mvoice=("mvoice", Behaviour(vram_mib=2000)))
    try:
        service, url = await evicting(world, start_broker)
        held = HeldStream(world["ollama"], chunks=3)
        left = defer.Deferred()

        def leave(collector, data):
            collector.transport.stopProducing()  # the client walks away mid-stream
            if not left.called:
                left.callback(None)

        reply = defer.ensureDeferred(client.request("POST", url + "/v1/llm", b'{"prompt":"x"}',
                                                    on_chunk=leave))
        await left
        held.release()
        await reply
        await wait_for(lambda: service.scheduler.stats().in_flight == 0)
        assert any(owner.startswith("ollama") for owner in world.gpu.allocations)  # resident
        again = await client.request("POST", url + "/v1/llm", b'{"prompt":"again"}')
        assert again.code == 200, again.body
        assert service.registry["ollama"].loaded is True
        assert world.gpu.oom_count == 0
        # ...and it can still be evicted for something that needs the room.
        tts = await client.request("POST", url + "/v1/tts", b"t")
        assert tts.code == 200 and world.gpu.oom_count == 0
    finally:
        await world.stop()


@pytest_twisted.ensureDeferred
async def test_a_consumer_that_went_down_and_came_back_is_not_trusted_to_be_loaded(
        abc, start_broker, client):
    """Found by the fault suite: a consumer that restarts has lost its model,
    but gpumgr kept it `loaded`, so its next job skipped the pressure check
    and met the memory another consumer took meanwhile: a CUDA out-of-memory
    (for ComfyUI, a render that fails after the client got its 200). Once its
    health check fails, where it stands is unknown."""
    service, url = await evicting(abc, start_broker, kinds=ABC_KINDS)
    assert (await client.request("POST", url + "/v1/tts", b"a")).code == 200
    await abc.stop_consumer("A")  # its process dies: its memory is back
    await service.health.probe_all_now()
    assert service.registry["A"].health == "down"
    abc.restart_consumer("A")
    await service.health.probe_all_now()
    assert (await client.request("POST", url + "/v1/stt", b"b")).code == 200  # B takes the room
    assert (await client.request("POST", url + "/v1/tts", b"a")).code == 200
    assert abc.gpu.oom_count == 0
    assert abc["B"].unloads == 1


@pytest_twisted.ensureDeferred
async def test_a_job_that_found_its_consumer_gone_leaves_it_unknown_not_loaded(
        abc, start_broker, client):
    """Found by the fault suite: the same, when the job itself meets the
    reset: the exchange marks the consumer down, and the end of the job
    then marked it `loaded` again."""
    service, url = await evicting(abc, start_broker, kinds=ABC_KINDS)
    assert (await client.request("POST", url + "/v1/tts", b"a")).code == 200
    abc["A"].behaviour.job_s = 30.0
    reply = defer.ensureDeferred(client.request("POST", url + "/v1/tts", b"a"))
    await wait_for(lambda: abc["A"].jobs_started == 2)
    await abc.stop_consumer("A")  # reset before the answer
    assert (await reply).code == 502
    assert service.registry["A"].loaded is not True
    abc["A"].behaviour.job_s = 0.02
    abc.restart_consumer("A")
    # The re-probe the reset triggered may still be on its way (refused): wait
    # for it, then probe the restarted consumer afresh.
    await service.health.probe_all_now()
    await service.health.probe_all_now()
    assert service.registry["A"].health == "ok"
    assert (await client.request("POST", url + "/v1/stt", b"b")).code == 200
    assert (await client.request("POST", url + "/v1/tts", b"a")).code == 200
    assert abc.gpu.oom_count == 0
