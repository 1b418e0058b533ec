"""Learning memory profiles from nvidia-smi: the pure decisions.

For every consumer (and every model of a service that reports its models'
sizes) gpumgr keeps the most it has *seen* it hold:

- **resident**: held while none of its jobs ran (between jobs);
- **job peak**: the most held above resident while its jobs ran, per job.

Where a reading comes from, most precise first:

1. **its processes** (`gpu_process`): the sum of `used_memory` of the
   processes whose name matches; readable whatever else runs on the card;
2. **the card**, only when the consumer is alone: the card's `memory.used`
   less the *baseline* (the card's `memory.used` when no consumer was loaded,
   being loaded or unloaded, or running: the driver's reserve and any
   stranger's memory), and only while every other consumer is known to be
   unloaded, none is being loaded or unloaded, the card is a single GPU, and
   the consumer has no `gpu_process` (then 1. applies). A stranger that
   started after the baseline was taken is counted as the consumer's: the
   figure errs high, never low;
3. **the service's own report** (ollama's `GET /api/ps` `size_vram`): the
   resident figure of each loaded model.

Every function here is pure: (previous figures, reading, who runs) -> figures.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import attrs

from gpumgr.config import ConsumerConfig
from gpumgr.gpu_sample import GpuSample
from gpumgr.memory import FigureSource, MemoryFigure, MemoryProfile

#: A consumer-wide figure; a model's figures are keyed by its name.
Key = tuple[str, "str | None"]


class Via:
    """Where a reading came from (shown in logs and tests)."""
    PROCESS = "process"
    CARD = "card"
    SERVICE = "service"


@attrs.frozen
class Learned:
    """What gpumgr measured for one consumer (or one of its models)."""

    #: Most held between jobs; None: never seen idle and loaded.
    resident_mib: int | None = None
    resident_samples: int = 0
    #: Most held above resident by one running job; None: never seen running.
    job_peak_mib: int | None = None
    job_peak_samples: int = 0
    #: What a job that answered out of memory was seen holding above resident.
    oom_peak_mib: int | None = None


NOTHING_LEARNED = Learned()


@attrs.frozen
class Activity:
    """Who holds or may hold the card when a sample is taken."""

    #: Jobs running now, per consumer (consumers without jobs left out).
    running: Mapping[str, int] = attrs.field(factory=dict)
    #: Consumers loaded, or whose residency is unknown (they may hold memory).
    loaded: frozenset[str] = frozenset()
    #: A load or unload is in progress (memory moves: nothing is attributed by card).
    changing: bool = False


@attrs.frozen
class Reading:
    """`held_mib` is what `consumer` (`model`) held, read `via`, with `jobs` of it running."""

    consumer: str
    model: str | None
    held_mib: int
    jobs: int
    via: str


@attrs.frozen
class Baseline:
    """The card's used memory with no consumer on it."""

    used_mib: int
    at: float


def _single_gpu_used(sample: GpuSample) -> int | None:
    if not sample.available or len(sample.gpus) != 1:
        return None
    return sample.gpus[0].memory_used_mib


def next_baseline(prev: Baseline | None, sample: GpuSample, activity: Activity) -> Baseline | None:
    """The newest reading of an empty card becomes the baseline."""
    used = _single_gpu_used(sample)
    if used is None or activity.loaded or activity.running or activity.changing:
        return prev
    return Baseline(used, sample.sampled_at or 0.0)


def process_readings(sample: GpuSample, consumers: Iterable[ConsumerConfig],
                     activity: Activity) -> list[Reading]:
    """Readings of consumers with `gpu_process`; none when a matching process's
    memory is unknown (`[N/A]`) or no process matches (not loaded: nothing to learn)."""
    if not sample.available:
        return []
    readings = []
    for c in consumers:
        if c.gpu_process is None:
            continue
        pattern = c.gpu_process
        mine = [p for p in sample.processes if pattern.search(p.name)]
        if not mine or any(p.used_mib is None for p in mine):
            continue
        held = sum(p.used_mib or 0 for p in mine)
        readings.append(Reading(c.name, None, held, activity.running.get(c.name, 0), Via.PROCESS))
    return readings


