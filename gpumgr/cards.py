"""Several cards in one box: where each consumer lives, and a lock per card.

A consumer lives on the cards `consumers.<name>.gpu` names (card 0 unless
it says otherwise), or, with `gpu: auto`, on the one card gpumgr chose when
it started the consumer's process (`Placements`; the choice is the pure
`place_auto`). Each card has its own lock (`PerCardLocked`, one `Locked`
per card with `scheduler.capacity` each): jobs on different cards never
wait for each other, and a job of a consumer on several cards takes each
card's lock in index order, so two such jobs cannot deadlock.

A card whose nvidia-smi row has gone refuses its consumers' jobs with
`GpuMissing`; the other cards go on.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from gpumgr.config import Config, ConsumerConfig
from gpumgr.errors import GpuMissing, GpumgrError
from gpumgr.eviction import ConsumerView, Residency, plan_eviction
from gpumgr.gpu_sample import GpuSample
from gpumgr.queue_policy import QueuedJob
from gpumgr.scheduler import Holder, Job, Locked, SchedulerStats
from gpumgr.states import SchedulerMode

log = Logger()


# -- where a consumer lives -----------------------------------------------------------


def spans_cards(config: Config) -> bool:
    """Does any consumer live off card 0 (then each card gets its own lock)?"""
    return any(c.gpu.auto or c.gpu.cards != (0,) for c in config.consumers.values())


@attrs.frozen
class CardChoice:
    """One card, as `place_auto` weighs it."""

    card: int
    victims: tuple[str, ...]
    shortfall_mib: int
    #: The most recent use among the victims (None: no victim, or never used).
    newest_victim_use: float | None


def weigh_card(target: str, card: int, views: Mapping[str, ConsumerView], free_mib: int | None,
               headroom_mib: int) -> CardChoice:
    """What starting `target` on `card` would cost there (pure): `views` are
    the consumers on that card, the target's own among them."""
    plan = plan_eviction(target, views, free_mib, headroom_mib)
    victims = plan.victim_names()
    uses = [u for u in (views[v].last_used for v in victims) if u is not None]
    return CardChoice(card, victims, plan.shortfall_mib, max(uses) if uses else None)


def place_auto(choices: Iterable[CardChoice]) -> int | None:
    """The card to start an `auto` consumer on (pure): one where it fits,
    with the fewest evictions, then the least recently used victims, then the
    lowest index. Where it fits nowhere, the card it misses by least (its
    admission then refuses with the figures). None when there is no card."""
    def key(c: CardChoice) -> tuple[int, int, float, int]:
        newest = c.newest_victim_use if c.newest_victim_use is not None else float("-inf")
        return (c.shortfall_mib, len(c.victims), newest, c.card)

    best = min(choices, key=key, default=None)
    return None if best is None else best.card


class Placements:
    """Which cards each consumer lives on now; `auto` ones are placed on demand."""

    def __init__(
        self,
        config: Callable[[], Config],
        sample: Callable[[], GpuSample],
        views: Callable[[], Mapping[str, ConsumerView]],
        may_move: Callable[[str], bool],
    ) -> None:
        """`may_move(name)`: its process is stopped and no job of it runs or
        waits, so an `auto` consumer may be placed afresh."""
        self._config = config
        self._sample = sample
        self._views = views
        self._may_move = may_move
        #: auto consumer -> the card it was placed on.
        self.assigned: dict[str, int] = {}

    def cards_of(self, name: str) -> tuple[int, ...]:
        """Where it lives now, without placing it (an unplaced auto one: nowhere)."""
        c = self._config().consumers.get(name)
        if c is None:
            return (0,)
        if not c.gpu.auto:
            return c.gpu.cards
        card = self.assigned.get(name)
        return () if card is None else (card,)

    def on_card(self, card: int) -> list[str]:
        return [n for n in self._config().consumers if card in self.cards_of(n)]

    def cards_for_job(self, name: str) -> tuple[int, ...]:
        """Where a job of `name` runs: an `auto` consumer free to move is placed now."""
        c = self._config().consumers.get(name)
        if c is None or not c.gpu.auto:
            return self.cards_of(name)
        if name in self.assigned and not self._may_move(name):
            return (self.assigned[name],)
        card = self._choose(c)
        if self.assigned.get(name) != card:
            log.info("{name} (gpu: auto) placed on card {card}", name=name, card=card)
        self.assigned[name] = card
        return (card,)

    def _choose(self, c: ConsumerConfig) -> int:
        sample, views, config = self._sample(), self._views(), self._config()
        cards = sample.card_indexes or (0,)
        choices = []
        for card in cards:
            here = {n: v for n, v in views.items()
                    if n != c.name and card in self.cards_of(n)}
            here[c.name] = views[c.name]
            choices.append(weigh_card(c.name, card, here, sample.free_mib_on(card),
                                      config.gpu.headroom_mib))
        chosen = place_auto(choices)
        return 0 if chosen is None else chosen

    def forget_removed(self) -> None:
        """After a reload: drop the places of consumers no longer `auto`."""
        consumers = self._config().consumers
        for name in list(self.assigned):
            if name not in consumers or not consumers[name].gpu.auto:
                del self.assigned[name]


