"""The broker: one facade over the health gate, the scheduler, the proxy,
eviction, managed processes and render tracking.

Resources only parse a request, call the broker and render its answer or its
error. Every request looks its route, consumer and timeouts up in the current
config (`self.config`), so a reload is one swap.

A GPU job, whatever the mode, is one pipeline (`_gpu_job`):
  admit (evicting: make room) -> start the consumer's process if it is not
  running -> relay the exchange (evicting: hold an out-of-memory answer and
  replay once) -> note that the consumer may now hold its memory -> keep the
  slot while a render the answer started is still running, or, when the
  client left, until the service stopped the work it left (gpumgr.abandoned).
"""

from __future__ import annotations

import collections
from typing import Any, Callable

import attrs
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IAgent

from gpumgr.abandoned import DRAIN_SAMPLE_S, AbandonedWork
from gpumgr.admission import Admission
from gpumgr.config import (
    AUDIO_ROUTE,
    KINDS,
    Config,
    ConfigError,
    ConsumerConfig,
    parse_config_text,
    read_config_file,
)
from gpumgr.deadlines import load_deadline_s
from gpumgr.drivers import ControlHttp, IDriver, get_driver
from gpumgr.errors import (
    BadPath,
    BadRequest,
    ConsumerUnhealthy,
    ControlFailed,
    GpumgrError,
    MethodNotAllowed,
    ConsumerRemoved,
    ConsumerStopped,
    JobTimeout,
    NotSupported,
    QueueFull,
    QueueTimeout,
    ShuttingDown,
    TooManyConnections,
    UpgradeNotSupported,
    UnknownConsumer,
    UnknownRoute,
    describe_failure,
)
from gpumgr.events import EventKind
from gpumgr.eviction import Residency
from gpumgr.gpu import GpuSampler
from gpumgr.health import HealthMonitor
from gpumgr.process import ManagedProcess, ProcessExit, ProcessState, port_answers
from gpumgr.proxy import Outcome, Result, StreamingProxy, Timeouts
from gpumgr.registry import Health, Registry
from gpumgr.renders import RenderTracker, TrackedRender
from gpumgr.scheduler import Locked, Passthrough, Scheduler
from gpumgr import __version__
from gpumgr.snapshot import (
    ConsumerSnapshot,
    DrainSnapshot,
    RenderSnapshot,
    RequestStats,
    Snapshot,
)
from gpumgr.states import SchedulerMode
from gpumgr.status import status_document
from gpumgr.target import Segment, Target, forward_url, routed_target
from gpumgr.tunnel import Tunnel, check_upgrade, is_upgrade

log = Logger()
#: One line per proxied request.
access_log = Logger(namespace="gpumgr.access")

#: A job's hard deadline comes this long after job_timeout_s. A tracked render
#: is not bound by it: the render tracker interrupts it at job_timeout_s and
#: holds the GPU until the evidence that it stopped (see `_track_render`).
_JOB_TIMEOUT_MARGIN_S = 2.0
#: The first bytes of a response kept for a driver that tracks renders.
_CAPTURE_BYTES = 64 * 1024


@attrs.define
class _Timing:
    """When a request arrived, got the GPU, and gave it back."""

    received: float
    bytes_in: int = 0
    started: float | None = None
    ended: float | None = None
    #: The request's path for the access log, from its parsed target.
    path: str = ""
    #: The job's hard deadline (`_bound_job`); a tracked render disarms it.
    deadline: Any = None
    #: The client left while its job held the GPU.
    client_gone: bool = False
    #: Set while the job is at a stage that a client leaving cancels (a process start).
    on_client_gone: Callable[[], None] | None = None
    #: Past admission and the process start: the exchange with the consumer
    #: (a job aborted before would cancel an eviction half-way).
    exchanging: bool = False

    def client_left(self) -> None:
        self.client_gone = True
        if self.on_client_gone is not None:
            self.on_client_gone()


def _body_size(request: Any) -> int:
    content = request.content
    if content is None:
        return 0
    try:
        position = content.tell()
        size = content.seek(0, 2)
        content.seek(position)
        return int(size)
    except (OSError, ValueError):
        return 0


def _wants_websocket(request: Any) -> bool:
    return (request.getHeader(b"upgrade") or b"").strip().lower() == b"websocket"


def reload_refusal(old: Config, new: Config) -> str | None:
    """Why a valid new config cannot be applied without a restart (pure)."""
    if new.listen != old.listen:
        return (f"listen changed from {old.listen!r} to {new.listen!r}: restart gpumgr "
                "to listen elsewhere (the running config is kept)")
    if new.scheduler.mode != old.scheduler.mode:
        return (f"scheduler.mode changed from {old.scheduler.mode} to {new.scheduler.mode}: "
                "that needs a restart (the running config is kept)")
    return None


#: nginx's code for "the client closed the connection before the answer was complete".
CLIENT_CLOSED_REQUEST = 499


