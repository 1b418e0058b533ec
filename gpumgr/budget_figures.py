"""The figures `gpumgr.budget` decides on, read from the config, the registry,
the latest GPU sample and the memory profiles (`scheduler.capacity: auto`).

The running jobs are the scheduler's to add (gpumgr.scheduler_auto): it knows
which run and with which job peak.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import attrs

from gpumgr.budget import Card, Holding
from gpumgr.cards import view_on_card
from gpumgr.config import Config, ConsumerConfig
from gpumgr.eviction import ConsumerView, Residency
from gpumgr.gpu import GpuSample
from gpumgr.memory import MemoryProfile, MemoryProfiles
from gpumgr.registry import Registry


@attrs.frozen
class Figures:
    card: Card
    holdings: Mapping[str, Holding]
    #: What nvidia-smi said the card uses (None: no sample).
    measured_used_mib: int | None = None
    #: When that was measured.
    sampled_at: float | None = None


def card_total_mib(config: Config, sample: GpuSample) -> int | None:
    """The card's size: measured, else gpu.total_mib, else unknown.
    (One card; several are summed until gpumgr schedules per card.)"""
    if sample.available and sample.gpus:
        totals = [g.memory_total_mib for g in sample.gpus]
        if None not in totals:
            return sum(t for t in totals if t is not None)
    return config.gpu.total_mib


def measured_used_mib(sample: GpuSample) -> int | None:
    if not sample.available or not sample.gpus:
        return None
    used = [g.memory_used_mib for g in sample.gpus]
    return None if None in used else sum(u for u in used if u is not None)


def read_figures(config: Config, registry: Registry, sample: GpuSample,
                 profiles: MemoryProfiles, card: int | None = None,
                 cards_of: Callable[[str], tuple[int, ...]] | None = None) -> Figures:
    """Every consumer as the budget sees it, idle (the scheduler adds its jobs).
    With `card` (several cards, gpumgr.auto_cards): that card's figures, and
    only the consumers that live there (`cards_of`), with what they hold there."""
    if card is not None:
        return _read_card(config, registry, sample, profiles, card, cards_of or (lambda n: (0,)))
    holdings = {name: _holding(profiles, c, registry.view(c))
                for name, c in config.consumers.items() if name in registry}
    whole = Card(card_total_mib(config, sample), config.gpu.headroom_mib)
    return Figures(whole, holdings, measured_used_mib(sample), sample.sampled_at)


def _holding(profiles: MemoryProfiles, c: ConsumerConfig,
             view: ConsumerView) -> Holding:
    resident = view.resident_mib
    if view.residency is not Residency.UNLOADED:
        resident = max(resident, profiles.profile(c).resident.mib)
    return Holding(c.name, view.residency, resident, (), view.can_coexist_with, view.pinned,
                   view.last_used, c.max_concurrency)


def _read_card(config: Config, registry: Registry, sample: GpuSample, profiles: MemoryProfiles,
               card: int, cards_of: Callable[[str], tuple[int, ...]]) -> Figures:
    """One card of several: its own total and use, never the cards' sum; a
    consumer's resident figure applies on each card it lives on."""
    holdings = {name: _holding(profiles, c,
                               view_on_card(registry.view(c), c, sample, card))
                for name, c in config.consumers.items()
                if name in registry and card in cards_of(name)}
    gpu = sample.card(card)
    total = gpu.memory_total_mib if gpu is not None else None
    used = gpu.memory_used_mib if gpu is not None else None
    return Figures(Card(total if total is not None else config.gpu.total_mib,
                        config.gpu.headroom_mib), holdings, used,
                   sample.sampled_at if used is not None else None)


