"""Live per-consumer state: what /v1/status shows and what eviction reads."""

from __future__ import annotations

from typing import Iterable, Iterator, Mapping

import attrs

from gpumgr.config import ConsumerConfig
from gpumgr.eviction import ConsumerView, Residency
from gpumgr.gpu import GpuSample
from gpumgr.states import Health


@attrs.define
class ConsumerState:
    name: str
    health: Health = Health.UNKNOWN
    last_probe: float | None = None
    last_error: str | None = None
    #: The last probe found nothing listening (connection refused): the
    #: service is gone, not merely unhealthy. Evidence that its work stopped.
    refused: bool = False
    residency: Residency = Residency.UNKNOWN
    gpu_resident_mib: int = 0
    active: int = 0
    total_requests: int = 0
    errors: int = 0
    last_used: float | None = None

    def gone_since(self, t: float) -> bool:
        """A probe at or after `t` found nothing listening. A refusal seen
        before `t` is stale for work the service took after it (it restarted
        and took it): it says nothing of that work."""
        return (self.health is Health.DOWN and self.refused
                and self.last_probe is not None and self.last_probe >= t)

    @property
    def loaded(self) -> bool | None:
        """The JSON form: true, false, or null when unknown."""
        return {Residency.LOADED: True, Residency.UNLOADED: False}.get(self.residency)


class Registry:
    def __init__(self, names: Iterable[str]) -> None:
        self._states: dict[str, ConsumerState] = {}
        self.sync(names)

    def sync(self, names: Iterable[str]) -> None:
        """Keep the states of consumers that still exist; add new ones, drop the rest."""
        wanted = list(names)
        self._states = {n: self._states.get(n) or ConsumerState(n) for n in wanted}

    def __getitem__(self, name: str) -> ConsumerState:
        return self._states[name]

    def __contains__(self, name: object) -> bool:
        return name in self._states

    def __iter__(self) -> Iterator[ConsumerState]:
        return iter(list(self._states.values()))

    def record_probe(self, name: str, now: float, health: Health, error: str | None) -> None:
        state = self._states[name]
        state.last_probe = now
        state.health = health
        state.last_error = error

    def set_health(self, name: str, health: Health) -> None:
        self._states[name].health = health

    def job_started(self, name: str, now: float) -> None:
        state = self._states.get(name)
        if state is None:
            return
        state.active += 1
        state.total_requests += 1
        state.last_used = now

    def job_ended(self, name: str, now: float) -> None:
        state = self._states.get(name)
        if state is None:  # removed by a reload while its job ran
            return
        state.active -= 1
        state.last_used = now

    # -- residency (tracked, or measured through gpu_process) ---------------

    def mark_loaded(self, name: str, resident_mib: int) -> None:
        state = self._states[name]
        state.residency = Residency.LOADED
        state.gpu_resident_mib = resident_mib

    def mark_unloaded(self, name: str) -> None:
        state = self._states[name]
        state.residency = Residency.UNLOADED
        state.gpu_resident_mib = 0

    def mark_unknown(self, name: str) -> None:
        state = self._states[name]
        state.residency = Residency.UNKNOWN
        state.gpu_resident_mib = 0

    def apply_sample(self, sample: GpuSample, consumers: Mapping[str, ConsumerConfig]) -> None:
        """Measured residency for consumers with a `gpu_process` pattern."""
        if not sample.available:
            return
        for name, c in consumers.items():
            if c.gpu_process is None or name not in self._states:
                continue
            pattern = c.gpu_process
            used = sum(p.used_mib or 0 for p in sample.processes if pattern.search(p.name))
            state = self._states[name]
            state.gpu_resident_mib = used
            state.residency = Residency.LOADED if used > 0 else Residency.UNLOADED

    def view(self, c: ConsumerConfig) -> ConsumerView:
        state = self._states[c.name]
        if state.residency is Residency.LOADED:
            resident = state.gpu_resident_mib or c.vram_resident_mib
        elif state.residency is Residency.UNKNOWN:
            resident = c.vram_resident_mib  # it may hold this much
        else:
            resident = 0
        return ConsumerView(
            name=c.name,
            residency=state.residency,
            resident_mib=resident,
            vram_resident_mib=c.vram_resident_mib,
            can_coexist_with=c.can_coexist_with,
            pinned=c.pinned,
            last_used=state.last_used,
            pin=c.pin,
        )

    def went_down(self, name: str) -> None:
        """It failed its health check or refused a connection. It may have
        restarted and lost its memory, or may hold it still: a tracked
        residency is no longer known (a measured one is read again from the
        next sample). Trusting `loaded` would admit its next job without a
        pressure check, into memory another consumer took meanwhile."""
        state = self._states[name]
        state.health = Health.DOWN
        state.residency = Residency.UNKNOWN
        state.gpu_resident_mib = 0

    def upstream_error(self, name: str, reason: str, reachable: bool) -> None:
        state = self._states.get(name)
        if state is None:
            return
        state.errors += 1
        state.last_error = reason
        if not reachable and state.health is not Health.STOPPED:
            self.went_down(name)


__all__ = ["ConsumerState", "Health", "Registry"]  # Health: its old home, kept for imports
