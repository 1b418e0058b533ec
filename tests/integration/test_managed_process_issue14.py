"""A process gpumgr owns, against the real world (issue 14), through the real broker
and the simulated whisper.cpp server as its own process: frozen with SIGSTOP, a
stranger already on its port, a client that leaves during its start, and the
health it reads while it starts."""

from __future__ import annotations

import os
import signal

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from gpumgr.testing import managed_whisper_entry, world_config
from gpumgr.testing.stranger import StrangerListener, StrangerWhisper
from tests.helpers import (
    Client,
    free_port,
    pid_alive,
    process_status,
    settled,
    transcribe,
    wait_for,
)

pytestmark = pytest.mark.integration


async def broker_for(world, start_broker, mode="locked", health=None, **whisper):
    entry = managed_whisper_entry(world, **whisper)
    config = world_config(world, managed={"whisper": entry}, scheduler={"mode": mode},
                          health=health or {"interval_s": 30})
    service, url = await start_broker(config)
    await service.health.probe_all_now()
    return service, url


def events(service, kind):
    return [e for e in service.status()["scheduler"]["recent_events"] if e["event"] == kind]


def in_flight(service) -> int:
    return service.scheduler.stats().in_flight


# -- 4. a frozen service ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_frozen_process_is_stopped_its_job_ends_and_the_next_request_restarts_it(
        managed_world, start_broker, client):
    service, url = await broker_for(
        managed_world, start_broker, health={"interval_s": 0.2, "timeout_s": 0.5,
                                             "down_grace_s": 1.0},
        job_s=5)
    pid = None
    try:
        reply = defer.ensureDeferred(transcribe(client, url))
        await wait_for(lambda: "[REQUEST] New inference request received"
                       in process_status(service)["last_stderr"], timeout_s=20)
        pid = process_status(service)["pid"]
        os.kill(pid, signal.SIGSTOP)  # frozen in the middle of the inference
        # Not request_timeout_s (600 s): the job ends once the process is gone.
        got = await settled(reply.addTimeout(25, reactor))
        assert not isinstance(got, defer.TimeoutError), "the job held the GPU on"
        assert in_flight(service) == 0
        # TERM waits in a frozen process: KILL ended it (its connection closed at once;
        # the exit is reaped a moment later).
        await wait_for(lambda: process_status(service)["state"] == "stopped")
        assert not pid_alive(pid) and process_status(service)["exit_code"] == -signal.SIGKILL
        [stopped] = events(service, "process_unresponsive")
        assert stopped["consumer"] == "whisper" and "health.down_grace_s" in stopped["detail"]
        assert managed_world.gpu.external_allocations() == []
        assert service.status()["consumers"]["whisper"]["loaded"] is False
        # ...and the next request starts it again.
        again = await transcribe(client, url)
        assert again.code == 200 and process_status(service)["pid"] not in (None, pid)
    finally:
        if pid is not None and pid_alive(pid):
            os.kill(pid, signal.SIGCONT)


# -- 5. a stranger on the managed port -----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_stranger_whisper_on_the_port_refuses_the_start_and_nothing_is_spawned(
        managed_world, start_broker, client, tmp_path):
    port = free_port()
    stranger = StrangerWhisper(port, str(tmp_path), vram_mib=700)
    try:
        stranger.wait_listening()
        service, url = await broker_for(managed_world, start_broker, port=port)
        reply = await transcribe(client, url)
        assert reply.code == 503
        error = reply.json()["error"]
        assert error["code"] == "process_start_failed" and error["consumer"] == "whisper"
        assert f"127.0.0.1:{port}" in error["message"]
        status = process_status(service)
        assert status["pid"] is None and status["state"] == "failed"
        # Only the stranger's memory: gpumgr started no second server beside it.
        assert [a.used_mib for a in managed_world.gpu.external_allocations()] == [700]
        assert service.status()["consumers"]["whisper"]["health"] == "stopped"
        assert in_flight(service) == 0
    finally:
        stranger.stop()


