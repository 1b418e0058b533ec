"""Live per-consumer state: what /v1/status shows and what eviction will read."""

from __future__ import annotations

from typing import Iterable, Mapping

import attrs

from gpumgr.config import ConsumerConfig
from gpumgr.eviction import ConsumerView
from gpumgr.gpu import GpuSample

HEALTH_UNKNOWN = "unknown"
HEALTH_OK = "ok"
HEALTH_DOWN = "down"


@attrs.define
class ConsumerState:
    name: str
    health: str = HEALTH_UNKNOWN
    last_probe: float | None = None
    last_error: str | None = None
    #: True/False when known; None after a restart until observed.
    loaded: bool | None = None
    gpu_resident_mib: int = 0
    active: int = 0
    total_requests: int = 0
    errors: int = 0
    last_used: float | None = None


class Registry:
    def __init__(self, names: Iterable[str]) -> None:
        self._states = {name: ConsumerState(name) for name in names}

    def __getitem__(self, name: str) -> ConsumerState:
        return self._states[name]

    def __iter__(self):
        return iter(self._states.values())

    def record_probe(self, name: str, now: float, error: str | None) -> None:
        state = self._states[name]
        state.last_probe = now
        state.health = HEALTH_OK if error is None else HEALTH_DOWN
        state.last_error = error

    def job_started(self, name: str, now: float) -> None:
        state = self._states[name]
        state.active += 1
        state.total_requests += 1
        state.last_used = now

    def job_ended(self, name: str, now: float) -> None:
        state = self._states[name]
        state.active -= 1
        state.last_used = now

    # -- loaded state (tracked, or measured through gpu_process) ------------

    def mark_loaded(self, name: str, resident_mib: int) -> None:
        state = self._states[name]
        state.loaded = True
        state.gpu_resident_mib = resident_mib

    def mark_unloaded(self, name: str) -> None:
        state = self._states[name]
        state.loaded = False
        state.gpu_resident_mib = 0

    def mark_unknown(self, name: str) -> None:
        state = self._states[name]
        state.loaded = None
        state.gpu_resident_mib = 0

    def apply_sample(self, sample: GpuSample, consumers: Mapping[str, ConsumerConfig]) -> None:
        """Measured residency for consumers with a `gpu_process` pattern."""
        if not sample.available:
            return
        for name, c in consumers.items():
            if c.gpu_process is None:
                continue
            used = sum(p.used_mib or 0 for p in sample.processes if c.gpu_process.search(p.name))
            state = self._states[name]
            state.gpu_resident_mib = used
            state.loaded = used > 0

    def view(self, c: ConsumerConfig) -> ConsumerView:
        state = self._states[c.name]
        if state.loaded is True:
            resident = state.gpu_resident_mib or c.vram_resident_mib
        elif state.loaded is None:
            resident = c.vram_resident_mib  # it may hold this much
        else:
            resident = 0
        return ConsumerView(
            name=c.name,
            loaded=state.loaded,
            resident_mib=resident,
            vram_resident_mib=c.vram_resident_mib,
            can_coexist_with=c.can_coexist_with,
            pinned=c.pinned,
            last_used=state.last_used,
        )

    def upstream_error(self, name: str, now: float, reason: str, reachable: bool) -> None:
        state = self._states[name]
        state.errors += 1
        state.last_error = reason
        if not reachable:
            state.health = HEALTH_DOWN
