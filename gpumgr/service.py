"""The service tree that wires the parts of the broker together."""

from __future__ import annotations

from typing import Any

import attrs

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory
from treq.client import HTTPClient

from gpumgr import __version__
from gpumgr.config import Config
from gpumgr.control import ControlClient
from gpumgr.gpu import GpuSampler
from gpumgr.health import HealthMonitor
from gpumgr.proxy import CachedEndpoints, StreamingProxy
from gpumgr.registry import Registry
from gpumgr.admission import Admission
from gpumgr.scheduler import Evicting, Locked, Passthrough, Scheduler
from gpumgr.status import build_status
from gpumgr.site import GpumgrSite
from gpumgr.web import Broker, RootResource

log = Logger()

#: Idle upstream connections are dropped before the consumers' own keep-alive
#: timeouts (whisper.cpp's is 5 s), so a POST never lands on a connection the
#: consumer is closing: Agent retries only idempotent methods.
_IDLE_CONNECTION_S = 4
#: Cached idle connections per consumer; concurrency itself is not capped here.
_IDLE_CONNECTIONS_PER_HOST = 32
#: How long shutdown waits for pools to close.
_SHUTDOWN_GRACE_S = 5.0


class _QuietClientFactory(_HTTP11ClientFactory):
    """The pool makes a factory per connection; don't log each start and stop."""

    noisy = False


def _make_pool(reactor) -> HTTPConnectionPool:
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool._factory = _QuietClientFactory
    pool.cachedConnectionTimeout = _IDLE_CONNECTION_S
    return pool


class ListenFailed(SystemExit):
    """gpumgr could not listen: exit with status 1 and one line, not a traceback.

    A SystemExit, so twistd's runner (which re-raises anything else from
    startService with a traceback) lets it through to the interpreter, which
    prints the message to stderr and exits 1.
    """


class _ListenService(Service):
    """Listens on an endpoint; `listening` fires with the port (tests read it)."""

    def __init__(self, reactor, description: str, factory) -> None:
        self._reactor = reactor
        self._endpoint = serverFromString(reactor, description)
        self._description = description
        self._factory = factory
        self.listening: defer.Deferred[Any] | None = None
        self._port = None

    def startService(self) -> None:
        super().startService()
        self.listening = self._endpoint.listen(self._factory)
        failed: list[Failure] = []
        self.listening.addCallbacks(self._got_port, failed.append)
        if failed:  # a TCP bind fails synchronously: stop startup with one clear line
            self.running = False
            raise ListenFailed(self._message(failed[0]))
        self.listening.addErrback(self._failed_late)

    def _message(self, failure: Failure) -> str:
        why = failure.getErrorMessage()
        if failure.check(CannotListenError) and isinstance(failure.value.socketError, OSError):
            why = failure.value.socketError.strerror or why
        return f"gpumgr: cannot listen on {self._description}: {why}"

    def _failed_late(self, failure: Failure) -> None:
        # Endpoints that bind later (none of tcp, tcp6, unix do) end here.
        log.critical("{message}", message=self._message(failure))
        self._reactor.stop()

    def _got_port(self, port):
        self._port = port
        address = port.getHost()
        log.info(
            "gpumgr {version} listening on http://{host}:{port}/",
            version=__version__, host=address.host, port=address.port,
        )
        return port

    def stopService(self):
        super().stopService()
        if self._port is not None:
            return self._port.stopListening()
        return None


def make_scheduler(config: Config, clock, registry: Registry, admission: Admission) -> Scheduler:
    sched = config.scheduler
    if sched.mode == "passthrough":
        return Passthrough(clock, registry)
    evicting = sched.mode == "evicting"
    locked = Locked(
        clock, registry, capacity=sched.capacity, max_queue=sched.max_queue,
        queue_timeout_s=sched.queue_timeout_s, priority=sched.priority, aging_s=sched.aging_s,
        is_loaded=(lambda name: registry[name].loaded is True) if evicting else None,
        max_overtakes=sched.max_overtakes if evicting else 0,
    )
    return Evicting(locked, admission) if evicting else locked


