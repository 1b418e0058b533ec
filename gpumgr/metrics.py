"""`GET /metrics`: Prometheus text, rendered from one `Snapshot` per scrape.

A custom collector turns the snapshot (the same one `/v1/status` renders)
into metric families, so the two never disagree; a leaf Resource renders the
registry on the reactor thread (prometheus_client's own MetricsResource would
run every scrape in the reactor's thread pool). Names follow the Prometheus
conventions: base units (bytes, seconds), `_total` on counters.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from gpumgr.balancer import Phase
from gpumgr.budget import WaitReason
from gpumgr.errors import MethodNotAllowed, UnknownRoute, write_error
from gpumgr.eviction import Residency
from gpumgr.process import ProcessState
from gpumgr.snapshot import RENDER_OUTCOMES, Histogram, RenderPhase, Snapshot
from gpumgr.states import Health

_MIB = 1024 * 1024


def _histogram(name: str, doc: str, by_consumer: dict[str, Histogram]) -> Metric:
    family = HistogramMetricFamily(name, doc, labels=["consumer"])
    for consumer, h in sorted(by_consumer.items()):
        family.add_metric([consumer], h.cumulative(), h.total)
    return family


def metric_families(s: Snapshot) -> Iterator[Metric]:
    """Every gpumgr metric, from one snapshot (pure)."""
    yield InfoMetricFamily("gpumgr_build", "gpumgr's version and scheduler mode.",
                           value={"version": s.version, "mode": s.mode.value})
    phase = GaugeMetricFamily("gpumgr_box_phase", "1 for the box's phase as a load balancer "
                              "sees it: serving, leaving (after SIGTERM), draining.",
                              labels=["phase"])
    for box_phase in Phase:
        phase.add_metric([box_phase.value], 1 if s.balancer.phase is box_phase else 0)
    yield phase
    yield GaugeMetricFamily("gpumgr_uptime_seconds", "Seconds since the broker started.",
                            value=s.now - s.started_at)
    reloads = CounterMetricFamily("gpumgr_config_reloads", "Config reloads attempted.",
                                  labels=["result"])
    reloads.add_metric(["ok"], s.reloads - s.reload_failures)
    reloads.add_metric(["failed"], s.reload_failures)
    yield reloads

    # -- requests ------------------------------------------------------------
    requests = CounterMetricFamily("gpumgr_requests", "Proxied requests by kind, consumer "
                                   "and status code (499: the client left).",
                                   labels=["kind", "consumer", "code"])
    for (kind, consumer, code), n in sorted(s.requests.requests.items()):
        requests.add_metric([kind, consumer, str(code)], n)
    yield requests
    yield _histogram("gpumgr_queue_wait_seconds", "Time from arrival to holding the GPU.",
                     s.requests.queue_wait_s)
    yield _histogram("gpumgr_gpu_hold_seconds", "Time a job held the GPU (a tracked render "
                     "included).", s.requests.gpu_hold_s)
    received = CounterMetricFamily("gpumgr_received_bytes", "Request body bytes received "
                                   "for a consumer.", labels=["consumer"])
    sent = CounterMetricFamily("gpumgr_sent_bytes", "Response body bytes relayed from a "
                               "consumer.", labels=["consumer"])
    for consumer, n in sorted(s.requests.bytes_in.items()):
        received.add_metric([consumer], n)
    for consumer, n in sorted(s.requests.bytes_out.items()):
        sent.add_metric([consumer], n)
    yield received
    yield sent

    # -- scheduler -----------------------------------------------------------
    sched = s.scheduler
    depth = GaugeMetricFamily("gpumgr_queue_depth", "Jobs waiting for the GPU, by kind.",
                              labels=["kind"])
    queued = {kind: 0 for kind in s.kinds} | dict(sched.queued_by_kind)
    for kind, n in sorted(queued.items()):
        depth.add_metric([kind], n)
    yield depth
    yield GaugeMetricFamily("gpumgr_in_flight_jobs", "Jobs holding the GPU now.",
                            value=sched.in_flight)
    yield CounterMetricFamily("gpumgr_jobs", "Jobs that got the GPU.", value=sched.total_jobs)
    yield CounterMetricFamily("gpumgr_rejected_jobs", "Jobs refused queue_full or "
                              "queue_timeout.", value=sched.rejected)
    evictions = CounterMetricFamily("gpumgr_evictions", "Consumers unloaded by gpumgr, by "
                                    "reason.", labels=["reason"])
    for reason, n in sorted(s.evictions_by_reason.items()):
        evictions.add_metric([reason], n)
    yield evictions
    yield CounterMetricFamily("gpumgr_eviction_failures", "Unloads that failed.",
                              value=sched.eviction_failures)
    yield CounterMetricFamily("gpumgr_oom_retries", "Jobs replayed after an out-of-memory "
                              "answer.", value=sched.oom_retries)
    if s.budget is not None:
        yield from _budget(s)
    for outcome in RENDER_OUTCOMES:
        yield CounterMetricFamily(f"gpumgr_renders_{outcome}",
                                  f"Renders {outcome} (ComfyUI; the GPU is held until done).",
                                  value=s.renders.get(outcome, 0))
    yield GaugeMetricFamily("gpumgr_renders_in_progress", "Renders holding the GPU now.",
                            value=sum(len(c.renders) for c in s.consumers))
    yield GaugeMetricFamily("gpumgr_abandoned_draining_jobs", "Jobs holding the GPU after "
                            "their client left, until the service stops.",
                            value=len(s.draining))
    yield _histogram("gpumgr_abandoned_drain_seconds", "How long a job held the GPU after its "
                     "client left, waiting for evidence that the service stopped.", s.drain_s)
    drains = CounterMetricFamily("gpumgr_abandoned_drains", "Drains after a client left, by "
                                 "how they ended (gpu_idle, memory_back, service_down, "
                                 "service_says_done, service_drained, grace_expired, "
                                 "cancelled).",
                                 labels=["outcome"])
    for outcome, n in sorted(s.drain_outcomes.items()):
        drains.add_metric([outcome], n)
    yield drains
    yield GaugeMetricFamily("gpumgr_renders_stuck", "Renders past job_timeout_s with no "
                            "evidence they stopped: the GPU stays held (admin unload frees it).",
                            value=sum(r.phase is RenderPhase.STUCK
                                      for c in s.consumers for r in c.renders))
    yield GaugeMetricFamily("gpumgr_tunnels_open", "WebSocket tunnels open now.",
                            value=s.tunnels_open)

    # -- consumers -----------------------------------------------------------
    up = GaugeMetricFamily("gpumgr_consumer_up", "1 unless the last health probe failed.",
                           labels=["consumer"])
    health = GaugeMetricFamily("gpumgr_consumer_health", "1 for the consumer's health state.",
                               labels=["consumer", "state"])
    residency = GaugeMetricFamily("gpumgr_consumer_residency", "1 for the consumer's "
                                  "residency (loaded, unloaded, unknown).",
                                  labels=["consumer", "state"])
    resident = GaugeMetricFamily("gpumgr_consumer_gpu_resident_bytes", "GPU memory the "
                                 "consumer holds (measured or tracked).", labels=["consumer"])
    active = GaugeMetricFamily("gpumgr_consumer_active_jobs", "Jobs of the consumer holding "
                               "the GPU.", labels=["consumer"])
    process_state = GaugeMetricFamily("gpumgr_process_state", "1 for the managed process's "
                                      "state.", labels=["consumer", "state"])
    restarts = CounterMetricFamily("gpumgr_process_restarts", "Managed process starts after "
                                   "a crash or a failed start.", labels=["consumer"])
    profile = GaugeMetricFamily("gpumgr_consumer_memory_profile_bytes", "The memory figure "
                                "admission uses: resident (between jobs) or job_peak (one job's "
                                "extra), by model (\"\" for the consumer) and source.",
                                labels=["consumer", "model", "figure", "source"])
    cards = GaugeMetricFamily("gpumgr_consumer_card_info", "1 for each card the consumer "
                              "lives on (a `gpu: auto` one: once placed).",
                              labels=["consumer", "gpu"])
    for c in s.consumers:
        for card in c.gpu_cards:
            cards.add_metric([c.name, str(card)], 1)
        up.add_metric([c.name], 0 if c.health is Health.DOWN else 1)
        for h in Health:
            health.add_metric([c.name, h.value], 1 if c.health is h else 0)
        for r in Residency:
            residency.add_metric([c.name, r.value], 1 if c.residency is r else 0)
        resident.add_metric([c.name], c.gpu_resident_mib * _MIB)
        active.add_metric([c.name], c.active)
        if c.process is not None:
            for p in ProcessState:
                process_state.add_metric([c.name, p.value],
                                         1 if c.process.state is p else 0)
            restarts.add_metric([c.name], c.process.restarts)
        for model, mp in c.memory:
            for figure, f in (("resident", mp.resident), ("job_peak", mp.job_peak)):
                profile.add_metric([c.name, model or "", figure, f.source.value], f.mib * _MIB)
    yield from (up, health, residency, resident, active, process_state, restarts, profile, cards)

    # -- GPU -----------------------------------------------------------------
    gauges = {
        "used": GaugeMetricFamily("gpumgr_gpu_memory_used_bytes", "GPU memory used "
                                  "(nvidia-smi).", labels=["gpu"]),
        "free": GaugeMetricFamily("gpumgr_gpu_memory_free_bytes", "GPU memory free.",
                                  labels=["gpu"]),
        "total": GaugeMetricFamily("gpumgr_gpu_memory_total_bytes", "GPU memory in all.",
                                   labels=["gpu"]),
        "util": GaugeMetricFamily("gpumgr_gpu_utilization_ratio", "GPU utilisation, 0 to 1.",
                                  labels=["gpu"]),
        "temp": GaugeMetricFamily("gpumgr_gpu_temperature_celsius", "GPU temperature.",
                                  labels=["gpu"]),
    }
    for g in s.gpu.gpus:
        label = [str(g.index)]
        values: dict[str, Any] = {
            "used": None if g.memory_used_mib is None else g.memory_used_mib * _MIB,
            "free": None if g.memory_free_mib is None else g.memory_free_mib * _MIB,
            "total": None if g.memory_total_mib is None else g.memory_total_mib * _MIB,
            "util": None if g.utilization_pct is None else g.utilization_pct / 100,
            "temp": g.temperature_c,
        }
        for key, value in values.items():
            if value is not None:  # unknown ([N/A]) is absent, not zero
                gauges[key].add_metric(label, value)
    yield from gauges.values()
    yield GaugeMetricFamily("gpumgr_gpu_sample_available", "1 if the latest nvidia-smi "
                            "sample succeeded.", value=1 if s.gpu.available else 0)
    yield CounterMetricFamily("gpumgr_nvidia_smi_samples", "nvidia-smi samples taken.",
                              value=s.gpu_samples)
    yield CounterMetricFamily("gpumgr_nvidia_smi_failures", "nvidia-smi samples that failed.",
                              value=s.gpu_sample_failures)
    yield CounterMetricFamily("gpumgr_nvidia_smi_sampling_seconds", "Time spent waiting "
                              "for nvidia-smi.", value=s.gpu_sampling_s_total)


class SnapshotCollector:
    """A prometheus_client collector over a snapshot source."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        return metric_families(self._snapshot())


