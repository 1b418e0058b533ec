"""May this job start now, on this card? A pure function of values (`scheduler.capacity: auto`).

One card's budget: what every consumer holds (resident), what every running
job adds (its job peak), and the headroom must fit in the card's total. A job
of consumer C starts when all of these hold (docs/scheduling.md):

- fewer than C's `max_concurrency` jobs of C run, and fewer than
  `max_running` jobs in all;
- C may coexist with every consumer that runs a job or is being loaded;
- no load or unload is in progress, unless C is loaded and needs no
  eviction (loads and unloads never overlap);
- memory: residents of the consumers that hold memory + job peaks of the
  running jobs + C's resident if it must be loaded + C's job peak + headroom
  <= total. If not, idle consumers (no job running, not pinned) are evicted,
  least recently used first: those the job would need gone on a card with
  nothing running (the evictions capacity 1 makes), and, to run beside
  running jobs, only consumers idle for `scheduler.overlap_evict_idle_s`
  (a swap costs a load; a running job ends soon). Otherwise the job waits.

It is refused only when it could not fit on an empty card. Card-scoped: a
box with several cards asks once per card.
"""

from __future__ import annotations

import enum
from typing import Mapping

import attrs

from gpumgr.eviction import Residency, may_coexist
from gpumgr.memory import MemoryProfile


class WaitReason(enum.StrEnum):
    MEMORY = "memory"
    EXCLUSIVITY = "exclusivity"
    LOAD_IN_PROGRESS = "load_in_progress"
    CONCURRENCY = "concurrency"
    MAX_RUNNING = "max_running"
    #: The oldest waiting job was overtaken for max_bypass_s: nothing else starts.
    BYPASS = "bypass"
    #: A job replays an out-of-memory answer alone, or a control job waits for an idle card.
    ALONE = "alone"


@attrs.frozen
class Card:
    """One card's figures."""

    #: None: not known (no sample, no gpu.total_mib): one job at a time.
    total_mib: int | None
    headroom_mib: int
    #: Memory held by things that are none of gpumgr's consumers, if known.
    other_mib: int = 0


@attrs.frozen
class Holding:
    """One consumer as the budget sees it."""

    name: str
    residency: Residency
    #: What it holds (or may hold, when unknown) between jobs.
    resident_mib: int
    #: The job peak of each of its running jobs.
    running_peaks_mib: tuple[int, ...] = ()
    can_coexist_with: tuple[str, ...] | None = None
    pinned: bool = False
    last_used: float | None = None
    max_concurrency: int = 1

    @property
    def running(self) -> int:
        return len(self.running_peaks_mib)

    @property
    def held_mib(self) -> int:
        return 0 if self.residency is Residency.UNLOADED else self.resident_mib


@attrs.frozen
class Ask:
    """The waiting job: its consumer and the profile of its model."""

    consumer: str
    profile: MemoryProfile


@attrs.frozen
class Start:
    #: Idle consumers to unload first, in order.
    victims: tuple[str, ...] = ()
    #: The consumer is not known to be loaded: this job loads it.
    load: bool = False

    @property
    def control(self) -> bool:
        """It unloads or loads: a load/unload is in progress while it does."""
        return bool(self.victims) or self.load


@attrs.frozen
class Wait:
    reason: WaitReason
    detail: str = ""


@attrs.frozen
class Refuse:
    """It could not fit even on an empty card (503 insufficient_vram)."""

    message: str


Decision = Start | Wait | Refuse


def _lru_key(h: Holding) -> tuple[int, float, str]:
    # Known-loaded before unknown (an unknown one may hold nothing), then LRU.
    certain = 0 if h.residency is Residency.LOADED else 1
    return (certain, h.last_used if h.last_used is not None else float("-inf"), h.name)


def used_mib(card: Card, holdings: Mapping[str, Holding]) -> int:
    """What the card holds now by the figures: residents, running peaks, others."""
    return card.other_mib + sum(h.held_mib + sum(h.running_peaks_mib) for h in holdings.values())


