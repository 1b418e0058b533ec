"""`scheduler.capacity: auto` on a box with several cards: one queue, a budget per card.

`Auto` keeps one queue, but each job lives on the cards of its consumer
(`Placements`, placed when it is queued for `gpu: auto`). It asks
`gpumgr.budget.decide` once per card, each time with that card's figures
(only the consumers that live there, that card's total, use and others'
memory), and `combine`s the answers: any refusal refuses, any wait waits,
else it starts with every card's victims. Loads and unloads in progress,
jobs that run alone and `max_running` are per card: jobs on different cards
never wait for each other.
"""

from __future__ import annotations

import collections
from typing import Callable, Generic, Iterable, Mapping, Protocol, Sequence, TypeVar

import attrs
from twisted.internet import defer

from gpumgr.budget import Decision, Refuse, Start, Wait
from gpumgr.budget_figures import Figures, quiet_other_mib, read_figures, with_running
from gpumgr.config import Config
from gpumgr.errors import GpumgrError
from gpumgr.gpu_sample import GpuSample
from gpumgr.memory import MemoryProfile, MemoryProfiles
from gpumgr.registry import Registry


@attrs.frozen
class AutoCards:
    """What `Auto` needs to admit per card (None there: one card, card 0)."""

    #: Where a job of the consumer runs; an `auto` consumer free to move is placed now.
    cards_for_job: Callable[[str], tuple[int, ...]]
    #: Where a consumer lives now, without placing it.
    cards_of: Callable[[str], tuple[int, ...]]
    #: Card -> its figures, idle (the scheduler adds its running jobs).
    figures: Callable[[int], Figures]
    #: A job refused at once: a card of its consumer has gone (`gpu_missing`).
    refusal: Callable[[str, tuple[int, ...]], GpumgrError | None] = lambda n, c: None


def combine(decisions: Sequence[Decision]) -> Decision:
    """One job's decisions on each of its cards, as one (pure): any refusal
    refuses, any wait waits (the first card's reason), else it starts with
    every card's victims (each once, in order) and loads if any card says so."""
    for d in decisions:
        if isinstance(d, Refuse):
            return d
    for d in decisions:
        if isinstance(d, Wait):
            return d
    starts = [d for d in decisions if isinstance(d, Start)]
    victims: list[str] = []
    for s in starts:
        victims.extend(v for v in s.victims if v not in victims)
    return Start(tuple(victims), any(s.load for s in starts))


def shares_card(a: Iterable[int], b: Iterable[int]) -> bool:
    return bool(set(a) & set(b))


class OnCards(Protocol):
    """A job as the per-card books see it."""

    consumer: str
    cards: tuple[int, ...]


J = TypeVar("J", bound=OnCards)


def heads_of(order: Sequence[J], job: J) -> list[J]:
    """The oldest waiting job on each of `job`'s cards, other than itself (pure):
    those it would overtake (bounded by scheduler.max_bypass_s)."""
    heads: list[J] = []
    for card in job.cards:
        head = next(o for o in order if card in o.cards)
        if head is not job and head not in heads:
            heads.append(head)
    return heads


class CardClaims(Generic[J]):
    """Per card: the job whose load or unload is in progress there (no other
    starts on that card meanwhile), and the jobs that wait to run alone on
    their cards (nothing new starts on those cards until they end)."""

    def __init__(self) -> None:
        self.control: dict[int, J] = {}
        self.alone: dict[J, list[defer.Deferred[None]]] = {}

    def take_control(self, job: J, cards: Iterable[int]) -> None:
        for card in cards:
            self.control[card] = job

    def control_on(self, card: int) -> str | None:
        job = self.control.get(card)
        return None if job is None else job.consumer

    def release_control(self, job: J) -> bool:
        mine = [card for card, holder in self.control.items() if holder is job]
        for card in mine:
            del self.control[card]
        return bool(mine)

    def ended(self, job: J) -> None:
        self.release_control(job)
        self.alone.pop(job, None)  # its waiters are its own: cancelled with it

    def alone_near(self, cards: Iterable[int]) -> J | None:
        return next((a for a in self.alone if shares_card(a.cards, cards)), None)

    def wait_alone(self, job: J, running: Iterable[J]) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self.alone.setdefault(job, []).append(d)
        self.fire(running)
        return d

    def fire(self, running: Iterable[J]) -> None:
        """Tell each job waiting to be alone once no other job runs on its cards."""
        running = list(running)
        for job, waiters in list(self.alone.items()):
            if any(shares_card(r.cards, job.cards) for r in running if r is not job):
                continue
            fired = list(waiters)
            waiters.clear()
            for d in fired:
                if not d.called:
                    d.callback(None)


class CardBooks:
    """Per card, what its figures need beyond a sample: the job peaks that
    ended lately (a sample taken before they ended still shows them), and
    others' memory on its last quiet reading (no job, no load or unload there)."""

    def __init__(self) -> None:
        self.released: dict[int, collections.deque[tuple[float, int]]] = \
            collections.defaultdict(lambda: collections.deque(maxlen=64))
        self.quiet_other_mib: dict[int, int] = {}

    def ended(self, cards: Iterable[int], now: float, job_peak_mib: int) -> None:
        for card in cards:
            self.released[card].append((now, job_peak_mib))

    def current(self, card: int, raw: Figures, running: Mapping[str, tuple[MemoryProfile, ...]],
                quiet: bool) -> Figures:
        """`raw` with the running jobs (`running`) added, and others' memory
        never below what the last quiet reading (`quiet`: nothing runs there) showed."""
        released = self.released[card]
        last_end = released[-1][0] if released else None
        if quiet and raw.sampled_at is not None and (last_end is None or raw.sampled_at > last_end):
            other = quiet_other_mib(raw)
            if other is not None:
                self.quiet_other_mib[card] = other
        return with_running(raw, running, released,
                            other_floor_mib=self.quiet_other_mib.get(card, 0))


def card_figures_reader(config: Callable[[], Config], registry: Registry,
                        sample: Callable[[], GpuSample], profiles: Callable[[], MemoryProfiles],
                        cards_of: Callable[[str], tuple[int, ...]]) -> Callable[[int], Figures]:
    """card -> `read_figures` for that card: only the consumers that live on it."""
    def figures(card: int) -> Figures:
        return read_figures(config(), registry, sample(), profiles(), card=card,
                            cards_of=cards_of)
    return figures


__all__ = ["AutoCards", "CardBooks", "CardClaims", "OnCards", "card_figures_reader", "combine", "heads_of",
           "shares_card"]
