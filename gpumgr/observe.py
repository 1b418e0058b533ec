"""The broker's parts, read at once into one `Snapshot` (what /v1/status and
/metrics render)."""

from __future__ import annotations

from typing import Mapping

import attrs

from gpumgr import __version__
from gpumgr.states import SchedulerMode
from gpumgr.abandoned import AbandonedWork
from gpumgr.admission import Admission
from gpumgr.config import KINDS, Config
from gpumgr.gpu import GpuSample, GpuSampler
from gpumgr.process import ManagedProcess
from gpumgr.profile_store import LearnedProfiles
from gpumgr.balancer import Phase, ReadinessCheck
from gpumgr.budget_figures import BudgetStatus
from gpumgr.cards import Placements, spans_cards
from gpumgr.registry import Health, Registry
from gpumgr.reload import ReloadHistory
from gpumgr.renders import RenderTracker
from gpumgr.scheduler import Scheduler
from gpumgr.scheduler_auto import Auto
from gpumgr.snapshot import (
    BalancerSnapshot,
    ConsumerSnapshot,
    DrainSnapshot,
    RenderSnapshot,
    RequestStats,
    Snapshot,
)


@attrs.frozen
class Parts:
    """What a snapshot reads (the broker's parts; none is changed)."""

    config: Config
    mode: SchedulerMode
    started_at: float
    reloads: ReloadHistory
    gpu: GpuSampler
    registry: Registry
    scheduler: Scheduler
    admission: Admission
    processes: Mapping[str, ManagedProcess]
    render_tracker: RenderTracker
    abandoned: AbandonedWork
    tunnels_open: int
    tunnels_total: int
    requests: RequestStats
    #: The memory figures admission uses (gpumgr.profile_store), where learned.
    profiles: LearnedProfiles | None = None
    #: Where each consumer lives (gpumgr.cards), and the balancer's view.
    placements: Placements | None = None
    readiness: ReadinessCheck | None = None


def _card_budgets(p: Parts, config: Config, sample: GpuSample) -> tuple[BudgetStatus, ...]:
    """capacity auto on a box with a budget per card: each card's budget (the
    cards nvidia-smi shows and those the consumers live on)."""
    if not isinstance(p.scheduler, Auto) or p.placements is None or not spans_cards(config):
        return ()
    placements = p.placements
    cards = set(sample.card_indexes).union(*(placements.cards_of(n) for n in config.consumers))
    return tuple(p.scheduler.budget_status(card) for card in sorted(cards))


def take_snapshot(now: float, p: Parts) -> Snapshot:
    a = p.admission
    stats = attrs.evolve(
        p.scheduler.stats(), mode=p.mode, evictions=a.evictions,
        eviction_failures=a.eviction_failures, oom_retries=a.oom_retries,
        recent_events=tuple(a.events))
    renders: dict[str, list[RenderSnapshot]] = {}
    for r in p.render_tracker.tracked.values():
        renders.setdefault(r.consumer, []).append(r.snapshot())
    consumers = []
    for state in p.registry:
        c = p.config.consumers.get(state.name)
        if c is None:
            continue
        process = p.processes.get(state.name)
        consumers.append(ConsumerSnapshot(
            name=c.name, url=c.url, driver=c.driver, health=Health(state.health),
            last_probe=state.last_probe, last_error=state.last_error,
            residency=state.residency, gpu_resident_mib=state.gpu_resident_mib,
            active=state.active, total_requests=state.total_requests, errors=state.errors,
            last_used=state.last_used, process=None if process is None else process.status(),
            renders=tuple(renders.get(c.name, ())),
            memory=() if p.profiles is None else p.profiles.profiles_of(c), pin=c.pin,
            gpu_cards=c.gpu.cards if p.placements is None else p.placements.cards_of(c.name),
            gpu_auto=c.gpu.auto))
    config, reloads, gpu = p.config, p.reloads, p.gpu
    return Snapshot(
        now=now, started_at=p.started_at, version=__version__, mode=p.mode,
        config_source=config.source, config_loaded_at=reloads.loaded_at,
        config_hash=reloads.config_hash or None, reloads=reloads.attempts,
        reload_failures=reloads.failures, last_reload_error=reloads.last_error,
        headroom_mib=config.gpu.headroom_mib, gpu=gpu.latest,
        gpu_samples=gpu.samples_taken, gpu_sample_failures=gpu.samples_failed,
        gpu_sampling_s_total=gpu.sampling_s_total, consumers=tuple(consumers),
        scheduler=stats, tunnels_open=p.tunnels_open, tunnels_total=p.tunnels_total,
        renders=dict(p.render_tracker.counts), evictions_by_reason=dict(a.evictions_by_reason),
        requests=p.requests,
        kinds=tuple(k for k in config.routes if k in KINDS),
        draining=tuple(DrainSnapshot(d.consumer, d.since, d.grace_s)
                       for d in p.abandoned.draining.values()),
        drain_s=dict(p.abandoned.durations_s),
        drain_outcomes=dict(p.abandoned.outcomes),
        budget=p.scheduler.budget_status() if isinstance(p.scheduler, Auto) else None,
        card_budgets=_card_budgets(p, config, gpu.latest),
        balancer=BalancerSnapshot(
            phase=Phase.SERVING if p.readiness is None else p.readiness.phase,
            box=config.balancer.box,
            readiness=() if p.readiness is None else p.readiness.check_routed()))
