"""Defects found in review (hostile and careless use of the new paths).

Each test is the smallest reproduction of one defect and is marked
`xfail(strict=True)`: the suite stays green until the defect is fixed, and
then the test must lose its mark (a fixed defect makes it XPASS, which fails).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import threading

import pytest
import pytest_twisted
import yaml
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ProcessTerminated
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from gpumgr.admission import Admission
from gpumgr.config import load_config, parse_config
from gpumgr.drivers.comfyui import ComfyUIDriver
from gpumgr.process import ManagedProcess, ProcessState
from gpumgr.registry import Registry
from gpumgr.target import parse_target
from gpumgr.testing import managed_whisper_entry, world_config, world_config_raw
from tests.helpers import (
    FakeProcessReactor,
    Gate,
    HeldStream,
    NoSample,
    PASS,
    RawClient,
    ScriptedProbe,
    UPGRADE,
    comfy_broker,
    file_broker,
    get_status,
    http_request,
    locked_broker,
    spec,
    transcribe,
    wait_for,
    wait_until,
)


def xfail(reason: str):
    return pytest.mark.xfail(strict=True, reason=reason)


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


# -- pass-through -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_percent_encoded_gpu_routes_are_still_scheduled(world, start_broker):
    service, _ = await locked_broker(world, start_broker)
    assert service.broker.route("image", "POST", parse_target(b"/%70rompt")).scheduled is True
    assert service.broker.route("llm", "POST", parse_target(b"/api/%67enerate")).scheduled


@pytest_twisted.ensureDeferred
async def test_head_reaches_the_consumer_as_head(world, start_broker, client):
    _, url = await locked_broker(world, start_broker)
    before = len(world["mvoice"].requests)
    reply = await client.request("HEAD", url + "/v1/tts/health")
    assert reply.code == 200
    assert [r.method for r in world["mvoice"].requests[before:]] == ["HEAD"]


@pytest_twisted.ensureDeferred
async def test_metrics_refuses_wrong_methods_in_json(broker, client):
    _, url = broker
    for method in ("POST", "DELETE"):
        reply = await client.request(method, url + "/metrics")
        assert reply.code == 405 and reply.header("Content-Type") == b"application/json"


# -- render tracking -----------------------------------------------------------------------


def _polls(world):
    return [r for r in world["comfyui"].requests
            if r.method == "GET" and (r.path.startswith("/history/") or r.path == "/queue")]


@pytest_twisted.ensureDeferred
async def test_a_reused_prompt_id_still_holds_the_gpu_while_it_renders(world, start_broker,
                                                                      client):
    service, url = await comfy_broker(world, start_broker)
    body = b'{"prompt":{},"prompt_id":"my-fixed-id"}'
    assert (await client.request("POST", url + "/v1/image", body)).code == 200
    await wait_for(lambda: service.scheduler.stats().in_flight == 0)  # first render over
    gate = Gate(world["comfyui"])
    polls_before = len(_polls(world))
    assert (await client.request("POST", url + "/v1/image", body)).code == 200
    try:
        await wait_for(lambda: "my-fixed-id" in gate.gates)  # ComfyUI is rendering it now
        await wait_for(lambda: len(_polls(world)) >= polls_before + 2, timeout_s=5)
        assert service.scheduler.stats().in_flight == 1
    finally:
        gate.release()


@pytest_twisted.ensureDeferred
async def test_a_render_lost_to_a_quick_comfyui_restart_releases_the_gpu(world, start_broker,
                                                                        client):
    service, url = await comfy_broker(world, start_broker)
    Gate(world["comfyui"])
    assert (await client.request("POST", url + "/v1/image", b'{"prompt":{}}')).code == 200
    assert service.scheduler.stats().in_flight == 1
    await world.stop_consumer("comfyui")
    world.restart_consumer("comfyui")  # back before the next poll: queue and history empty
    await wait_for(lambda: service.scheduler.stats().in_flight == 0, timeout_s=6)


@pytest_twisted.ensureDeferred
async def test_a_render_tracked_across_a_url_change_releases_the_gpu(world, start_broker,
                                                                    client, tmp_path,
                                                                    ws_upstream):
    path = tmp_path / "gpumgr.yaml"
    service, url = await file_broker(world, start_broker, path, scheduler={"mode": "locked"},
                                     health={"interval_s": 0.2})
    Gate(world["comfyui"])
    assert (await client.request("POST", url + "/v1/image", b'{"prompt":{}}')).code == 200
    raw = world_config_raw(world, health={"interval_s": 0.2}, scheduler={"mode": "locked"})
    raw["consumers"]["comfyui"]["url"] = ws_upstream  # answers 200 to the health probe
    path.write_text(yaml.safe_dump(raw))
    assert (await client.request("POST", url + "/v1/admin/reload")).code == 200
    await world.stop_consumer("comfyui")  # the old instance, and its render, are gone
    await wait_for(lambda: service.scheduler.stats().in_flight == 0, timeout_s=6)


def test_a_prompt_answer_over_64_kib_still_names_its_render():
    errors = {f"node{i}": {"errors": ["x" * 200], "class_type": "X"} for i in range(400)}
    body = json.dumps({"prompt_id": "abc", "number": 1, "node_errors": errors}).encode()
    head = body[:64 * 1024]  # what the broker hands the driver
    assert ComfyUIDriver().render_id("POST", "/prompt", 200, head) == "abc"


@pytest_twisted.ensureDeferred
async def test_job_timeout_bounds_a_stream_too(world, start_broker, client):
    service, url = await start_broker(world_config(
        world, scheduler={"mode": "locked"}, health={"interval_s": 30},
        consumers={"ollama": {"job_timeout_s": 0.5}}))
    held = await HeldStream(world["ollama"]).start(client, url)
    try:
        await wait_for(lambda: service.scheduler.stats().in_flight == 0, timeout_s=5)
    finally:
        held.release()


# -- reload --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_queued_job_whose_consumer_a_reload_removed_is_not_a_500(world, start_broker,
                                                                        client, tmp_path):
    path = tmp_path / "gpumgr.yaml"
    service, url = await file_broker(world, start_broker, path, scheduler={"mode": "evicting"})
    held = await HeldStream(world["ollama"]).start(client, url)
    queued = defer.ensureDeferred(client.request("POST", url + "/v1/image", b'{"prompt":{}}'))
    await wait_for(lambda: service.scheduler.stats().queue_depth == 1)
    raw = world_config_raw(world, health={"interval_s": 30}, scheduler={"mode": "evicting"})
    del raw["consumers"]["comfyui"], raw["routes"]["image"]
    path.write_text(yaml.safe_dump(raw))
    assert (await client.request("POST", url + "/v1/admin/reload")).code == 200
    held.release()
    await held.reply
    reply = await queued
    assert reply.code != 500, reply.body


@pytest_twisted.ensureDeferred
async def test_removing_a_consumer_with_a_tracked_render_logs_no_traceback(world, start_broker,
                                                                          client, tmp_path):
    failures = []

    def observe(event):
        if event.get("log_failure") is not None:
            failures.append(event["log_failure"])

    path = tmp_path / "gpumgr.yaml"
    service, url = await file_broker(world, start_broker, path, scheduler={"mode": "locked"})
    Gate(world["comfyui"])
    assert (await client.request("POST", url + "/v1/image", b'{"prompt":{}}')).code == 200
    raw = world_config_raw(world, health={"interval_s": 30}, scheduler={"mode": "locked"})
    del raw["consumers"]["comfyui"], raw["routes"]["image"]
    path.write_text(yaml.safe_dump(raw))
    globalLogPublisher.addObserver(observe)
    try:
        assert (await client.request("POST", url + "/v1/admin/reload")).code == 200
        await wait_for(lambda: service.scheduler.stats().in_flight == 0)
    finally:
        globalLogPublisher.removeObserver(observe)
    assert [f.getErrorMessage() for f in failures] == []


# -- managed processes ---------------------------------------------------------------------


def _kill_simulated_servers(world) -> None:
    for allocation in world.gpu.external_allocations():
        try:
            os.kill(allocation.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest_twisted.ensureDeferred
async def test_stopping_a_wrapped_server_stops_the_server(managed_world,  # noqa: F811
                                                          start_broker, client):
    entry = managed_whisper_entry(managed_world)
    argv = entry["process"]["command"]
    entry["process"]["command"] = ["/bin/sh", "-c", shlex.join(argv) + "; exit $?"]
    config = world_config(managed_world, managed={"whisper": entry},
                          scheduler={"mode": "locked"}, health={"interval_s": 30},
                          gpu={"unload_settle_s": 0.5})
    service, url = await start_broker(config)
    try:
        assert (await transcribe(client, url)).code == 200
        unloaded = await client.request("POST", url + "/v1/consumers/whisper/unload")
        assert unloaded.code == 200 and unloaded.json()["loaded"] is False
        assert managed_world.gpu.external_allocations() == []  # today: still 1500 MiB held
    finally:
        _kill_simulated_servers(managed_world)


@pytest_twisted.ensureDeferred
async def test_reloading_a_busy_process_block_never_runs_two_servers(managed_world,  # noqa: F811
                                                                    start_broker, client,
                                                                    tmp_path):
    entry = managed_whisper_entry(managed_world, job_s=1.0)
    path = tmp_path / "gpumgr.yaml"
    raw = world_config_raw(managed_world, managed={"whisper": entry},
                           scheduler={"mode": "locked"}, health={"interval_s": 30})
    path.write_text(yaml.safe_dump(raw))
    service, url = await start_broker(load_config(str(path)))
    try:
        first = defer.ensureDeferred(transcribe(client, url))
        await wait_for(lambda: service.broker.processes["whisper"].state
                       is ProcessState.RUNNING)
        second = defer.ensureDeferred(transcribe(client, url))
        await wait_for(lambda: service.scheduler.stats().queue_depth == 1)
        raw["consumers"]["whisper"]["process"]["env"] = {"WHISPER_THREADS": "4"}
        path.write_text(yaml.safe_dump(raw))
        assert (await client.request("POST", url + "/v1/admin/reload")).code == 200
        assert (await first).code == 200
        assert (await second).code == 200
        # The second request was served by the process of the new config, alone.
        serving = [a.pid for a in managed_world.gpu.external_allocations()]
        assert serving == [service.broker.processes["whisper"].pid]
    finally:
        _kill_simulated_servers(managed_world)


def test_a_start_cancelled_while_stopping_spawns_nothing():
    fake, probe = FakeProcessReactor(), ScriptedProbe()
    probe.healthy = True
    mp = ManagedProcess(fake, "whisper", spec(), probe)
    mp.start()
    mp.stop()
    waiting = mp.start()
    waiting.addErrback(lambda _: None)
    waiting.cancel()
    ended = Failure(ProcessTerminated(signal=signal.SIGTERM))
    fake.transports[0].proto.processExited(ended)
    fake.transports[0].proto.processEnded(ended)
    assert len(fake.spawned) == 1 and mp.state is ProcessState.STOPPED


class _SlowStop:
    """A process that needs SIGKILL: its stop ends after stop_timeout_s."""

    def __init__(self, clock: Clock, stop_s: float) -> None:
        self._clock, self._stop_s = clock, stop_s

    def unload(self, name):
        d: defer.Deferred[None] = defer.Deferred()
        self._clock.callLater(self._stop_s, lambda: d.called or d.callback(None))
        return d

    def load(self, name):
        return defer.succeed(None)

    def load_timeout_s(self, name):
        return 60.0


def test_an_unload_waits_as_long_as_the_process_may_take_to_stop():
    clock = Clock()
    config = parse_config({
        "routes": {"stt": "whisper"},
        "consumers": {"whisper": {
            "url": "http://127.0.0.1:9", "driver": "whisper.cpp", "paths": {"stt": "/inference"},
            "vram_resident_mib": 1500,
            "process": {"command": ["/bin/true"], "stop_timeout_s": 60}}}}, "<review>")
    registry = Registry(config.consumers)
    registry.mark_loaded("whisper", 1500)
    admission = Admission(clock, lambda: config, registry, NoSample(), _SlowStop(clock, 45.0),
                          runner=None)  # type: ignore[arg-type]
    results = []
    admission.unload("whisper", "admin").addBoth(results.append)
    clock.advance(45.0)
    assert results == [True] and admission.eviction_failures == 0


# -- signals on a real twistd ------------------------------------------------------------


def _drain_with_second_signal(demo_process, second):  # noqa: F811
    proc, port, _, output = demo_process
    result = {}

    def stream():
        _, r = http_request(port, "POST", "/v1/llm", b'{"prompt":"long"}')
        result["lines"] = [json.loads(line) for line in r.read().splitlines()]

    t = threading.Thread(target=stream)
    t.start()
    wait_until(lambda: get_status(port)["scheduler"]["in_flight"] == 1)
    proc.send_signal(signal.SIGTERM)

    def refused():
        try:
            http_request(port, "GET", "/healthz")
        except OSError:
            return True
        return False

    wait_until(refused)  # draining: the port is closed, the stream still runs
    proc.send_signal(second)
    t.join(timeout=30)
    code = proc.wait(timeout=30)
    return code, result.get("lines"), output()


@pytest.mark.slow
def test_a_second_sigterm_while_draining_still_exits_0(demo_process):  # noqa: F811
    code, lines, output = _drain_with_second_signal(demo_process, signal.SIGTERM)
    assert code == 0 and "Traceback" not in output


@pytest.mark.slow
def test_a_sighup_while_draining_does_not_kill_gpumgr(demo_process):  # noqa: F811
    code, lines, _ = _drain_with_second_signal(demo_process, signal.SIGHUP)
    assert code == 0 and lines and lines[-1]["done"] is True
