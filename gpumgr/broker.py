"""The broker: the one face the HTTP layer (gpumgr.web), the service and the
CLI see, wired over modules that each do one job:

  routing     a request's parsed target to a `Route`
  jobs        the GPU job pipeline (admit, start, exchange, track, drain)
  fleet       the processes gpumgr owns, and how a consumer loads and unloads
  reload      reading a new config, and what came of it
  accounting  each request's status, counters and access log line
  admin       the operator's load and unload
  observe     the parts read at once into one Snapshot

Every request looks its route, consumer and timeouts up in the current config
(`self.config`), so a reload is one swap.
"""

from __future__ import annotations

import collections
from typing import Any, Callable

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IAgent

from gpumgr.abandoned import DRAIN_SAMPLE_S, AbandonedWork
from gpumgr.accounting import Accounting, Timing, access_status, body_size
from gpumgr.admin import AdminAction, run_admin
from gpumgr.admission import Admission
from gpumgr.balancer import ReadinessCheck, box_headers
from gpumgr.cards import PerCardLocked, PerCardSetup, Placements, cuda_env, spans_cards
from gpumgr.config import AUDIO_ROUTE, Config, ConsumerConfig
from gpumgr.drivers import ControlHttp, IDriver, get_driver
from gpumgr.errors import (
    BadPath,
    ConsumerRemoved,
    ConsumerStopped,
    ConsumerUnhealthy,
    QueueFull,
    QueueTimeout,
    ShuttingDown,
    UnknownRoute,
    UpgradeNotSupported,
    describe_failure,
)
from gpumgr.fleet import Fleet
from gpumgr.gpu import GpuSample, GpuSampler
from gpumgr.health import HealthMonitor
from gpumgr.jobs import GpuJob, Jobs, drain, make_scheduler, timeouts_for
from gpumgr.measure import Measuring
from gpumgr.process import ManagedProcess
from gpumgr.proxy import StreamingProxy
from gpumgr.registry import Registry
from gpumgr.observe import Parts, take_snapshot
from gpumgr.reload import (
    ReloadHistory,
    ReloadOutcome,
    ReloadRefused,
    read_new_config,
    reload_refusal,
)
from gpumgr.renders import RenderTracker, TrackedRender
from gpumgr.request_book import RequestBook, Scene, describe
from gpumgr.routing import Route, is_gpu_work, path_is_safe, route, wants_websocket
from gpumgr.auto_cards import card_figures_reader
from gpumgr.budget_figures import profile_reader, read_figures
from gpumgr.memory import MemoryProfiles
from gpumgr.scheduler import Locked, Scheduler
from gpumgr.scheduler_auto import Auto
from gpumgr.snapshot import Snapshot
from gpumgr.states import SchedulerMode
from gpumgr.status import status_document
from gpumgr.target import Target, forward_url
from gpumgr.tunnel import Tunnel, Tunnels, check_upgrade, is_upgrade

log = Logger()

#: Errors of a request that never reached its service.
_REFUSED_BEFORE_SENDING = (ConsumerUnhealthy, ConsumerStopped, ConsumerRemoved, QueueFull,
                           QueueTimeout, ShuttingDown)