def access_status(result: Any, client_left: bool) -> int:
    """The status a proxied request is counted and logged with (pure).

    A client that left before its answer was complete is 499, whatever the
    upstream had begun to send (a stream cut mid-way was logged as 200, one
    cut before the headers was counted as code 0).
    """
    if isinstance(result, Result):
        if result.outcome is Outcome.CLIENT_GONE:
            return CLIENT_CLOSED_REQUEST
        if result.status is not None:
            return result.status
        return 502 if result.outcome is Outcome.UPSTREAM_BROKE else 500
    if client_left or (isinstance(result, Failure) and result.check(defer.CancelledError)):
        return CLIENT_CLOSED_REQUEST
    if isinstance(result, Failure) and isinstance(result.value, GpumgrError):
        return result.value.status
    return 500


def _client_left(request: Any) -> bool:
    """The client's connection closed before its response was finished."""
    return bool(getattr(request, "_disconnected", False)) and not request.finished


def path_is_safe(segments: list[bytes]) -> bool:
    """Reject traversal, encoded separators and empty segments (pure)."""
    return bool(segments) and Target(tuple(Segment.of(s) for s in segments)).problem() is None


#: Errors of a request that never reached its service.
_REFUSED_BEFORE_SENDING = (ConsumerUnhealthy, ConsumerStopped, ConsumerRemoved, QueueFull,
                           QueueTimeout, ShuttingDown)


@attrs.frozen
class Route:
    """Where one request goes, all decided on one parsed target."""

    consumer: ConsumerConfig
    #: What is classified, checked and forwarded (its origin form).
    target: Target
    url: bytes
    scheduled: bool
    #: A service's own state-changing route: admin only.
    control: bool
    passthrough: bool


