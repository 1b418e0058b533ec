"""The processes gpumgr owns: one per consumer with a `process` block.

The fleet creates them from the config, retires those a reload removed or
changed, says what a stopped one's health is, loads and unloads a consumer
(`LoadUnload`, the way admission does it), and stops a process that stays
down (its exit is the evidence its GPU work stopped).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Mapping, Protocol

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from gpumgr.events import EventKind
from gpumgr.deadlines import load_deadline_s
from gpumgr.config import Config, ConsumerConfig
from gpumgr.drivers import ControlHttp, get_driver
from gpumgr.errors import ConsumerUnhealthy, ControlFailed, GpumgrError, describe_failure
from gpumgr.process import ManagedProcess, ProcessExit, ProcessState, port_answers
from gpumgr.registry import Health, Registry

log = Logger()


class EventSink(Protocol):
    """Admission's event log, as the fleet writes to it."""

    def __call__(self, kind: str, consumer: str, reason: str | None = None,
                 mib: int | None = None, detail: str | None = None) -> None: ...


class Fleet:
    """The owned processes, by consumer name."""

    def __init__(
        self,
        reactor: Any,
        config: Callable[[], Config],
        registry: Registry,
        http: ControlHttp,
        process_factory: Callable[..., ManagedProcess],
        event: EventSink,
        holders: Callable[[], Iterable[str]],
        abort_jobs: Callable[[str, str], None],
    ) -> None:
        """`holders`: the consumers whose jobs hold the GPU now; `abort_jobs`
        cancels a consumer's jobs that talk to it (gpumgr.jobs)."""
        self._reactor = reactor
        self._config = config
        self._registry = registry
        self.http = http
        self._process_factory = process_factory
        self._event = event
        self._holders = holders
        self._abort_jobs = abort_jobs
        self.processes: dict[str, ManagedProcess] = {}
        #: Processes a reload removed or changed, until they have stopped.
        self.retiring: dict[str, ManagedProcess] = {}
        self.load_unload = LoadUnload(self)
        #: The environment that puts a consumer's process on its cards (gpumgr.cards).
        self.gpu_env: Callable[[str], Mapping[str, str]] = lambda name: {}

    def _gpu_env_of(self, name: str) -> Mapping[str, str]:
        return self.gpu_env(name)

    def consumer(self, name: str) -> ConsumerConfig:
        return self._config().consumers[name]

    # -- the set of processes ---------------------------------------------------

    def sync(self) -> None:
        """A process for every consumer that has a `process` block and none yet."""
        for name, c in self._config().consumers.items():
            if c.process is None or name in self.processes or name in self.retiring:
                continue
            self.processes[name] = self._process_factory(
                self._reactor, name, c.process, probe=lambda name=name: self._ready_probe(name),
                on_exit=lambda exit, name=name: self._exited(name, exit),
                port_check=lambda name=name: self._port_check(name))
            self.processes[name].gpu_env = functools.partial(self._gpu_env_of, name)
            self._registry.mark_unloaded(name)
            self._registry.set_health(name, Health.STOPPED)

    def apply(self, old: Config, new: Config) -> None:
        """A reload: retire the processes it removed or changed, create new ones."""
        for name, process in list(self.processes.items()):
            c = new.consumers.get(name)
            if c is None or c.process != old.consumers[name].process:
                del self.processes[name]
                # A changed process starts only once the old one has stopped: two
                # servers must never hold the same port and memory side by side.
                self._retire(name, process).addBoth(lambda _: self.sync())
        self.sync()

    def _retire(self, name: str, process: ManagedProcess) -> defer.Deferred[None]:
        """A managed process whose consumer is gone (or changed): stopped once
        no job of it holds the GPU. Fires once it has stopped."""
        self.retiring[name] = process
        stopped: defer.Deferred[None] = defer.Deferred()

        def attempt() -> None:
            if name in self._holders():
                self._reactor.callLater(1.0, attempt)
                return
            log.info("{name}: stopping its process (removed or changed by a reload)", name=name)

            def done(result: object) -> None:
                if isinstance(result, Failure):
                    log.warn("{name}: stopping failed: {why}", name=name,
                             why=describe_failure(result))
                if self.retiring.get(name) is process:
                    del self.retiring[name]
                stopped.callback(None)

            process.stop().addBoth(done)

        attempt()
        return stopped

    async def stop_retiring(self, name: str) -> None:
        """A job of `name` holds the GPU: a process a reload changed goes now
        (the new one starts after it)."""
        retiring = self.retiring.get(name)
        if retiring is None:
            return
        await retiring.stop()
        if self.retiring.get(name) is retiring:
            del self.retiring[name]
        self.sync()

    def stop_all(self) -> defer.Deferred[Any]:
        owned = list(self.processes.values()) + list(self.retiring.values())
        return defer.DeferredList([p.stop() for p in owned], consumeErrors=True)

    def stop_for_render(self, name: str) -> defer.Deferred[None] | None:
        """A render with no evidence that it stopped: its owned process goes."""
        process = self.processes.get(name)
        return None if process is None else process.stop()

    # -- what a process's state says ------------------------------------------------

    def is_stopped(self, name: str) -> bool:
        """An owned process that is not running (a consumer gpumgr does not own: False)."""
        process = self.processes.get(name)
        return process is not None and process.state is not ProcessState.RUNNING

    def process_health(self, name: str) -> Health | None:
        """A managed process that is not running: `starting` or `stopped`, and not
        probed. None: probe it (not managed, or running)."""
        process = self.processes.get(name)
        if process is None or process.state is ProcessState.RUNNING:
            return None
        return Health.STARTING if process.state is ProcessState.STARTING else Health.STOPPED

    def show_process_health(self, name: str) -> None:
        health = self.process_health(name)
        if health is not None and name in self._registry:
            self._registry.set_health(name, health)

    def health_refusal(self, c: ConsumerConfig) -> GpumgrError | None:
        """A request to a consumer whose last health check failed is refused;
        one whose owned process is stopped is not (it starts on demand)."""
        if c.name in self.processes and self.is_stopped(c.name):
            return None
        state = self._registry[c.name]
        if state.health is not Health.DOWN:
            return None
        why = f": {state.last_error}" if state.last_error else ""
        return ConsumerUnhealthy(f"{c.name} failed its last health check{why}", consumer=c.name,
                                 retry_after_s=self._config().health.interval_s)

    # -- a process's life ------------------------------------------------------------

    def _ready_probe(self, name: str) -> defer.Deferred[None]:
        """A managed process is up once its health route says OK (not STARTING)."""
        config = self._config()
        c = config.consumers[name]
        d = get_driver(c.driver).probe(self.http, c)
        d.addTimeout(config.health.timeout_s, self._reactor)

        def ready(health: Health) -> None:
            if health is not Health.OK:
                raise ControlFailed(f"{name} is {health.value}", consumer=name)

        return d.addCallback(ready)

    def _port_check(self, name: str) -> defer.Deferred[str | None]:
        """Before a spawn: does anything answer on the consumer URL's port?"""
        c = self._config().consumers[name]
        return port_answers(self._reactor, c.url, c.connect_timeout_s)

    def started(self, name: str) -> None:
        """Its readiness probe passed: it is up."""
        if name in self._registry:
            self._registry.record_probe(name, self._reactor.seconds(), Health.OK, None)

    def _exited(self, name: str, exit: ProcessExit) -> None:
        if name not in self._registry:
            return
        self._registry.mark_unloaded(name)
        self._registry.set_health(name, Health.STOPPED)
        if not exit.expected:
            kind = EventKind.PROCESS_START_FAILED if exit.during_start else EventKind.PROCESS_CRASH
            self._event(kind, name, detail=exit.description)

    def still_down(self, name: str, error: str | None) -> None:
        """Down for health.down_grace_s, and on one more probe: crashed or frozen.

        Its jobs would hold the GPU until request_timeout_s. A process gpumgr
        owns is stopped (TERM, then KILL): its exit is the evidence the GPU
        work stopped, and the next request starts it again. For any other
        consumer, being down is the evidence, and its jobs are aborted.
        """
        why = (f"{name} failed its health checks for "
               f"{self._config().health.down_grace_s:g}s (health.down_grace_s)"
               + (f": {error}" if error else ""))
        process = self.processes.get(name)
        if process is not None and process.state is ProcessState.RUNNING:
            log.warn("{why}; stopping its process (TERM, then KILL)", why=why)
            self._event(EventKind.PROCESS_UNRESPONSIVE, name, "consumer_down", detail=why)

            def stop_failed(f: Failure) -> None:
                log.error("{name}: stopping its unresponsive process failed: {e}; its jobs "
                          "keep the GPU", name=name, e=f.getErrorMessage())

            process.stop().addCallbacks(lambda _: self._abort_jobs(name, why), stop_failed)
            return
        self._abort_jobs(name, why)


class LoadUnload:
    """How a consumer is really loaded and unloaded: its owned process, or its
    driver (admission's `Control`)."""

    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet

    def load(self, name: str) -> defer.Deferred[None]:
        fleet = self._fleet
        c = fleet.consumer(name)
        process = fleet.processes.get(name)
        if process is not None:
            d = process.start()
            fleet.show_process_health(name)  # starting

            def done(result: object) -> object:
                if isinstance(result, Failure):
                    fleet.show_process_health(name)
                else:
                    fleet.started(name)
                return result

            return d.addBoth(done)
        return get_driver(c.driver).load(fleet.http, c)

    def unload(self, name: str) -> defer.Deferred[None]:
        fleet = self._fleet
        c = fleet.consumer(name)
        process = fleet.processes.get(name)
        if process is not None:
            return process.stop()
        return get_driver(c.driver).unload(fleet.http, c)

    def load_timeout_s(self, name: str) -> float:
        return load_deadline_s(self._fleet.consumer(name).process)
