"""The /v1/status document: a pure rendering of a `Snapshot`."""

from __future__ import annotations

import datetime
from typing import Any

from gpumgr.budget_figures import BudgetStatus
from gpumgr.events import Event
from gpumgr.memory import MemoryFigure, MemoryProfile
from gpumgr.scheduler import Holder
from gpumgr.process import ProcessStatus
from gpumgr.snapshot import BalancerSnapshot, ConsumerSnapshot, Snapshot


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    moment = datetime.datetime.fromtimestamp(ts, tz=datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


_LOADED = {"loaded": True, "unloaded": False}
#: A holder's state while its client is gone and the service may still compute.
DRAINING = "draining after the client left"


def _consumer(s: Snapshot, c: ConsumerSnapshot) -> dict[str, Any]:
    return {
        "url": c.url,
        "driver": c.driver,
        "health": c.health.value,
        "last_probe": iso(c.last_probe),
        "last_error": c.last_error,
        "loaded": _LOADED.get(c.residency.value),
        "residency": c.residency.value,
        "pin": c.pin,
        "gpu": list(c.gpu_cards),
        "gpu_auto": c.gpu_auto,
        "gpu_resident_mib": c.gpu_resident_mib,
        "active": c.active,
        "total_requests": c.total_requests,
        "errors": c.errors,
        "last_used": iso(c.last_used),
        "process": None if c.process is None else process_document(c.process),
        "renders": [{"prompt_id": r.render_id, "since": iso(r.since),
                     "held_s": round(s.now - r.since, 3), "state": r.phase.value,
                     "state_since": iso(r.phase_since)} for r in c.renders],
        **memory_document(c.memory),
    }


def _event(e: Event) -> dict[str, Any]:
    return {"at": iso(e.at), "event": e.kind.value, "consumer": e.consumer,
            "reason": e.reason, "mib": e.mib, "detail": e.detail}


def process_document(p: ProcessStatus) -> dict[str, Any]:
    """A consumer's "process" in /v1/status (the same keys since before it was typed)."""
    return {
        "state": p.state.value,
        "pid": p.pid,
        "started_at": p.started_at,
        "exit_code": p.exit_code,
        "restarts": p.restarts,
        "last_stderr": list(p.last_stderr),
    }


def _holder(s: Snapshot, h: Holder) -> dict[str, Any]:
    render = next((r.render_id for c in s.consumers if c.name == h.consumer
                   for r in c.renders), None)
    draining = not h.control and any(d.consumer == h.consumer for d in s.draining)
    state = DRAINING if draining else "rendering" if render is not None else \
        "control" if h.control else "running"
    return {"consumer": h.consumer, "kind": h.kind, "since": iso(h.since),
            "held_ms": int((s.now - h.since) * 1000), "control": h.control,
            "render": render, "state": state}


def status_document(s: Snapshot) -> dict[str, Any]:
    sample, sched = s.gpu, s.scheduler
    return {
        "broker": {
            "version": s.version,
            "uptime_s": round(s.now - s.started_at, 3),
            "mode": s.mode.value,
            "config": s.config_source,
            "config_loaded_at": iso(s.config_loaded_at),
            "config_hash": s.config_hash,
            "reloads": s.reloads,
            "reload_failures": s.reload_failures,
            "last_reload_error": s.last_reload_error,
            "tunnels": {"open": s.tunnels_open, "total": s.tunnels_total},
            "balancer": balancer_document(s.balancer),
        },
        "gpu": {
            "available": sample.available,
            "error": sample.error,
            "sampled_at": iso(sample.sampled_at),
            "age_ms": None if sample.sampled_at is None else int((s.now - sample.sampled_at) * 1000),
            "samples": s.gpu_samples,
            "sample_failures": s.gpu_sample_failures,
            "sampling_ms_total": round(s.gpu_sampling_s_total * 1000, 1),
            "headroom_mib": s.headroom_mib,
            "gpus": [
                {
                    "index": g.index,
                    "uuid": g.uuid,
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
                {"pid": p.pid, "name": p.name, "used_mib": p.used_mib, "gpu_uuid": p.gpu_uuid}
                for p in sample.processes
            ],
        },
        "consumers": {c.name: _consumer(s, c) for c in s.consumers},
        "scheduler": {
            "mode": s.mode.value,
            "capacity": sched.capacity if s.budget is None else "auto",
            "queue_depth": sched.queue_depth,
            "in_flight": sched.in_flight,
            "total_jobs": sched.total_jobs,
            "last_wait_ms": sched.last_wait_ms,
            "last_run_ms": sched.last_run_ms,
            "evictions": sched.evictions,
            "oldest_queued": iso(sched.oldest_queued),
            "rejected": sched.rejected,
            "queued_by_kind": dict(sched.queued_by_kind),
            "eviction_failures": sched.eviction_failures,
            "oom_retries": sched.oom_retries,
            "renders": dict(s.renders),
            "holders": [_holder(s, h) for h in sched.holders],
            "draining": [
                {"consumer": d.consumer, "state": DRAINING, "since": iso(d.since),
                 "draining_ms": int((s.now - d.since) * 1000), "grace_s": d.grace_s}
                for d in s.draining
            ],
            "drains": dict(s.drain_outcomes),
            "recent_events": [_event(e) for e in sched.recent_events],
            **({} if s.budget is None else {"budget": _budget(s.budget, s.card_budgets)}),
        },
    }


def balancer_document(b: BalancerSnapshot) -> dict[str, Any]:
    """The box as a load balancer sees it: its phase (serving, leaving after
    SIGTERM, draining), its name, and /v1/ready/<kind> of each routed kind."""
    return {"phase": b.phase.value, "box": b.box,
            "kinds": {r.kind: {"ready": r.ready,
                               "reason": None if r.reason is None else r.reason.value}
                      for r in b.readiness}}


def _figure(f: MemoryFigure) -> dict[str, Any]:
    return {"mib": f.mib, "source": f.source.value, "samples": f.samples}


def memory_document(memory: tuple[tuple[str | None, MemoryProfile], ...]) -> dict[str, Any]:
    """`memory`: the consumer's figures, and `models` with each learned model's."""
    docs = {model: {"resident": _figure(p.resident), "job_peak": _figure(p.job_peak)}
            for model, p in memory}
    if None not in docs:
        return {}
    doc: dict[str, Any] = dict(docs.pop(None))
    if docs:
        doc["models"] = {m: docs[m] for m in sorted(m for m in docs if m is not None)}
    return {"memory": doc}


def _budget(b: BudgetStatus, cards: tuple[BudgetStatus, ...] = ()) -> dict[str, Any]:
    """capacity auto: the memory budget (card 0's), and why each waiting job
    waits; on a box with a budget per card, every card's under `cards`."""
    return {
        **_card_budget(b),
        "waiting": [{"consumer": w.consumer, "kind": w.kind, "reason": w.reason,
                     "detail": w.detail} for w in b.waiting],
        **({"cards": [{"card": c.card, **_card_budget(c)} for c in cards]} if cards else {}),
    }


def _card_budget(b: BudgetStatus) -> dict[str, Any]:
    return {
        "total_mib": b.total_mib, "headroom_mib": b.headroom_mib, "other_mib": b.other_mib,
        "free_mib": b.free_mib,
        "consumers": {c.name: {"resident_mib": c.resident_mib, "job_mib": c.job_mib,
                               "running": c.running} for c in b.consumers},
    }