class _Control:
    """How a consumer is really loaded and unloaded: its process, or its driver."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker

    def load(self, name: str) -> defer.Deferred[None]:
        b = self._broker
        c = b.config.consumers[name]
        process = b.processes.get(name)
        if process is not None:
            d = process.start()
            b._show_process_health(name)  # starting

            def done(result: Any) -> Any:
                if isinstance(result, Failure):
                    b._show_process_health(name)
                else:
                    b._process_started(None, name)
                return result

            return d.addBoth(done)
        return get_driver(c.driver).load(b.http, c)

    def unload(self, name: str) -> defer.Deferred[None]:
        b = self._broker
        c = b.config.consumers[name]
        process = b.processes.get(name)
        if process is not None:
            return process.stop()
        return get_driver(c.driver).unload(b.http, c)

    def load_timeout_s(self, name: str) -> float:
        return load_deadline_s(self._broker.config.consumers[name].process)


class Broker:
    def __init__(
        self,
        reactor: Any,
        config: Config,
        gpu: GpuSampler,
        http: ControlHttp,
        proxy_agent: Callable[[ConsumerConfig], IAgent],
        cooperator: task.Cooperator,
        process_factory: Callable[..., ManagedProcess] = ManagedProcess,
        overrides: Callable[[Config], Config] = lambda c: c,
    ) -> None:
        self.reactor = reactor
        self._config = config
        self.gpu = gpu
        self.http = http
        self._agent_for = proxy_agent
        self._process_factory = process_factory
        self.started_at = reactor.seconds()
        self.registry = Registry(config.consumers)
        self.processes: dict[str, ManagedProcess] = {}
        #: Processes a reload removed or changed, until they have stopped.
        self._retiring: dict[str, ManagedProcess] = {}
        self.tunnels: set[Tunnel] = set()
        self.tunnels_total = 0
        self.request_stats = RequestStats()
        self._overrides = overrides
        self.config_loaded_at = self.started_at
        self.config_hash = config.sha256
        self.last_reload_error: str | None = None
        self.reload_attempts = 0
        self.reload_failures = 0
        #: Told of every applied config (the site's body limit follows it).
        self.config_listeners: list[Callable[[Config], None]] = []
        self.scheduler: Scheduler = self._make_scheduler(config)
        self.admission = Admission(reactor, lambda: self._config, self.registry, gpu,
                                   _Control(self), self.scheduler)
        self.proxy = StreamingProxy(reactor, cooperator, self._upstream_error)
        #: The jobs holding the GPU for each consumer (aborted when it stays down).
        self._jobs: dict[str, dict[defer.Deferred[Any], _Timing]] = {}
        self.health = HealthMonitor(
            reactor, lambda: self._config.consumers, self.registry, self._probe,
            config.health.interval_s, config.health.timeout_s,
            not_running=self._process_health, down_grace_s=config.health.down_grace_s,
            on_still_down=self._still_down)
        self.render_tracker = RenderTracker(
            reactor, http, lambda: self._config.consumers, self.registry,
            self.health.probe_now, self.admission.event, self._stop_process_for_render)
        self.abandoned = AbandonedWork(
            reactor, gpu.sample_now, self.admission.event,
            sample_period_s=lambda: min(DRAIN_SAMPLE_S, self._config.gpu.interval_s))
        gpu.listeners.append(lambda sample: self.registry.apply_sample(
            sample, self._config.consumers))
        self._sync_processes()

    # -- config --------------------------------------------------------------

    @property
    def config(self) -> Config:
        return self._config

    @property
    def mode(self) -> SchedulerMode:
        return self._config.scheduler.mode

    def _make_scheduler(self, config: Config) -> Scheduler:
        sched = config.scheduler
        if sched.mode is SchedulerMode.PASSTHROUGH:
            return Passthrough(self.reactor, self.registry)
        evicting = sched.mode is SchedulerMode.EVICTING
        return Locked(
            self.reactor, self.registry, capacity=sched.capacity, max_queue=sched.max_queue,
            queue_timeout_s=sched.queue_timeout_s, priority=sched.priority,
            aging_s=sched.aging_s,
            is_loaded=(lambda n: n in self.registry
                       and self.registry[n].residency is Residency.LOADED) if evicting else None,
            max_overtakes=sched.max_overtakes if evicting else 0,
        )

    def reload(self) -> dict[str, Any]:
        """Re-read the config file; apply it if it is valid and needs no restart.

        An invalid file leaves the running config as it is. Either way the
        outcome is logged and shown in /v1/status.broker.
        """
        source = self._config.source
        self.reload_attempts += 1
        try:
            text = read_config_file(source)  # never blocks the reactor on a FIFO
            new = self._overrides(parse_config_text(text, source))
            problem = reload_refusal(self._config, new)
            if problem is not None:
                raise ConfigError(source, "", problem)
        except (OSError, ConfigError) as e:
            message = str(e) if isinstance(e, ConfigError) else f"{source}: cannot read: {e}"
            self.reload_failures += 1
            self.last_reload_error = message
            log.error("reload refused, keeping the running config: {message}", message=message)
            return {"reloaded": False, "error": message}
        self.apply_config(new)
        log.info("reloaded {source} ({n} consumers)", source=source, n=len(new.consumers))
        return {"reloaded": True, "config_hash": self.config_hash}

    def apply_config(self, new: Config) -> None:
        """Swap in a validated config. Queued and running jobs are not
        disturbed; consumers that remain keep their state and process."""
        old = self._config
        self._config = new
        self.config_loaded_at = self.reactor.seconds()
        self.config_hash = new.sha256
        self.last_reload_error = None
        self.registry.sync(new.consumers)
        for name, process in list(self.processes.items()):
            c = new.consumers.get(name)
            if c is None or c.process != old.consumers[name].process:
                del self.processes[name]
                # A changed process starts only once the old one has stopped: two
                # servers must never hold the same port and memory side by side.
                self._retire(name, process).addBoth(lambda _: self._sync_processes())
        self._sync_processes()
        sched = new.scheduler
        if isinstance(self.scheduler, Locked):
            self.scheduler.configure(sched.capacity, sched.max_queue, sched.queue_timeout_s,
                                     sched.priority, sched.aging_s, sched.max_overtakes)
        self.health.configure(new.health.interval_s, new.health.timeout_s,
                              new.health.down_grace_s)
        self.gpu.configure(new.gpu.nvidia_smi, new.gpu.interval_s, new.gpu.timeout_s)
        for listener in self.config_listeners:
            listener(new)

    def _retire(self, name: str, process: ManagedProcess) -> defer.Deferred[None]:
        """A managed process whose consumer is gone (or changed): stopped once
        no job of it holds the GPU. Fires once it has stopped."""
        self._retiring[name] = process
        stopped: defer.Deferred[None] = defer.Deferred()

        def attempt() -> None:
            if any(h.consumer == name for h in self.scheduler.stats().holders):
                self.reactor.callLater(1.0, attempt)
                return
            log.info("{name}: stopping its process (removed or changed by a reload)", name=name)

            def done(result: Any) -> None:
                if isinstance(result, Failure):
                    log.warn("{name}: stopping failed: {why}", name=name,
                             why=describe_failure(result))
                if self._retiring.get(name) is process:
                    del self._retiring[name]
                stopped.callback(None)

            process.stop().addBoth(done)

        attempt()
        return stopped

    async def drain(self, grace_s: float) -> None:
        """Shutdown: refuse queued and new GPU jobs with 503 shutting_down, let
        running ones (tracked renders too) finish for up to `grace_s`, then
        cancel them."""
        self.scheduler.close(ShuttingDown("gpumgr is shutting down", retry_after_s=5))
        running = len(self.scheduler.stats().holders)
        log.info("draining: queued jobs refused, waiting up to {s:g}s for {n} running job(s)",
                 s=grace_s, n=running)
        idle = self.scheduler.when_idle()
        try:
            await idle.addTimeout(grace_s, self.reactor)
        except defer.TimeoutError:
            running = len(self.scheduler.stats().holders)
            log.warn("{n} job(s) still running after {s:g}s (shutdown_grace_s): aborting them",
                     n=running, s=grace_s)
            self.scheduler.cancel_running()

    def _sync_processes(self) -> None:
        for name, c in self._config.consumers.items():
            if c.process is None or name in self.processes or name in self._retiring:
                continue
            self.processes[name] = self._process_factory(
                self.reactor, name, c.process, probe=lambda name=name: self._ready_probe(name),
                on_exit=lambda exit, name=name: self._process_exited(name, exit),
                port_check=lambda name=name: self._port_check(name))
            self.registry.mark_unloaded(name)
            self.registry.set_health(name, Health.STOPPED)

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        self.started_at = self.reactor.seconds()
        self.health.start()
        self.gpu.start()
        for name, c in self._config.consumers.items():
            if c.preload:
                self._preload(name)

    def _preload(self, name: str) -> None:
        evicting = self.mode is SchedulerMode.EVICTING
        d = self.scheduler.run(name, lambda: self.admission.load(name, "preload", evicting),
                               control=True)

        def failed(f: Failure) -> None:
            log.warn("preloading {name} failed: {why}", name=name, why=describe_failure(f))

        d.addErrback(failed)

    def stop(self) -> defer.Deferred[Any]:
        """Stop probing and sampling, close tunnels, stop every process gpumgr owns."""
        for tunnel in list(self.tunnels):
            tunnel.close()
        self.health.stop()
        self.gpu.stop()
        self.admission.stop()
        owned = list(self.processes.values()) + list(self._retiring.values())
        return defer.DeferredList([p.stop() for p in owned], consumeErrors=True)

    # -- health --------------------------------------------------------------

    def _probe(self, c: ConsumerConfig) -> defer.Deferred[Health]:
        return get_driver(c.driver).probe(self.http, c)

    def _ready_probe(self, name: str) -> defer.Deferred[None]:
        """A managed process is up once its health route says OK (not STARTING)."""
        c = self._config.consumers[name]
        d = get_driver(c.driver).probe(self.http, c)
        d.addTimeout(self._config.health.timeout_s, self.reactor)

        def ready(health: Health) -> None:
            if health is not Health.OK:
                raise ControlFailed(f"{name} is {health.value}", consumer=name)

        return d.addCallback(ready)

    def _port_check(self, name: str) -> defer.Deferred[str | None]:
        """Before a spawn: does anything answer on the consumer URL's port?"""
        c = self._config.consumers[name]
        return port_answers(self.reactor, c.url, c.connect_timeout_s)

    def _process_stopped(self, name: str) -> bool:
        process = self.processes.get(name)
        return process is not None and process.state is not ProcessState.RUNNING

    def _process_health(self, name: str) -> Health | None:
        """A managed process that is not running: `starting` or `stopped`, and not
        probed. None: probe it (not managed, or running)."""
        process = self.processes.get(name)
        if process is None or process.state is ProcessState.RUNNING:
            return None
        return Health.STARTING if process.state is ProcessState.STARTING else Health.STOPPED

    def _show_process_health(self, name: str) -> None:
        health = self._process_health(name)
        if health is not None and name in self.registry:
            self.registry.set_health(name, health)

    def _still_down(self, name: str, error: str | None) -> None:
        """Down for health.down_grace_s, and on one more probe: crashed or frozen.

        Its jobs would hold the GPU until request_timeout_s. A process gpumgr
        owns is stopped (TERM, then KILL): its exit is the evidence the GPU
        work stopped, and the next request starts it again. For any other
        consumer, being down is the evidence, and its jobs are aborted.
        """
        why = (f"{name} failed its health checks for {self._config.health.down_grace_s:g}s "
               "(health.down_grace_s)" + (f": {error}" if error else ""))
        process = self.processes.get(name)
        if process is not None and process.state is ProcessState.RUNNING:
            log.warn("{why}; stopping its process (TERM, then KILL)", why=why)
            self.admission.event(EventKind.PROCESS_UNRESPONSIVE, name, "consumer_down", detail=why)

            def stop_failed(f: Failure) -> None:
                log.error("{name}: stopping its unresponsive process failed: {e}; its jobs "
                          "keep the GPU", name=name, e=f.getErrorMessage())

            process.stop().addCallbacks(lambda _: self._abort_jobs(name, why), stop_failed)
            return
        self._abort_jobs(name, why)

    def _watch_job(self, name: str, d: defer.Deferred[Any],
                   timing: _Timing) -> defer.Deferred[Any]:
        """Keep a running job findable, so that `_abort_jobs` can end it."""
        jobs = self._jobs.setdefault(name, {})
        jobs[d] = timing

        def done(result: Any) -> Any:
            jobs.pop(d, None)
            if not jobs and self._jobs.get(name) is jobs:
                del self._jobs[name]
            return result

        return d.addBoth(done)

    def _abort_jobs(self, name: str, why: str) -> None:
        """Cancel its jobs that are talking to it; one still evicting for it
        finishes that first (it is looked at again after the next grace)."""
        jobs = [d for d, timing in self._jobs.get(name, {}).items() if timing.exchanging]
        if not jobs:
            return
        log.warn("{why}; aborting {n} job(s) that hold the GPU for it", why=why, n=len(jobs))
        self.admission.event(EventKind.JOB_ABORTED, name, "consumer_down", detail=why)
        for d in jobs:
            d.cancel()

    def _process_started(self, _: Any, name: str) -> None:
        """Its readiness probe passed: it is up."""
        if name in self.registry:
            self.registry.record_probe(name, self.reactor.seconds(), Health.OK, None)

    def _process_exited(self, name: str, exit: ProcessExit) -> None:
        if name not in self.registry:
            return
        self.registry.mark_unloaded(name)
        self.registry.set_health(name, Health.STOPPED)
        if not exit.expected:
            kind = EventKind.PROCESS_START_FAILED if exit.during_start else EventKind.PROCESS_CRASH
            self.admission.event(kind, name, detail=exit.description)

    def _upstream_error(self, consumer: str, reachable: bool, reason: str) -> None:
        self.registry.upstream_error(consumer, reason, reachable)
        if not reachable and not self._process_stopped(consumer):
            log.warn("{consumer} unreachable ({reason}); re-probing now",
                     consumer=consumer, reason=reason)
            self.health.probe_now(consumer)

    def _health_refusal(self, c: ConsumerConfig) -> GpumgrError | None:
        if c.name in self.processes and self._process_stopped(c.name):
            return None  # started on demand
        state = self.registry[c.name]
        if state.health is not Health.DOWN:
            return None
        why = f": {state.last_error}" if state.last_error else ""
        return ConsumerUnhealthy(f"{c.name} failed its last health check{why}", consumer=c.name,
                                 retry_after_s=self._config.health.interval_s)

    # -- requests ------------------------------------------------------------

    def route(self, kind: str, method: str, target: Target | None, query: bytes | None = None,
              body: Callable[[], bytes | None] = lambda: None) -> Route:
        """Where a request to /v1/<kind>[/<target>] goes, decided on the one
        parsed target, or raise. `query` is the request's, for /v1/<kind>
        itself. `body` reads the request body, for drivers whose control
        routes depend on it (ollama's unload)."""
        config = self._config
        c = config.consumer_for(kind)
        if c is None:
            raise UnknownRoute(f"no consumer is routed for {kind!r}")
        if method != method.upper():
            # Methods are case-sensitive (RFC 9110), but not to every server:
            # Werkzeug upper-cases them. `post` would be classified as neither
            # GPU work nor a control route, and run as POST there.
            raise BadRequest(f"the method {method!r} must be upper case", consumer=c.name)
        if target is None:
            if method != "POST":
                raise MethodNotAllowed(method, ("POST",))
            sent = routed_target(c.paths[kind], query)
            scheduled = True
        else:
            if not c.passthrough:
                raise UnknownRoute(f"{c.name} does not allow pass-through "
                                   f"(consumers.{c.name}.passthrough)", consumer=c.name)
            problem = target.problem()
            if problem is not None:
                raise BadPath(problem, consumer=c.name)
            sent = target
            # With or without `;` parameters (servers differ: gpumgr.target).
            scheduled = any(self.is_gpu_work(c, method, p)
                            for p in (sent.path, sent.bare_path))
        driver = get_driver(c.driver)
        control = any(driver.is_control(c, method, p, body)
                      for p in dict.fromkeys((sent.path, sent.bare_path)))
        return Route(c, sent, forward_url(c.url, sent), scheduled, control,
                     passthrough=target is not None)

    @staticmethod
    def is_gpu_work(c: ConsumerConfig, method: str, path: str) -> bool:
        if any(s.matches(method, path) for s in c.scheduled):
            return True
        return bool(get_driver(c.driver).is_gpu_work(method, path))

    def handle(self, request: Any, kind: str, route: Route,
               logged_path: str) -> defer.Deferred[Any]:
        """Serve /v1/<kind>[/<subpath>] as `route` says. Fails with a
        GpumgrError to render. A control route (already authorised by the
        web layer) leaves the consumer's residency unknown once it was sent."""
        method = request.method.decode("ascii", "replace")
        c, url, path, scheduled = route.consumer, route.url, route.target.path, route.scheduled
        timing = _Timing(self.reactor.seconds(), bytes_in=_body_size(request), path=logged_path)
        refusal = self._health_refusal(c)
        if refusal is not None:
            d: defer.Deferred[Any] = defer.fail(refusal)
        elif is_upgrade(request) and (route.passthrough or _wants_websocket(request)):
            # On pass-through routes WebSockets tunnel and other upgrades get 501; on
            # /v1/<kind> an offer such as curl's h2c is ignored (RFC 9110 7.8).
            if not route.passthrough:
                raise UpgradeNotSupported("WebSockets are relayed on pass-through routes only")
            check_upgrade(request)
            return self._tunnel(request, c, route.target)
        elif not scheduled and self._process_stopped(c.name):
            d = defer.fail(ConsumerStopped(
                f"{c.name} is not running; its next GPU request starts it", consumer=c.name,
                retry_after_s=1))
        elif not scheduled:
            d = self.proxy.forward(request, c.name, self._agent_for(c), url, self._timeouts(c),
                                   [(b"X-Gpumgr-Consumer", c.name.encode("utf-8"))])
        else:
            driver = get_driver(c.driver)

            def job() -> defer.Deferred[Any]:
                current = self._config.consumers.get(c.name)
                if current is None:
                    return defer.fail(ConsumerRemoved(
                        f"{c.name} was removed by a config reload while this request waited",
                        consumer=c.name))
                d = defer.ensureDeferred(
                    self._gpu_job(request, current, driver, method, path, url, timing))
                return self._watch_job(c.name, self._bound_job(d, current, timing), timing)

            d = self.scheduler.run(c.name, job, kind=kind)
            # A client that leaves while queued leaves the queue at once. Once its
            # job runs, a process start nobody waits for is abandoned (`_start_for`);
            # then the exchange decides: it cancels the upstream, or, for GPU work
            # that goes on after the answer, reads the answer to follow it.
            request.notifyFinish().addErrback(
                lambda _: d.cancel() if timing.started is None else timing.client_left())
        if route.control:
            d.addBoth(self._control_sent, c.name)
        d.addBoth(self._account, request, kind, c.name, timing)
        return d

    def _control_sent(self, result: Any, name: str) -> Any:
        """A service's own control route went through (load, unload, free,
        interrupt...): what gpumgr believed of its memory may be wrong now.
        A tracked render is left tracked: its end is taken from the service's
        queue, never from an interrupt's answer."""
        if isinstance(result, Failure) and result.check(*_REFUSED_BEFORE_SENDING):
            return result
        if name in self.registry:
            self.registry.mark_unknown(name)
            log.info("{name}: its control route was used through pass-through; "
                     "its residency is unknown until measured or loaded", name=name)
        return result

    def _bound_job(self, d: defer.Deferred[Any], c: ConsumerConfig,
                   timing: _Timing) -> defer.Deferred[Any]:
        """Every job is bounded: job_timeout_s plus a margin. A tracked render
        leaves this bound when its tracking starts (`_track_render`): from
        there the tracker bounds it, and gives the GPU back only on evidence
        that the render stopped; a timeout here would release it on none."""
        limit_s = c.job_timeout_s + _JOB_TIMEOUT_MARGIN_S
        timed_out = []

        def expire() -> None:
            timed_out.append(True)
            d.cancel()

        timing.deadline = self.reactor.callLater(limit_s, expire)

        def settle(result: Any) -> Any:
            if timing.deadline is not None and timing.deadline.active():
                timing.deadline.cancel()
            if timed_out:
                return self._job_timed_out(c.name, limit_s)
            return result

        return d.addBoth(settle)

    def _job_timed_out(self, name: str, seconds: float) -> Failure:
        self.admission.event(EventKind.JOB_TIMEOUT, name, "job_timeout")
        log.warn("{name}: a job held the GPU past job_timeout_s; it was aborted", name=name)
        return Failure(JobTimeout(f"{name}: the job ran past job_timeout_s and was aborted",
                                  consumer=name))

    def _account(self, result: Any, request: Any, kind: str, consumer: str,
                 timing: _Timing) -> Any:
        """Metrics and the access log line of one proxied request."""
        now = self.reactor.seconds()
        code = access_status(result, _client_left(request))
        bytes_out = result.bytes_out if isinstance(result, Result) else 0
        bytes_in = timing.bytes_in
        wait_s = None if timing.started is None else timing.started - timing.received
        hold_s = None if timing.started is None else (timing.ended or now) - timing.started
        self.request_stats.record(kind, consumer, code, bytes_in, bytes_out, wait_s, hold_s)
        access_log.info(
            "{method} {path} {kind} {consumer} {status} in={bytes_in} out={bytes_out} "
            "wait_ms={wait_ms} gpu_ms={gpu_ms}",
            method=request.method.decode("ascii", "replace"),
            path=timing.path, kind=kind,
            consumer=consumer, status=code, bytes_in=bytes_in, bytes_out=bytes_out,
            wait_ms=None if wait_s is None else int(wait_s * 1000),
            gpu_ms=None if hold_s is None else int(hold_s * 1000))
        return result

    async def _gpu_job(self, request: Any, c: ConsumerConfig, driver: IDriver, method: str,
                       path: str, url: bytes, timing: _Timing) -> Result:
        timing.started = self.reactor.seconds()
        try:
            return await self._gpu_work(request, c, driver, method, path, url, timing)
        finally:
            timing.ended = self.reactor.seconds()

    async def _gpu_work(self, request: Any, c: ConsumerConfig, driver: IDriver, method: str,
                        path: str, url: bytes, timing: _Timing) -> Result:
        name = c.name
        evicting = self.mode is SchedulerMode.EVICTING
        if evicting:
            await self.admission.admit(name)
        retiring = self._retiring.get(name)
        if retiring is not None:
            # A reload changed its process block: this job holds the GPU, so the old
            # process goes now, and the new one starts below.
            await retiring.stop()
            if self._retiring.get(name) is retiring:
                del self._retiring[name]
            self._sync_processes()
        process = self.processes.get(name)
        if process is not None and process.state is not ProcessState.RUNNING:
            await self._start_for(name, process, timing)
        timing.exchanging = True
        # Two figures, so that neither hides the other: the wait for the GPU
        # (the queue), then what admission took once it had it (evictions,
        # loads, a process start).
        started = timing.received if timing.started is None else timing.started
        wait_ms = int((started - timing.received) * 1000)
        admit_ms = int((self.reactor.seconds() - started) * 1000)
        headers = [(b"X-Gpumgr-Consumer", name.encode("utf-8")),
                   (b"X-Gpumgr-Wait-Ms", str(wait_ms).encode("ascii")),
                   (b"X-Gpumgr-Admit-Ms", str(admit_ms).encode("ascii"))]
        capture = _CAPTURE_BYTES if driver.tracks_renders else 0

        def forward(hold_oom: bool) -> defer.Deferred[Result]:
            return self.proxy.forward(request, name, self._agent_for(c), url, self._timeouts(c),
                                      headers, hold_oom=hold_oom, capture_bytes=capture,
                                      finish_upstream=driver.tracks_renders)

        result = await forward(evicting)
        if result.outcome is Outcome.OOM:
            await self.admission.evict_for_oom(name)
            result = await forward(False)
        self.admission.job_ended(name, result)
        # A client that left after the consumer took its prompt still leaves a
        # render running: its answer was read all the same (finish_upstream).
        if result.outcome in (Outcome.COMPLETED, Outcome.CLIENT_GONE) \
                and result.status is not None and result.body_head:
            render_id = driver.render_id(method, path, result.status, result.body_head)
            if render_id is not None:
                # job_timeout_s bounds the hold of the GPU, not the wait for it.
                started = timing.started if timing.started is not None else timing.received
                await self._track_render(c, driver, render_id, started, timing)
                return result
        if result.abandoned:
            await self._settle_abandoned(c, driver)
        return result

    async def _settle_abandoned(self, c: ConsumerConfig, driver: IDriver) -> None:
        """The client left while the service had its request: keep the slot
        until the service stopped that work (see gpumgr.abandoned)."""
        if self.mode is SchedulerMode.PASSTHROUGH or c.abandoned_grace_s <= 0:
            return
        name = c.name

        def is_down() -> bool:
            # Gone, not merely unhealthy: a service that answers its health
            # route 503 (busy, flapping) may still compute.
            if self._process_stopped(name):
                return True
            state = self.registry[name] if name in self.registry else None
            return state is not None and state.health is Health.DOWN and state.refused

        def ask_service() -> defer.Deferred[bool | None]:
            return driver.work_stopped(self.http, c).addTimeout(
                self._config.health.timeout_s, self.reactor)

        await self.abandoned.settle(name, c.abandoned_grace_s, c.gpu_process,
                                    c.vram_resident_mib, is_down, ask_service)

    async def _start_for(self, name: str, process: ManagedProcess, timing: _Timing) -> None:
        """Start the consumer's process for a job.

        A client that leaves (before or during the start) abandons it: an
        eviction before it has completed, the start is given up and the
        process stopped once no other job waits for it, and the job (and the
        GPU) ends once that stop has, not when the start would have.
        """
        if not timing.client_gone:
            load = self.admission.load(name, "demand", evicting=False)
            timing.on_client_gone = load.cancel
            try:
                await load
                return
            except defer.CancelledError:
                pass
            finally:
                timing.on_client_gone = None
        log.info("{name}: its process start was given up (the client left, or the job ended)",
                 name=name)
        await process.when_stopped()
        raise defer.CancelledError()

    def _tunnel(self, request: Any, c: ConsumerConfig, target: Target) -> defer.Deferred[None]:
        """A WebSocket relayed as a byte tunnel; never scheduled."""
        limits = self._config.limits
        if len(self.tunnels) >= limits.max_tunnels:
            raise TooManyConnections(
                f"gpumgr is relaying its limit of {limits.max_tunnels} WebSocket tunnels "
                "(limits.max_tunnels)", retry_after_s=5)
        tunnel = Tunnel(self.reactor, request, c.name, self.tunnels.discard,
                        idle_timeout_s=limits.tunnel_idle_timeout_s)
        self.tunnels.add(tunnel)
        self.tunnels_total += 1
        path_and_query = target.origin_form()
        peer = request.getClientAddress()
        tunnel.start(self.reactor, c.url, path_and_query, c.connect_timeout_s,
                     c.request_timeout_s, getattr(peer, "host", None))
        return tunnel.done

    def _timeouts(self, c: ConsumerConfig) -> Timeouts:
        return Timeouts(request_s=c.request_timeout_s, body_idle_s=c.body_idle_timeout_s,
                        client_stall_s=self._config.limits.client_stall_timeout_s)

    # -- render tracking -----------------------------------------------------

    async def _track_render(self, c: ConsumerConfig, driver: IDriver, render_id: str,
                            job_started: float, timing: _Timing | None = None) -> None:
        """Hold the job's GPU slot until the render is over (see renders.py).
        The job's hard deadline is disarmed: the tracker interrupts the render
        at job_timeout_s and releases on evidence only, which may come later."""
        if timing is not None and timing.deadline is not None and timing.deadline.active():
            timing.deadline.cancel()
        await self.render_tracker.track(c.name, driver, render_id, job_started)

    def _stop_process_for_render(self, name: str) -> defer.Deferred[None] | None:
        process = self.processes.get(name)
        return None if process is None else process.stop()

    @property
    def renders(self) -> dict[int, TrackedRender]:
        return self.render_tracker.tracked

    @property
    def render_counts(self) -> collections.Counter[str]:
        return self.render_tracker.counts

    # -- /audio --------------------------------------------------------------

    def relay_audio(self, request: Any, target: Target) -> defer.Deferred[Any]:
        """GET /audio/<rest>: `target` is the whole request target, forwarded as is."""
        rest = target.after(1)
        if rest is None or rest.problem() is not None:
            return defer.fail(BadPath("audio paths must be plain file names, no '..' or '//'"))
        c = self._config.consumer_for(AUDIO_ROUTE)
        if c is None:
            return defer.fail(UnknownRoute("no consumer is routed for audio_proxy"))
        refusal = self._health_refusal(c)
        if refusal is not None:
            return defer.fail(refusal)
        url = forward_url(c.url, target)
        return self.proxy.forward(request, c.name, self._agent_for(c), url, self._timeouts(c),
                                  [(b"X-Gpumgr-Consumer", c.name.encode("utf-8"))])

    # -- admin ---------------------------------------------------------------

    def admin(self, name: str, action: str) -> defer.Deferred[dict[str, Any]]:
        """Load or unload `name` through the scheduler, like any job."""
        c = self._config.consumers.get(name)
        if c is None:
            return defer.fail(UnknownConsumer(f"no consumer named {name!r}"))
        if action == "load" and not c.can_load:
            return defer.fail(NotSupported(f"{name} has no way to load (no load route or "
                                           "process)", consumer=name))
        if action == "unload" and not c.can_unload:
            return defer.fail(NotSupported(f"{name} has no way to unload (no unload route, "
                                           "native unload or process)", consumer=name))
        evicting = self.mode is SchedulerMode.EVICTING
        if action == "load":
            job: Callable[[], Any] = lambda: self.admission.load(name, "admin", evicting)
        else:
            job = lambda: self.admission.admin_unload(name)  # noqa: E731
            # A render of `name` stuck with no evidence that it stopped gives
            # the GPU back to this unload: the operator's way out.
            self.render_tracker.request_release(name)
        d = self.scheduler.run(name, job, control=True)
        if action == "unload":
            d.addBoth(self._unload_done, name)

        def answer(_: Any) -> dict[str, Any]:
            state = self.registry[name]
            return {"consumer": name, "action": action, "loaded": state.loaded,
                    "gpu_resident_mib": state.gpu_resident_mib}

        return d.addCallback(answer)

    def _unload_done(self, result: Any, name: str) -> Any:
        self.render_tracker.release_done(name)
        return result

    # -- status --------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """Everything /v1/status and /metrics show, taken at once."""
        a = self.admission
        now = self.reactor.seconds()
        stats = attrs.evolve(
            self.scheduler.stats(), mode=self.mode, evictions=a.evictions,
            eviction_failures=a.eviction_failures, oom_retries=a.oom_retries,
            recent_events=tuple(a.events))
        renders: dict[str, list[RenderSnapshot]] = {}
        for r in self.renders.values():
            renders.setdefault(r.consumer, []).append(r.snapshot())
        consumers = []
        for state in self.registry:
            c = self._config.consumers.get(state.name)
            if c is None:
                continue
            process = self.processes.get(state.name)
            consumers.append(ConsumerSnapshot(
                name=c.name, url=c.url, driver=c.driver, health=Health(state.health),
                last_probe=state.last_probe, last_error=state.last_error,
                residency=state.residency, gpu_resident_mib=state.gpu_resident_mib,
                active=state.active, total_requests=state.total_requests, errors=state.errors,
                last_used=state.last_used, process=None if process is None else process.status(),
                renders=tuple(renders.get(c.name, ()))))
        return Snapshot(
            now=now, started_at=self.started_at, version=__version__, mode=self.mode,
            config_source=self._config.source, config_loaded_at=self.config_loaded_at,
            config_hash=self.config_hash or None, reloads=self.reload_attempts,
            reload_failures=self.reload_failures, last_reload_error=self.last_reload_error,
            headroom_mib=self._config.gpu.headroom_mib, gpu=self.gpu.latest,
            gpu_samples=self.gpu.samples_taken, gpu_sample_failures=self.gpu.samples_failed,
            gpu_sampling_s_total=self.gpu.sampling_s_total, consumers=tuple(consumers),
            scheduler=stats, tunnels_open=len(self.tunnels), tunnels_total=self.tunnels_total,
            renders=dict(self.render_counts), evictions_by_reason=dict(a.evictions_by_reason),
            requests=self.request_stats,
            kinds=tuple(k for k in self._config.routes if k in KINDS),
            draining=tuple(DrainSnapshot(d.consumer, d.since, d.grace_s)
                           for d in self.abandoned.draining.values()),
            drain_s=dict(self.abandoned.durations_s),
            drain_outcomes=dict(self.abandoned.outcomes))

    def status(self) -> dict[str, Any]:
        return status_document(self.snapshot())


__all__ = ["Broker", "Route", "TrackedRender", "path_is_safe"]
