"""Services whose process gpumgr owns, through the real broker: the simulated
whisper.cpp server (its own process; it loads its model before it binds its
port, and has no unload route) started on demand, stopped on eviction."""

from __future__ import annotations

import os
import signal

import pytest
import pytest_twisted
from twisted.internet import defer

from gpumgr.testing import managed_whisper_entry, world_config
from tests.helpers import pid_alive, process_status, transcribe, wait_for

pytestmark = pytest.mark.integration


async def broker_for(world, start_broker, mode, **whisper):
    entry = managed_whisper_entry(world, **whisper)
    config = world_config(world, managed={"whisper": entry}, scheduler={"mode": mode},
                          health={"interval_s": 30})
    service, url = await start_broker(config)
    await service.health.probe_all_now()
    return service, url


@pytest.mark.parametrize("mode", ["passthrough", "locked", "evicting"])
@pytest_twisted.ensureDeferred
async def test_a_request_starts_the_process_first_in_every_mode(managed_world, start_broker,
                                                               client, mode):
    service, url = await broker_for(managed_world, start_broker, mode)
    status = service.status()["consumers"]["whisper"]
    assert status["process"]["state"] == "stopped" and status["health"] == "stopped"
    assert status["loaded"] is False
    reply = await transcribe(client, url)
    assert reply.code == 200 and "text" in reply.json()
    status = service.status()["consumers"]["whisper"]
    assert status["process"]["state"] == "running" and status["health"] == "ok"
    assert status["loaded"] is True and status["process"]["pid"]
    assert any(a.used_mib == 1500 for a in managed_world.gpu.external_allocations())


@pytest_twisted.ensureDeferred
async def test_eviction_stops_the_process_and_its_memory_comes_back(managed_world,
                                                                   start_broker, client):
    # 12000 MiB: ollama 9000 + whisper 1500 + headroom do not fit beside comfyui 7000.
    service, url = await broker_for(managed_world, start_broker, "evicting")
    assert (await transcribe(client, url)).code == 200
    pid = process_status(service)["pid"]
    assert (await client.request("POST", url + "/v1/llm", b'{"prompt":"x"}')).code == 200
    reply = await client.request("POST", url + "/v1/image", b'{"prompt":{}}')
    assert reply.code == 200
    assert process_status(service)["state"] == "stopped"
    assert not pid_alive(pid)
    assert managed_world.gpu.external_allocations() == []
    assert managed_world.gpu.oom_count == 0
    events = [(e["event"], e["consumer"]) for e in service.status()["scheduler"]["recent_events"]]
    assert ("eviction", "whisper") in events
    # ...and the next request starts it again.
    assert (await transcribe(client, url)).code == 200
    assert process_status(service)["state"] == "running"


@pytest_twisted.ensureDeferred
async def test_admin_load_and_unload_start_and_stop_it(managed_world, start_broker, client):
    service, url = await broker_for(managed_world, start_broker, "locked")
    loaded = await client.request("POST", url + "/v1/consumers/whisper/load")
    assert loaded.code == 200 and loaded.json()["loaded"] is True
    assert process_status(service)["state"] == "running"
    unloaded = await client.request("POST", url + "/v1/consumers/whisper/unload")
    assert unloaded.code == 200 and unloaded.json()["loaded"] is False
    assert process_status(service)["state"] == "stopped"


@pytest_twisted.ensureDeferred
async def test_a_process_that_exits_during_start_gives_a_clear_503(managed_world, start_broker,
                                                                  client):
    service, url = await broker_for(managed_world, start_broker, "locked",
                                    fail_load="failed to load model")
    reply = await transcribe(client, url)
    assert reply.code == 503
    error = reply.json()["error"]
    assert error["code"] == "process_start_failed" and error["consumer"] == "whisper"
    assert "status 1" in error["message"] and "failed to load model" in error["message"]
    assert process_status(service)["state"] == "failed"
    assert service.scheduler.stats().in_flight == 0


@pytest_twisted.ensureDeferred
async def test_a_crash_loop_backs_off(managed_world, start_broker, client):
    service, url = await broker_for(managed_world, start_broker, "locked",
                                    fail_load="failed to load model")
    for _ in range(3):
        assert (await transcribe(client, url)).code == 503
    starts = process_status(service)["restarts"]
    refused = await transcribe(client, url)
    assert refused.code == 503 and refused.header("Retry-After") is not None
    assert "failed to load model" in refused.json()["error"]["message"]
    assert process_status(service)["restarts"] == starts  # refused at once, not started


@pytest_twisted.ensureDeferred
async def test_a_start_that_takes_too_long_is_stopped_and_refused(managed_world, start_broker,
                                                                 client):
    service, url = await broker_for(managed_world, start_broker, "locked", load_s=30,
                                    start_timeout_s=0.5)
    reply = await transcribe(client, url)
    assert reply.code == 503 and reply.json()["error"]["code"] == "process_start_failed"
    assert process_status(service)["state"] in ("failed", "stopped")
    assert managed_world.gpu.external_allocations() == []


@pytest_twisted.ensureDeferred
async def test_a_crash_is_recorded_and_the_next_request_restarts_it(managed_world,
                                                                   start_broker, client):
    service, url = await broker_for(managed_world, start_broker, "evicting")
    assert (await transcribe(client, url)).code == 200
    pid = process_status(service)["pid"]
    os.kill(pid, signal.SIGKILL)
    await wait_for(lambda: process_status(service)["state"] == "failed")
    status = service.status()
    assert status["consumers"]["whisper"]["loaded"] is False
    assert status["consumers"]["whisper"]["process"]["exit_code"] == -signal.SIGKILL
    crash = [e for e in status["scheduler"]["recent_events"] if e["event"] == "process_crash"]
    assert crash and crash[-1]["consumer"] == "whisper"
    assert (await transcribe(client, url)).code == 200
    assert process_status(service)["restarts"] == 1
    assert process_status(service)["pid"] != pid


@pytest_twisted.ensureDeferred
async def test_no_process_outlives_a_stopped_broker(managed_world, start_broker, client):
    service, url = await broker_for(managed_world, start_broker, "locked")
    assert (await transcribe(client, url)).code == 200
    pid = process_status(service)["pid"]
    await service.stopService()
    service.stopService = lambda: defer.succeed(None)  # the fixture stops it again
    assert not pid_alive(pid)
