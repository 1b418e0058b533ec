"""Who gets the GPU when: the seam, Passthrough, and Locked.

`Scheduler.run(consumer, job, kind)` calls `job()` when the consumer may use
the GPU and holds that right until the job's Deferred fires -- for a proxied
request that is the last byte of the response, or the abort. Cancelling the
Deferred returned by `run` removes a queued job, or cancels a running one.

`Passthrough` runs everything at once; it only counts. `Locked` lets at
most `capacity` jobs run and queues the rest: bounded, prioritised with aging,
with a wait deadline, and cancellable. Who runs next is a pure function of
the waiting jobs and the time (gpumgr.queue_policy).
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Mapping, Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from gpumgr.errors import GpumgrError
from gpumgr.job_queue import (Holder, Job, JobQueue, SchedulerStats, Ticket, TicketState,
                              _IdleWaiters)
from gpumgr.queue_policy import (QueuedJob, Waiting, pick_next, pick_next_avoiding_swaps,
                                 pick_order)
from gpumgr.registry import Registry
from gpumgr.states import SchedulerMode


class Scheduler(Protocol):
    mode: SchedulerMode

    def run(self, consumer: str, job: Job, kind: str | None = None,
            control: bool = False, request_id: str | None = None) -> defer.Deferred[Any]:
        """`control` jobs (loads, unloads) hold the GPU but are not requests;
        `request_id` names the request a job serves (gpumgr.request_book)."""
        ...

    def queue_order(self) -> tuple[QueuedJob, ...]:
        """The waiting jobs, in the order they would start if nothing changed."""
        ...

    def queued_for(self, consumer: str) -> int:
        """Jobs waiting for `consumer` (idle unload waits for them)."""
        ...

    def close(self, error: GpumgrError) -> None:
        """Refuse new jobs, and queued ones, with `error` (shutdown)."""
        ...

    def cancel_running(self) -> None:
        """Cancel every running job (shutdown, once the grace period is over)."""
        ...

    def when_idle(self) -> defer.Deferred[None]:
        """Fires once no job runs."""
        ...

    def stats(self) -> SchedulerStats:
        ...


class Passthrough:
    """No lock, no queue: every job starts immediately."""

    mode = SchedulerMode.PASSTHROUGH

    def __init__(self, clock: IReactorTime, registry: Registry) -> None:
        self._clock = clock
        self._registry = registry
        self._running: dict[int, Holder] = {}
        self._jobs: dict[int, defer.Deferred[Any]] = {}
        self._seq = itertools.count()
        self._total = 0
        self._last_run_ms = 0
        self._closed: GpumgrError | None = None
        self._idle = _IdleWaiters()

    def run(self, consumer: str, job: Job, kind: str | None = None,
            control: bool = False, request_id: str | None = None) -> defer.Deferred[Any]:
        if self._closed is not None:
            return defer.fail(self._closed)
        started = self._clock.seconds()
        key = next(self._seq)
        self._running[key] = Holder(consumer, kind, started, control)
        self._total += 1
        if not control:
            self._registry.job_started(consumer, started)

        def ended(result: Any) -> Any:
            now = self._clock.seconds()
            del self._running[key]
            self._jobs.pop(key, None)
            self._last_run_ms = int((now - started) * 1000)
            if not control:
                self._registry.job_ended(consumer, now)
            if not self._running:
                self._idle.fire()
            return result

        d = defer.maybeDeferred(job)
        if not d.called:
            self._jobs[key] = d
        d.addBoth(ended)
        return d

    def queued_for(self, consumer: str) -> int:
        return 0

    def queue_order(self) -> tuple[QueuedJob, ...]:
        return ()

    def close(self, error: GpumgrError) -> None:
        self._closed = error

    def cancel_running(self) -> None:
        for d in list(self._jobs.values()):
            d.cancel()

    def when_idle(self) -> defer.Deferred[None]:
        return self._idle.wait(not self._running)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            mode=self.mode,
            capacity=None,
            queue_depth=0,
            in_flight=len(self._running),
            total_jobs=self._total,
            last_wait_ms=0,
            last_run_ms=self._last_run_ms,
            evictions=0,
            oldest_queued=None,
            holders=tuple(self._running.values()),
        )


class _Ticket(Ticket):
    __slots__ = ("overtaken",)

    def __init__(self, seq: int, consumer: str, kind: str | None, priority: int, job: Job,
                 enqueued_at: float, control: bool, request_id: str | None) -> None:
        super().__init__(seq, consumer, kind, priority, job, enqueued_at, control, request_id)
        self.overtaken = 0

    def waiting_view(self, cheap: bool = False) -> Waiting:
        return Waiting(self.seq, self.priority, self.enqueued_at, cheap, self.overtaken)


class Locked(JobQueue[_Ticket]):
    """At most `capacity` jobs hold the GPU; the rest wait in a bounded queue
    (gpumgr.job_queue), and the next to start is `pick_next`'s choice."""

    mode = SchedulerMode.LOCKED  # the broker reports EVICTING when it evicts around it
    capacity: int

    def __init__(
        self,
        clock: IReactorTime,
        registry: Registry,
        capacity: int = 1,
        max_queue: int = 64,
        queue_timeout_s: float = 600.0,
        priority: Mapping[str, int] | None = None,
        aging_s: float = 30.0,
        is_loaded: Callable[[str], bool] | None = None,
        max_overtakes: int = 0,
    ) -> None:
        super().__init__(clock, registry)
        self.capacity = capacity
        self._max_queue = max_queue
        self._queue_timeout_s = queue_timeout_s
        self._priority = dict(priority or {})
        self._aging_s = aging_s
        self._is_loaded = is_loaded
        self._max_overtakes = max_overtakes
        self._dispatching = False

    def configure(self, capacity: int, max_queue: int, queue_timeout_s: float,
                  priority: Mapping[str, int], aging_s: float, max_overtakes: int) -> None:
        """New limits from a reload. Queued and running jobs stay as they are;
        a larger capacity starts waiting jobs at once."""
        self.capacity = capacity
        self._max_queue = max_queue
        self._queue_timeout_s = queue_timeout_s
        self._priority = dict(priority)
        self._aging_s = aging_s
        if self._is_loaded is not None:
            self._max_overtakes = max_overtakes
        self._dispatch()

    # -- the seam ----------------------------------------------------------

    def run(self, consumer: str, job: Job, kind: str | None = None,
            control: bool = False, request_id: str | None = None) -> defer.Deferred[Any]:
        if self._closed is not None:
            return defer.fail(self._closed)
        ticket = _Ticket(next(self._seq), consumer, kind, self._priority_of(kind), job,
                         self._clock.seconds(), control, request_id)
        ticket.outer = defer.Deferred(lambda _d: self._cancel(ticket))
        if len(self._running) < self.capacity and not self._waiting:
            self._start(ticket, job)
            self._dispatch()
        else:
            self._queue(ticket)
        return ticket.outer

    def queue_order(self) -> tuple[QueuedJob, ...]:
        views = [t.waiting_view(self._is_loaded(t.consumer) if self._is_loaded is not None
                                else False) for t in self._waiting]
        order = pick_order(views, self._clock.seconds(), self._aging_s,
                           self._max_overtakes if self._is_loaded is not None else 0)
        return tuple(QueuedJob(t.request_id, t.consumer, t.kind, t.enqueued_at, t.control)
                     for t in (self._waiting[i] for i in order))

    # -- internals -----------------------------------------------------------

    def _dispatch(self) -> None:
        # A job that finishes synchronously re-enters here from _finished; the
        # outer loop picks up its freed slot, so the stack never grows.
        if self._dispatching:
            return
        self._dispatching = True
        try:
            while self._waiting and len(self._running) < self.capacity:
                ticket = self._waiting.pop(self._choose())
                self._start(ticket, ticket.job)
        finally:
            self._dispatching = False

    def _choose(self) -> int:
        now = self._clock.seconds()
        if self._is_loaded is None or self._max_overtakes <= 0:
            return pick_next([t.waiting_view() for t in self._waiting], now, self._aging_s)
        loaded: dict[str, bool] = {}
        views = []
        for t in self._waiting:
            if t.consumer not in loaded:
                loaded[t.consumer] = self._is_loaded(t.consumer)
            views.append(t.waiting_view(loaded[t.consumer]))
        index, passed = pick_next_avoiding_swaps(views, now, self._aging_s, self._max_overtakes)
        for i in passed:
            self._waiting[i].overtaken += 1
        return index


# Waiting and the pick_next functions: their old home, kept for imports.
__all__ = ["Holder", "Job", "Locked", "Passthrough", "QueuedJob", "Scheduler", "SchedulerStats", "TicketState",
           "Waiting", "pick_next", "pick_next_avoiding_swaps"]
