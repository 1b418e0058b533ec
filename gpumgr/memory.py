"""What a consumer needs on the card: its memory profile, as typed values.

Two figures per consumer (per model, for a service that reports its models'
sizes): **resident**, what it holds between jobs, and **job peak**, the extra
it holds while one of its jobs runs. Each is the larger of what the config
says and what gpumgr measured, and says where it came from.

`MemoryProfiles` is how the rest of gpumgr asks for them; `ConfiguredProfiles`
answers from the config alone (nothing measured yet, or nothing to measure
with).
"""

from __future__ import annotations

import enum
from typing import Protocol

import attrs

from gpumgr.config import ConsumerConfig


class FigureSource(enum.StrEnum):
    CONFIG = "config"
    MEASURED = "measured"
    #: Raised to what was in use when a job answered out of memory.
    OOM = "oom"


@attrs.frozen
class MemoryFigure:
    mib: int
    source: FigureSource
    #: Samples the measured part rests on (0: none).
    samples: int = 0


@attrs.frozen
class MemoryProfile:
    resident: MemoryFigure
    #: Extra memory while one job runs, on top of `resident`.
    job_peak: MemoryFigure

    @property
    def running_mib(self) -> int:
        """What one running job of a loaded consumer holds in all."""
        return self.resident.mib + self.job_peak.mib


class MemoryProfiles(Protocol):
    def profile(self, consumer: ConsumerConfig, model: str | None = None) -> MemoryProfile:
        """The figures admission uses for a job of `consumer` (and `model`)."""
        ...

    def raise_peak(self, consumer: str, model: str | None, seen_mib: int) -> None:
        """A job answered out of memory: its job peak is at least `seen_mib` from now on."""
        ...


def configured(consumer: ConsumerConfig) -> MemoryProfile:
    return MemoryProfile(
        resident=MemoryFigure(consumer.vram_resident_mib, FigureSource.CONFIG),
        job_peak=MemoryFigure(consumer.vram_job_mib, FigureSource.CONFIG),
    )


class ConfiguredProfiles:
    """The config's figures, raised by out-of-memory answers (kept in memory only)."""

    def __init__(self) -> None:
        self._raised: dict[tuple[str, str | None], int] = {}

    def profile(self, consumer: ConsumerConfig, model: str | None = None) -> MemoryProfile:
        base = configured(consumer)
        raised = self._raised.get((consumer.name, model))
        if raised is None or raised <= base.job_peak.mib:
            return base
        return attrs.evolve(base, job_peak=MemoryFigure(raised, FigureSource.OOM))

    def raise_peak(self, consumer: str, model: str | None, seen_mib: int) -> None:
        key = (consumer, model)
        self._raised[key] = max(self._raised.get(key, 0), seen_mib)