def missing_card_error(name: str, cards: Iterable[int], sample: GpuSample) -> GpuMissing | None:
    """Refuse a job of `name` whose card has no row in a good sample (pure)."""
    gone = [c for c in cards if sample.card_missing(c)]
    if not gone:
        return None
    present = ", ".join(map(str, sample.card_indexes)) or "none"
    return GpuMissing(
        f"{name} lives on GPU {', '.join(map(str, gone))}, which nvidia-smi no longer lists "
        f"(cards present: {present}); its jobs are refused until the card is back",
        consumer=name, retry_after_s=30)


# -- a lock per card ----------------------------------------------------------------


class PerCardLocked:
    """One `Locked` per card; a job holds the locks of all its consumer's cards."""

    mode = SchedulerMode.LOCKED

    def __init__(
        self,
        make_lock: Callable[[], Locked],
        cards_for_job: Callable[[str], tuple[int, ...]],
        refusal: Callable[[str, tuple[int, ...]], GpumgrError | None] = lambda n, c: None,
    ) -> None:
        self._make_lock = make_lock
        self._cards_for_job = cards_for_job
        self._refusal = refusal
        self.locks: dict[int, Locked] = {}
        self._closed: GpumgrError | None = None
        self._settings: tuple[Any, ...] | None = None
        self._total = 0
        self._in_flight = 0

    def lock(self, card: int) -> Locked:
        lock = self.locks.get(card)
        if lock is None:
            lock = self.locks[card] = self._make_lock()
            if self._settings is not None:
                lock.configure(*self._settings)
        return lock

    @property
    def capacity(self) -> int:
        return self.lock(0).capacity

    def configure(self, capacity: int, max_queue: int, queue_timeout_s: float,
                  priority: Mapping[str, int], aging_s: float, max_overtakes: int) -> None:
        self._settings = (capacity, max_queue, queue_timeout_s, priority, aging_s, max_overtakes)
        for lock in self.locks.values():
            lock.configure(*self._settings)

    def run(self, consumer: str, job: Job, kind: str | None = None,
            control: bool = False, request_id: str | None = None) -> defer.Deferred[Any]:
        if self._closed is not None:
            return defer.fail(self._closed)
        try:
            cards = tuple(sorted(set(self._cards_for_job(consumer)))) or (0,)
        except Exception as e:  # a placement that failed must not take the broker down
            log.failure("placing {consumer} failed", consumer=consumer)
            return defer.fail(e)
        refusal = self._refusal(consumer, cards)
        if refusal is not None:
            return defer.fail(refusal)

        def counted() -> defer.Deferred[Any]:
            self._total += 1
            self._in_flight += 1

            def ended(result: Any) -> Any:
                self._in_flight -= 1
                return result

            return defer.maybeDeferred(job).addBoth(ended)

        def take(i: int) -> defer.Deferred[Any]:
            lock = self.lock(cards[i])
            if i == len(cards) - 1:
                return lock.run(consumer, counted, kind, control, request_id=request_id)
            # Outer cards are held as control jobs: the job is counted once, inside.
            return lock.run(consumer, lambda: take(i + 1), kind, control=True,
                            request_id=request_id)

        return take(0)

    def queued_for(self, consumer: str) -> int:
        return sum(lock.queued_for(consumer) for lock in self.locks.values())

    def queue_order(self) -> tuple[QueuedJob, ...]:
        """Every card's waiting jobs: by their place in their card's queue, then
        by arrival; a job waiting for a second card is listed once."""
        ranked: dict[Any, tuple[int, float, QueuedJob]] = {}
        for _, lock in sorted(self.locks.items()):
            for place, q in enumerate(lock.queue_order()):
                key = q.request_id if q.request_id is not None else id(q)
                ranked.setdefault(key, (place, q.enqueued_at, q))
        return tuple(q for _, _, q in sorted(ranked.values(), key=lambda r: (r[0], r[1])))

    def close(self, error: GpumgrError) -> None:
        self._closed = error
        for lock in self.locks.values():
            lock.close(error)

    def cancel_running(self) -> None:
        for _, lock in sorted(self.locks.items()):
            lock.cancel_running()

    @defer.inlineCallbacks
    def when_idle(self) -> Any:
        while any(lock.stats().in_flight for lock in self.locks.values()):
            yield defer.gatherResults([lock.when_idle() for lock in list(self.locks.values())])

    @property
    def max_running_seen(self) -> int:
        return max((lock.max_running_seen for lock in self.locks.values()), default=0)

    def card_stats(self) -> dict[int, SchedulerStats]:
        return {card: lock.stats() for card, lock in sorted(self.locks.items())}

    def stats(self) -> SchedulerStats:
        per_card = list(self.card_stats().values()) or [self.lock(0).stats()]
        by_kind: dict[str, int] = {}
        for s in per_card:
            for kind, n in s.queued_by_kind.items():
                by_kind[kind] = by_kind.get(kind, 0) + n
        holders: dict[tuple[str, str | None], Holder] = {}
        for s in per_card:
            for h in s.holders:
                seen = holders.get((h.consumer, h.kind))
                if seen is None or (seen.control and not h.control):
                    holders[(h.consumer, h.kind)] = h
        oldest = [s.oldest_queued for s in per_card if s.oldest_queued is not None]
        return SchedulerStats(
            mode=self.mode,
            capacity=per_card[0].capacity,
            queue_depth=sum(s.queue_depth for s in per_card),
            in_flight=self._in_flight,
            total_jobs=self._total,
            last_wait_ms=max(s.last_wait_ms for s in per_card),
            last_run_ms=max(s.last_run_ms for s in per_card),
            evictions=0,
            oldest_queued=min(oldest) if oldest else None,
            rejected=sum(s.rejected for s in per_card),
            queued_by_kind=by_kind,
            holders=tuple(sorted(holders.values(), key=lambda h: h.since)),
        )


