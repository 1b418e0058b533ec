"""Drivers in memory: their defaults in the config, their rules, and their
calls against a fake ControlHttp; render tracking on a Clock."""

from __future__ import annotations

import json

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock, Cooperator

from gpumgr.broker import Broker
from gpumgr.config import ConfigError, parse_config
from gpumgr.drivers import DRIVER_NAMES, get_driver
from gpumgr.drivers.base import ControlCallFailed, HttpReply, IDriver, RenderState
from gpumgr.drivers.comfyui import history_done, prompt_id_of, queued_ids
from gpumgr.drivers.ollama import loaded_models
from gpumgr.gpu import GpuSampler
from gpumgr.process import ProcessState, ProcessStatus
from gpumgr.registry import Health, Registry
from gpumgr.renders import RenderTracker
from gpumgr.snapshot import RenderPhase
from zope.interface.verify import verifyObject


class FakeHttp:
    """Answers from a table of (method, path) -> HttpReply; records calls."""

    def __init__(self, answers=None):
        self.answers = answers or {}
        self.calls: list[tuple[str, str, bytes | None]] = []

    def request(self, method, url, body=None, content_type=None):
        path = "/" + url.split("/", 3)[3]
        self.calls.append((method, path, body))
        answer = self.answers.get((method, path), HttpReply(404, b"{}"))
        if isinstance(answer, Exception):
            return defer.fail(answer)
        if isinstance(answer, defer.Deferred):
            return answer
        return defer.succeed(answer)


def consumer(driver, **keys):
    raw = {"consumers": {"x": {"url": "http://svc:1", "driver": driver, **keys}}}
    return parse_config(raw, "t.yaml").consumers["x"]


def result_of(d):
    out = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], defer.Failure):
        out[0].raiseException()
    return out[0]


@pytest.mark.parametrize("name", DRIVER_NAMES)
def test_every_driver_implements_the_interface(name):
    assert verifyObject(IDriver, get_driver(name))


def test_defaults_come_from_the_driver_and_config_keys_override_them():
    ollama = consumer("ollama")
    assert ollama.health_path == "/api/version" and ollama.can_unload and not ollama.can_load
    comfy = consumer("comfyui")
    assert comfy.health_path == "/system_stats" and comfy.unload.path == "/free"
    vllm = consumer("vllm")
    assert (vllm.load.path, vllm.unload.path) == ("/wake_up", "/sleep?level=1")
    whisper = consumer("whisper.cpp")
    assert whisper.health_path == "/health" and whisper.pinned
    managed = consumer("whisper.cpp", process={"command": ["whisper-server"]})
    assert not managed.pinned and managed.can_load
    custom = consumer("comfyui", health="/queue", unload={"path": "/api/free"})
    assert custom.health_path == "/queue" and custom.unload.path == "/api/free"


def test_the_http_driver_still_requires_health_and_unknown_drivers_are_refused():
    with pytest.raises(ConfigError) as info:
        consumer("http")
    assert info.value.key_path == "consumers.x.health"
    with pytest.raises(ConfigError) as info:
        consumer("tgi")
    assert info.value.key_path == "consumers.x.driver" and "ollama" in info.value.problem


def test_scheduled_entries_are_validated():
    c = consumer("http", health="/h", scheduled=["POST /generate", "GET /render/"])
    assert [(s.method, s.path_prefix) for s in c.scheduled] == [("POST", "/generate"),
                                                                ("GET", "/render/")]
    for bad in (["/generate"], ["FETCH /x"], ["POST x"], "POST /x", [1]):
        with pytest.raises(ConfigError) as info:
            consumer("http", health="/h", scheduled=bad)
        assert info.value.key_path.startswith("consumers.x.scheduled")


