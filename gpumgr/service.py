"""The service tree that wires the parts of the broker together."""

from __future__ import annotations

import signal
from typing import Any, Callable

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError, ReactorNotRunning
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory
from treq.client import HTTPClient

from gpumgr import __version__
from gpumgr.admission import Admission
from gpumgr.balancer import Phase
from gpumgr.broker import Broker
from gpumgr.config import Config, ConsumerConfig
from gpumgr.errors import describe_failure
from gpumgr.gpu import GpuSampler
from gpumgr.health import HealthMonitor
from gpumgr.proxy import CachedEndpoints
from gpumgr.registry import Registry
from gpumgr.scheduler import Scheduler
from gpumgr.service_calls import ServiceCalls
from gpumgr.site import GpumgrSite
from gpumgr.web import RootResource

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


def _make_pool(reactor: Any) -> HTTPConnectionPool:
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

    def __init__(self, reactor: Any, description: str, factory: IProtocolFactory) -> None:
        self._reactor = reactor
        self._endpoint = serverFromString(reactor, description)
        self._description = description
        self._factory = factory
        self.listening: defer.Deferred[Any] | None = None
        self._port: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.listening = self._endpoint.listen(self._factory)
        failed: list[Failure] = []
        self.listening.addCallbacks(self._got_port, failed.append)
        if failed:  # a TCP bind fails synchronously: stop startup with one clear line
            self.running = False
            raise ListenFailed(self._message(failed[0]))
        self.listening.addErrback(self._failed_late)

    def _message(self, failure: Failure) -> str:
        why = describe_failure(failure)
        error = failure.value
        if isinstance(error, CannotListenError) and isinstance(error.socketError, OSError):
            why = error.socketError.strerror or why
        return f"gpumgr: cannot listen on {self._description}: {why}"

    def _failed_late(self, failure: Failure) -> None:
        # Endpoints that bind later (none of tcp, tcp6, unix do) end here.
        log.critical("{message}", message=self._message(failure))
        self._reactor.stop()

    def _got_port(self, port: IListeningPort) -> IListeningPort:
        self._port = port
        address: Any = port.getHost()  # an IPv4Address or IPv6Address
        log.info(
            "gpumgr {version} listening on http://{host}:{port}/",
            version=__version__, host=address.host, port=address.port,
        )
        return port

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._port is not None:
            stopped: defer.Deferred[None] | None = self._port.stopListening()
            return stopped
        return None


