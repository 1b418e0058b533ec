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

import enum
import itertools
import math
from typing import Any, Callable, Mapping, Protocol

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from gpumgr.errors import GpumgrError, QueueFull, QueueTimeout
from gpumgr.events import Event
from gpumgr.queue_policy import (QueuedJob, Waiting, pick_next, pick_next_avoiding_swaps,
                                 pick_order)
from gpumgr.registry import Registry
from gpumgr.states import SchedulerMode

Job = Callable[[], "defer.Deferred[Any]"]


class _IdleWaiters:
    """Deferreds waiting for the scheduler to have no running job."""

    def __init__(self) -> None:
        self._waiters: list[defer.Deferred[None]] = []

    def wait(self, idle: bool) -> defer.Deferred[None]:
        if idle:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiters.append(d)
        return d

    def fire(self) -> None:
        fired, self._waiters = self._waiters, []
        for d in fired:
            d.callback(None)


@attrs.frozen
class Holder:
    """A job holding the GPU now."""

    consumer: str
    kind: str | None
    since: float
    control: bool


@attrs.frozen
class SchedulerStats:
    mode: SchedulerMode
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
    eviction_failures: int = 0
    oom_retries: int = 0
    recent_events: tuple[Event, ...] = ()
    holders: tuple[Holder, ...] = ()


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


