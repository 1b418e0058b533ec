"""The queue both GPU schedulers keep: tickets, the bounded wait, the running set.

`JobQueue` is what `Locked` (gpumgr.scheduler) and `Auto`
(gpumgr.scheduler_auto) share: a ticket per job; a queue bounded by
`max_queue` (QueueFull) whose jobs wait at most `queue_timeout_s`
(QueueTimeout) and can be cancelled; the running jobs and their counters;
`close`, `cancel_running`, `when_idle`, `queued_for`, `stats`. Who starts
next, and when, is each scheduler's own (`_dispatch`).

The slot is released in exactly one place (`_finished`), which every path
out of a running job reaches: success, failure, a synchronous exception from
the job, and cancellation.
"""

from __future__ import annotations

import enum
import itertools
import math
from typing import Any, Callable, Generic, TypeVar

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from gpumgr.errors import GpumgrError, QueueFull, QueueTimeout
from gpumgr.events import Event
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


class TicketState(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    DONE = "done"
    DROPPED = "dropped"  # left the queue: cancelled, timed out or refused


class Ticket:
    """One job, from the queue to its end; `outer` is what its caller holds,
    `inner` the job's own Deferred once it runs."""

    __slots__ = ("seq", "consumer", "kind", "priority", "job", "enqueued_at", "started_at",
                 "outer", "inner", "timer", "state", "control", "request_id")

    def __init__(self, seq: int, consumer: str, kind: str | None, priority: int, job: Any,
                 enqueued_at: float, control: bool = False,
                 request_id: str | None = None) -> None:
        self.seq = seq
        self.consumer = consumer
        self.kind = kind
        self.priority = priority
        #: What runs it: the scheduler knows what to call it with.
        self.job = job
        self.enqueued_at = enqueued_at
        self.started_at = enqueued_at
        self.outer: defer.Deferred[Any] | None = None
        self.inner: defer.Deferred[Any] | None = None
        self.timer: Any = None
        self.state = TicketState.WAITING
        self.control = control
        self.request_id = request_id


T = TypeVar("T", bound=Ticket)


class JobQueue(Generic[T]):
    """The shared core; a scheduler adds `_dispatch` (who starts now) and
    whatever it keeps beside a running job (the hooks below)."""

    mode: SchedulerMode
    capacity: int | None
    _max_queue: int
    _queue_timeout_s: float
    _priority: dict[str, int]

    def __init__(self, clock: IReactorTime, registry: Registry) -> None:
        self._clock = clock
        self._registry = registry
        self._seq = itertools.count()
        self._waiting: list[T] = []
        self._running: set[T] = set()
        self._total = 0
        self._rejected = 0
        self._last_wait_ms = 0
        self._last_run_ms = 0
        self._max_running_seen = 0
        self._closed: GpumgrError | None = None
        self._idle = _IdleWaiters()

    @property
    def max_running_seen(self) -> int:
        return self._max_running_seen

    def close(self, error: GpumgrError) -> None:
        self._closed = error
        waiting, self._waiting = self._waiting, []
        for t in waiting:
            self._drop(t)
            assert t.outer is not None
            t.outer.errback(error)

    def cancel_running(self) -> None:
        for t in sorted(self._running, key=lambda t: t.seq):
            if t.inner is not None:
                t.inner.cancel()

    def when_idle(self) -> defer.Deferred[None]:
        return self._idle.wait(not self._running)

    def queued_for(self, consumer: str) -> int:
        return sum(1 for t in self._waiting if t.consumer == consumer)

    def stats(self) -> SchedulerStats:
        by_kind: dict[str, int] = {}
        for t in self._waiting:
            key = t.kind or "other"
            by_kind[key] = by_kind.get(key, 0) + 1
        return SchedulerStats(
            mode=self.mode, capacity=self.capacity, queue_depth=len(self._waiting),
            in_flight=len(self._running), total_jobs=self._total,
            last_wait_ms=self._last_wait_ms, last_run_ms=self._last_run_ms, evictions=0,
            oldest_queued=min((t.enqueued_at for t in self._waiting), default=None),
            rejected=self._rejected, queued_by_kind=by_kind,
            holders=tuple(Holder(t.consumer, t.kind, t.started_at, t.control)
                          for t in sorted(self._running, key=lambda t: t.seq)))

    # -- for the schedulers ----------------------------------------------------

    def _priority_of(self, kind: str | None) -> int:
        return self._priority.get(kind, 0) if kind else 0

    def _queue(self, t: T) -> bool:
        """Put `t` in the queue with its wait deadline; False: the queue is
        full, and `t` was refused (QueueFull)."""
        if len(self._waiting) >= self._max_queue:
            self._rejected += 1
            t.state = TicketState.DROPPED
            assert t.outer is not None
            t.outer.errback(QueueFull(
                f"{len(self._waiting)} jobs are already waiting (scheduler.max_queue)",
                consumer=t.consumer, retry_after_s=self._retry_after_s()))
            return False
        t.timer = self._clock.callLater(self._queue_timeout_s, self._expire, t)
        self._waiting.append(t)
        return True

    def _retry_after_s(self) -> float:
        per_job_s = max(self._last_run_ms / 1000.0, 1.0)
        slots = self.capacity if self.capacity is not None else 1
        return math.ceil(per_job_s * (len(self._waiting) + 1) / slots)

    def _start(self, t: T, job: Callable[[], defer.Deferred[Any]],
               took: Callable[[], None] | None = None) -> None:
        """`t` (out of the queue) holds the GPU now; `took` runs once it
        counts as running, before its `job` is called."""
        now = self._clock.seconds()
        self._drop_timer(t)
        t.state = TicketState.RUNNING
        t.started_at = now
        self._running.add(t)
        if took is not None:
            took()
        self._max_running_seen = max(self._max_running_seen, len(self._running))
        self._total += 1
        self._last_wait_ms = int((now - t.enqueued_at) * 1000)
        if not t.control:
            self._registry.job_started(t.consumer, now)
        t.inner = defer.maybeDeferred(job)
        t.inner.addBoth(self._finished, t, now)

    def _finished(self, result: Any, t: T, started_at: float) -> None:
        try:
            now = self._clock.seconds()
            t.state = TicketState.DONE
            self._running.discard(t)
            self._last_run_ms = int((now - started_at) * 1000)
            if not t.control:
                self._registry.job_ended(t.consumer, now)
            self._ended(t, now)
        finally:
            self._released()
            self._dispatch()
            if not self._running:
                self._idle.fire()
        # If the caller cancelled and the job did not stop at once, the caller
        # already has its CancelledError; the late result goes nowhere.
        outer = t.outer
        assert outer is not None
        if not outer.called:
            if isinstance(result, Failure):
                outer.errback(result)
            else:
                outer.callback(result)

    def _refuse(self, t: T, error: GpumgrError) -> None:
        """A waiting `t` leaves the queue with `error`."""
        self._waiting.remove(t)
        self._drop(t)
        self._rejected += 1
        assert t.outer is not None
        t.outer.errback(error)

    def _expire(self, t: T) -> None:
        t.timer = None
        if t.state is not TicketState.WAITING:
            return
        self._refuse(t, QueueTimeout(
            f"waited {self._queue_timeout_s:g}s for the GPU (scheduler.queue_timeout_s)"
            f"{self._wait_reason(t)}", consumer=t.consumer))
        self._left_queue()

    def _cancel(self, t: T) -> None:
        if t.state is TicketState.WAITING:
            self._waiting.remove(t)
            self._drop(t)
            self._left_queue()
            # outer errbacks with CancelledError once we return.
        elif t.state is TicketState.RUNNING and t.inner is not None:
            t.inner.cancel()

    def _drop(self, t: T) -> None:
        t.state = TicketState.DROPPED
        self._drop_timer(t)

    @staticmethod
    def _drop_timer(t: Ticket) -> None:
        if t.timer is not None and t.timer.active():
            t.timer.cancel()
        t.timer = None

    # -- what a scheduler adds -----------------------------------------------

    def _dispatch(self) -> None:
        """Start what may start now."""
        raise NotImplementedError

    def _ended(self, t: T, now: float) -> None:
        """`t` gave its slot back (the books beside the running set)."""

    def _released(self) -> None:
        """After every end, even a failed one, before the queue is looked at again."""

    def _left_queue(self) -> None:
        """A waiting job expired or was cancelled."""

    def _wait_reason(self, t: T) -> str:
        """Appended to a QueueTimeout's message."""
        return ""
