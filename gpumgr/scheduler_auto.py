"""`scheduler.capacity: auto`: jobs start side by side when their memory fits.

`Auto` keeps the queue like `Locked` does (bounded, priority with aging, a
wait deadline, cancellable) but asks `gpumgr.budget.decide` for each waiting
job, in priority order: a job that fits may start before an earlier one that
does not (backfill), but the head of the queue is overtaken for at most
`max_bypass_s`; after that only jobs that cannot delay it start.

A GPU job is started with a `Grant`: the evictions and the load its decision
chose (it carries them out), a call to say that part is over, and a way to
wait until it runs alone (an out-of-memory replay). While a job unloads or
loads, no other load or unload starts. A control job (preload, admin, idle
unload) runs alone on the card.

The queue itself (bounded, the wait deadline, cancel, the running set, and
the one place a job's slot is released) is gpumgr.job_queue's, shared with
`Locked`; `Auto` adds its decision and the books it keeps beside it.

With several cards (`cards`, gpumgr.auto_cards) each job lives on its
consumer's cards and is decided on each card's own figures; loads, unloads,
jobs alone and `max_running` are per card, so jobs on different cards never
wait for each other.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from gpumgr.auto_cards import AutoCards, CardBooks, CardClaims, combine, heads_of, shares_card
from gpumgr.budget import Ask, Decision, Refuse, Start, Wait, WaitReason, decide
from gpumgr.budget_figures import (BudgetStatus, Figures, ProfileOf, WaitingJob,
                                   budget_status, oom_peak_mib)
from gpumgr.errors import InsufficientVram
from gpumgr.job_queue import Job, JobQueue, Ticket, TicketState
from gpumgr.memory import FigureSource, MemoryFigure, MemoryProfile
from gpumgr.queue_policy import QueuedJob, Waiting, effective_priority
from gpumgr.registry import Registry
from gpumgr.states import SchedulerMode

log = Logger()

_NOTHING = MemoryProfile(MemoryFigure(0, FigureSource.CONFIG), MemoryFigure(0, FigureSource.CONFIG))


class Grant:
    """What a started job is told: what to carry out, and how to say it is done."""

    def __init__(self, sched: Auto, ticket: _Ticket, start: Start) -> None:
        self._sched = sched
        self._ticket = ticket
        self.start = start

    def control_done(self) -> None:
        """Its evictions and load are over: other loads and unloads may start."""
        self._sched._control_done(self._ticket)

    def alone(self) -> defer.Deferred[None]:
        """Fires once no other job runs; nothing new starts meanwhile (until it ends)."""
        return self._sched._alone(self._ticket)


GrantedJob = Callable[[Grant], "defer.Deferred[Any]"]


class _Ticket(Ticket):
    __slots__ = ("model", "profile", "why", "alone", "bypassed_since", "cards")

    def __init__(self, seq: int, consumer: str, kind: str | None, model: str | None,
                 priority: int, job: GrantedJob, control: bool, enqueued_at: float,
                 request_id: str | None) -> None:
        super().__init__(seq, consumer, kind, priority, job, enqueued_at, control, request_id)
        self.model = model
        self.profile = _NOTHING
        self.why: Wait | None = None
        #: It runs with no other job (a control job, a job with no grant).
        self.alone = control
        #: When a later job first started ahead of it.
        self.bypassed_since: float | None = None
        #: The cards it runs on (one card: card 0).
        self.cards: tuple[int, ...] = (0,)


class Auto(JobQueue[_Ticket]):
    """Jobs start when `gpumgr.budget` says they fit; see the module docstring."""

    mode = SchedulerMode.LOCKED  # the broker reports its own mode

    def __init__(
        self,
        clock: IReactorTime,
        registry: Registry,
        figures: Callable[[], Figures],
        profile_of: ProfileOf,
        may_evict: bool = True,
        max_queue: int = 64,
        queue_timeout_s: float = 600.0,
        priority: Mapping[str, int] | None = None,
        aging_s: float = 30.0,
        max_bypass_s: float = 30.0,
        max_running: int = 8,
        overlap_evict_idle_s: float | None = 120.0,
        cards: AutoCards | None = None,
    ) -> None:
        """`figures`: the one card's; with `cards` (several cards), each card's
        figures come from `cards.figures` instead."""
        super().__init__(clock, registry)
        self._cards = cards
        self._card_figures: Callable[[int], Figures] = (
            cards.figures if cards is not None else lambda _card: figures())
        self._profile_of = profile_of
        self._may_evict = may_evict
        self.capacity = None
        self.configure(max_queue, queue_timeout_s, priority or {}, aging_s, max_bypass_s,
                       max_running, dispatch=False)
        #: Per card: a load or unload in progress, jobs waiting to run alone.
        self._claims: CardClaims[_Ticket] = CardClaims()
        self._overlap_evict_idle_s = overlap_evict_idle_s
        #: Per card: job peaks that ended lately, others' memory when quiet.
        self._books = CardBooks()
        self._dispatching = False
        self._again = False

    def configure(self, max_queue: int, queue_timeout_s: float, priority: Mapping[str, int],
                  aging_s: float, max_bypass_s: float, max_running: int,
                  dispatch: bool = True, overlap_evict_idle_s: float | None = 120.0) -> None:
        """New limits from a reload; queued and running jobs stay as they are."""
        self._max_queue = max_queue
        self._queue_timeout_s = queue_timeout_s
        self._priority = dict(priority)
        self._aging_s = aging_s
        self._max_bypass_s = max_bypass_s
        self._max_running = max_running
        self._overlap_evict_idle_s = overlap_evict_idle_s
        if dispatch:
            self.poke()

    def run(self, consumer: str, job: Job, kind: str | None = None,
            control: bool = False, request_id: str | None = None) -> defer.Deferred[Any]:
        """A job that knows nothing of grants (a load, an unload: `control`)
        runs alone: it has no figures to be admitted on, and may load or
        unload anything."""
        return self._enqueue(consumer, lambda _grant: job(), kind, None, control, alone=True,
                             request_id=request_id)

    def run_granted(self, consumer: str, job: GrantedJob, kind: str | None = None,
                    model: str | None = None,
                    request_id: str | None = None) -> defer.Deferred[Any]:
        """A GPU job of `consumer` (running `model`), started with its `Grant`."""
        return self._enqueue(consumer, job, kind, model, False, alone=False,
                             request_id=request_id)

    def queue_order(self) -> tuple[QueuedJob, ...]:
        """The waiting jobs in the order they are looked at (a later one that
        fits may still start first: backfill, bounded by max_bypass_s)."""
        return tuple(QueuedJob(t.request_id, t.consumer, t.kind, t.enqueued_at, t.control)
                     for t in self._order())

    def poke(self) -> None:
        """Figures changed (a GPU sample, a profile, a reload): look at the queue again."""
        self._dispatch()

    def waiting_reasons(self) -> tuple[tuple[str, str | None, WaitReason | None, str], ...]:
        """(consumer, kind, reason, detail) of every waiting job, in queue order."""
        return tuple((t.consumer, t.kind, t.why.reason if t.why else None,
                      t.why.detail if t.why else "") for t in self._order())

    def budget_status(self, card: int = 0) -> BudgetStatus:
        return budget_status(self.budget(card), tuple(
            WaitingJob(c, k, None if r is None else r.value, d)
            for c, k, r, d in self.waiting_reasons()), card)

    def running_profiles(self, card: int | None = None) -> dict[str, tuple[MemoryProfile, ...]]:
        """The running jobs' profiles by consumer (on `card`: the jobs there)."""
        running: dict[str, list[MemoryProfile]] = {}
        for t in sorted(self._running, key=lambda t: t.seq):
            if card is None or card in t.cards:
                running.setdefault(t.consumer, []).append(t.profile)
        return {n: tuple(p) for n, p in running.items()}

    def budget(self, card: int = 0) -> Figures:
        """`card`'s figures with the running jobs in them (status, metrics)."""
        return self._current_figures(card)

    def oom_peak_mib(self, consumer: str) -> int | None:
        """A running job of `consumer` answered out of memory: the least job
        peak that explains it, on the card with the least room it had."""
        cards = next((t.cards for t in self._running if t.consumer == consumer), (0,))
        seen = [p for p in (oom_peak_mib(self._current_figures(c), consumer) for c in cards)
                if p is not None]
        return min(seen, default=None)

    def _enqueue(self, consumer: str, job: GrantedJob, kind: str | None, model: str | None,
                 control: bool, alone: bool,
                 request_id: str | None = None) -> defer.Deferred[Any]:
        if self._closed is not None:
            return defer.fail(self._closed)
        t = _Ticket(next(self._seq), consumer, kind, model, self._priority_of(kind), job,
                    control, self._clock.seconds(), request_id)
        t.alone = alone
        if self._cards is not None:
            try:
                t.cards = tuple(sorted(set(self._cards.cards_for_job(consumer)))) or (0,)
            except Exception as e:  # a placement that failed must not take the broker down
                log.failure("placing {consumer} failed", consumer=consumer)
                return defer.fail(e)
            refusal = self._cards.refusal(consumer, t.cards)
            if refusal is not None:
                return defer.fail(refusal)
        t.outer = defer.Deferred(lambda _d: self._cancel(t))
        if self._queue(t):
            self._dispatch()
        return t.outer

    def _order(self) -> list[_Ticket]:
        now = self._clock.seconds()
        return sorted(self._waiting, key=lambda t: (-effective_priority(
            Waiting(t.seq, t.priority, t.enqueued_at), now, self._aging_s), t.seq))

    def _decide(self, t: _Ticket, figures: Mapping[int, Figures]) -> Decision:
        """Asked on each of its cards (figures: card -> its figures), combined."""
        alone = self._claims.alone_near(t.cards)
        if alone is not None:
            return Wait(WaitReason.ALONE, f"a job of {alone.consumer} replays alone")
        near = [r for r in self._running if shares_card(r.cards, t.cards)]
        if any(r.alone for r in near):
            return Wait(WaitReason.ALONE, "a load or unload runs alone")
        if t.alone:
            if near:
                return Wait(WaitReason.ALONE, "a load or unload waits for an idle card")
            return Start()
        if any(t.consumer not in figures[c].holdings for c in t.cards):
            return Start()  # removed by a reload: the job fails at once (ConsumerRemoved)
        profile = self._profile_of(t.consumer, t.model)
        if profile is None:
            return Start()
        t.profile = profile
        decisions = []
        for card in t.cards:
            f = figures[card]
            decisions.append(decide(
                f.card, f.holdings, Ask(t.consumer, profile), self._claims.control_on(card),
                self._max_running, self._may_evict, now=self._clock.seconds(),
                overlap_evict_idle_s=self._overlap_evict_idle_s))
        return combine(decisions)

    def _current_figures(self, card: int = 0) -> Figures:
        """`card`'s budget figures now: its running jobs added, and others'
        memory never below what its last quiet reading showed."""
        return self._books.current(card, self._card_figures(card), self.running_profiles(card),
                                   quiet=not any(card in r.cards for r in self._running))

    def _would_delay(self, head: _Ticket, t: _Ticket, start: Start) -> bool:
        """Could `t` keep `head` waiting once what holds it up has ended? Not if `t`
        loads nothing and `head` would start beside `t` alone (EASY backfill)."""
        if start.control:
            return True
        beside_t = {card: self._books.current(
            card, self._card_figures(card),
            {t.consumer: (t.profile,)} if card in t.cards else {}, quiet=False)
            for card in head.cards}
        return not isinstance(self._decide(head, beside_t), Start)

    def _dispatch(self) -> None:
        # Re-entered from a job that ends synchronously: the outer loop goes round again.
        if self._dispatching:
            self._again = True
            return
        self._dispatching = True
        try:
            self._again = True
            while self._again:
                self._again = False
                self._dispatch_once()
        finally:
            self._dispatching = False

    def _dispatch_once(self) -> None:
        order = self._order()
        if not order:
            return
        now = self._clock.seconds()
        figures = {c: self._current_figures(c) for c in sorted({c for t in order for c in t.cards})}
        for t in order:
            decision = self._decide(t, figures)
            if isinstance(decision, Refuse):
                self._refuse(t, InsufficientVram(decision.message, consumer=t.consumer,
                                                 retry_after_s=5))
                self._again = True
                return
            if isinstance(decision, Wait):
                t.why = decision
                continue
            heads = heads_of(order, t)
            over = [h for h in heads if h.bypassed_since is not None
                    and now - h.bypassed_since >= self._max_bypass_s
                    and self._would_delay(h, t, decision)]
            if over:
                t.why = Wait(WaitReason.BYPASS, f"the oldest job ({over[0].consumer}) was "
                             f"overtaken for {self._max_bypass_s:g}s (scheduler.max_bypass_s)")
                continue
            for h in heads:
                if h.bypassed_since is None:
                    h.bypassed_since = now
            self._grant(t, decision)
            self._again = True
            return

    def _grant(self, t: _Ticket, start: Start) -> None:
        self._waiting.remove(t)
        t.why = None
        self._start(t, lambda: t.job(Grant(self, t, start)), lambda: self._took(t, start))

    def _took(self, t: _Ticket, start: Start) -> None:
        if start.victims:
            log.info("{name} starts once {victims} are evicted ({card})", name=t.consumer,
                     victims=", ".join(start.victims), card=self._current_figures(t.cards[0]).card)
        if start.control:  # its load and unloads: its cards and its victims'
            cards_of = self._cards.cards_of if self._cards is not None else lambda _v: (0,)
            self._claims.take_control(t, {*t.cards, *(c for v in start.victims for c in cards_of(v))})

    def _ended(self, t: _Ticket, now: float) -> None:
        self._claims.ended(t)
        self._books.ended(t.cards, now, t.profile.job_peak.mib)

    def _released(self) -> None:
        self._claims.fire(self._running)

    def _control_done(self, t: _Ticket) -> None:
        if self._claims.release_control(t):
            self._dispatch()

    def _alone(self, t: _Ticket) -> defer.Deferred[None]:
        if t.state is not TicketState.RUNNING:
            return defer.succeed(None)
        return self._claims.wait_alone(t, self._running)

    def _left_queue(self) -> None:
        self._dispatch()  # a head that leaves lets the jobs it held back go

    def _wait_reason(self, t: _Ticket) -> str:
        return f" ({t.why.reason}: {t.why.detail})" if t.why else ""


__all__ = ["Auto", "Grant", "GrantedJob"]