@attrs.frozen
class PerCardSetup:
    """What gpumgr.jobs needs to build a `PerCardLocked`."""

    placements: Placements
    sample: Callable[[], GpuSample]

    def scheduler(self, make_lock: Callable[[], Locked]) -> PerCardLocked:
        return PerCardLocked(make_lock, self.placements.cards_for_job, self.refusal)

    def refusal(self, name: str, cards: tuple[int, ...]) -> GpuMissing | None:
        return missing_card_error(name, cards, self.sample())


def cuda_env(cards: Iterable[int]) -> dict[str, str]:
    """The environment that puts a process on `cards`, numbered as nvidia-smi
    numbers them (CUDA's own default order is fastest first, not PCI bus order)."""
    return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "CUDA_VISIBLE_DEVICES": ",".join(str(c) for c in cards)}


def view_on_card(view: ConsumerView, c: ConsumerConfig, sample: GpuSample,
                 card: int) -> ConsumerView:
    """A measured consumer's view on one card of several: what its processes
    hold on that card (gpumgr.gpu_sample attributes them by UUID)."""
    if (c.gpu_process is None or view.residency is not Residency.LOADED
            or len(sample.card_indexes) < 2):
        return view
    held = sum(p.used_mib or 0 for p in sample.processes_on(card) if c.gpu_process.search(p.name))
    return attrs.evolve(view, resident_mib=held or c.vram_resident_mib)


__all__ = ["CardChoice", "PerCardLocked", "PerCardSetup", "cuda_env", "Placements", "missing_card_error", "place_auto",
           "spans_cards", "view_on_card", "weigh_card"]
