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

from typing import Callable, Iterable, Sequence

import attrs

from gpumgr.budget import Decision, Refuse, Start, Wait
from gpumgr.budget_figures import Figures, read_figures
from gpumgr.config import Config
from gpumgr.errors import GpumgrError
from gpumgr.gpu_sample import GpuSample
from gpumgr.memory import MemoryProfiles
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


def card_figures_reader(config: Callable[[], Config], registry: Registry,
                        sample: Callable[[], GpuSample], profiles: Callable[[], MemoryProfiles],
                        cards_of: Callable[[str], tuple[int, ...]]) -> Callable[[int], Figures]:
    """card -> `read_figures` for that card: only the consumers that live on it."""
    def figures(card: int) -> Figures:
        return read_figures(config(), registry, sample(), profiles(), card=card,
                            cards_of=cards_of)
    return figures


__all__ = ["AutoCards", "card_figures_reader", "combine", "shares_card"]