def card_reading(sample: GpuSample, consumers: Iterable[ConsumerConfig], activity: Activity,
                 baseline: Baseline | None) -> Reading | None:
    """The card's used memory as one consumer's, only when it is alone (module doc, 2.)."""
    used = _single_gpu_used(sample)
    if used is None or baseline is None or activity.changing:
        return None
    present = set(activity.loaded) | {n for n, k in activity.running.items() if k > 0}
    if len(present) != 1:
        return None
    (name,) = present
    c = next((c for c in consumers if c.name == name), None)
    if c is None or c.gpu_process is not None:
        return None
    return Reading(name, None, max(0, used - baseline.used_mib),
                   activity.running.get(name, 0), Via.CARD)


def service_readings(consumer: str, model_sizes_mib: Mapping[str, int]) -> list[Reading]:
    """A service's report of its loaded models' sizes: each model's resident figure."""
    return [Reading(consumer, model, mib, 0, Via.SERVICE)
            for model, mib in sorted(model_sizes_mib.items()) if mib >= 0]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def learn(prev: Learned, reading: Reading, configured_resident_mib: int) -> Learned:
    """Fold one reading in. Idle: the resident figure is the most held.
    Running: what is held above resident (measured, else configured), shared
    by the `jobs` running, is one job's peak if it is the most seen."""
    if reading.jobs <= 0:
        resident = max(prev.resident_mib or 0, reading.held_mib)
        return attrs.evolve(prev, resident_mib=resident,
                            resident_samples=prev.resident_samples + 1)
    base = prev.resident_mib if prev.resident_mib is not None else configured_resident_mib
    per_job = max(0, _ceil_div(reading.held_mib - base, reading.jobs))
    return attrs.evolve(prev, job_peak_mib=max(prev.job_peak_mib or 0, per_job),
                        job_peak_samples=prev.job_peak_samples + 1)


def raise_oom(prev: Learned, seen_mib: int) -> Learned:
    return attrs.evolve(prev, oom_peak_mib=max(prev.oom_peak_mib or 0, seen_mib))


def figure(configured_mib: int, measured_mib: int | None, samples: int,
           oom_mib: int | None = None) -> MemoryFigure:
    """The larger of configured, measured and out-of-memory figures, and where it comes from."""
    best = MemoryFigure(configured_mib, FigureSource.CONFIG, samples)
    if measured_mib is not None and samples > 0 and measured_mib > best.mib:
        best = MemoryFigure(measured_mib, FigureSource.MEASURED, samples)
    if oom_mib is not None and oom_mib > best.mib:
        best = MemoryFigure(oom_mib, FigureSource.OOM, samples)
    return best


def profile_of(c: ConsumerConfig, consumer_wide: Learned, model: Learned | None) -> MemoryProfile:
    """The figures for a job of `c`: a model's own where learned, else the consumer's."""
    def pick(attr: str) -> Learned:
        if model is not None and getattr(model, attr) is not None:
            return model
        return consumer_wide

    res = pick("resident_mib")
    peak = pick("job_peak_mib")
    oom = max((m.oom_peak_mib or 0) for m in (consumer_wide, model or NOTHING_LEARNED)) or None
    return MemoryProfile(
        resident=figure(c.vram_resident_mib, res.resident_mib, res.resident_samples),
        job_peak=figure(c.vram_job_mib, peak.job_peak_mib, peak.job_peak_samples, oom),
    )


def readings_for(sample: GpuSample, consumers: Iterable[ConsumerConfig], activity: Activity,
                 baseline: Baseline | None) -> list[Reading]:
    """Every reading one sample gives."""
    consumers = list(consumers)
    readings = process_readings(sample, consumers, activity)
    card = card_reading(sample, consumers, activity, baseline)
    if card is not None:
        readings.append(card)
    return readings


def fold(learned: Mapping[Key, Learned], readings: Iterable[Reading],
         configured_resident: Mapping[str, int],
         single_model: Mapping[str, str] | None = None) -> dict[Key, Learned]:
    """Fold readings into the learned figures. A consumer-wide running
    reading also teaches the job peak of its model when exactly one model of
    it is loaded (`single_model`)."""
    out = dict(learned)
    for r in readings:
        conf = configured_resident.get(r.consumer, 0)
        keys: list[Key] = [(r.consumer, r.model)]
        if r.model is None and r.jobs > 0 and single_model and r.consumer in single_model:
            keys.append((r.consumer, single_model[r.consumer]))
        for key in keys:
            # A model's job peak is measured above its own resident figure
            # (the service's report) where there is one (`learn`).
            out[key] = learn(out.get(key, NOTHING_LEARNED), r, conf)
    return out