def decide(
    card: Card,
    holdings: Mapping[str, Holding],
    ask: Ask,
    control_in_progress: str | None = None,
    max_running: int = 8,
    may_evict: bool = True,
    now: float = 0.0,
    overlap_evict_idle_s: float | None = None,
) -> Decision:
    """Start, wait or refuse a job of `ask.consumer` (see the module docstring).

    `control_in_progress`: the consumer a load or unload is under way for.
    `overlap_evict_idle_s`: a consumer is evicted to make room *beside running
    jobs* only once it has been idle this long (None: never); the evictions
    the job would need on a card with nothing running are made whatever the
    idle time, as capacity 1 makes them. A swap costs a load; a running job
    ends soon.
    """
    me = holdings[ask.consumer]
    resident = max(ask.profile.resident.mib, me.resident_mib)
    peak = ask.profile.job_peak.mib
    pinned_elsewhere = sum(h.held_mib for n, h in holdings.items()
                           if n != ask.consumer and h.pinned)
    if card.total_mib is not None:
        # Memory held by strangers may come back: the job waits for it.
        alone_mib = pinned_elsewhere + resident + peak + card.headroom_mib
        if alone_mib > card.total_mib:
            return Refuse(
                f"{ask.consumer} needs {resident + peak} MiB ({resident} resident + {peak} "
                f"job peak) + {card.headroom_mib} MiB headroom; the card has "
                f"{card.total_mib} MiB, {pinned_elsewhere} MiB of it held by consumers "
                "that cannot be unloaded: it could not fit even on an empty card")
    running_total = sum(h.running for h in holdings.values())
    if running_total >= max_running:
        return Wait(WaitReason.MAX_RUNNING, f"{running_total} jobs run (scheduler.max_running)")
    if me.running >= me.max_concurrency:
        return Wait(WaitReason.CONCURRENCY,
                    f"{me.running} jobs of {me.name} run (max_concurrency {me.max_concurrency})")
    busy = [h for n, h in holdings.items() if n != me.name
            and (h.running or n == control_in_progress)]
    blocking = [h.name for h in busy if not may_coexist(me, h)]
    if blocking:
        return Wait(WaitReason.EXCLUSIVITY,
                    f"{me.name} may not coexist with {', '.join(sorted(blocking))}")
    # Idle consumers it may not coexist with must go first, whatever the memory.
    victims: list[str] = []
    for h in sorted(holdings.values(), key=_lru_key):
        if h.name == me.name or h.residency is Residency.UNLOADED or may_coexist(me, h):
            continue
        if h.pinned:
            return Refuse(f"{me.name} may not coexist with {h.name}, which cannot be unloaded")
        victims.append(h.name)
    load = me.residency is not Residency.LOADED
    if card.total_mib is None:
        if running_total:
            return Wait(WaitReason.MEMORY, "the card's size is unknown: one job at a time")
        return _start_unless_busy(tuple(victims), load, control_in_progress, may_evict)
    # My own resident counts once: held already, unless it is unloaded.
    need = used_mib(card, holdings) - me.held_mib + resident + peak + card.headroom_mib
    need -= sum(holdings[v].held_mib for v in victims)
    # What it would need with no job running: the evictions capacity 1 would make.
    need_alone = need - sum(sum(h.running_peaks_mib) for h in holdings.values())
    for h in sorted(holdings.values(), key=_lru_key):
        if need <= card.total_mib:
            break
        if (h.name == me.name or h.name in victims or h.residency is Residency.UNLOADED
                or h.pinned or h.running or h.name == control_in_progress or h.held_mib == 0):
            continue
        if need_alone <= card.total_mib and not _stale(h, now, overlap_evict_idle_s):
            continue  # needed gone only to run beside others: not worth a swap
        victims.append(h.name)
        need -= h.held_mib
        need_alone -= h.held_mib
    if need > card.total_mib:
        return Wait(WaitReason.MEMORY,
                    f"{me.name} needs {need - card.total_mib} MiB more than the card has "
                    "free (with headroom) until running jobs end or an idle consumer may "
                    "be evicted (scheduler.overlap_evict_idle_s)")
    return _start_unless_busy(tuple(victims), load, control_in_progress, may_evict)


def _stale(h: Holding, now: float, idle_s: float | None) -> bool:
    """Idle long enough to be evicted for a job that would run beside others."""
    if idle_s is None:
        return False
    return h.last_used is None or now - h.last_used >= idle_s


def _start_unless_busy(victims: tuple[str, ...], load: bool, control_in_progress: str | None,
                       may_evict: bool) -> Decision:
    if victims and not may_evict:
        return Wait(WaitReason.MEMORY, f"it would need {', '.join(victims)} evicted "
                    "(scheduler.mode locked evicts nothing)")
    start = Start(victims, load)
    if start.control and control_in_progress is not None:
        return Wait(WaitReason.LOAD_IN_PROGRESS,
                    f"a load or unload of {control_in_progress} is in progress")
    return start


def fits_after(card: Card, holdings: Mapping[str, Holding], ask: Ask, start: Start) -> int:
    """What the card would hold, by the figures, once `start` is carried out and
    the job runs at its peak, headroom included (for tests and status)."""
    me = holdings[ask.consumer]
    resident = max(ask.profile.resident.mib, me.resident_mib)
    held = used_mib(card, {n: h for n, h in holdings.items() if n not in start.victims})
    return held - me.held_mib + resident + ask.profile.job_peak.mib + card.headroom_mib


__all__ = ["Ask", "Card", "Decision", "Holding", "Refuse", "Start", "Wait", "WaitReason",
           "decide", "fits_after", "may_coexist", "used_mib"]
