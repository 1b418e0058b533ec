"""Live per-consumer state: what /v1/status shows and what eviction will read."""

from __future__ import annotations

from typing import Iterable

import attrs

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

    def upstream_error(self, name: str, now: float, reason: str, reachable: bool) -> None:
        state = self._states[name]
        state.errors += 1
        state.last_error = reason
        if not reachable:
            state.health = HEALTH_DOWN
