"""Periodic health probes, one per consumer, each with its own deadline.

Probes run concurrently: the loop starts every probe and returns at once, so a
slow consumer never delays another's probe (or the next tick). A consumer
whose previous probe is still running is skipped rather than stacked. A
managed process that is not running is not probed: it is `stopped` (the next
request starts it), or `starting` while a start is under way.

A consumer that stays down (failed probes: a crashed or frozen service) for
`down_grace_s` is probed once more, and if it is still down `on_still_down`
hears of it (again every `down_grace_s` while it stays down): the broker then
stops a process it owns and aborts the jobs that hold the GPU for it, rather
than letting them wait for request_timeout_s.
"""

from __future__ import annotations

from typing import Callable, Mapping

from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from gpumgr.config import ConsumerConfig
from gpumgr.errors import describe_failure
from gpumgr.registry import Registry
from gpumgr.states import Health

log = Logger()

#: probe(consumer) -> Deferred[Health]: OK or STARTING, or a readable failure.
#: The monitor enforces the deadline by cancelling it.
Probe = Callable[[ConsumerConfig], "defer.Deferred[Health]"]


class HealthMonitor:
    def __init__(
        self,
        clock: IReactorTime,
        consumers: Callable[[], Mapping[str, ConsumerConfig]],
        registry: Registry,
        probe: Probe,
        interval_s: float,
        timeout_s: float,
        not_running: Callable[[str], Health | None] = lambda name: None,
        down_grace_s: float = 10.0,
        on_still_down: Callable[[str, str | None], None] | None = None,
    ) -> None:
        self._clock = clock
        self._consumers = consumers
        self._registry = registry
        self._probe = probe
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        #: A managed process that is not running: its health (STOPPED,
        #: STARTING), and it is not probed. None: probe it.
        self._not_running = not_running
        self.down_grace_s = down_grace_s
        self._on_still_down = on_still_down
        self._down_timers: dict[str, IDelayedCall] = {}
        self._in_progress: dict[str, defer.Deferred[None]] = {}
        self._loop: LoopingCall | None = None

    def start(self) -> None:
        self._loop = LoopingCall(self.probe_all)
        self._loop.clock = self._clock
        self._loop.start(self.interval_s, now=True)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        for d in list(self._in_progress.values()):
            d.cancel()
        for name in list(self._down_timers):
            self._disarm(name)

    def configure(self, interval_s: float, timeout_s: float,
                  down_grace_s: float | None = None) -> None:
        """New settings from a reload (a grace already running keeps its end)."""
        self.timeout_s = timeout_s
        if down_grace_s is not None:
            self.down_grace_s = down_grace_s
        if interval_s != self.interval_s:
            self.interval_s = interval_s
            if self._loop is not None and self._loop.running:
                self._loop.stop()
                self.start()

    def probe_all(self) -> None:
        for name in self._consumers():
            self.probe_now(name)

    def probe_all_now(self) -> defer.Deferred[list[None]]:
        """Probe every consumer and fire when all probes have been recorded."""
        return defer.gatherResults([self.probe_now(name) for name in self._consumers()])

    def probing(self, name: str) -> bool:
        """A probe of `name` is on its way (it may reach whatever listens on
        the port by the time it connects)."""
        return name in self._in_progress

    def probe_now(self, name: str) -> defer.Deferred[None]:
        """Probe one consumer now, unless a probe of it is already running."""
        if name in self._in_progress:
            return self._in_progress[name]
        consumer = self._consumers().get(name)
        if consumer is None or name not in self._registry:
            return defer.succeed(None)
        health = self._not_running(name)
        if health is not None:
            self._change(name, health, None)
            return defer.succeed(None)
        d: defer.Deferred[Health] = defer.maybeDeferred(self._probe, consumer)
        d.addTimeout(self.timeout_s, self._clock)
        recorded = d.addBoth(self._record, name)
        self._in_progress[name] = recorded
        return recorded

    def _record(self, result: Health | Failure, name: str) -> None:
        self._in_progress.pop(name, None)
        if name not in self._registry:
            return  # removed by a reload meanwhile
        health = self._not_running(name)
        if health is not None:
            self._change(name, health, None)  # it was stopped meanwhile
            return
        self._registry[name].refused = isinstance(result, Failure) and bool(
            result.check(ConnectionRefusedError))
        if isinstance(result, Failure):
            if result.check(defer.TimeoutError):
                error: str | None = f"probe timed out after {self.timeout_s:g}s"
            elif result.check(defer.CancelledError):
                return  # the monitor is stopping
            else:
                error = describe_failure(result)
            health = Health.DOWN
        else:
            error, health = None, result
        self._registry[name].last_probe = self._clock.seconds()
        self._change(name, health, error)

    def _change(self, name: str, health: Health, error: str | None) -> None:
        state = self._registry[name]
        was = state.health
        if health is Health.DOWN:
            self._registry.went_down(name)
            if name not in self._down_timers and self._on_still_down is not None:
                self._down_timers[name] = self._clock.callLater(
                    self.down_grace_s, self._grace_over, name)
        else:
            self._disarm(name)
        state.health = health
        state.last_error = error
        if was is not health:
            log.info("consumer {name} health {was} -> {now}{why}", name=name, was=was.value,
                     now=health.value, why=f" ({error})" if error else "")

    def _disarm(self, name: str) -> None:
        timer = self._down_timers.pop(name, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _grace_over(self, name: str) -> None:
        """Down since down_grace_s ago: one more probe decides."""
        del self._down_timers[name]
        self.probe_now(name).addBoth(self._still_down, name)

    def _still_down(self, _: object, name: str) -> None:
        if name not in self._registry or self._registry[name].health is not Health.DOWN:
            return
        if name not in self._down_timers:  # and again while it stays down
            self._down_timers[name] = self._clock.callLater(
                self.down_grace_s, self._grace_over, name)
        assert self._on_still_down is not None
        try:
            self._on_still_down(name, self._registry[name].last_error)
        except Exception:
            log.failure("handling {name} staying down failed", name=name)