class TicketState(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    DONE = "done"
    DROPPED = "dropped"  # left the queue: cancelled, timed out or refused


class _Ticket:
    __slots__ = ("seq", "consumer", "kind", "priority", "job", "enqueued_at", "outer",
                 "inner", "timer", "state", "overtaken", "control", "started_at", "request_id")

    def __init__(self, seq: int, consumer: str, kind: str | None, priority: int, job: Job,
                 enqueued_at: float) -> None:
        self.seq = seq
        self.consumer = consumer
        self.kind = kind
        self.priority = priority
        self.job = job
        self.enqueued_at = enqueued_at
        self.outer: defer.Deferred[Any] | None = None
        self.inner: defer.Deferred[Any] | None = None
        self.timer: Any = None
        self.state = TicketState.WAITING
        self.overtaken = 0
        self.control = False
        self.started_at = enqueued_at
        self.request_id: str | None = None

    def waiting_view(self, cheap: bool = False) -> Waiting:
        return Waiting(self.seq, self.priority, self.enqueued_at, cheap, self.overtaken)


class Locked:
    """At most `capacity` jobs hold the GPU; the rest wait in a bounded queue.

    The slot is released in exactly one place (`_finished`), which every path
    out of a running job reaches: success, failure, a synchronous exception
    from the job, and cancellation.
    """

    mode = SchedulerMode.LOCKED  # the broker reports EVICTING when it evicts around it

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
        self._clock = clock
        self._registry = registry
        self.capacity = capacity
        self._max_queue = max_queue
        self._queue_timeout_s = queue_timeout_s
        self._priority = dict(priority or {})
        self._aging_s = aging_s
        self._is_loaded = is_loaded
        self._max_overtakes = max_overtakes
        self._seq = itertools.count()
        self._waiting: list[_Ticket] = []
        self._running: set[_Ticket] = set()
        self._total = 0
        self._rejected = 0
        self._last_wait_ms = 0
        self._last_run_ms = 0
        self._max_running_seen = 0
        self._dispatching = False
        self._closed: GpumgrError | None = None
        self._idle = _IdleWaiters()

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

    def close(self, error: GpumgrError) -> None:
        self._closed = error
        waiting, self._waiting = self._waiting, []
        for ticket in waiting:
            ticket.state = TicketState.DROPPED
            if ticket.timer is not None and ticket.timer.active():
                ticket.timer.cancel()
            ticket.timer = None
            assert ticket.outer is not None
            ticket.outer.errback(error)

    def cancel_running(self) -> None:
        for ticket in sorted(self._running, key=lambda t: t.seq):
            if ticket.inner is not None:
                ticket.inner.cancel()

    def when_idle(self) -> defer.Deferred[None]:
        return self._idle.wait(not self._running)

    # -- the seam ----------------------------------------------------------

    def run(self, consumer: str, job: Job, kind: str | None = None,
            control: bool = False, request_id: str | None = None) -> defer.Deferred[Any]:
        if self._closed is not None:
            return defer.fail(self._closed)
        now = self._clock.seconds()
        ticket = _Ticket(next(self._seq), consumer, kind,
                         self._priority.get(kind, 0) if kind else 0, job, now)
        ticket.control = control
        ticket.request_id = request_id
        ticket.outer = defer.Deferred(lambda _d: self._cancel(ticket))
        if len(self._running) < self.capacity and not self._waiting:
            self._start(ticket)
            self._dispatch()
        elif len(self._waiting) >= self._max_queue:
            self._rejected += 1
            ticket.state = TicketState.DROPPED
            ticket.outer.errback(QueueFull(
                f"{len(self._waiting)} jobs are already waiting (scheduler.max_queue)",
                consumer=consumer, retry_after_s=self._retry_after_s()))
        else:
            ticket.timer = self._clock.callLater(self._queue_timeout_s, self._expire, ticket)
            self._waiting.append(ticket)
        return ticket.outer

    def stats(self) -> SchedulerStats:
        by_kind: dict[str, int] = {}
        for t in self._waiting:
            key = t.kind or "other"
            by_kind[key] = by_kind.get(key, 0) + 1
        return SchedulerStats(
            mode=self.mode,
            capacity=self.capacity,
            queue_depth=len(self._waiting),
            in_flight=len(self._running),
            total_jobs=self._total,
            last_wait_ms=self._last_wait_ms,
            last_run_ms=self._last_run_ms,
            evictions=0,
            oldest_queued=min((t.enqueued_at for t in self._waiting), default=None),
            rejected=self._rejected,
            queued_by_kind=by_kind,
            holders=tuple(Holder(t.consumer, t.kind, t.started_at, t.control)
                          for t in sorted(self._running, key=lambda t: t.seq)),
        )

    @property
    def max_running_seen(self) -> int:
        return self._max_running_seen

    # -- internals -----------------------------------------------------------

    def _retry_after_s(self) -> float:
        per_job_s = max(self._last_run_ms / 1000.0, 1.0)
        return math.ceil(per_job_s * (len(self._waiting) + 1) / self.capacity)

    def _start(self, ticket: _Ticket) -> None:
        now = self._clock.seconds()
        ticket.state = TicketState.RUNNING
        if ticket.timer is not None and ticket.timer.active():
            ticket.timer.cancel()
        ticket.timer = None
        ticket.started_at = now
        self._running.add(ticket)
        self._max_running_seen = max(self._max_running_seen, len(self._running))
        self._total += 1
        self._last_wait_ms = int((now - ticket.enqueued_at) * 1000)
        if not ticket.control:
            self._registry.job_started(ticket.consumer, now)
        started_at = now
        ticket.inner = defer.maybeDeferred(ticket.job)
        ticket.inner.addBoth(self._finished, ticket, started_at)

    def _finished(self, result: Any, ticket: _Ticket, started_at: float) -> None:
        try:
            now = self._clock.seconds()
            ticket.state = TicketState.DONE
            self._running.discard(ticket)
            self._last_run_ms = int((now - started_at) * 1000)
            if not ticket.control:
                self._registry.job_ended(ticket.consumer, now)
        finally:
            self._dispatch()
            if not self._running:
                self._idle.fire()
        # If the caller cancelled and the job did not stop at once, the caller
        # already has its CancelledError; the late result goes nowhere.
        outer = ticket.outer
        assert outer is not None
        if not outer.called:
            if isinstance(result, Failure):
                outer.errback(result)
            else:
                outer.callback(result)

    def _dispatch(self) -> None:
        # A job that finishes synchronously re-enters here from _finished; the
        # outer loop picks up its freed slot, so the stack never grows.
        if self._dispatching:
            return
        self._dispatching = True
        try:
            while self._waiting and len(self._running) < self.capacity:
                self._start(self._waiting.pop(self._choose()))
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

    def queued_for(self, consumer: str) -> int:
        return sum(1 for t in self._waiting if t.consumer == consumer)

    def queue_order(self) -> tuple[QueuedJob, ...]:
        views = [t.waiting_view(self._is_loaded(t.consumer) if self._is_loaded is not None
                                else False) for t in self._waiting]
        order = pick_order(views, self._clock.seconds(), self._aging_s,
                           self._max_overtakes if self._is_loaded is not None else 0)
        return tuple(QueuedJob(t.request_id, t.consumer, t.kind, t.enqueued_at, t.control)
                     for t in (self._waiting[i] for i in order))

    def _expire(self, ticket: _Ticket) -> None:
        ticket.timer = None
        if ticket.state is not TicketState.WAITING:
            return
        self._waiting.remove(ticket)
        ticket.state = TicketState.DROPPED
        self._rejected += 1
        assert ticket.outer is not None
        ticket.outer.errback(QueueTimeout(
            f"waited {self._queue_timeout_s:g}s for the GPU (scheduler.queue_timeout_s)",
            consumer=ticket.consumer))

    def _cancel(self, ticket: _Ticket) -> None:
        if ticket.state is TicketState.WAITING:
            self._waiting.remove(ticket)
            ticket.state = TicketState.DROPPED
            if ticket.timer is not None and ticket.timer.active():
                ticket.timer.cancel()
            ticket.timer = None
            # outer errbacks with CancelledError once we return.
        elif ticket.state is TicketState.RUNNING and ticket.inner is not None:
            ticket.inner.cancel()


# Waiting and the pick_next functions: their old home, kept for imports.
__all__ = ["Holder", "Job", "Locked", "Passthrough", "QueuedJob", "Scheduler", "SchedulerStats", "TicketState",
           "Waiting", "pick_next", "pick_next_avoiding_swaps"]
