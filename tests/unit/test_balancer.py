"""Readiness for a load balancer (gpumgr.balancer): the pure decision for
every reason, the live reading, the route, the config, the box's name."""

from __future__ import annotations

import json

import attrs
import pytest
import pytest_twisted
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet import defer
from twisted.internet.task import Clock, Cooperator

from gpumgr.balancer import (
    KindState,
    NotReady,
    Phase,
    ReadinessCheck,
    box_headers,
    decide,
)
from gpumgr.broker import Broker
from gpumgr.config import BalancerConfig, ConfigError, parse_config
from gpumgr.errors import ProcessStartFailed, UnknownRoute
from gpumgr.gpu import GpuSampler
from gpumgr.process import ProcessState
from gpumgr.registry import Health, Registry
from gpumgr.scheduler import Locked, Passthrough
from gpumgr.web import RootResource
from tests.unit.test_web_unit import RAW, Echo, NoHttp, call, make_stub

READY_STATE = KindState(kind="llm", consumer="ollama", health=Health.OK, process=None,
                        start_refused=None, queued=0, queued_total=0, scheduler_max_queue=64)
BALANCER = BalancerConfig(max_queue=2)


def reason(state: KindState = READY_STATE, phase: Phase = Phase.SERVING,
           balancer: BalancerConfig = BALANCER) -> NotReady | None:
    return decide(state, phase, balancer).reason


def test_a_healthy_consumer_with_room_is_ready():
    answer = decide(READY_STATE, Phase.SERVING, BALANCER)
    assert answer.ready and answer.as_json() == {
        "kind": "llm", "consumer": "ollama", "ready": True, "reason": None, "queued": 0}


def test_draining_and_the_not_ready_period_come_before_everything_else():
    down = attrs.evolve(READY_STATE, health=Health.DOWN, queued=9)
    assert reason(down, Phase.DRAINING) is NotReady.DRAINING
    assert reason(down, Phase.LEAVING) is NotReady.NOT_READY
    assert reason(phase=Phase.LEAVING) is NotReady.NOT_READY


def test_a_consumer_that_failed_its_health_check_is_down():
    answer = decide(attrs.evolve(READY_STATE, health=Health.DOWN), Phase.SERVING, BALANCER)
    assert answer.reason is NotReady.CONSUMER_DOWN and not answer.ready
    assert answer.as_json()["reason"] == {
        "code": "consumer_down", "message": "ollama failed its last health check"}


def test_a_consumer_not_probed_yet_is_not_ready():
    assert reason(attrs.evolve(READY_STATE, health=Health.UNKNOWN)) is NotReady.CONSUMER_UNKNOWN


def test_a_consumer_loading_its_model_is_ready():
    assert reason(attrs.evolve(READY_STATE, health=Health.STARTING)) is None


@pytest.mark.parametrize("process", [ProcessState.STOPPED, ProcessState.FAILED,
                                     ProcessState.STARTING, ProcessState.STOPPING])
def test_an_owned_process_that_can_start_is_ready(process):
    # Its registry health says stopped (or down, from before it stopped): it starts on demand.
    for health in (Health.STOPPED, Health.DOWN):
        assert reason(attrs.evolve(READY_STATE, process=process, health=health)) is None


def test_an_owned_process_in_its_start_back_off_is_down():
    state = attrs.evolve(READY_STATE, process=ProcessState.FAILED, health=Health.STOPPED,
                         start_refused="exited 1; 3 failed starts in a row, next try in 8s")
    answer = decide(state, Phase.SERVING, BALANCER)
    assert answer.reason is NotReady.CONSUMER_DOWN and "next try in 8s" in answer.message


def test_a_running_owned_process_that_fails_its_probe_is_down():
    state = attrs.evolve(READY_STATE, process=ProcessState.RUNNING, health=Health.DOWN)
    assert reason(state) is NotReady.CONSUMER_DOWN


def test_the_queue_of_the_kind_at_max_queue_is_full():
    assert reason(attrs.evolve(READY_STATE, queued=1, queued_total=1)) is None
    answer = decide(attrs.evolve(READY_STATE, queued=2, queued_total=2), Phase.SERVING, BALANCER)
    assert answer.reason is NotReady.QUEUE_FULL and answer.as_json()["queued"] == 2
    assert "balancer.max_queue is 2" in answer.message


def test_other_kinds_waiting_count_only_against_the_schedulers_own_bound():
    assert reason(attrs.evolve(READY_STATE, queued=0, queued_total=63)) is None
    answer = decide(attrs.evolve(READY_STATE, queued=0, queued_total=64), Phase.SERVING,
                    BALANCER)
    assert answer.reason is NotReady.QUEUE_FULL and "scheduler.max_queue" in answer.message
    # Passthrough has no queue, hence no bound.
    assert reason(attrs.evolve(READY_STATE, queued_total=500, scheduler_max_queue=None)) is None