class GpumgrService(MultiService):
    """The broker: HTTP site, health monitor, GPU sampler and scheduler."""

    def __init__(self, reactor, config: Config, listen: str | None = None) -> None:
        super().__init__()
        self.reactor = reactor
        self.config = config
        self.registry = Registry(config.consumers)

        self._data_pool = _make_pool(reactor)
        self._data_pool.maxPersistentPerHost = _IDLE_CONNECTIONS_PER_HOST
        agents = {
            name: Agent.usingEndpointFactory(
                reactor, CachedEndpoints(reactor, c.connect_timeout_s), pool=self._data_pool)
            for name, c in config.consumers.items()
        }
        self._control_pool = _make_pool(reactor)
        self.control = ControlClient(
            HTTPClient(
                Agent(reactor, connectTimeout=config.health.timeout_s, pool=self._control_pool)
            )
        )
        self.health = HealthMonitor(
            reactor,
            config.consumers,
            self.registry,
            self.control.probe,
            config.health.interval_s,
            config.health.timeout_s,
        )
        self.gpu = GpuSampler(
            reactor, config.gpu.nvidia_smi, config.gpu.interval_s, config.gpu.timeout_s
        )
        self.gpu.listeners.append(lambda sample: self.registry.apply_sample(sample, config.consumers))
        self.admission = Admission(reactor, config, self.registry, self.gpu, self.control)
        self.scheduler = make_scheduler(config, reactor, self.registry, self.admission)
        self.admission.submit = lambda name, job: self.scheduler.run(name, job, control=True)
        self.admission.queued_for = self.scheduler.queued_for
        self._cooperator = Cooperator(scheduler=lambda f: reactor.callLater(0, f))
        self.proxy = StreamingProxy(reactor, self._cooperator, self._upstream_error)
        self.started_at = reactor.seconds()
        broker = Broker(
            reactor, config, self.registry, self.scheduler, self.proxy, agents, self.status,
            self.admission,
        )
        self.site = GpumgrSite(RootResource(broker), reactor, config.limits)
        self.http = _ListenService(reactor, listen or config.listen, self.site)
        self.http.setServiceParent(self)

    def status(self) -> dict:
        a = self.admission
        stats = attrs.evolve(
            self.scheduler.stats(), evictions=a.evictions, eviction_failures=a.eviction_failures,
            oom_retries=a.oom_retries, recent_events=tuple(a.events))
        return build_status(
            self.reactor.seconds(),
            self.started_at,
            self.config,
            self.registry,
            self.gpu.latest,
            stats,
            self.gpu.samples_taken,
            self.gpu.sampling_s_total,
        )

    def _upstream_error(self, consumer: str, reachable: bool, reason: str) -> None:
        self.registry.upstream_error(consumer, self.reactor.seconds(), reason, reachable)
        if not reachable:
            log.warn("{consumer} unreachable ({reason}); re-probing now",
                     consumer=consumer, reason=reason)
            self.health.probe_now(consumer)

    def startService(self) -> None:
        self.started_at = self.reactor.seconds()
        super().startService()
        self.health.start()
        self.gpu.start()
        for name, c in self.config.consumers.items():
            if c.preload:
                d = self.scheduler.run(name, lambda name=name: self.admission.load(name, "preload"),
                                       control=True)
                d.addErrback(lambda f, name=name: log.warn(
                    "preloading {name} failed: {why}", name=name, why=f.getErrorMessage()))

    def stopService(self):
        self.health.stop()
        self.gpu.stop()
        self.admission.stop()
        d = defer.maybeDeferred(super().stopService)
        d.addBoth(lambda _: self._close_pools())
        return d

    def _close_pools(self):
        self._cooperator.stop()
        closing = defer.DeferredList(
            [self._data_pool.closeCachedConnections(), self._control_pool.closeCachedConnections()]
        )
        timer = self.reactor.callLater(_SHUTDOWN_GRACE_S, closing.cancel)
        closing.addBoth(lambda _: timer.active() and timer.cancel())
        return closing
