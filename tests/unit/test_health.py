from types import MappingProxyType

from twisted.internet import defer
from twisted.internet.task import Clock

from gpumgr.config import ConsumerConfig
from gpumgr.health import HealthMonitor
from gpumgr.registry import Health, Registry


def consumer(name):
    return ConsumerConfig(
        name=name, url=f"http://{name}", health_path="/health", paths=MappingProxyType({}),
        vram_resident_mib=0, can_coexist_with=None, load=None, unload=None,
        connect_timeout_s=5, request_timeout_s=600,
    )


class FakeProbes:
    """Each probe returns a Deferred the test fires by hand."""

    def __init__(self):
        self.pending: dict[str, list[defer.Deferred]] = {}
        self.cancelled: list[str] = []

    def __call__(self, consumer):
        url = consumer.url_for(consumer.health_path)
        d = defer.Deferred(lambda _: self.cancelled.append(url))
        self.pending.setdefault(url, []).append(d)
        return d

    def answer(self, url, error=None, health=Health.OK):
        d = self.pending[url].pop(0)
        d.errback(error) if error else d.callback(health)


def make(names=("a", "b"), interval=5, timeout=2):
    clock = Clock()
    consumers = {n: consumer(n) for n in names}
    registry = Registry(consumers)
    probes = FakeProbes()
    monitor = HealthMonitor(clock, lambda: consumers, registry, probes, interval, timeout)
    return clock, registry, probes, monitor


def test_health_is_unknown_until_first_probe_then_ok():
    clock, registry, probes, monitor = make()
    assert registry["a"].health == "unknown"
    monitor.start()  # now=True: probes go out at once
    assert set(probes.pending) == {"http://a/health", "http://b/health"}
    clock.advance(0.3)
    probes.answer("http://a/health")
    assert registry["a"].health == "ok" and registry["a"].last_probe == 0.3
    assert registry["b"].health == "unknown"


def test_failed_probe_marks_down_with_reason_and_loop_continues():
    clock, registry, probes, monitor = make(("a",))
    monitor.start()
    probes.answer("http://a/health", RuntimeError("health check answered HTTP 503"))
    assert registry["a"].health == "down"
    assert "503" in registry["a"].last_error
    clock.advance(5)
    assert len(probes.pending["http://a/health"]) == 1  # the loop survived
    probes.answer("http://a/health")
    assert registry["a"].health == "ok" and registry["a"].last_error is None


def test_probe_deadline_cancels_and_marks_down():
    clock, registry, probes, monitor = make(("a",), timeout=2)
    monitor.start()
    clock.advance(2)
    assert probes.cancelled == ["http://a/health"]
    assert registry["a"].health == "down"
    assert registry["a"].last_error == "probe timed out after 2s"


def test_slow_consumer_does_not_delay_others_and_is_not_stacked():
    clock, registry, probes, monitor = make(("slow", "fast"), interval=1, timeout=10)
    monitor.start()
    probes.answer("http://fast/health")
    clock.advance(1)  # slow's first probe still running
    assert len(probes.pending["http://fast/health"]) == 1  # fast probed again on time
    assert len(probes.pending["http://slow/health"]) == 1  # slow not probed twice
    probes.answer("http://fast/health")
    assert registry["fast"].health == "ok" and registry["slow"].health == "unknown"


def test_probe_now_reuses_a_running_probe():
    clock, registry, probes, monitor = make(("a",))
    monitor.start()
    d = monitor.probe_now("a")
    assert len(probes.pending["http://a/health"]) == 1
    probes.answer("http://a/health")
    assert d.called


def test_stop_cancels_running_probes():
    clock, registry, probes, monitor = make(("a",))
    monitor.start()
    monitor.stop()
    assert probes.cancelled == ["http://a/health"]
    clock.advance(100)
    assert len(probes.pending["http://a/health"]) == 1  # no new probe after stop
    assert probes.pending["http://a/health"][0].called


def test_starting_is_recorded_and_does_not_count_as_down():
    clock, registry, probes, monitor = make(("a",))
    monitor.start()
    probes.answer("http://a/health", health=Health.STARTING)
    assert registry["a"].health is Health.STARTING and registry["a"].last_error is None


def test_a_stopped_managed_process_is_not_probed():
    clock = Clock()
    consumers = {"a": consumer("a")}
    registry = Registry(consumers)
    probes = FakeProbes()
    stopped = {"a"}
    monitor = HealthMonitor(clock, lambda: consumers, registry, probes, 5, 2,
                            not_running=lambda n: Health.STOPPED if n in stopped else None)
    monitor.start()
    assert probes.pending == {} and registry["a"].health is Health.STOPPED
    stopped.clear()
    clock.advance(5)
    probes.answer("http://a/health")
    assert registry["a"].health is Health.OK


def test_a_consumer_removed_by_a_reload_is_dropped_quietly():
    clock, registry, probes, monitor = make(("a", "b"))
    monitor.start()
    registry.sync(["b"])
    probes.answer("http://a/health", RuntimeError("gone"))
    assert "a" not in registry and registry["b"].health is Health.UNKNOWN


# -- issue 14: a process that starts reads `starting`; a consumer that stays down --