def test_gpu_work_rules():
    http, ollama, comfy = get_driver("http"), get_driver("ollama"), get_driver("comfyui")
    assert http.is_gpu_work("POST", "/x") and http.is_gpu_work("DELETE", "/x")
    assert not http.is_gpu_work("GET", "/x") and not http.is_gpu_work("HEAD", "/x")
    for path in ("/api/generate", "/api/chat", "/api/embed", "/api/embeddings",
                 "/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        assert ollama.is_gpu_work("POST", path), path
    for method, path in (("GET", "/api/tags"), ("GET", "/api/ps"), ("POST", "/api/show"),
                         ("POST", "/api/pull"), ("GET", "/v1/models")):
        assert not ollama.is_gpu_work(method, path), path
    assert comfy.is_gpu_work("POST", "/prompt") and comfy.is_gpu_work("POST", "/api/prompt")
    for method, path in (("GET", "/history/1"), ("GET", "/view"), ("POST", "/upload/image"),
                         ("GET", "/queue"), ("GET", "/prompt")):
        assert not comfy.is_gpu_work(method, path), path


def test_ollama_unload_frees_every_loaded_model():
    ps = {"models": [{"name": "llama3:latest", "model": "llama3:latest"},
                     {"name": "qwen2:7b", "model": "qwen2:7b", "size_vram": 1}]}
    http = FakeHttp({("GET", "/api/ps"): HttpReply(200, json.dumps(ps).encode()),
                     ("POST", "/api/generate"): HttpReply(200, b'{"done_reason":"unload"}')})
    result_of(get_driver("ollama").unload(http, consumer("ollama")))
    sent = [json.loads(body) for method, path, body in http.calls if method == "POST"]
    assert sent == [{"model": "llama3:latest", "keep_alive": 0},
                    {"model": "qwen2:7b", "keep_alive": 0}]


def test_ollama_unload_failures_are_reported():
    http = FakeHttp({("GET", "/api/ps"): HttpReply(200, b'{"models":[{"name":"a"}]}'),
                     ("POST", "/api/generate"): HttpReply(500, b'{"error":"busy"}')})
    with pytest.raises(ControlCallFailed, match="a: HTTP 500"):
        result_of(get_driver("ollama").unload(http, consumer("ollama")))
    with pytest.raises(ControlCallFailed, match="HTTP 503"):
        result_of(get_driver("ollama").unload(
            FakeHttp({("GET", "/api/ps"): HttpReply(503, b"")}), consumer("ollama")))
    for bad in (b"nope", b"[]", b'{"models": 3}'):
        with pytest.raises(ControlCallFailed):
            loaded_models(bad)
    assert loaded_models(b'{"models": [{"size": 1}, 7, {"name": "m"}]}') == ["m"]


def test_ollama_with_a_configured_unload_uses_it():
    c = consumer("ollama", unload={"path": "/api/generate", "body": '{"model":"m","keep_alive":0}'})
    http = FakeHttp({("POST", "/api/generate"): HttpReply(200, b"{}")})
    result_of(get_driver("ollama").unload(http, c))
    assert [m for m, _, _ in http.calls] == ["POST"]


def test_whisper_loading_model_is_starting_and_other_failures_are_down():
    whisper, c = get_driver("whisper.cpp"), consumer("whisper.cpp")
    starting = FakeHttp({("GET", "/health"): HttpReply(503, b'{"status":"loading model"}')})
    assert result_of(whisper.probe(starting, c)) is Health.STARTING
    ok = FakeHttp({("GET", "/health"): HttpReply(200, b'{"status":"ok"}')})
    assert result_of(whisper.probe(ok, c)) is Health.OK
    broken = FakeHttp({("GET", "/health"): HttpReply(500, b"boom")})
    with pytest.raises(ControlCallFailed, match="HTTP 500"):
        result_of(whisper.probe(broken, c))


def test_whisper_waits_its_turn_behind_the_inference_before_it():
    whisper, c = get_driver("whisper.cpp"), consumer("whisper.cpp")
    since_2026 = HttpReply(400, b"Invalid request")  # its error handler's body
    until_2026 = HttpReply(200, b'{"error":"no \'file\' field in the request"}')
    for reply in (since_2026, until_2026):
        http = FakeHttp({("POST", "/inference"): reply})
        assert result_of(whisper.work_barrier(http, c)) is True
        assert http.calls == [("POST", "/inference", b"")]
    # Its inference route where `--inference-path` moved it.
    moved = consumer("whisper.cpp", paths={"stt": "/v1/audio/transcriptions"})
    http = FakeHttp({("POST", "/v1/audio/transcriptions"): since_2026})
    assert result_of(whisper.work_barrier(http, moved)) is True
    # Anything else is not whisper-server's answer: no evidence.
    for reply in (HttpReply(404, b"{}"), HttpReply(500, b"Invalid request"),
                  HttpReply(400, b'{"error":"no \'file\' field in the request"}'),
                  HttpReply(400, b"Invalid request: bad header"),
                  HttpReply(200, b'{"text":"hello"}')):
        http = FakeHttp({("POST", "/inference"): reply})
        assert result_of(whisper.work_barrier(http, c)) is None
    # A service that does not serialise its work has no barrier.
    for name in ("ollama", "comfyui", "vllm"):
        assert result_of(get_driver(name).work_barrier(FakeHttp(), consumer(name))) is None


def test_comfyui_prompt_ids_and_history():
    comfy = get_driver("comfyui")
    assert comfy.render_id("POST", "/prompt", 200, b'{"prompt_id":"p1","number":3}') == "p1"
    assert comfy.render_id("POST", "/api/prompt", 200, b'{"prompt_id":"p2"}') == "p2"
    assert comfy.render_id("POST", "/prompt", 400, b'{"prompt_id":"p1"}') is None
    assert comfy.render_id("GET", "/prompt", 200, b'{"prompt_id":"p1"}') is None
    for body in (b"", b"not json", b"[]", b'{"prompt_id": 5}', b'{"prompt_id": ""}'):
        assert prompt_id_of(body) is None
    assert queued_ids(b'{"queue_running": [[3, "p1", {}, {}, []]], '
                      b'"queue_pending": [[4, "p2", {}, {}, []], "junk", [5]]}') == {"p1", "p2"}
    with pytest.raises(ControlCallFailed):
        queued_ids(b"<html>")
    assert not history_done(b"{}", "p1")
    assert history_done(b'{"p1": {"status": {"completed": true}}}', "p1")
    with pytest.raises(ControlCallFailed):
        history_done(b"<html>", "p1")


# -- render tracking, on a Clock ------------------------------------------------


class Renders:
    """A ComfyUI-like driver whose history the test controls."""

    def __init__(self):
        self.state = RenderState.RUNNING
        self.polls = 0
        self.interrupted: list[str] = []
        self.fail_polls = False

    def render_state(self, http, c, render_id):
        self.polls += 1
        if self.fail_polls:
            return defer.fail(ControlCallFailed("connection refused"))
        return defer.succeed(self.state)

    def interrupt(self, http, c, render_id):
        self.interrupted.append(render_id)
        return defer.succeed(None)


RAW = {"consumers": {"comfy": {"url": "http://comfy:1", "driver": "comfyui", "job_timeout_s": 60,
                               "paths": {"image": "/prompt"}}},
       "routes": {"image": "comfy"}}


def make_broker():
    clock = Clock()
    config = parse_config(RAW, "t.yaml")
    gpu = GpuSampler(clock, "nvidia-smi", 2, 5, run=lambda *a: defer.Deferred())
    probes = FakeHttp({("GET", "/system_stats"): HttpReply(200, b"{}")})
    broker = Broker(clock, config, gpu, probes, lambda c: None,
                    Cooperator(scheduler=lambda f: clock.callLater(0, f)))
    return clock, broker


def test_a_render_holds_until_history_fills():
    clock, broker = make_broker()
    driver = Renders()
    d = defer.ensureDeferred(broker._track_render(broker.config.consumers["comfy"], driver,
                                                  "p1", clock.seconds()))
    assert broker.status()["consumers"]["comfy"]["renders"][0]["prompt_id"] == "p1"
    for _ in range(4):
        clock.advance(0.5)
    assert not d.called and driver.polls == 5  # every 0.5 s
    driver.state = RenderState.DONE
    clock.advance(0.5)
    assert d.called and broker.renders == {}
    assert broker.render_counts["completed"] == 1


def test_a_render_its_service_forgot_is_lost_and_released():
    clock, broker = make_broker()
    driver = Renders()
    d = defer.ensureDeferred(broker._track_render(broker.config.consumers["comfy"], driver,
                                                  "p1", clock.seconds()))
    driver.state = RenderState.GONE
    clock.advance(0.5)
    assert d.called and broker.render_counts["lost"] == 1
    (event,) = [e for e in broker.admission.events if e.kind == "render_lost"]
    assert event.detail.startswith("p1: ")


def test_a_render_past_job_timeout_is_interrupted_and_held_until_it_ended():
    """The interrupt's answer is no evidence (ComfyUI sees it only between nodes):
    the GPU stays held, the stop is asked again at every poll, until the
    service shows the render ended."""
    clock, broker = make_broker()
    driver = Renders()
    d = defer.ensureDeferred(broker._track_render(broker.config.consumers["comfy"], driver,
                                                  "p1", clock.seconds()))
    for _ in range(119):
        clock.advance(0.5)  # job_timeout_s is 60
    assert driver.interrupted == []
    clock.advance(0.5)
    assert not d.called and driver.interrupted == ["p1"]
    (render,) = broker.status()["consumers"]["comfy"]["renders"]
    assert render["state"] == "interrupting"
    (event,) = [e for e in broker.admission.events if e.kind == "render_interrupted"]
    assert event.consumer == "comfy" and event.detail == "p1"
    clock.advance(0.5)
    assert not d.called and driver.interrupted == ["p1", "p1"]
    driver.state = RenderState.DONE  # /history shows execution_interrupted
    clock.advance(0.5)
    assert d.called and broker.renders == {}
    assert broker.render_counts["interrupted"] == 1 and broker.render_counts["lost"] == 0


def test_a_stopped_render_that_left_the_queue_is_released():
    clock, broker = make_broker()
    driver = Renders()
    d = defer.ensureDeferred(broker._track_render(broker.config.consumers["comfy"], driver,
                                                  "p1", clock.seconds()))
    for _ in range(121):
        clock.advance(0.5)
    driver.state = RenderState.GONE  # deleted from ComfyUI's queue: no history
    clock.advance(0.5)
    assert d.called and broker.render_counts["lost"] == 0


def _tracker(clock, stop_process=lambda name: None):
    config = parse_config(RAW, "t.yaml")
    registry = Registry(config.consumers)
    events: list[tuple] = []
    tracker = RenderTracker(clock, FakeHttp({}), lambda: config.consumers, registry,
                            lambda name: None, lambda *a, **k: events.append((a, k)),
                            stop_process)
    return tracker, config.consumers["comfy"], events


def _past_grace(clock):
    for _ in range(int((60 + 30) / 0.5) + 2):  # job_timeout_s, then render_stop_grace_s
        clock.advance(0.5)


def test_no_evidence_within_the_grace_stops_the_owned_process_then_releases():
    clock = Clock()
    stopping: list[defer.Deferred] = []

    def stop_process(name):
        stopping.append(defer.Deferred())
        return stopping[-1]

    tracker, c, events = _tracker(clock, stop_process)
    driver = Renders()
    d = defer.ensureDeferred(tracker.track("comfy", driver, "p1", clock.seconds()))
    _past_grace(clock)
    assert len(stopping) == 1 and not d.called
    (render,) = tracker.tracked.values()
    assert render.phase is RenderPhase.STOPPING
    assert [a[0] for a, _ in events] == ["render_interrupted", "render_stuck"]
    stopping[0].callback(None)  # the process exited
    assert d.called and tracker.counts["stopped"] == 1 and tracker.tracked == {}


def test_no_evidence_and_no_process_holds_as_stuck_until_an_admin_release():
    clock = Clock()
    tracker, c, events = _tracker(clock)
    driver = Renders()
    d = defer.ensureDeferred(tracker.track("comfy", driver, "p1", clock.seconds()))
    _past_grace(clock)
    (render,) = tracker.tracked.values()
    assert render.phase is RenderPhase.STUCK and not d.called
    assert tracker.counts["stuck"] == 1
    (stuck,) = [k for a, k in events if a[0] == "render_stuck"]
    assert "p1" in stuck["detail"] and "admin unload" in stuck["detail"]
    for _ in range(100):
        clock.advance(0.5)
    assert not d.called  # held for as long as nothing says otherwise
    tracker.request_release("other")
    clock.advance(0.5)
    assert not d.called  # another consumer's unload changes nothing
    tracker.request_release("comfy")
    clock.advance(0.5)
    assert d.called and tracker.counts["released"] == 1
    assert [a[0] for a, _ in events][-1] == "render_released"


def test_a_stuck_render_still_ends_on_late_evidence_and_a_failed_stop_leaves_it_stuck():
    clock = Clock()
    tracker, c, events = _tracker(clock, lambda name: defer.fail(RuntimeError("D state")))
    driver = Renders()
    d = defer.ensureDeferred(tracker.track("comfy", driver, "p1", clock.seconds()))
    _past_grace(clock)
    (render,) = tracker.tracked.values()
    assert render.phase is RenderPhase.STUCK and tracker.counts["stopped"] == 0
    driver.state = RenderState.DONE
    clock.advance(0.5)
    assert d.called and tracker.counts["released"] == 0


def test_an_admin_release_does_not_touch_a_render_that_is_not_stuck():
    clock = Clock()
    tracker, c, events = _tracker(clock)
    driver = Renders()
    d = defer.ensureDeferred(tracker.track("comfy", driver, "p1", clock.seconds()))
    tracker.request_release("comfy")
    clock.advance(0.5)
    assert not d.called  # running: an unload waits for it like any job
    tracker.release_done("comfy")
    _past_grace(clock)
    assert not d.called  # stuck, and no unload waits any more
    driver.state = RenderState.DONE
    clock.advance(0.5)
    assert d.called


def test_a_render_is_released_once_its_service_is_gone():
    clock, broker = make_broker()
    driver = Renders()
    driver.fail_polls = True
    d = defer.ensureDeferred(broker._track_render(broker.config.consumers["comfy"], driver,
                                                  "p1", clock.seconds()))
    clock.advance(1.0)
    assert not d.called  # a failing poll alone does not release it...
    broker.registry.set_health("comfy", Health.DOWN)  # ...nor a failing health route...
    clock.advance(1.0)
    assert not d.called
    state = broker.registry["comfy"]
    state.refused, state.last_probe = True, clock.seconds()  # ...but nothing listening does
    clock.advance(0.5)
    assert d.called and broker.renders == {} and broker.render_counts["lost"] == 1


def test_a_refusal_seen_before_the_service_took_the_prompt_is_not_evidence():
    """Found by the fault suite (a ComfyUI render started without gpumgr's
    slot): ComfyUI restarted and took a prompt while the registry still held
    the refusal its last probe saw during the restart. That refusal says
    nothing of the new process's prompt: it is tracked until its evidence."""
    clock, broker = make_broker()
    state = broker.registry["comfy"]
    broker.registry.set_health("comfy", Health.DOWN)
    state.refused, state.last_probe = True, clock.seconds()  # seen while it restarted
    clock.advance(0.2)
    driver = Renders()
    d = defer.ensureDeferred(broker._track_render(broker.config.consumers["comfy"], driver,
                                                  "p1", clock.seconds()))
    clock.advance(2.0)
    assert not d.called and driver.polls > 0  # followed in /queue, not released
    driver.state = RenderState.DONE
    clock.advance(1.0)
    assert d.called and broker.render_counts["lost"] == 0
    assert broker.render_counts["completed"] == 1


def test_cancelling_a_tracked_render_releases_it():
    clock, broker = make_broker()
    d = defer.ensureDeferred(broker._track_render(broker.config.consumers["comfy"], Renders(),
                                                  "p1", clock.seconds()))
    clock.advance(0.5)
    d.cancel()
    assert broker.renders == {}
    d.addErrback(lambda f: f.trap(defer.CancelledError))


@pytest.mark.parametrize("queue,history,state", [
    (b'{"queue_running": [[1, "p1", {}, {}, []]], "queue_pending": []}', b'{"p1": {}}',
     RenderState.RUNNING),  # a reused id: an old history entry, but rendering again
    (b'{"queue_running": [], "queue_pending": [[2, "p1", {}, {}, []]]}', b"{}",
     RenderState.RUNNING),
    (b'{"queue_running": [], "queue_pending": []}', b'{"p1": {"status": {}}}',
     RenderState.DONE),
    (b'{"queue_running": [], "queue_pending": []}', b"{}", RenderState.GONE),  # restarted
])
def test_comfyui_render_state_asks_the_queue_first(queue, history, state):
    http = FakeHttp({("GET", "/queue"): HttpReply(200, queue),
                     ("GET", "/history/p1"): HttpReply(200, history)})
    assert result_of(get_driver("comfyui").render_state(http, consumer("comfyui"), "p1")) \
        is state


def test_a_prompt_id_is_found_in_a_truncated_answer():
    body = b'{"prompt_id": "a\\"b", "number": 1, "node_errors": {"x": "' + b"y" * 70000
    assert prompt_id_of(body[:65536]) == 'a"b'


def test_after_a_client_left_only_vllm_can_be_asked_whether_work_runs():
    running = b'vllm:num_requests_running{model_name="m"} 1.0\nvllm:num_requests_waiting{model_name="m"} 0.0\n'
    idle = running.replace(b"} 1.0", b"} 0.0")
    vllm, c = get_driver("vllm"), consumer("vllm")
    assert result_of(vllm.work_stopped(FakeHttp({("GET", "/metrics"): HttpReply(200, running)}),
                                       c)) is False
    assert result_of(vllm.work_stopped(FakeHttp({("GET", "/metrics"): HttpReply(200, idle)}),
                                       c)) is True
    assert result_of(vllm.work_stopped(FakeHttp({("GET", "/metrics"): HttpReply(500, b"")}),
                                       c)) is None
    for name in ("http", "ollama", "comfyui", "whisper.cpp"):
        http = FakeHttp()
        keys = {"health": "/h"} if name == "http" else {}
        assert result_of(get_driver(name).work_stopped(http, consumer(name, **keys))) is None
        assert http.calls == []  # nothing to ask: they offer no such route


def test_comfyui_stops_a_prompt_by_deleting_it_from_the_queue_then_interrupting_it():
    """Delete first: a prompt that starts running between the calls is still
    interrupted; a pending one is gone (an interrupt would be skipped for it)."""
    config = parse_config(RAW, "t.yaml")
    http = FakeHttp({("POST", "/queue"): HttpReply(200, b""),
                     ("POST", "/interrupt"): HttpReply(200, b"")})
    driver = get_driver("comfyui")
    d = driver.interrupt(http, config.consumers["comfy"], "p1")
    assert d.called
    assert [(m, p, json.loads(b)) for m, p, b in http.calls] == [
        ("POST", "/queue", {"delete": ["p1"]}), ("POST", "/interrupt", {"prompt_id": "p1"})]
    http.answers[("POST", "/queue")] = HttpReply(500, b"boom")
    failed = driver.interrupt(http, config.consumers["comfy"], "p1")
    assert isinstance(failed.result.value, ControlCallFailed)
    failed.addErrback(lambda _: None)


class _OwnedProcess:
    """What the broker needs of a ManagedProcess, for the render tracker's stop."""

    def __init__(self, reactor, name, spec, probe, on_exit, port_check=None):
        self.name, self.on_exit = name, on_exit
        self.stops: list[defer.Deferred] = []
        self.state = ProcessState.RUNNING

    def stop(self):
        self.stops.append(defer.Deferred())
        return self.stops[-1]

    def status(self):
        return ProcessStatus(self.state, pid=None, started_at=None, exit_code=None, restarts=0,
                             last_stderr=())

    def start_refusal(self):
        return None  # not in a start back-off (what readiness asks, via status)


def test_the_broker_stops_the_process_it_owns_when_a_render_gives_no_evidence():
    clock = Clock()
    raw = json.loads(json.dumps(RAW))
    raw["consumers"]["comfy"]["process"] = {"command": ["comfyui-main"]}
    raw["consumers"]["comfy"]["render_stop_grace_s"] = 5
    config = parse_config(raw, "t.yaml")
    gpu = GpuSampler(clock, "nvidia-smi", 2, 5, run=lambda *a: defer.Deferred())
    broker = Broker(clock, config, gpu, FakeHttp({}), lambda c: None,
                    Cooperator(scheduler=lambda f: clock.callLater(0, f)),
                    process_factory=_OwnedProcess)
    process = broker.processes["comfy"]
    broker.registry.set_health("comfy", Health.OK)  # it was started and answers
    driver = Renders()
    d = defer.ensureDeferred(broker._track_render(config.consumers["comfy"], driver, "p1",
                                                  clock.seconds()))
    for _ in range(int((60 + 5) / 0.5) + 2):
        clock.advance(0.5)
    assert len(process.stops) == 1 and not d.called
    (render,) = broker.status()["consumers"]["comfy"]["renders"]
    assert render["state"] == "stopping"
    process.stops[0].callback(None)  # it exited: the render is over
    assert d.called and broker.render_counts["stopped"] == 1 and broker.renders == {}


def test_a_render_is_released_once_the_process_gpumgr_owns_for_it_exited():
    """A crash of the owned process is evidence at once, not after job_timeout_s."""
    clock, broker = make_broker()
    driver = Renders()
    driver.fail_polls = True  # nothing answers any more
    d = defer.ensureDeferred(broker._track_render(broker.config.consumers["comfy"], driver,
                                                  "p1", clock.seconds()))
    clock.advance(1.0)
    assert not d.called
    broker.registry.set_health("comfy", Health.STOPPED)  # as _process_exited marks it
    clock.advance(0.5)
    assert d.called and broker.render_counts["lost"] == 1
    (event,) = [e for e in broker.admission.events if e.kind == "render_lost"]
    assert "exited" in event.detail
