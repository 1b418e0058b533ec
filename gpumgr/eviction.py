"""What to evict before a job for `target` runs: a pure function of values.

Rules (docs/scheduling.md explains them with a worked example):

- Exclusivity: X and Y may be loaded together unless one of them has a
  `can_coexist_with` list that does not name the other. Every loaded or
  unknown consumer that may not coexist with the target is evicted.
- Pressure: a target that is not loaded needs `vram_resident_mib + headroom`.
  If the free memory (after the exclusivity victims) is less, further loaded
  consumers are evicted, least recently used first, until it fits; consumers
  in the unknown state come after them (they may hold nothing).
- The target itself is evicted only to learn where it stands: when its
  residency is unknown and the job is short of memory otherwise, unloading
  it first makes the next measurement true (it may have held its memory all
  along). A consumer with no way to unload is pinned, and so is one with
  `pin: true` in its config (a refusal names that pin).
- With no free-memory figure, pressure is not checked; exclusivity still is.
"""

from __future__ import annotations

import enum
from typing import Iterable, Mapping, Protocol

import attrs


class Residency(enum.StrEnum):
    LOADED = "loaded"
    UNLOADED = "unloaded"
    #: After a restart, or a failed unload: it may hold its memory, or not.
    UNKNOWN = "unknown"


@attrs.frozen
class ConsumerView:
    name: str
    residency: Residency
    #: What it holds (or may hold, when unknown): measured, else vram_resident_mib.
    resident_mib: int
    vram_resident_mib: int
    can_coexist_with: tuple[str, ...] | None
    pinned: bool
    last_used: float | None
    #: Pinned by config (`consumers.<name>.pin`), not merely unable to unload:
    #: named as such in a refusal.
    pin: bool = False


@attrs.frozen
class EvictionPlan:
    target: str
    #: Victims in the order to unload them, each with its reason.
    victims: tuple[tuple[str, str], ...]
    needed_mib: int | None  # None: the target is loaded, or pressure was not checked
    free_mib: int | None  # free before any eviction
    projected_free_mib: int | None  # free once every victim's memory is back
    #: Loaded pinned consumers that may not coexist with the target.
    blocked_by: tuple[str, ...] = ()
    #: Consumers pinned by config (`pin: true`) that pressure would have
    #: evicted had they not been pinned: the target is short because of them.
    held_by_pin: tuple[str, ...] = ()

    @property
    def shortfall_mib(self) -> int:
        if self.needed_mib is None or self.projected_free_mib is None:
            return 0
        return max(0, self.needed_mib - self.projected_free_mib)

    def victim_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.victims)


class Coexisting(Protocol):
    """Anything with a name and a `can_coexist_with` list (a view, a budget holding)."""

    @property
    def name(self) -> str: ...

    @property
    def can_coexist_with(self) -> tuple[str, ...] | None: ...


def may_coexist(a: Coexisting, b: Coexisting) -> bool:
    """The one rule: each side's list, when it has one, names the other."""
    if a.can_coexist_with is not None and b.name not in a.can_coexist_with:
        return False
    if b.can_coexist_with is not None and a.name not in b.can_coexist_with:
        return False
    return True


def _lru_key(view: ConsumerView) -> tuple[float, str]:
    # Never used sorts first; the name makes the order total.
    return (view.last_used if view.last_used is not None else float("-inf"), view.name)


def plan_eviction(
    target: str,
    views: Mapping[str, ConsumerView],
    free_mib: int | None,
    headroom_mib: int,
    exclude: Iterable[str] = (),
) -> EvictionPlan:
    """Decide which consumers to unload so that a job for `target` can run.

    `exclude` names consumers not to choose again (already tried this time).
    """
    me = views[target]
    skip = set(exclude)
    victims: list[tuple[str, str]] = []
    blocked: list[str] = []
    freed = 0

    others = sorted((v for n, v in views.items() if n != target), key=_lru_key)
    for other in others:
        if other.residency is Residency.UNLOADED or may_coexist(me, other):
            continue
        if other.pinned:
            if other.residency is Residency.LOADED:
                blocked.append(other.name)
            continue
        if other.name in skip:
            continue
        victims.append((other.name, "exclusivity"))
        freed += other.resident_mib

    if me.residency is Residency.LOADED or free_mib is None:
        return EvictionPlan(target, tuple(victims), None, free_mib, None, tuple(blocked))

    needed = me.vram_resident_mib + headroom_mib
    projected = free_mib + freed
    if me.residency is Residency.UNKNOWN and me.pinned:
        projected += me.resident_mib  # it cannot be unloaded; assume it holds its share
    chosen = {name for name, _ in victims}
    by_certainty = [v for v in others if v.residency is Residency.LOADED] + [
        v for v in others if v.residency is Residency.UNKNOWN]
    for other in by_certainty:
        if projected >= needed:
            break
        if other.name in chosen or other.name in skip or other.pinned:
            continue
        victims.append((other.name, "pressure"))
        projected += other.resident_mib
    if (projected < needed and me.residency is Residency.UNKNOWN and not me.pinned
            and target not in skip):
        victims.append((target, "unknown_state"))
        projected += me.resident_mib
    held_by_pin = tuple(v.name for v in by_certainty if v.pin and v.name not in chosen) \
        if projected < needed else ()
    return EvictionPlan(target, tuple(victims), needed, free_mib, projected, tuple(blocked),
                        held_by_pin)


def settled(freed_mib: int, victim_resident_mib: int, free_mib: int, needed_mib: int | None) -> bool:
    """Has enough memory come back after an unload to stop waiting?

    CUDA frees lazily: wait until 75% of the victim's memory is back (as
    ollama does), or until the target fits anyway.
    """
    if needed_mib is not None and free_mib >= needed_mib:
        return True
    return freed_mib >= 0.75 * victim_resident_mib