def _budget(s: Snapshot) -> Iterator[Metric]:
    """scheduler.capacity auto: the memory budget and why jobs wait."""
    b = s.budget
    assert b is not None
    budgets = s.card_budgets or (b,)
    parts = GaugeMetricFamily("gpumgr_budget_bytes", "The memory budget (capacity auto): "
                              "per card and consumer its resident and running-job parts.",
                              labels=["card", "consumer", "part"])
    card = GaugeMetricFamily("gpumgr_budget_card_bytes", "Each card as the budget sees it: "
                             "free (after headroom), headroom, other (measured, unaccounted).",
                             labels=["card", "part"])
    for one in budgets:
        index = str(one.card)
        for c in one.consumers:
            parts.add_metric([index, c.name, "resident"], c.resident_mib * _MIB)
            parts.add_metric([index, c.name, "job"], c.job_mib * _MIB)
        if one.free_mib is not None:
            card.add_metric([index, "free"], one.free_mib * _MIB)
        card.add_metric([index, "headroom"], one.headroom_mib * _MIB)
        card.add_metric([index, "other"], one.other_mib * _MIB)
    yield parts
    yield card
    waiting = GaugeMetricFamily("gpumgr_waiting_jobs", "Waiting jobs by why they wait "
                                "(capacity auto).", labels=["reason"])
    by_reason: dict[str, int] = {r.value: 0 for r in WaitReason}
    for w in b.waiting:
        if w.reason is not None:
            by_reason[w.reason] = by_reason.get(w.reason, 0) + 1
    for reason, n in sorted(by_reason.items()):
        waiting.add_metric([reason], n)
    yield waiting


def make_registry(snapshot: Callable[[], Snapshot]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot))
    return registry


class MetricsResource(Resource):
    """GET /metrics, rendered on the reactor thread."""

    isLeaf = True

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        Resource.__init__(self)  # super() would hide it from untyped_calls_exclude
        self._registry = make_registry(snapshot)

    def render(self, request: Any) -> Any:
        """GET and HEAD; every other answer follows gpumgr's JSON error contract."""
        if request.postpath not in ([], [b""]):
            write_error(request, UnknownRoute(f"no route for {request.path.decode('latin-1')}"))
            return NOT_DONE_YET
        if request.method not in (b"GET", b"HEAD"):
            write_error(request, MethodNotAllowed(request.method.decode("ascii", "replace"),
                                                  ("GET", "HEAD")))
            return NOT_DONE_YET
        return self.render_GET(request)

    def render_GET(self, request: Any) -> bytes:
        body = generate_latest(self._registry)
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        request.setHeader(b"Content-Length", str(len(body)).encode("ascii"))
        return body

