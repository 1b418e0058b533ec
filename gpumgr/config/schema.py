"""The config's values: frozen, typed, built once by the parser and shared.

Everything that reads the config (the broker, the drivers, the HTTP layer)
imports these; none of them sees raw YAML. Only the parser
(`gpumgr.config.parse`) builds them (`attrs.evolve` derives variants, such as
`--mode`'s); the defaults here are the parser's, for code and tests that build
a value directly.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Literal, Mapping

import attrs

from gpumgr.config.balancer import BalancerConfig
from gpumgr.config.process_names import ProcessNameMatcher
from gpumgr.states import SchedulerMode

#: The /v1/<kind> routes, and the keys of a consumer's `paths`.
KINDS = ("tts", "stt", "llm", "image")
#: `routes.audio_proxy`: the consumer behind GET /audio/<rest>, proxied unscheduled.
AUDIO_ROUTE = "audio_proxy"
ROUTE_KEYS = KINDS + (AUDIO_ROUTE,)
SCHEDULER_MODES = tuple(m.value for m in SchedulerMode)
#: Methods a control call or a `scheduled` route may name.
HTTP_METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH")
#: `scheduler.capacity: auto`: jobs start when their memory fits (gpumgr.budget).
AUTO: Literal["auto"] = "auto"


@attrs.frozen
class HttpCall:
    """A control call on a consumer (load or unload)."""

    method: str
    path: str
    body: bytes
    content_type: str | None


@attrs.frozen
class ProcessConfig:
    """A service whose process gpumgr starts and stops itself."""

    #: argv, never a shell string.
    command: tuple[str, ...]
    cwd: str | None = None
    #: Added to gpumgr's own environment.
    env: Mapping[str, str] = attrs.field(factory=lambda: MappingProxyType({}))
    #: From spawn until the health probe first passes.
    start_timeout_s: float = 120.0
    #: SIGTERM, then SIGKILL after this long.
    stop_timeout_s: float = 10.0


@attrs.frozen
class GpuPlacement:
    """`consumers.<name>.gpu`: the cards a consumer lives on, or `auto`."""

    #: Card indexes, ascending; its memory is needed on each. Empty with `auto`.
    cards: tuple[int, ...] = (0,)
    #: gpumgr picks one card when it starts the consumer's process.
    auto: bool = False

    def describe(self) -> str:
        return "auto" if self.auto else ",".join(map(str, self.cards))


@attrs.frozen
class ScheduledRoute:
    """`METHOD /path-prefix`: pass-through requests that are GPU work."""

    method: str
    path_prefix: str

    def matches(self, method: str, path: str) -> bool:
        return method == self.method and path.startswith(self.path_prefix)


@attrs.frozen
class ConsumerConfig:
    """One GPU service behind gpumgr (`consumers.<name>`), its driver's defaults filled in."""

    name: str
    url: str
    health_path: str
    paths: Mapping[str, str]
    vram_resident_mib: int
    can_coexist_with: tuple[str, ...] | None
    load: HttpCall | None
    unload: HttpCall | None
    connect_timeout_s: float
    request_timeout_s: float
    body_idle_timeout_s: float = 300.0
    #: Which nvidia-smi process names are this consumer's; when set, residency is measured.
    gpu_process: ProcessNameMatcher | None = None
    idle_unload_s: float | None = None
    preload: bool = False
    process: ProcessConfig | None = None
    #: Names a driver in gpumgr.drivers: how gpumgr talks to the service.
    driver: str = "http"
    #: It can give its memory back: an unload route, a native unload, or a process.
    can_unload: bool = False
    #: It can be warmed: a load route, or a process to start.
    can_load: bool = False
    #: /v1/<kind>/<subpath> reaches url + /<subpath>.
    passthrough: bool = False
    #: Extra pass-through requests that are GPU work.
    scheduled: tuple[ScheduledRoute, ...] = ()
    #: Longest a job (a tracked render included) may hold the GPU.
    job_timeout_s: float = 1800.0
    #: After its client left, how long a job holds the GPU at most waiting for
    #: evidence that the service stopped (gpumgr.abandoned); 0: not at all.
    abandoned_grace_s: float = 30.0
    #: Extra memory one running job may add on top of the resident memory
    #: (a starting figure; a measured job peak that is larger wins).
    vram_job_mib: int = 0
    #: Jobs of this consumer that may run at once (scheduler.capacity: auto).
    max_concurrency: int = 1
    #: After a render's interrupt, how long gpumgr waits for evidence that it
    #: stopped before it stops the owned process (or, with none, reports it stuck).
    render_stop_grace_s: float = 30.0
    #: How often a tracked render's evidence (ComfyUI's /queue) is read.
    render_poll_s: float = 0.5
    #: `pin: true`: never evicted for pressure, exclusivity or idleness (an
    #: admin unload still works).
    pin: bool = False
    #: The cards it lives on (card 0 unless the config says otherwise).
    gpu: GpuPlacement = GpuPlacement()

    @property
    def pinned(self) -> bool:
        """With no way to unload, or pinned by config, a consumer is never evicted."""
        return not self.can_unload or self.pin

    def url_for(self, path: str) -> str:
        return self.url + path