# -- reading the live state ------------------------------------------------------------


@attrs.define
class FakeProcess:
    state: ProcessState
    refusal: ProcessStartFailed | None = None

    def start_refusal(self) -> ProcessStartFailed | None:
        return self.refusal


def live(processes=None, scheduler=None):
    config = parse_config({**RAW, "scheduler": {"mode": "locked", "max_queue": 3},
                           "balancer": {"max_queue": 2}}, "unit.yaml")
    registry = Registry(config.consumers)
    clock = Clock()
    sched = scheduler or Locked(clock, registry, capacity=1, max_queue=3)
    return ReadinessCheck(lambda: config, registry, lambda: sched,
                          lambda: processes or {}), registry, sched


def test_the_check_reads_health_queue_and_phase_from_the_live_state():
    check, registry, sched = live()
    assert check.check("llm").reason is NotReady.CONSUMER_UNKNOWN
    registry.set_health("ollama", Health.OK)
    assert check.check("llm").ready
    held = defer.Deferred()
    sched.run("ollama", lambda: held, kind="llm")  # runs
    sched.run("ollama", lambda: defer.Deferred(), kind="llm")
    assert check.check("llm").ready  # one waits
    sched.run("ollama", lambda: defer.Deferred(), kind="llm")
    answer = check.check("llm")
    assert answer.reason is NotReady.QUEUE_FULL and answer.queued == 2
    registry.set_health("mvoice", Health.OK)
    assert check.check("tts").ready  # two llm jobs wait; tts has room (3 in all)
    check.phase = Phase.LEAVING
    assert check.check("tts").reason is NotReady.NOT_READY
    check.phase = Phase.DRAINING
    assert check.check("tts").reason is NotReady.DRAINING


def test_the_check_reads_an_owned_processs_start_back_off():
    process = FakeProcess(ProcessState.FAILED)
    check, registry, _ = live(processes={"ollama": process})
    registry.set_health("ollama", Health.STOPPED)
    assert check.check("llm").ready
    process.refusal = ProcessStartFailed("3 failed starts in a row, next try in 5s", "ollama")
    answer = check.check("llm")
    assert answer.reason is NotReady.CONSUMER_DOWN and "next try in 5s" in answer.message


def test_an_unknown_kind_or_one_without_a_consumer_is_an_unknown_route():
    check, *_ = live(scheduler=Passthrough(Clock(), Registry(())))
    for kind in ("video", "image"):
        with pytest.raises(UnknownRoute):
            check.check(kind)


# -- the route -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_route_answers_200_ready_and_503_with_the_reason():
    stub, _, registry, _, _ = make_stub()
    registry.set_health("ollama", Health.OK)
    response, body = await call(stub, "GET", "http://gpumgr/v1/ready/llm")
    assert response.code == 200 and json.loads(body)["ready"] is True
    assert response.headers.getRawHeaders("cache-control") == ["no-store"]
    registry.set_health("ollama", Health.DOWN)
    response, body = await call(stub, "GET", "http://gpumgr/v1/ready/llm")
    assert response.code == 503
    assert json.loads(body)["reason"]["code"] == "consumer_down"
    assert response.headers.getRawHeaders("content-type") == ["application/json"]


@pytest_twisted.ensureDeferred
async def test_the_route_refuses_unknown_kinds_and_other_shapes_with_404():
    stub, *_ = make_stub()
    for path in ("/v1/ready/video", "/v1/ready/image", "/v1/ready", "/v1/ready/llm/x"):
        response, body = await call(stub, "GET", "http://gpumgr" + path)
        assert response.code == 404, path
        assert json.loads(body)["error"]["code"] == "unknown_route"
    response, _ = await call(stub, "POST", "http://gpumgr/v1/ready/llm")
    assert response.code == 405


# -- config and the box's name ---------------------------------------------------------


def test_the_balancer_section_defaults_and_values():
    assert parse_config(RAW, "f.yaml").balancer == BalancerConfig(None, 4, 0.0)
    config = parse_config({**RAW, "balancer": {"box": "gpu-1.lan", "max_queue": 8,
                                               "not_ready_s": 5}}, "f.yaml")
    assert config.balancer == BalancerConfig("gpu-1.lan", 8, 5.0)