class Broker:
    #: Made after the fleet, which reports to them (see __init__).
    admission: Admission
    jobs: Jobs

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
        profiles: MemoryProfiles | None = None,
    ) -> None:
        self.reactor = reactor
        self._config = config
        self.gpu = gpu
        self.http = http
        self._agent_for = proxy_agent
        self._overrides = overrides
        self.started_at = reactor.seconds()
        self.reloads = ReloadHistory(loaded_at=self.started_at, config_hash=config.sha256)
        #: Told of every applied config (the site's body limit follows it).
        self.config_listeners: list[Callable[[Config], None]] = []
        self.registry = Registry(config.consumers)
        self.accounting = Accounting(reactor)
        self.requests = RequestBook(reactor, lambda: self._config.requests)
        self._tunnels = Tunnels(reactor)
        #: Which cards each consumer lives on (gpumgr.cards); a lock per card if
        #: any consumer lives off card 0.
        self.placements = Placements(lambda: self._config, lambda: gpu.latest,
                                     lambda: self.admission.views(), self._may_move)
        #: The memory figures capacity auto admits on: given, else the learned ones
        #: (`self.measuring`, set below; read lazily).
        self._given_profiles = profiles
        self.scheduler: Scheduler = make_scheduler(
            reactor, self.registry, config.scheduler, self.evicting, self.passing_through,
            PerCardSetup(self.placements, lambda: gpu.latest) if spans_cards(config) else None,
            figures=lambda: read_figures(self._config, self.registry, gpu.latest, self.profiles),
            profile_of=profile_reader(lambda: self._config, lambda: self.profiles),
            card_figures=card_figures_reader(lambda: self._config, self.registry,
                                             lambda: gpu.latest, lambda: self.profiles,
                                             self.placements.cards_of))
        self.fleet = Fleet(
            reactor, lambda: self._config, self.registry, http, process_factory,
            event=lambda *a, **kw: self.admission.event(*a, **kw),
            holders=lambda: {h.consumer for h in self.scheduler.stats().holders},
            abort_jobs=lambda name, why: self.jobs.abort(name, why))
        self.admission = Admission(reactor, lambda: self._config, self.registry, gpu,
                                   self.fleet.load_unload, self.scheduler)
        #: Every decision is per card: a lock or a budget for each.
        per_card = isinstance(self.scheduler, PerCardLocked) or (
            isinstance(self.scheduler, Auto) and spans_cards(config))
        if per_card:
            self.admission.cards_of = self.placements.cards_of
            self.fleet.gpu_env = self._gpu_env
        self.proxy = StreamingProxy(reactor, cooperator, self._upstream_error)
        self.health = HealthMonitor(
            reactor, lambda: self._config.consumers, self.registry,
            lambda c: get_driver(c.driver).probe(http, c),
            config.health.interval_s, config.health.timeout_s,
            not_running=self.fleet.process_health, down_grace_s=config.health.down_grace_s,
            on_still_down=self.fleet.still_down)
        self.render_tracker = RenderTracker(
            reactor, http, lambda: self._config.consumers, self.registry,
            self.health.probe_now, self.admission.event, self.fleet.stop_for_render)
        self.abandoned = AbandonedWork(
            reactor, gpu.sample_now, self.admission.event,
            sample_period_s=lambda: min(DRAIN_SAMPLE_S, self._config.gpu.interval_s))
        self.jobs = Jobs(reactor, lambda: self._config, self.registry, http, lambda: self.scheduler,
                         self.admission, self.fleet, self.proxy, proxy_agent,
                         self.render_tracker, self.abandoned, evicting=self.evicting,
                         passthrough=self.passing_through, profiles=lambda: self.profiles)
        if per_card:
            self.jobs.cards_of = self.placements.cards_of
        #: /v1/ready/<kind>, and the phase the service sets on SIGTERM (gpumgr.balancer).
        self.readiness = ReadinessCheck(lambda: self._config, self.registry,
                                        lambda: self.scheduler, lambda: self.fleet.processes)
        # A sample reaches the registry, then the profiles, then a waiting job.
        gpu.listeners.append(lambda sample: self.registry.apply_sample(
            sample, self._config.consumers))
        #: Learned memory profiles (`self.measuring.profiles`, a MemoryProfiles) and the
        #: nvidia-smi stream while jobs run (gpumgr.measure).
        self.measuring = Measuring(reactor, lambda: self._config, gpu, self.registry,
                                   lambda: self.scheduler, http)
        gpu.listeners.append(self._sampled)
        self.fleet.sync()

    @property
    def profiles(self) -> MemoryProfiles:
        """The memory figures admission uses: given, else learned (max of config and measured)."""
        if self._given_profiles is not None:
            return self._given_profiles
        return self.measuring.profiles

    @profiles.setter
    def profiles(self, profiles: MemoryProfiles) -> None:
        self._given_profiles = profiles

    def _sampled(self, sample: GpuSample) -> None:
        if isinstance(self.scheduler, Auto):
            self.scheduler.poke()  # new figures: a waiting job may fit now

    # -- config and mode ---------------------------------------------------------

    @property
    def config(self) -> Config:
        return self._config

    @property
    def mode(self) -> SchedulerMode:
        return self._config.scheduler.mode

    # The only places the scheduler mode is compared.
    @property
    def evicting(self) -> bool:
        return self.mode is SchedulerMode.EVICTING

    @property
    def passing_through(self) -> bool:
        return self.mode is SchedulerMode.PASSTHROUGH

    def reload(self) -> ReloadOutcome:
        """Re-read the config file; apply it if it is valid and needs no restart.
        Either way the outcome is logged and shown in /v1/status.broker."""
        self.reloads.attempts += 1
        try:
            new = read_new_config(self._config, self._overrides)
        except ReloadRefused as e:
            log.error("reload refused, keeping the running config: {message}", message=str(e))
            return self.reloads.refused(str(e))
        self.apply_config(new)
        log.info("reloaded {source} ({n} consumers)", source=new.source, n=len(new.consumers))
        return ReloadOutcome(reloaded=True, config_hash=new.sha256)

    def apply_config(self, new: Config) -> None:
        """Swap in a validated config. Queued and running jobs are not
        disturbed; consumers that remain keep their state and process."""
        old = self._config
        self._config = new
        self.reloads.applied(new, self.reactor.seconds())
        self.registry.sync(new.consumers)
        self.fleet.apply(old, new)
        sched = new.scheduler
        self.placements.forget_removed()
        if isinstance(self.scheduler, (Locked, PerCardLocked)) and isinstance(sched.capacity, int):
            self.scheduler.configure(sched.capacity, sched.max_queue, sched.queue_timeout_s,
                                     sched.priority, sched.aging_s, sched.max_overtakes)
        elif isinstance(self.scheduler, Auto):
            self.scheduler.configure(sched.max_queue, sched.queue_timeout_s, sched.priority,
                                     sched.aging_s, sched.max_bypass_s, sched.max_running,
                                     overlap_evict_idle_s=sched.overlap_evict_idle_s)
        self.health.configure(new.health.interval_s, new.health.timeout_s,
                              new.health.down_grace_s)
        self.gpu.configure(new.gpu.nvidia_smi, new.gpu.interval_s, new.gpu.timeout_s)
        for listener in self.config_listeners:
            listener(new)

    def _may_move(self, name: str) -> bool:
        """An `auto` consumer may be placed afresh: no process, no job of it."""
        return (self.fleet.is_stopped(name) and self.registry[name].active == 0
                and self.scheduler.queued_for(name) == 0)

    def _gpu_env(self, name: str) -> dict[str, str]:
        c = self._config.consumers.get(name)
        if c is None or (c.process is not None and "CUDA_VISIBLE_DEVICES" in c.process.env
                         and not c.gpu.auto):
            return {}
        return cuda_env(self.placements.cards_of(name))

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        self.started_at = self.reactor.seconds()
        self.health.start()
        self.gpu.start()
        self.measuring.start()
        for name, c in self._config.consumers.items():
            if c.preload:
                self._preload(name)

    def _preload(self, name: str) -> None:
        evicting = self.evicting
        d = self.scheduler.run(name, lambda: self.admission.load(name, "preload", evicting),
                               control=True)

        def failed(f: Failure) -> None:
            log.warn("preloading {name} failed: {why}", name=name, why=describe_failure(f))

        d.addErrback(failed)

    async def drain(self, grace_s: float) -> None:
        """Shutdown: refuse queued and new GPU jobs, then end running ones (gpumgr.jobs)."""
        await drain(self.reactor, self.scheduler, grace_s)

    def stop(self) -> defer.Deferred[Any]:
        """Stop probing and sampling, close tunnels, stop every process gpumgr owns."""
        self._tunnels.close_all()
        self.health.stop()
        self.gpu.stop()
        self.measuring.stop()
        self.admission.stop()
        return self.fleet.stop_all()

    # -- requests ----------------------------------------------------------------

    def route(self, kind: str, method: str, target: Target | None, query: bytes | None = None,
              body: Callable[[], bytes | None] = lambda: None) -> Route:
        """Where a request to /v1/<kind>[/<target>] goes (gpumgr.routing)."""
        return route(self._config, kind, method, target, query, body)

    is_gpu_work = staticmethod(is_gpu_work)

    def handle(self, request: Any, kind: str, route: Route,
               logged_path: str) -> defer.Deferred[Any]:
        """Serve /v1/<kind>[/<subpath>] as `route` says. Fails with a
        GpumgrError to render. A service's control route (already authorised
        by the web layer) leaves the consumer's residency unknown once sent."""
        c = route.consumer
        request_id = self.requests.parse(request)
        timing = Timing(self.reactor.seconds(), bytes_in=body_size(request), path=logged_path,
                        request_id=request_id)
        refusal = self.fleet.health_refusal(c)
        if refusal is not None:
            d: defer.Deferred[Any] = defer.fail(refusal)
        elif is_upgrade(request) and (route.passthrough or wants_websocket(request)):
            # On pass-through routes WebSockets tunnel and other upgrades get 501; on
            # /v1/<kind> an offer such as curl's h2c is ignored (RFC 9110 7.8).
            if not route.passthrough:
                raise UpgradeNotSupported("WebSockets are relayed on pass-through routes only")
            check_upgrade(request)
            return self._tunnels.open(request, c, route.target, self._config.limits)
        elif not route.scheduled and self.fleet.is_stopped(c.name):
            d = defer.fail(ConsumerStopped(
                f"{c.name} is not running; its next GPU request starts it", consumer=c.name,
                retry_after_s=1))
        elif not route.scheduled:
            d = self._relay(request, c, route.url, kind)
        else:
            method = request.method.decode("ascii", "replace")
            d = self.jobs.run(GpuJob(request, kind, route, method, timing))
        d = self.requests.open(request, kind, c.name, timing, d, route.scheduled)
        if route.service_control:
            d.addBoth(self._service_control_sent, c.name)
        d.addBoth(self.accounting.account, request, kind, c.name, timing)
        return d.addBoth(self.requests.close, request_id, request)

    def relay_audio(self, request: Any, target: Target) -> defer.Deferred[Any]:
        """GET /audio/<rest>: `target` is the whole request target, forwarded as is."""
        rest = target.after(1)
        if rest is None or rest.problem() is not None:
            return defer.fail(BadPath("audio paths must be plain file names, no '..' or '//'"))
        c = self._config.consumer_for(AUDIO_ROUTE)
        if c is None:
            return defer.fail(UnknownRoute("no consumer is routed for audio_proxy"))
        refusal = self.fleet.health_refusal(c)
        if refusal is not None:
            return defer.fail(refusal)
        return self._relay(request, c, forward_url(c.url, target))

    def _relay(self, request: Any, c: ConsumerConfig, url: bytes,
               kind: str | None = None) -> defer.Deferred[Any]:
        """Not GPU work: straight through, never scheduled."""
        return self.proxy.forward(request, c.name, self._agent_for(c), url,
                                  timeouts_for(self._config, c),
                                  [(b"X-Gpumgr-Consumer", c.name.encode("utf-8")),
                                   *box_headers(self._config.balancer, kind)])

    def _service_control_sent(self, result: object, name: str) -> object:
        """A service's own control route went through (load, unload, free,
        interrupt...): what gpumgr believed of its memory may be wrong now.
        A tracked render is left tracked: its end is taken from the service's
        queue, never from an interrupt's answer."""
        if isinstance(result, Failure) and isinstance(result.value, _REFUSED_BEFORE_SENDING):
            return result
        if name in self.registry:
            self.registry.mark_unknown(name)
            log.info("{name}: its control route was used through pass-through; "
                     "its residency is unknown until measured or loaded", name=name)
        return result

    def _upstream_error(self, consumer: str, reachable: bool, reason: str) -> None:
        self.registry.upstream_error(consumer, reason, reachable)
        if not reachable and not self.fleet.is_stopped(consumer):
            log.warn("{consumer} unreachable ({reason}); re-probing now",
                     consumer=consumer, reason=reason)
            self.health.probe_now(consumer)

    async def _track_render(self, c: ConsumerConfig, driver: IDriver, render_id: str,
                            job_started: float, timing: Timing | None = None) -> None:
        """A render's GPU slot held until it is over (gpumgr.jobs)."""
        await self.jobs.track_render(c, driver, render_id, job_started, timing)

    # -- requests users can see and cancel (gpumgr.request_book) -------------------

    def _request_scene(self) -> Scene:
        return Scene(self.reactor.seconds(), self.scheduler.queue_order(),
                     tuple(h.consumer for h in self.scheduler.stats().holders),
                     dict(self.admission.acting),
                     {r.render_id: r.phase.value for r in self.render_tracker.tracked.values()})

    def request_document(self, text: str) -> dict[str, Any]:
        return describe(self.requests.find(text), self._request_scene())

    def requests_document(self) -> dict[str, Any]:
        """The live requests: the queue in the order it would start, then the rest."""
        scene = self._request_scene()
        docs = [describe(e, scene) for e in self.requests.live()]
        queued = sorted((d for d in docs if d["state"] == "queued"),
                        key=lambda d: (d["position"] is None, d["position"] or 0))
        return {"queue": queued, "running": [d for d in docs if d["state"] != "queued"]}

    # -- admin -------------------------------------------------------------------

    def admin(self, name: str, action: AdminAction) -> defer.Deferred[dict[str, Any]]:
        """Load or unload `name` through the scheduler, like any job (gpumgr.admin)."""
        return run_admin(self._config, self.scheduler, self.admission, self.render_tracker,
                         self.registry, self.evicting, name, action)

    # -- what the status page and /metrics show ----------------------------------

    @property
    def processes(self) -> dict[str, ManagedProcess]:
        return self.fleet.processes

    @property
    def tunnels(self) -> set[Tunnel]:
        return self._tunnels.open_now

    @property
    def reload_attempts(self) -> int:
        return self.reloads.attempts

    @property
    def renders(self) -> dict[int, TrackedRender]:
        return self.render_tracker.tracked

    @property
    def render_counts(self) -> collections.Counter[str]:
        return self.render_tracker.counts

    def snapshot(self) -> Snapshot:
        """Everything /v1/status and /metrics show, taken at once."""
        return take_snapshot(self.reactor.seconds(), Parts(
            self._config, self.mode, self.started_at, self.reloads, self.gpu, self.registry,
            self.scheduler, self.admission, self.fleet.processes, self.render_tracker,
            self.abandoned, len(self._tunnels.open_now), self._tunnels.total,
            self.accounting.request_stats, self.measuring.profiles, self.placements,
            self.readiness))

    def status(self) -> dict[str, Any]:
        return status_document(self.snapshot())


__all__ = ["Broker", "Route", "TrackedRender", "access_status", "path_is_safe",
           "reload_refusal"]
