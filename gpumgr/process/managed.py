"""ManagedProcess: one consumer's process, started on demand and stopped to free VRAM.

Starts are shared by every caller waiting for them, probed until healthy,
refused during a back-off after failed starts, and given up when every
caller withdraws; stops end the whole process group (`gpumgr.process.run`).
"""

from __future__ import annotations

import math
import os
from typing import Callable, Mapping

from twisted.internet import defer
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from gpumgr.config import ProcessConfig
from gpumgr.errors import ProcessStartFailed, ProcessStopFailed, describe_failure
from gpumgr.process.launcher import OS_PROCESS_GROUPS, ProcessGroups, launch, resolve_executable
from gpumgr.process.output import LOG_LINES_PER_S, ServiceOutput
from gpumgr.process.phases import ProcessState, RunEvent, StartPhase
from gpumgr.process.run import PIPE_DRAIN_S, ServiceProtocol, ServiceRun
from gpumgr.process.values import ProcessExit, ProcessStatus, describe_exit, start_backoff_s
from gpumgr.terminate import PROCESS_KILL_GRACE_S

log = Logger(namespace="gpumgr.process")

#: Health probes while a process starts; connection refused is normal then.
PROBE_INTERVAL_S = 0.25


class ManagedProcess:
    """One consumer's process: started on demand, probed until healthy, stopped to free VRAM.

    The public attributes are for reading (status, tests); only the methods
    change them.
    """

    def __init__(
        self,
        reactor: IReactorProcess,
        name: str,
        spec: ProcessConfig,
        probe: Callable[[], defer.Deferred[None]],
        on_exit: Callable[[ProcessExit], None] | None = None,
        *,
        clock: IReactorTime | None = None,
        kill_grace_s: float = PROCESS_KILL_GRACE_S,
        pipe_drain_s: float = PIPE_DRAIN_S,
        log_lines_per_s: int = LOG_LINES_PER_S,
        groups: ProcessGroups = OS_PROCESS_GROUPS,
        port_check: Callable[[], defer.Deferred[str | None]] | None = None,
    ) -> None:
        self._reactor = reactor
        self._clock: IReactorTime = clock if clock is not None else IReactorTime(reactor)
        self.name = name
        self.spec = spec
        self._probe = probe
        self._on_exit = on_exit
        self._kill_grace_s = kill_grace_s
        self._pipe_drain_s = pipe_drain_s
        self._groups = groups
        self._port_check = port_check
        #: The look at the service's port before a spawn (see `_begin`).
        self._checking: defer.Deferred[str | None] | None = None
        self.state = ProcessState.STOPPED
        self.pid: int | None = None
        self.started_at: float | None = None
        self.exit_code: int | None = None
        #: Spawns that followed a crash or a failed start.
        self.restarts = 0
        self._output = ServiceOutput(name, self._clock, log_lines_per_s)
        self._run: ServiceRun | None = None
        self._start_waiters: list[defer.Deferred[None]] = []
        #: start() while stopping: spawned after the stop, if a caller still waits.
        self._queued_starts: list[defer.Deferred[None]] = []
        self._stop_waiters: list[defer.Deferred[None]] = []
        self._consecutive_failures = 0
        self._last_failure_at: float | None = None
        self._last_start_error: str | None = None
        self._last_end_unexpected = False
        #: Variables that put it on its cards (gpumgr.cards.cuda_env), read at each spawn.
        self.gpu_env: Callable[[], Mapping[str, str]] = dict

    @property
    def last_stderr(self) -> tuple[str, ...]:
        return self._output.last_stderr

    # -- the public face --

    def start(self) -> defer.Deferred[None]:
        """Fires once the process answers its health probe; shares a start in progress.

        Cancelling it withdraws this caller only; a start that every caller
        has withdrawn is given up (before the spawn: nothing is spawned; after:
        the process is stopped), since nobody would record the process as
        loaded, and eviction would never stop it.
        """
        if self.state is ProcessState.RUNNING:
            return defer.succeed(None)
        if self.state is ProcessState.STOPPING:
            return self._wait(self._queued_starts)
        if self.state is ProcessState.STARTING:
            return self._wait(self._start_waiters)
        refusal = self._backoff_refusal()
        if refusal is not None:
            return defer.fail(refusal)
        waiter = self._wait(self._start_waiters)
        self._begin()
        return waiter

    def stop(self) -> defer.Deferred[None]:
        """TERM, KILL after stop_timeout_s, to its whole process group; fires
        once the process, and every process left in its group, has exited.

        A start in progress fails. Fails with ProcessStopFailed only if the
        process outlives KILL (a D-state process): then it is given up on.
        """
        run = self._run
        if run is None and self._checking is not None:
            self._abandon_check()
            self._fire(self._start_waiters, ProcessStartFailed(
                f"{self.name}: start cancelled: stop() was called while it was starting",
                consumer=self.name))
            return defer.succeed(None)
        if run is None or self.state in (ProcessState.STOPPED, ProcessState.FAILED):
            return defer.succeed(None)
        waiter = self._wait(self._stop_waiters)
        if self.state is ProcessState.STARTING:
            run.start_error = (
                f"{self.name}: start cancelled: stop() was called while it was starting")
            run.event(RunEvent.START_CANCELLED)
            self._abort_health_wait(run)
        if self.state is not ProcessState.STOPPING:
            self.state = ProcessState.STOPPING
            run.terminate()
        return waiter

    def when_stopped(self) -> defer.Deferred[None]:
        """Fires once a stop in progress has ended; at once when none is.

        For a caller that gave up on a start: the start is being stopped
        (`_withdraw`), and the GPU is not free until it has.
        """
        if self.state is ProcessState.STOPPING and self._run is not None:
            return self._wait(self._stop_waiters)
        return defer.succeed(None)

    def start_refusal(self) -> ProcessStartFailed | None:
        """Why a start asked for now would fail at once (the back-off after
        failed starts), or None: it can start."""
        return self._backoff_refusal()

    def status(self) -> ProcessStatus:
        return ProcessStatus(state=self.state, pid=self.pid, started_at=self.started_at,
                             exit_code=self.exit_code, restarts=self.restarts,
                             last_stderr=self._output.last_stderr)

    # -- starting --

    def _backoff_refusal(self) -> ProcessStartFailed | None:
        wait_s = start_backoff_s(self._consecutive_failures)
        if wait_s is None or self._last_failure_at is None:
            return None
        remaining_s = self._last_failure_at + wait_s - self._clock.seconds()
        if remaining_s <= 0:
            return None
        message = (
            f"{self._last_start_error}; {self._consecutive_failures} failed starts in a row, "
            f"next try in {math.ceil(remaining_s)}s"
        )
        return ProcessStartFailed(message, consumer=self.name, retry_after_s=remaining_s)

    def _begin(self) -> None:
        """Spawn, once nothing answers on the service's port.

        A server gpumgr did not start may already listen there: the real
        whisper-server sets SO_REUSEPORT, so a second one would bind beside it
        and share its requests (and the stranger's memory would outlive an
        eviction); any other listener makes ours exit "address in use" while
        the stranger answers our probes. Either way gpumgr spawns nothing.
        """
        if self._port_check is None:
            self._spawn()
            return
        self.state = ProcessState.STARTING
        d = self._checking = defer.maybeDeferred(self._port_check)
        d.addBoth(self._port_checked, d)

    def _port_checked(self, result: str | None | Failure,
                      d: defer.Deferred[str | None]) -> None:
        if self._checking is not d:
            return  # abandoned: by a stop, or by every caller
        self._checking = None
        if isinstance(result, Failure):
            self._start_failed_before_spawn(
                f"{self.name}: cannot start: checking its port failed: "
                f"{result.getErrorMessage() or type(result.value).__name__}")
        elif result is not None:
            # Not counted toward the start back-off: nothing was spawned, the
            # look is cheap, and the next start after the stranger left must
            # spawn at once rather than wait out a crash loop's back-off.
            self._start_failed_before_spawn(
                f"{self.name}: refusing to start: {result}, and gpumgr did not start it; "
                "stop that server or give this one another port", backoff=False)
        else:
            self._spawn()

    def _abandon_check(self) -> None:
        d, self._checking = self._checking, None
        self.state = ProcessState.STOPPED
        if d is not None:
            d.cancel()

    def _spawn(self) -> None:
        self._output.new_run()
        self.exit_code = None
        env = dict(os.environ)
        env.update(self.spec.env)
        env.update(self.gpu_env())
        cwd = self.spec.cwd
        command = self.spec.command
        if cwd is not None and not os.path.isdir(cwd):
            self._start_failed_before_spawn(
                f"{self.name}: cannot start: cwd {cwd!r} is not a directory")
            return
        executable = resolve_executable(command[0], cwd, env.get("PATH", os.defpath))
        if executable is None:
            self._start_failed_before_spawn(
                f"{self.name}: cannot start: {command[0]!r} not found or not executable")
            return
        run = ServiceRun(
            self.name, self._clock, self._groups, stop_timeout_s=self.spec.stop_timeout_s,
            kill_grace_s=self._kill_grace_s, pipe_drain_s=self._pipe_drain_s,
            finish=self._finish, is_current=lambda r: r is self._run)
        run.protocol = ServiceProtocol(self._output, run)
        self._run = run
        self.state = ProcessState.STARTING
        how = launch(executable, command, cwd, os.getpid())
        try:
            run.transport = self._reactor.spawnProcess(
                run.protocol, how.executable, list(how.args), env=env, path=how.path)
        except OSError as e:
            self._run = None
            self._start_failed_before_spawn(f"{self.name}: cannot start {command[0]!r}: {e}")
            return
        if self._last_end_unexpected:
            self.restarts += 1
        self.pid = run.pid = run.transport.pid
        if how.new_session:
            run.pgid = self.pid
        self.started_at = self._clock.seconds()
        log.info("{name}: started pid {pid}: {command}", name=self.name, pid=self.pid,
                 command=" ".join(command))
        run.healthy = defer.Deferred(lambda _: self._stop_probing(run))
        run.healthy.addTimeout(self.spec.start_timeout_s, self._clock)
        run.healthy.addCallbacks(lambda _: self._became_healthy(run),
                                 lambda f: self._never_healthy(run, f))
        self._poll(run)

    def _poll(self, run: ServiceRun) -> None:
        run.poll_timer = None
        if run.state.start is not StartPhase.PROBING:
            return
        run.probe = defer.maybeDeferred(self._probe)
        run.probe.addCallbacks(lambda _: self._probe_passed(run),
                               lambda f: self._probe_failed(run, f))

    def _probe_passed(self, run: ServiceRun) -> None:
        run.probe = None
        if run.state.existence.exited:
            return  # whoever answered, it was not our process: its exit ends the start
        if run.state.start is StartPhase.PROBING and run.healthy is not None:
            run.event(RunEvent.PROBING_STOPPED)
            run.healthy.callback(None)

    def _probe_failed(self, run: ServiceRun, failure: Failure) -> None:
        run.probe = None
        if run.state.start is StartPhase.PROBING:
            run.last_probe_error = describe_failure(failure)
            run.poll_timer = self._clock.callLater(PROBE_INTERVAL_S, self._poll, run)

    def _stop_probing(self, run: ServiceRun) -> None:
        run.event(RunEvent.PROBING_STOPPED)
        if run.poll_timer is not None and run.poll_timer.active():
            run.poll_timer.cancel()
        run.poll_timer = None
        if run.probe is not None:
            run.probe.cancel()

    def _abort_health_wait(self, run: ServiceRun) -> None:
        """The start ended some other way (exit, stop): no more probes, no verdict."""
        self._stop_probing(run)
        if run.healthy is not None and not run.healthy.called:
            run.healthy.cancel()

    def _became_healthy(self, run: ServiceRun) -> None:
        if run is not self._run or self.state is not ProcessState.STARTING:
            return
        self.state = ProcessState.RUNNING
        run.event(RunEvent.START_OVER)
        self._consecutive_failures = 0
        self._last_end_unexpected = False
        took_s = self._clock.seconds() - (self.started_at or 0)
        log.info("{name}: healthy after {took_s:.2f}s", name=self.name, took_s=took_s)
        self._fire(self._start_waiters, None)

    def _never_healthy(self, run: ServiceRun, failure: Failure) -> None:
        if not isinstance(failure.value, defer.TimeoutError) or run is not self._run:
            return None  # cancelled: whoever cancelled it says why
        detail = f" (last probe: {run.last_probe_error})" if run.last_probe_error else ""
        run.start_error = (
            f"{self.name} did not become healthy within {self.spec.start_timeout_s:g}s"
            f"{detail}; stopped it")
        log.warn("{message}", message=run.start_error)
        self.state = ProcessState.STOPPING
        run.terminate()
        return None

    def _start_failed_before_spawn(self, message: str, backoff: bool = True) -> None:
        log.warn("{message}", message=message)
        self.state = ProcessState.FAILED
        if backoff:
            self._count_failure(message)
        self._fire(self._start_waiters, ProcessStartFailed(message, consumer=self.name))

    def _count_failure(self, message: str) -> None:
        self._consecutive_failures += 1
        self._last_failure_at = self._clock.seconds()
        self._last_start_error = message
        self._last_end_unexpected = True

    # -- the end of a run --

    def _finish(self, run: ServiceRun, gave_up: bool) -> None:
        if run is not self._run:
            return
        self._run = None
        run.cancel_timers()
        self._abort_health_wait(run)
        self._output.end_run()
        code, sig = run.exit_code, run.exit_signal
        self.pid = None
        self.started_at = None
        self.exit_code = -sig if sig else code
        during_start, expected = run.state.start.pending, run.state.stop.requested
        cancelled = run.state.start is StartPhase.CANCELLED
        run.event(RunEvent.START_OVER)
        if gave_up:
            description = "did not exit after SIGKILL; gave up on it"
        else:
            description = describe_exit(code, sig)

        start_error: ProcessStartFailed | None = None
        if during_start:
            message = run.start_error or self._exit_during_start(description)
            if not cancelled:
                self._count_failure(message)
            if gave_up:
                message += "; it did not exit after SIGKILL"
            start_error = ProcessStartFailed(message, consumer=self.name)
        elif not expected:
            self._last_end_unexpected = True
            log.warn("{name} {description} unexpectedly; last stderr: {stderr}",
                     name=self.name, description=description, stderr=self.last_stderr[-5:])
        else:
            log.info("{name}: stopped ({description})", name=self.name, description=description)

        if gave_up:
            self.state = ProcessState.FAILED
        elif cancelled or (expected and not during_start):
            self.state = ProcessState.STOPPED
        else:
            self.state = ProcessState.FAILED

        # The owner hears of the exit before any waiter resumes, so they see it as gone.
        if self._on_exit is not None:
            event = ProcessExit(self.name, self.exit_code, expected, during_start, description,
                                self.last_stderr)
            try:
                self._on_exit(event)
            except Exception:
                log.failure("{name}: on_exit failed", name=self.name)
        if start_error is not None:
            self._fire(self._start_waiters, start_error)
        if gave_up:
            self._fire(self._stop_waiters, ProcessStopFailed(
                f"{self.name} did not exit after SIGKILL; gave up", consumer=self.name))
        else:
            self._fire(self._stop_waiters, None)
        self._start_queued()

    def _start_queued(self) -> None:
        """The starts asked for while it was stopping, by callers still waiting."""
        if not self._queued_starts or self.state is ProcessState.STOPPING:
            return  # nobody waits; or a stop waiter's callback stopped it again
        queued, self._queued_starts = self._queued_starts, []
        if self.state is ProcessState.RUNNING:
            self._fire(queued, None)
            return
        self._start_waiters.extend(queued)
        if self.state is ProcessState.STARTING:
            return  # a stop waiter's callback started it: share that start
        refusal = self._backoff_refusal()
        if refusal is not None:
            self._fire(self._start_waiters, refusal)
        else:
            self._begin()

    def _exit_during_start(self, description: str) -> str:
        last_line = self._output.last_stderr_line()
        message = f"{self.name} {description} during start" + (
            f": {last_line}" if last_line else " (nothing on stderr)")
        log.warn("{message}", message=message)
        return message

    # -- waiters --

    def _wait(self, waiters: list[defer.Deferred[None]]) -> defer.Deferred[None]:
        """A Deferred of one's own: cancelling it leaves the shared start or stop alone."""
        d: defer.Deferred[None] = defer.Deferred(self._withdraw)
        waiters.append(d)
        return d

    def _withdraw(self, d: defer.Deferred[None]) -> None:
        """A caller cancelled its wait; a start nobody waits for is not worth finishing."""
        for waiters in (self._start_waiters, self._queued_starts, self._stop_waiters):
            if d in waiters:
                waiters.remove(d)
        run = self._run
        if self.state is ProcessState.STARTING and self._checking is not None \
                and not self._start_waiters:
            log.info("{name}: every caller cancelled its start; nothing was spawned",
                     name=self.name)
            self._abandon_check()
            return
        if self.state is ProcessState.STARTING and run is not None and not self._start_waiters:
            log.info("{name}: every caller cancelled its start; stopping it", name=self.name)
            run.start_error = f"{self.name}: start cancelled by every caller"
            run.event(RunEvent.START_CANCELLED)
            self._abort_health_wait(run)
            self.state = ProcessState.STOPPING
            run.terminate()

    @staticmethod
    def _fire(waiters: list[defer.Deferred[None]], result: Exception | None) -> None:
        pending, waiters[:] = list(waiters), []
        for d in pending:
            if d.called:
                continue
            if isinstance(result, Exception):
                d.errback(result)
            else:
                d.callback(None)