def with_running(figures: Figures, running: Mapping[str, tuple[MemoryProfile, ...]],
                 released: Iterable[tuple[float, int]] = (),
                 other_floor_mib: int = 0) -> Figures:
    """Add the running jobs: each job's peak, and its consumer's resident (a
    consumer with a job running holds its memory, or is loading it). Memory
    nvidia-smi shows beyond what the figures account for counts as held by
    others (a stranger, a peak larger than its figure, memory an unload is
    still giving back): the budget never trusts figures below a measurement."""
    holdings = dict(figures.holdings)
    for name, jobs in running.items():
        h = holdings.get(name)
        if h is None or not jobs:
            continue
        resident = max([h.resident_mib] + [p.resident.mib for p in jobs])
        holdings[name] = attrs.evolve(
            h, residency=Residency.LOADED, resident_mib=resident,
            running_peaks_mib=tuple(p.job_peak.mib for p in jobs))
    card = figures.card
    if figures.measured_used_mib is not None:
        accounted = sum(h.held_mib + sum(h.running_peaks_mib) for h in holdings.values())
        # `released`: (when, MiB) of job peaks that ended. Those that ended
        # after the sample was taken still show in it: not someone else's.
        after = figures.sampled_at if figures.sampled_at is not None else float("inf")
        accounted += sum(mib for at, mib in released if at >= after)
        # A job that started before the sample may not have taken its peak
        # yet, which would hide others' memory: never less than what a
        # quiet card showed (`quiet_other_mib`).
        card = attrs.evolve(card, other_mib=max(other_floor_mib,
                                                figures.measured_used_mib - accounted))
    return Figures(card, holdings, figures.measured_used_mib, figures.sampled_at)


def quiet_other_mib(figures: Figures) -> int | None:
    """Memory in use beyond the residents, measured while no job ran and no
    load or unload was under way (the caller knows): the driver's own, a
    display's, another program's. Exact, unlike a reading taken while jobs
    run, whose peaks come and go."""
    if figures.measured_used_mib is None:
        return None
    return max(0, figures.measured_used_mib - sum(h.held_mib for h in figures.holdings.values()))


def oom_peak_mib(figures: Figures, consumer: str) -> int | None:
    """A job of `consumer` answered out of memory: its job peak is more than
    the room the others left it (memory only measured, not accounted for, is
    taken as its own), so at least that plus one; never more than fits an
    empty card. Another out-of-memory with more room raises it again."""
    card, me = figures.card, figures.holdings.get(consumer)
    if card.total_mib is None or me is None:
        return None
    others = sum(h.held_mib + sum(h.running_peaks_mib)
                 for n, h in figures.holdings.items() if n != consumer)
    room = (card.total_mib - others - me.held_mib) // max(1, me.running)
    return max(0, min(room + 1, card.total_mib - me.held_mib - card.headroom_mib))


@attrs.frozen
class ConsumerBudget:
    name: str
    #: What it holds between jobs (0 when unloaded).
    resident_mib: int
    #: What its running jobs add (their job peaks).
    job_mib: int
    running: int


@attrs.frozen
class WaitingJob:
    consumer: str
    kind: str | None
    #: gpumgr.budget.WaitReason's value; None: not looked at yet.
    reason: str | None
    detail: str


@attrs.frozen
class BudgetStatus:
    """The budget as /v1/status, /metrics and the page show it."""

    total_mib: int | None
    headroom_mib: int
    #: Measured in use beyond the figures (other programs, peaks above their figures).
    other_mib: int
    free_mib: int | None
    consumers: tuple[ConsumerBudget, ...]
    waiting: tuple[WaitingJob, ...]
    #: The card these figures are of (one queue: `waiting` is the box's).
    card: int = 0


def budget_status(figures: Figures, waiting: tuple[WaitingJob, ...],
                  card_index: int = 0) -> BudgetStatus:
    card = figures.card
    parts = tuple(ConsumerBudget(h.name, h.held_mib, sum(h.running_peaks_mib), h.running)
                  for h in figures.holdings.values())
    used = card.other_mib + sum(p.resident_mib + p.job_mib for p in parts)
    free = None if card.total_mib is None else card.total_mib - used - card.headroom_mib
    return BudgetStatus(card.total_mib, card.headroom_mib, card.other_mib, free, parts, waiting,
                        card_index)


ProfileOf = Callable[[str, "str | None"], "MemoryProfile | None"]


def profile_reader(config: Callable[[], Config],
                   profiles: Callable[[], MemoryProfiles]) -> ProfileOf:
    """(consumer, model) -> its profile; None once a reload removed the consumer."""
    def profile_of(name: str, model: str | None) -> MemoryProfile | None:
        c = config().consumers.get(name)
        return None if c is None else profiles().profile(c, model)
    return profile_of


__all__ = ["BudgetStatus", "ConsumerBudget", "WaitingJob", "budget_status", "Figures", "ProfileOf", "card_total_mib", "measured_used_mib", "oom_peak_mib",
           "profile_reader",
           "read_figures", "with_running"]