@pytest_twisted.ensureDeferred
async def test_a_plain_listener_on_the_port_never_receives_the_upload(
        managed_world, start_broker, client):
    port = free_port()
    stranger = StrangerListener()
    stranger.listen(reactor, port)
    try:
        service, url = await broker_for(managed_world, start_broker, port=port)
        reply = await transcribe(client, url)
        assert reply.code == 503 and reply.json()["error"]["code"] == "process_start_failed"
        assert f"127.0.0.1:{port}" in reply.json()["error"]["message"]
        assert stranger.requests == []  # neither our probes nor the user's upload
        assert process_status(service)["pid"] is None
    finally:
        await stranger.stop()
    # Once the port is free, the next request starts gpumgr's own server.
    reply = await transcribe(client, url)
    assert reply.code == 200 and process_status(service)["state"] == "running"


# -- 6. a client that leaves during a process start ----------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_client_that_leaves_during_a_start_frees_the_gpu_once_the_process_stopped(
        managed_world, start_broker):
    service, url = await broker_for(managed_world, start_broker, load_s=3)
    leaving = Client()
    try:
        reply = defer.ensureDeferred(transcribe(leaving, url))
        await wait_for(lambda: process_status(service)["state"] == "starting"
                       and process_status(service)["pid"] is not None)
        pid = process_status(service)["pid"]
        reply.cancel()  # the client hangs up while the model loads
        await settled(reply)
    finally:
        await leaving.close()
    await wait_for(lambda: in_flight(service) == 0)
    # The lock came back after the stop, not after the start would have ended.
    assert process_status(service)["state"] == "stopped" and not pid_alive(pid)
    assert managed_world.gpu.external_allocations() == []  # it never loaded its model
    assert [e["consumer"] for e in events(service, "load_cancelled")] == ["whisper"]
    assert events(service, "load") == [] and events(service, "process_start_failed") == []


# -- 10. `starting` while it starts --------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_health_reads_starting_while_the_process_starts(managed_world, start_broker,
                                                              client):
    service, url = await broker_for(managed_world, start_broker, load_s=1.5)
    assert service.status()["consumers"]["whisper"]["health"] == "stopped"
    reply = defer.ensureDeferred(transcribe(client, url))
    await wait_for(lambda: process_status(service)["state"] == "starting")
    assert service.status()["consumers"]["whisper"]["health"] == "starting"
    assert (await reply).code == 200
    assert service.status()["consumers"]["whisper"]["health"] == "ok"


@pytest_twisted.async_yield_fixture
async def slow_unload_world(tmp_path):
    """Like managed_world, but ollama's memory comes back 1.5 s after its unload."""
    from gpumgr.testing import Behaviour, make_world

    w = make_world(reactor, str(tmp_path), total_mib=12000, managed_whisper=True,
                   behaviours={"ollama": Behaviour(vram_mib=9000, unload_settle_s=1.5)})
    w.listen(reactor)
    yield w
    await w.stop()


@pytest_twisted.ensureDeferred
async def test_a_client_that_leaves_during_an_eviction_lets_it_complete_and_starts_nothing(
        slow_unload_world, start_broker, client):
    # ollama 9000 + whisper 3000 + headroom do not fit in 12000 MiB: ollama is evicted first.
    service, url = await broker_for(slow_unload_world, start_broker, mode="evicting",
                                    vram_mib=3000)
    assert (await client.request("POST", url + "/v1/llm", b'{"prompt":"x"}')).code == 200
    leaving = Client()
    try:
        reply = defer.ensureDeferred(transcribe(leaving, url))
        await wait_for(lambda: any(e["consumer"] == "ollama" for e in events(service, "eviction")))
        reply.cancel()  # while gpumgr waits for ollama's memory to come back
        await settled(reply)
    finally:
        await leaving.close()
    await wait_for(lambda: in_flight(service) == 0)
    consumers = service.status()["consumers"]
    assert consumers["ollama"]["loaded"] is False  # the eviction completed
    status = process_status(service)
    assert status["state"] == "stopped" and status["pid"] is None  # nobody waits: no start
    assert [a.used_mib for a in slow_unload_world.gpu.external_allocations()] == []
    assert all(e["consumer"] != "whisper" for e in events(service, "load"))
