"""Periodic health probes, one per consumer, each with its own deadline.

Probes run concurrently: the loop starts every probe and returns at once, so a
slow consumer never delays another's probe (or the next tick). A consumer
whose previous probe is still running is skipped rather than stacked.
"""

from __future__ import annotations

from typing import Callable, Mapping

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from gpumgr.config import ConsumerConfig
from gpumgr.registry import Registry

log = Logger()

#: probe(url) -> Deferred[None]; fails with a readable exception. The monitor
#: enforces the deadline by cancelling it.
Probe = Callable[[str], "defer.Deferred[None]"]


class HealthMonitor:
    def __init__(
        self,
        clock: IReactorTime,
        consumers: Mapping[str, ConsumerConfig],
        registry: Registry,
        probe: Probe,
        interval_s: float,
        timeout_s: float,
    ) -> None:
        self._clock = clock
        self._consumers = consumers
        self._registry = registry
        self._probe = probe
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._in_progress: dict[str, defer.Deferred[None]] = {}
        self._loop: LoopingCall | None = None

    def start(self) -> None:
        self._loop = LoopingCall(self.probe_all)
        self._loop.clock = self._clock
        self._loop.start(self._interval_s, now=True)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        for d in list(self._in_progress.values()):
            d.cancel()

    def probe_all(self) -> None:
        for name in self._consumers:
            self.probe_now(name)

    def probe_all_now(self) -> defer.Deferred[list]:
        """Probe every consumer and fire when all probes have been recorded."""
        return defer.gatherResults([self.probe_now(name) for name in self._consumers])

    def probe_now(self, name: str) -> defer.Deferred[None]:
        """Probe one consumer now, unless a probe of it is already running."""
        if name in self._in_progress:
            return self._in_progress[name]
        consumer = self._consumers[name]
        url = consumer.url_for(consumer.health_path)
        d = defer.maybeDeferred(self._probe, url)
        self._in_progress[name] = d
        timer = self._clock.callLater(self._timeout_s, d.cancel)

        def record(result) -> None:
            if timer.active():
                timer.cancel()
            del self._in_progress[name]
            error = None
            if isinstance(result, defer.Failure):
                if result.check(defer.CancelledError):
                    error = f"probe timed out after {self._timeout_s:g}s"
                else:
                    error = _describe(result.value)
            was = self._registry[name].health
            self._registry.record_probe(name, self._clock.seconds(), error)
            now = self._registry[name].health
            if now != was:
                log.info(
                    "consumer {name} health {was} -> {now}{why}",
                    name=name, was=was, now=now,
                    why=f" ({error})" if error else "",
                )

        d.addBoth(record)
        return d


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 300 else text[:297] + "..."