class GpumgrService(MultiService):
    """The broker behind an HTTP site, with its connection pools."""

    def __init__(self, reactor: Any, config: Config, listen: str | None = None,
                 overrides: Callable[[Config], Config] = lambda c: c,
                 install_signals: bool = False) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.reactor = reactor
        self._install_signals = install_signals
        self._data_pool = _make_pool(reactor)
        self._data_pool.maxPersistentPerHost = _IDLE_CONNECTIONS_PER_HOST
        self._agents: dict[tuple[str, float], Agent] = {}
        self._control_pool = _make_pool(reactor)
        self.service_calls = ServiceCalls(
            HTTPClient(
                Agent(reactor, connectTimeout=config.health.timeout_s, pool=self._control_pool)
            )
        )
        self.gpu = GpuSampler(
            reactor, config.gpu.nvidia_smi, config.gpu.interval_s, config.gpu.timeout_s
        )
        self._cooperator = Cooperator(scheduler=lambda f: reactor.callLater(0, f))
        self.broker = Broker(reactor, config, self.gpu, self.service_calls, self._agent_for,
                             self._cooperator, overrides=overrides)
        self.site = GpumgrSite(RootResource(self.broker), reactor, config.limits)
        self.broker.config_listeners.append(self._config_applied)
        self.http = _ListenService(reactor, listen or config.listen, self.site)
        self.http.setServiceParent(self)  # type: ignore[no-untyped-call]
        self._draining = False
        self._leaving: Any = None  # the timer of the not-ready period (SIGTERM)

    # Shortcuts for tests and the demo.
    @property
    def config(self) -> Config:
        return self.broker.config

    @property
    def registry(self) -> Registry:
        return self.broker.registry

    @property
    def scheduler(self) -> Scheduler:
        return self.broker.scheduler

    @property
    def admission(self) -> Admission:
        return self.broker.admission

    @property
    def health(self) -> HealthMonitor:
        return self.broker.health

    def status(self) -> dict[str, Any]:
        return self.broker.status()

    def _config_applied(self, config: Config) -> None:
        """Limits from a reload: deadlines, body and spool sizes apply to new
        requests; the connection cap is fitted to the open-file limit again."""
        site = self.site
        site.limits = config.limits
        site.max_body_bytes = config.limits.max_body_bytes
        site.spool.capacity_bytes = config.limits.max_spool_bytes
        site._fit_fd_limit()

    def _agent_for(self, c: ConsumerConfig) -> Agent:
        """One Agent per consumer origin and connect timeout, on the shared pool."""
        key = (c.url, c.connect_timeout_s)
        agent = self._agents.get(key)
        if agent is None:
            agent = Agent.usingEndpointFactory(
                self.reactor, CachedEndpoints(self.reactor, c.connect_timeout_s),
                pool=self._data_pool)
            self._agents[key] = agent
        return agent

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.broker.start()
        self._previous_handlers: dict[int, Any] = {}
        self._signal_actions: dict[int, Callable[[], Any]] = {}
        self._draining = False
        if self._install_signals:
            # After the reactor installed its own handlers, which it does as it starts.
            self.reactor.callWhenRunning(self._install_signal_handlers)

    def _install_signal_handlers(self) -> None:
        """SIGHUP reloads. SIGTERM and SIGINT stop the reactor, which drains
        (stopService) and then exits 0: the reactor's own handlers would have
        twistd re-raise the signal at exit, which systemd reads as a failure.
        SIGTERM first reports not ready for balancer.not_ready_s (`_leave`)."""
        if not self.running:
            return
        handlers: dict[int, Callable[[], Any]] = {
            signal.SIGHUP: self._reload, signal.SIGTERM: self._leave,
            signal.SIGINT: self._stop_reactor}
        for signum in handlers:
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
        self._signal_actions = handlers

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self._signal_actions[signum])

    def _reload(self) -> None:
        if self._draining:
            log.info("SIGHUP while draining for shutdown: not reloading")
            return
        self.broker.reload()

    def _leave(self) -> None:
        """SIGTERM: report not ready (/v1/ready) while still serving, so that
        a load balancer stops sending, then drain. A second SIGTERM in that
        period drains at once."""
        not_ready_s = self.broker.config.balancer.not_ready_s
        if self._leaving is not None or self._draining or not_ready_s <= 0:
            self._stop_reactor()
            return
        log.info("SIGTERM: reporting not ready for {s:g}s (balancer.not_ready_s), "
                 "still serving; then draining", s=not_ready_s)
        self.broker.readiness.phase = Phase.LEAVING
        self._leaving = self.reactor.callLater(not_ready_s, self._stop_reactor)

    def _stop_reactor(self) -> None:
        try:
            self.reactor.stop()
        except ReactorNotRunning:
            pass  # a second signal while draining

    def stopService(self) -> defer.Deferred[Any]:
        """Drain: stop listening, answer queued jobs 503 shutting_down, let
        running ones finish for up to shutdown_grace_s, stop the processes
        gpumgr owns, close the pools."""
        # Our handlers stay until the drain is over: a second SIGTERM, or a
        # SIGHUP from logrotate, must not cut it short.
        self._draining = True
        self.broker.readiness.phase = Phase.DRAINING
        if self._leaving is not None and self._leaving.active():
            self._leaving.cancel()
        d = defer.maybeDeferred(super().stopService)
        d.addBoth(lambda _: defer.ensureDeferred(
            self.broker.drain(self.broker.config.shutdown_grace_s)))
        d.addBoth(lambda _: self.broker.stop())
        d.addBoth(lambda _: self._close_pools())
        d.addBoth(self._restore_signal_handlers)
        return d

    def _restore_signal_handlers(self, result: Any) -> Any:
        for signum, previous in self._previous_handlers.items():
            if previous is not None:
                signal.signal(signum, previous)
        self._previous_handlers = {}
        return result

    def _close_pools(self) -> defer.Deferred[Any]:
        self._cooperator.stop()
        closing = defer.DeferredList(
            [self._data_pool.closeCachedConnections(), self._control_pool.closeCachedConnections()]
        )
        closing.addTimeout(_SHUTDOWN_GRACE_S, self.reactor)
        closing.addErrback(lambda f: log.warn("closing connection pools: {why}",
                                              why=describe_failure(f)))
        return closing
