"""The /v1/status document, built purely from values."""

from __future__ import annotations

import datetime
from typing import Any

from gpumgr import __version__
from gpumgr.config import Config
from gpumgr.gpu import GpuSample
from gpumgr.registry import Registry
from gpumgr.scheduler import SchedulerStats


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    moment = datetime.datetime.fromtimestamp(ts, tz=datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def build_status(
    now: float,
    started_at: float,
    config: Config,
    registry: Registry,
    sample: GpuSample,
    scheduler: SchedulerStats,
    samples_taken: int = 0,
    sampling_s_total: float = 0.0,
) -> dict[str, Any]:
    return {
        "broker": {
            "version": __version__,
            "uptime_s": round(now - started_at, 3),
            "mode": scheduler.mode,
        },
        "gpu": {
            "available": sample.available,
            "error": sample.error,
            "sampled_at": iso(sample.sampled_at),
            "age_ms": None if sample.sampled_at is None else int((now - sample.sampled_at) * 1000),
            "samples": samples_taken,
            "sampling_ms_total": round(sampling_s_total * 1000, 1),
            "headroom_mib": config.gpu.headroom_mib,
            "gpus": [
                {
                    "index": g.index,
                    "name": g.name,
                    "memory_total_mib": g.memory_total_mib,
                    "memory_used_mib": g.memory_used_mib,
                    "memory_free_mib": g.memory_free_mib,
                    "utilization_pct": g.utilization_pct,
                    "temperature_c": g.temperature_c,
                }
                for g in sample.gpus
            ],
            "processes": [
                {"pid": p.pid, "name": p.name, "used_mib": p.used_mib} for p in sample.processes
            ],
        },
        "consumers": {
            state.name: {
                "url": config.consumers[state.name].url,
                "health": state.health.value,
                "last_probe": iso(state.last_probe),
                "last_error": state.last_error,
                "loaded": state.loaded,
                "residency": state.residency.value,
                "gpu_resident_mib": state.gpu_resident_mib,
                "active": state.active,
                "total_requests": state.total_requests,
                "errors": state.errors,
                "last_used": iso(state.last_used),
            }
            for state in registry
            if state.name in config.consumers
        },
        "scheduler": {
            "mode": scheduler.mode,
            "capacity": scheduler.capacity,
            "queue_depth": scheduler.queue_depth,
            "in_flight": scheduler.in_flight,
            "total_jobs": scheduler.total_jobs,
            "last_wait_ms": scheduler.last_wait_ms,
            "last_run_ms": scheduler.last_run_ms,
            "evictions": scheduler.evictions,
            "oldest_queued": iso(scheduler.oldest_queued),
            "rejected": scheduler.rejected,
            "queued_by_kind": dict(scheduler.queued_by_kind),
            "eviction_failures": scheduler.eviction_failures,
            "oom_retries": scheduler.oom_retries,
            "recent_events": list(scheduler.recent_events),
            "holders": [
                {"consumer": h.consumer, "kind": h.kind, "since": iso(h.since),
                 "held_ms": int((now - h.since) * 1000), "control": h.control}
                for h in scheduler.holders
            ],
        },
    }