@pytest.mark.parametrize("section, key, problem", [
    ({"box": "a b"}, "balancer.box", "letters, digits"),
    ({"box": "x;Path=/"}, "balancer.box", "letters, digits"),
    ({"box": ""}, "balancer.box", "must not be empty"),
    ({"max_queue": 0}, "balancer.max_queue", "greater than 0"),
    ({"not_ready_s": -1}, "balancer.not_ready_s", "negative"),
    ({"not_ready": 5}, "balancer.not_ready", "unknown key"),
])
def test_bad_balancer_values_are_refused_naming_the_key(section, key, problem):
    with pytest.raises(ConfigError) as e:
        parse_config({**RAW, "balancer": section}, "f.yaml")
    assert e.value.file == "f.yaml" and e.value.key_path == key and problem in e.value.problem


def test_the_box_is_named_on_answers_and_in_a_cookie_for_audio_on_tts_answers():
    assert box_headers(BalancerConfig(), "tts") == []
    named = BalancerConfig(box="gpu-1")
    assert box_headers(named, "llm") == [(b"X-Gpumgr-Box", b"gpu-1")]
    assert box_headers(named, None) == [(b"X-Gpumgr-Box", b"gpu-1")]
    assert box_headers(named, "tts") == [
        (b"X-Gpumgr-Box", b"gpu-1"), (b"Set-Cookie", b"gpumgr_box=gpu-1; Path=/audio/; HttpOnly")]


class CookieEcho(Echo):
    def render(self, request):
        request.addCookie(b"session", b"mine")
        return super().render(request)


def named_stub():
    clock = Clock()
    config = parse_config({**RAW, "balancer": {"box": "gpu-1"}}, "unit.yaml")
    upstreams = {"ollama": Echo(), "mvoice": CookieEcho()}
    agents = {name: RequestTraversalAgent(res) for name, res in upstreams.items()}
    cooperator = Cooperator(scheduler=lambda f: clock.callLater(0, f))
    gpu = GpuSampler(clock, "nvidia-smi", 2, 5, run=lambda *a: defer.Deferred())
    broker = Broker(clock, config, gpu, NoHttp(), lambda c: agents[c.name], cooperator)
    return StubTreq(RootResource(broker)), agents, clock


@pytest_twisted.ensureDeferred
async def test_proxied_answers_name_the_box_and_tts_answers_add_the_cookie():
    stub, agents, clock = named_stub()
    response, _ = await call(stub, "POST", "http://gpumgr/v1/tts", data=b"{}",
                             agents=agents.values(), clock=clock)
    assert response.code == 200
    assert response.headers.getRawHeaders("x-gpumgr-box") == ["gpu-1"]
    # The service's own cookie is kept beside gpumgr's.
    assert sorted(response.headers.getRawHeaders("set-cookie")) == [
        "gpumgr_box=gpu-1; Path=/audio/; HttpOnly", "session=mine"]
    response, _ = await call(stub, "POST", "http://gpumgr/v1/llm", data=b"{}",
                             agents=agents.values(), clock=clock)
    assert response.headers.getRawHeaders("x-gpumgr-box") == ["gpu-1"]
    assert response.headers.getRawHeaders("set-cookie") is None
    response, _ = await call(stub, "GET", "http://gpumgr/audio/a.wav",
                             agents=agents.values(), clock=clock)
    assert response.code == 200 and response.headers.getRawHeaders("x-gpumgr-box") == ["gpu-1"]


def test_readiness_probes_use_the_reserved_connections():
    from gpumgr.limits import uses_reserve

    assert uses_reserve(b"/v1/ready/llm") and not uses_reserve(b"/v1/ready%2Fllm")


# -- SIGTERM: not ready first, then drain ------------------------------------------------


def sigterm_service(not_ready_s):
    from twisted.internet.testing import MemoryReactorClock

    from gpumgr.service import GpumgrService

    reactor = MemoryReactorClock()
    reactor.running = True
    config = parse_config({**RAW, "balancer": {"not_ready_s": not_ready_s}}, "unit.yaml")
    return GpumgrService(reactor, config), reactor


def test_sigterm_reports_not_ready_for_not_ready_s_then_stops_the_reactor():
    service, reactor = sigterm_service(5)
    service.registry.set_health("ollama", Health.OK)
    service._leave()
    assert service.broker.readiness.check("llm").reason is NotReady.NOT_READY
    reactor.advance(4.9)
    assert reactor.running  # still serving
    reactor.advance(0.1)
    assert not reactor.running and reactor.hasStopped  # stopService drains from here


def test_a_second_sigterm_in_the_not_ready_period_stops_at_once():
    service, reactor = sigterm_service(5)
    service._leave()
    reactor.advance(1)
    service._leave()
    assert not reactor.running


def test_without_a_not_ready_period_sigterm_stops_at_once():
    service, reactor = sigterm_service(0)
    service._leave()
    assert not reactor.running
    assert service.broker.readiness.phase is Phase.SERVING
