"""Who gets the GPU when.

`Scheduler.run(consumer, job, kind)` calls `job()` when the consumer may use
the GPU and holds that right until the job's Deferred fires -- for a proxied
request that is the last byte of the response, or the abort. Cancelling the
Deferred returned by `run` removes a queued job, or cancels a running one.

`Passthrough` runs everything at once; it only counts.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from gpumgr.registry import Registry

Job = Callable[[], "defer.Deferred[Any]"]


@attrs.frozen
class SchedulerStats:
    mode: str
    capacity: int | None
    queue_depth: int
    in_flight: int
    total_jobs: int
    last_wait_ms: int
    last_run_ms: int
    evictions: int
    oldest_queued: float | None
    rejected: int = 0
    queued_by_kind: dict[str, int] = attrs.field(factory=dict)


class Scheduler(Protocol):
    mode: str

    def run(self, consumer: str, job: Job, kind: str | None = None) -> defer.Deferred[Any]:
        ...

    def stats(self) -> SchedulerStats:
        ...


class Passthrough:
    """No lock, no queue: every job starts immediately."""

    mode = "passthrough"

    def __init__(self, clock: IReactorTime, registry: Registry) -> None:
        self._clock = clock
        self._registry = registry
        self._in_flight = 0
        self._total = 0
        self._last_run_ms = 0

    def run(self, consumer: str, job: Job, kind: str | None = None) -> defer.Deferred[Any]:
        started = self._clock.seconds()
        self._in_flight += 1
        self._total += 1
        self._registry.job_started(consumer, started)

        def ended(result):
            now = self._clock.seconds()
            self._in_flight -= 1
            self._last_run_ms = int((now - started) * 1000)
            self._registry.job_ended(consumer, now)
            return result

        d = defer.maybeDeferred(job)
        d.addBoth(ended)
        return d

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            mode=self.mode,
            capacity=None,
            queue_depth=0,
            in_flight=self._in_flight,
            total_jobs=self._total,
            last_wait_ms=0,
            last_run_ms=self._last_run_ms,
            evictions=0,
            oldest_queued=None,
        )