def test_a_managed_process_that_is_starting_reads_starting_and_is_not_probed():
    clock = Clock()
    consumers = {"a": consumer("a")}
    registry = Registry(consumers)
    probes = FakeProbes()
    state = {"a": Health.STARTING}
    monitor = HealthMonitor(clock, lambda: consumers, registry, probes, 5, 2,
                            not_running=state.get)
    monitor.start()
    assert probes.pending == {} and registry["a"].health is Health.STARTING
    state["a"] = Health.STOPPED
    clock.advance(5)
    assert registry["a"].health is Health.STOPPED


def make_watched(grace=10.0, interval=5, timeout=2):
    clock = Clock()
    consumers = {"a": consumer("a")}
    registry = Registry(consumers)
    probes = FakeProbes()
    heard: list[tuple[float, str, str | None]] = []
    monitor = HealthMonitor(clock, lambda: consumers, registry, probes, interval, timeout,
                            down_grace_s=grace,
                            on_still_down=lambda n, why: heard.append((clock.seconds(), n, why)))
    return clock, registry, probes, monitor, heard


def test_a_consumer_down_for_the_grace_is_probed_once_more_then_reported():
    clock, registry, probes, monitor, heard = make_watched(grace=3, interval=100)
    monitor.start()
    probes.answer("http://a/health", RuntimeError("connection refused"))
    assert registry["a"].health is Health.DOWN and heard == []
    clock.advance(2.9)
    assert heard == [] and probes.pending["http://a/health"] == []
    clock.advance(0.1)  # the grace is over: one more probe decides
    assert len(probes.pending["http://a/health"]) == 1 and heard == []
    clock.advance(2)  # it times out: a frozen service
    assert heard == [(5.0, "a", "probe timed out after 2s")]
    clock.advance(3)  # still down: said again every grace
    clock.advance(2)
    assert [h[0] for h in heard] == [5.0, 10.0]
    monitor.stop()
    clock.advance(100)
    assert len(heard) == 2 and clock.getDelayedCalls() == []


def test_a_consumer_that_answers_within_the_grace_is_not_reported():
    clock, registry, probes, monitor, heard = make_watched(grace=3, interval=100)
    monitor.start()
    probes.answer("http://a/health", RuntimeError("connection refused"))
    clock.advance(1)
    monitor.probe_now("a")
    probes.answer("http://a/health")
    assert registry["a"].health is Health.OK
    clock.advance(10)
    assert heard == [] and probes.pending["http://a/health"] == []


def test_a_consumer_that_answers_the_last_probe_is_not_reported():
    clock, registry, probes, monitor, heard = make_watched(grace=3, interval=100)
    monitor.start()
    probes.answer("http://a/health", RuntimeError("connection refused"))
    clock.advance(3)
    probes.answer("http://a/health")
    assert heard == [] and registry["a"].health is Health.OK
    clock.advance(10)
    assert heard == []


def test_a_probe_failure_is_described_in_words_not_reprs():
    from twisted.python.failure import Failure
    from twisted.web._newclient import ResponseNeverReceived

    clock, registry, probes, monitor = make(("a",))
    monitor.start()
    probes.answer("http://a/health", ResponseNeverReceived([Failure(defer.CancelledError())]))
    # One describer for every failure (gpumgr.errors.describe_failure).
    assert registry["a"].last_error == "no response: gave up waiting (cancelled)"


def test_down_grace_s_is_a_validated_health_key():
    import pytest

    from gpumgr.config import ConfigError, parse_config

    base = {"consumers": {"a": {"url": "http://127.0.0.1:9", "health": "/h",
                                "paths": {"llm": "/x"}}}, "routes": {"llm": "a"}}
    assert parse_config(base, "c.yaml").health.down_grace_s == 10.0
    assert parse_config({**base, "health": {"down_grace_s": 2.5}},
                        "c.yaml").health.down_grace_s == 2.5
    with pytest.raises(ConfigError) as e:
        parse_config({**base, "health": {"down_grace_s": 0}}, "c.yaml")
    assert str(e.value) == "c.yaml: health.down_grace_s: must be greater than 0"
    with pytest.raises(ConfigError) as e:
        parse_config({**base, "health": {"down_grace_s": "soon"}}, "c.yaml")
    assert str(e.value) == "c.yaml: health.down_grace_s: must be a number, got a string 'soon'"


def test_only_a_refused_connection_marks_the_consumer_gone():
    """`refused` is evidence that the service is gone (gpumgr.abandoned);
    a failing or slow health route is not."""
    from twisted.internet.error import ConnectionRefusedError

    clock, registry, probes, monitor = make(("a",))
    monitor.start()
    probes.answer("http://a/health", RuntimeError("503 busy"))
    assert registry["a"].health is Health.DOWN and registry["a"].refused is False
    clock.advance(monitor.interval_s)
    probes.answer("http://a/health", ConnectionRefusedError())
    assert registry["a"].health is Health.DOWN and registry["a"].refused is True
    clock.advance(monitor.interval_s)
    probes.answer("http://a/health")
    assert registry["a"].health is Health.OK and registry["a"].refused is False


def test_probing_says_whether_a_probe_is_on_its_way():
    clock, registry, probes, monitor = make(("a",))
    assert monitor.probing("a") is False
    monitor.start()
    assert monitor.probing("a") is True
    probes.answer("http://a/health")
    assert monitor.probing("a") is False
