"""One typed snapshot of the broker's state.

`/v1/status` and `/metrics` both render a `Snapshot`, taken at once, so the
two never disagree. Cumulative request figures (`RequestStats`) live here too:
they are the counters and histograms that status has no room for.
"""

from __future__ import annotations

import bisect
import collections
import enum

import attrs

from gpumgr.memory import MemoryProfile

from gpumgr.balancer import Phase, Readiness
from gpumgr.eviction import Residency
from gpumgr.gpu import GpuSample
from gpumgr.process import ProcessStatus
from gpumgr.budget_figures import BudgetStatus
from gpumgr.scheduler import SchedulerStats
from gpumgr.states import Health, SchedulerMode

#: Seconds: from a few milliseconds (a queue hop) to an hour-long render.
TIME_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                  60.0, 120.0, 300.0, 900.0, 1800.0, 3600.0)


@attrs.define
class Histogram:
    """Counts per upper bound (cumulative on export), plus sum and count."""

    buckets: tuple[float, ...] = TIME_BUCKETS_S
    counts: list[int] = attrs.Factory(lambda self: [0] * (len(self.buckets) + 1),
                                      takes_self=True)
    total: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """[(le, count)] as Prometheus exports them, ending with +Inf."""
        out, running = [], 0
        for bound, n in zip(list(self.buckets) + [float("inf")], self.counts):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out


@attrs.define
class RequestStats:
    """What every proxied request adds up to."""

    #: (kind, consumer, status code) -> requests
    requests: collections.Counter[tuple[str, str, int]] = attrs.Factory(collections.Counter)
    bytes_in: collections.Counter[str] = attrs.Factory(collections.Counter)
    bytes_out: collections.Counter[str] = attrs.Factory(collections.Counter)
    queue_wait_s: dict[str, Histogram] = attrs.Factory(dict)
    gpu_hold_s: dict[str, Histogram] = attrs.Factory(dict)

    def record(self, kind: str, consumer: str, code: int, bytes_in: int, bytes_out: int,
               wait_s: float | None, hold_s: float | None) -> None:
        self.requests[(kind, consumer, code)] += 1
        self.bytes_in[consumer] += bytes_in
        self.bytes_out[consumer] += bytes_out
        if wait_s is not None:
            self.queue_wait_s.setdefault(consumer, Histogram()).observe(wait_s)
        if hold_s is not None:
            self.gpu_hold_s.setdefault(consumer, Histogram()).observe(hold_s)


#: How tracked renders ended (a counter each), "tracked" counting every one.
RENDER_OUTCOMES = ("tracked", "completed", "interrupted", "stopped", "stuck", "released",
                   "lost")


class RenderPhase(enum.Enum):
    """Where gpumgr stands with a render that holds the GPU."""

    #: Queued or rendering, within its job_timeout_s.
    RUNNING = "running"
    #: Past job_timeout_s: stopped (interrupted, or deleted from the queue)
    #: and held until the service shows it ended, for render_stop_grace_s.
    INTERRUPTING = "interrupting"
    #: No evidence within the grace: gpumgr stops the process it owns.
    STOPPING = "stopping"
    #: No evidence within the grace and no process of gpumgr's to stop: still
    #: held, until evidence comes or an admin unload gives the GPU back.
    STUCK = "stuck"


@attrs.frozen
class RenderSnapshot:
    consumer: str
    render_id: str
    since: float
    phase: RenderPhase = RenderPhase.RUNNING
    #: When the render entered `phase`.
    phase_since: float | None = None


@attrs.frozen
class DrainSnapshot:
    """A job holding the GPU after its client left, until the service stopped."""

    consumer: str
    since: float
    grace_s: float


@attrs.frozen
class ConsumerSnapshot:
    name: str
    url: str
    driver: str
    health: Health
    last_probe: float | None
    last_error: str | None
    residency: Residency
    gpu_resident_mib: int
    active: int
    total_requests: int
    errors: int
    last_used: float | None
    #: ManagedProcess.status(), or None when gpumgr does not own the process.
    process: ProcessStatus | None
    renders: tuple[RenderSnapshot, ...] = ()
    #: Memory figures: (None, the consumer's), then (model, its own) per learned model.
    memory: tuple[tuple[str | None, MemoryProfile], ...] = ()
    #: `pin: true` in its config: never evicted (an admin unload still works).
    pin: bool = False
    #: The cards it lives on now (gpumgr.cards.Placements); `gpu: auto` and
    #: not placed yet: none.
    gpu_cards: tuple[int, ...] = (0,)
    gpu_auto: bool = False


@attrs.frozen
class BalancerSnapshot:
    """What a load balancer in front of the box sees of it (gpumgr.balancer)."""

    phase: Phase = Phase.SERVING
    box: str | None = None
    #: /v1/ready/<kind> for each routed kind, as it would answer now.
    readiness: tuple[Readiness, ...] = ()


@attrs.frozen
class Snapshot:
    now: float
    started_at: float
    version: str
    mode: SchedulerMode
    config_source: str
    config_loaded_at: float
    config_hash: str | None
    reloads: int
    reload_failures: int
    last_reload_error: str | None
    headroom_mib: int
    gpu: GpuSample
    gpu_samples: int
    gpu_sample_failures: int
    gpu_sampling_s_total: float
    consumers: tuple[ConsumerSnapshot, ...]
    scheduler: SchedulerStats
    tunnels_open: int
    tunnels_total: int
    #: tracked / completed / interrupted / stopped / stuck / released / lost
    renders: dict[str, int]
    evictions_by_reason: dict[str, int]
    requests: RequestStats
    #: Kinds with a route: their queue depth is exported even when 0.
    kinds: tuple[str, ...] = ()
    #: Jobs draining after their client left (gpumgr.abandoned).
    draining: tuple[DrainSnapshot, ...] = ()
    #: How long such drains lasted, by consumer, and how they ended.
    drain_s: dict[str, Histogram] = attrs.Factory(dict)
    drain_outcomes: dict[str, int] = attrs.Factory(dict)
    #: scheduler.capacity auto: the memory budget and why each waiting job waits.
    budget: BudgetStatus | None = None
    #: On a box with a budget per card: every card's, in card order (else empty).
    card_budgets: tuple[BudgetStatus, ...] = ()
    balancer: BalancerSnapshot = BalancerSnapshot()
