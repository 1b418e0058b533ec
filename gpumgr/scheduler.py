"""Who gets the GPU when: the seam, Passthrough, and Locked.

`Scheduler.run(consumer, job, kind)` calls `job()` when the consumer may use
the GPU and holds that right until the job's Deferred fires -- for a proxied
request that is the last byte of the response, or the abort. Cancelling the
Deferred returned by `run` removes a queued job, or cancels a running one.

`Passthrough` runs everything at once; it only counts. `Locked` lets at
most `capacity` jobs run and queues the rest: bounded, prioritised with aging,
with a wait deadline, and cancellable. Who runs next is a pure function
(`pick_next`) of the waiting jobs and the time.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Mapping, Protocol, Sequence

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from gpumgr.errors import QueueFull, QueueTimeout
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


@attrs.frozen
class Waiting:
    """What `pick_next` needs to know about a queued job."""

    seq: int
    priority: int
    enqueued_at: float


def effective_priority(w: Waiting, now: float, aging_s: float) -> int:
    """Base priority plus one level per `aging_s` seconds spent waiting."""
    return w.priority + int((now - w.enqueued_at) // aging_s)


def pick_next(waiting: Sequence[Waiting], now: float, aging_s: float) -> int:
    """Index of the job to run next: highest effective priority, then FIFO."""
    best = 0
    best_key = None
    for i, w in enumerate(waiting):
        key = (effective_priority(w, now, aging_s), -w.seq)
        if best_key is None or key > best_key:
            best, best_key = i, key
    return best


class _Ticket:
    __slots__ = ("seq", "consumer", "kind", "priority", "job", "enqueued_at", "outer",
                 "inner", "timer", "state")

    def __init__(self, seq, consumer, kind, priority, job, enqueued_at):
        self.seq = seq
        self.consumer = consumer
        self.kind = kind
        self.priority = priority
        self.job = job
        self.enqueued_at = enqueued_at
        self.outer: defer.Deferred[Any] | None = None
        self.inner: defer.Deferred[Any] | None = None
        self.timer = None
        self.state = "waiting"  # -> running -> done; or waiting -> dropped

    def waiting_view(self) -> Waiting:
        return Waiting(self.seq, self.priority, self.enqueued_at)


class Locked:
    """At most `capacity` jobs hold the GPU; the rest wait in a bounded queue.

    The slot is released in exactly one place (`_finished`), which every path
    out of a running job reaches: success, failure, a synchronous exception
    from the job, and cancellation.
    """

    mode = "locked"

    def __init__(
        self,
        clock: IReactorTime,
        registry: Registry,
        capacity: int = 1,
        max_queue: int = 64,
        queue_timeout_s: float = 600.0,
        priority: Mapping[str, int] | None = None,
        aging_s: float = 30.0,
    ) -> None:
        self._clock = clock
        self._registry = registry
        self.capacity = capacity
        self._max_queue = max_queue
        self._queue_timeout_s = queue_timeout_s
        self._priority = dict(priority or {})
        self._aging_s = aging_s
        self._seq = itertools.count()
        self._waiting: list[_Ticket] = []
        self._running: set[_Ticket] = set()
        self._total = 0
        self._rejected = 0
        self._last_wait_ms = 0
        self._last_run_ms = 0
        self._max_running_seen = 0
        self._dispatching = False

    # -- the seam ----------------------------------------------------------

    def run(self, consumer: str, job: Job, kind: str | None = None) -> defer.Deferred[Any]:
        now = self._clock.seconds()
        ticket = _Ticket(next(self._seq), consumer, kind,
                         self._priority.get(kind, 0) if kind else 0, job, now)
        ticket.outer = defer.Deferred(lambda _d: self._cancel(ticket))
        if len(self._running) < self.capacity and not self._waiting:
            self._start(ticket)
            self._dispatch()
        elif len(self._waiting) >= self._max_queue:
            self._rejected += 1
            ticket.state = "dropped"
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
        ticket.state = "running"
        if ticket.timer is not None and ticket.timer.active():
            ticket.timer.cancel()
        ticket.timer = None
        self._running.add(ticket)
        self._max_running_seen = max(self._max_running_seen, len(self._running))
        self._total += 1
        self._last_wait_ms = int((now - ticket.enqueued_at) * 1000)
        self._registry.job_started(ticket.consumer, now)
        started_at = now
        ticket.inner = defer.maybeDeferred(ticket.job)
        ticket.inner.addBoth(self._finished, ticket, started_at)

    def _finished(self, result: Any, ticket: _Ticket, started_at: float) -> None:
        try:
            now = self._clock.seconds()
            ticket.state = "done"
            self._running.discard(ticket)
            self._last_run_ms = int((now - started_at) * 1000)
            self._registry.job_ended(ticket.consumer, now)
        finally:
            self._dispatch()
        # If the caller cancelled and the job did not stop at once, the caller
        # already has its CancelledError; the late result goes nowhere.
        if not ticket.outer.called:
            if isinstance(result, Failure):
                ticket.outer.errback(result)
            else:
                ticket.outer.callback(result)

    def _dispatch(self) -> None:
        # A job that finishes synchronously re-enters here from _finished; the
        # outer loop picks up its freed slot, so the stack never grows.
        if self._dispatching:
            return
        self._dispatching = True
        try:
            while self._waiting and len(self._running) < self.capacity:
                now = self._clock.seconds()
                index = pick_next([t.waiting_view() for t in self._waiting], now, self._aging_s)
                self._start(self._waiting.pop(index))
        finally:
            self._dispatching = False

    def _expire(self, ticket: _Ticket) -> None:
        ticket.timer = None
        if ticket.state != "waiting":
            return
        self._waiting.remove(ticket)
        ticket.state = "dropped"
        self._rejected += 1
        ticket.outer.errback(QueueTimeout(
            f"waited {self._queue_timeout_s:g}s for the GPU (scheduler.queue_timeout_s)",
            consumer=ticket.consumer))

    def _cancel(self, ticket: _Ticket) -> None:
        if ticket.state == "waiting":
            self._waiting.remove(ticket)
            ticket.state = "dropped"
            if ticket.timer is not None and ticket.timer.active():
                ticket.timer.cancel()
            ticket.timer = None
            # outer errbacks with CancelledError once we return.
        elif ticket.state == "running" and ticket.inner is not None:
            ticket.inner.cancel()