@attrs.frozen
class HealthConfig:
    interval_s: float = 5.0
    timeout_s: float = 2.0
    #: A consumer down this long (failed probes; a frozen process) has the jobs
    #: holding the GPU for it aborted, and a process gpumgr owns stopped.
    down_grace_s: float = 10.0


@attrs.frozen
class GpuConfig:
    nvidia_smi: str = "nvidia-smi"
    interval_s: float = 2.0
    timeout_s: float = 5.0
    headroom_mib: int = 512
    unload_settle_s: float = 10.0
    #: Used for accounting only when no GPU sample is available.
    total_mib: int | None = None
    #: Where learned memory profiles are kept across restarts (None: not kept).
    state_dir: str | None = None
    #: While jobs run, nvidia-smi reports every this many ms (one long-lived process).
    loop_ms: int = 250


@attrs.frozen
class SchedulerConfig:
    mode: SchedulerMode = SchedulerMode.PASSTHROUGH
    #: An integer: at most that many jobs at once; `AUTO`: as many as fit in memory.
    capacity: int | Literal["auto"] = 1
    max_queue: int = 64
    queue_timeout_s: float = 600.0
    #: kind -> priority; higher runs first. Kinds not listed get 0.
    priority: Mapping[str, int] = attrs.field(factory=lambda: MappingProxyType({}))
    aging_s: float = 30.0
    max_overtakes: int = 4
    #: capacity auto: how long the oldest waiting job may be overtaken by jobs that fit.
    max_bypass_s: float = 30.0
    #: capacity auto: jobs at once, at most.
    max_running: int = 8
    #: capacity auto: an idle consumer is evicted to let a job run beside
    #: running ones only once it has been idle this long.
    overlap_evict_idle_s: float = 120.0

    @property
    def auto(self) -> bool:
        return self.capacity == AUTO


@attrs.frozen
class LimitsConfig:
    """What one client, or all of them together, may hold of gpumgr.

    Connections, file descriptors, spool disk and time: each is bounded so
    that slow or hostile clients cannot starve `/healthz` or everyone else.
    """

    max_body_mib: float = 512
    client_stall_timeout_s: float = 60.0
    #: The whole request head (request line and headers) must arrive within this.
    header_timeout_s: float = 10.0
    #: A connection idle between requests is closed after this.
    keepalive_timeout_s: float = 60.0
    #: No request-body byte for this long: 408 and close.
    body_idle_timeout_s: float = 30.0
    #: A body must average this much once the grace period is over; 0 turns it off.
    min_body_rate_kib_s: float = 1.0
    min_body_rate_grace_s: float = 10.0
    #: Client connections held at once; keep well below the file-descriptor limit.
    max_connections: int = 1024
    #: Request bodies buffered at once, across all connections (memory and temp files).
    max_spool_mib: float = 2048
    max_request_line_bytes: int = 8192
    #: Bytes of all header lines together, and how many lines.
    max_header_bytes: int = 16384
    max_headers: int = 100
    #: Of max_connections, kept for /healthz, /v1/status, /metrics and admin
    #: (at most half of them): tunnels and uploads never take these.
    reserved_connections: int = 16
    #: WebSocket tunnels open at once; more get 503.
    max_tunnels: int = 256
    #: A tunnel that carries no byte either way for this long is closed.
    tunnel_idle_timeout_s: float = 3600.0
    #: A whole request body must arrive within this, whatever its rate.
    max_upload_s: float = 900.0

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mib * 1024 * 1024)

    @property
    def max_spool_bytes(self) -> int:
        return int(self.max_spool_mib * 1024 * 1024)

    @property
    def min_body_rate_bytes_s(self) -> float:
        return self.min_body_rate_kib_s * 1024


@attrs.frozen
class RequestsConfig:
    """How long `GET /v1/requests/<id>` still knows a finished request."""

    #: Finished requests kept, at most (the oldest go first).
    keep_finished: int = 256
    #: A finished request is forgotten this long after it ended.
    keep_finished_s: float = 600.0


@attrs.frozen
class Config:
    source: str
    listen: str
    health: HealthConfig
    gpu: GpuConfig
    scheduler: SchedulerConfig
    limits: LimitsConfig
    routes: Mapping[str, str]
    consumers: Mapping[str, ConsumerConfig]
    admin_token: str | None = None
    #: Host names (lower case, no port) besides loopback addresses and
    #: localhost under which admin and control routes answer.
    allowed_hosts: frozenset[str] = frozenset()
    #: On SIGTERM, how long running jobs may finish before they are aborted.
    shutdown_grace_s: float = 30.0
    #: Behind a load balancer: readiness and the box's name (gpumgr.balancer).
    balancer: BalancerConfig = attrs.field(factory=BalancerConfig)
    #: SHA-256 of the file text this config was parsed from ("" if built in code).
    sha256: str = ""
    requests: RequestsConfig = RequestsConfig()

    def consumer_for(self, route: str) -> ConsumerConfig | None:
        name = self.routes.get(route)
        return None if name is None else self.consumers[name]

