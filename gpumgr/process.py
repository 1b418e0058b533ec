"""Services whose process gpumgr owns: start, health-wait, stop, crash and back-off.

whisper.cpp's server has no unload route and loads its model before it binds
its port, so freeing its VRAM means stopping the process and getting it back
means starting it again (llama-swap's `cmd`/`cmdStop`). `ManagedProcess`
does that for one consumer with a `process` block.

A `process.command` is often a wrapper (``sh -c``, ``uv run``, ``conda run``)
whose child is the real server, and a wrapper may neither exec it nor pass
signals on. So on Linux the child is spawned through a tiny launcher that
starts a new session: the service and everything it forks share one process
group (its id is the pid gpumgr logs), and stopping signals that whole group,
then waits until no live process is left in it, not only the direct child.

The launcher also asks the kernel to send the direct child SIGTERM when
gpumgr dies (``PR_SET_PDEATHSIG``). What that covers when gpumgr is SIGKILLed
(or crashes; a clean shutdown stops every group):

- covered: a service that is the direct child, and a wrapper that execs its
  server (``sh -c "exec whisper-server ..."``) or passes SIGTERM on;
- not covered: the children of a wrapper that does neither (``sh -c "a; b"``,
  ``conda run``): the death signal is per process and fork clears it, so they
  outlive gpumgr. They are still in their own group, so
  ``kill -TERM -- -PID`` (PID from "started pid PID") ends them all;
- not covered either way: a process that starts its own session or group
  (a daemonizing server): gpumgr never sees it, as before.
"""

from __future__ import annotations

import collections
import enum
import math
import os
import shutil
import signal
import sys
from typing import Any, Callable, Mapping, Protocol, Sequence
from urllib.parse import urlsplit

import attrs
from twisted.internet import defer, error
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from gpumgr.config import ProcessConfig
from gpumgr.errors import ProcessStartFailed, ProcessStopFailed, describe_failure

log = Logger()

#: Health probes while a process starts; connection refused is normal then.
PROBE_INTERVAL_S = 0.25
#: Failed starts in a row before start() refuses at once.
BACKOFF_AFTER_FAILURES = 3
BACKOFF_FIRST_S = 30.0
BACKOFF_MAX_S = 600.0
#: After SIGKILL, how long to wait for the exit before giving up on the process.
KILL_GRACE_S = 5.0
#: Once the group is gone, how long a process outside it may hold our pipes.
PIPE_DRAIN_S = 1.0
#: How often to look whether a group outlives its leader; groups have no exit event.
GROUP_POLL_S = 0.1
LINE_MAX_CHARS = 2000
LOG_LINES_PER_S = 50
STDERR_KEPT_LINES = 20


class ProcessState(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    FAILED = "failed"


@attrs.frozen
class ProcessExit:
    """What `on_exit` hears: every exit, and whether gpumgr asked for it."""

    name: str
    #: The exit status; minus the signal number when a signal ended it.
    exit_code: int | None
    #: False for a crash, or an exit during start that nobody asked for.
    expected: bool
    #: True when the process never became healthy.
    during_start: bool
    description: str
    last_stderr: tuple[str, ...] = ()


def start_backoff_s(
    consecutive_failures: int,
    after: int = BACKOFF_AFTER_FAILURES,
    first_s: float = BACKOFF_FIRST_S,
    max_s: float = BACKOFF_MAX_S,
) -> float | None:
    """How long after the latest failed start a new start must wait; None: no wait.

    Nothing for the first `after - 1` failures, then `first_s`, doubling with
    each further failure, capped at `max_s`.
    """
    if consecutive_failures < after:
        return None
    doublings = min(consecutive_failures - after, 32)  # 2**32 * anything sane > max_s
    return min(max_s, first_s * 2.0**doublings)


def describe_exit(exit_code: int | None, signal_number: int | None) -> str:
    """'exited with status 1', 'was killed by signal 9 (SIGKILL)'."""
    if signal_number:
        try:
            sig_name = f" ({signal.Signals(signal_number).name})"
        except ValueError:
            sig_name = ""
        return f"was killed by signal {signal_number}{sig_name}"
    return f"exited with status {exit_code}"


# ``python -I -S -c _LAUNCHER <gpumgr pid> <cwd or ""> <executable> <argv...>``
_LAUNCHER = """\
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
except Exception:
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)  # gpumgr died before the death signal was armed
try:
    os.setsid()  # its own process group, which gpumgr stops as a whole
except OSError as e:
    sys.stderr.write("cannot start a new session: %s\\n" % e.strerror)
    sys.exit(127)
for s in range(1, signal.NSIG):  # Python ignores SIGPIPE and SIGXFSZ; the service should not
    try:
        if signal.getsignal(s) == signal.SIG_IGN:
            signal.signal(s, signal.SIG_DFL)
    except (OSError, ValueError):
        pass
try:
    if sys.argv[2]:
        os.chdir(sys.argv[2])
except OSError as e:
    sys.stderr.write("cannot change directory to %s: %s\\n" % (sys.argv[2], e.strerror))
    sys.exit(127)
try:
    os.execv(sys.argv[3], sys.argv[4:])
except OSError as e:
    sys.stderr.write("cannot run %s: %s\\n" % (sys.argv[3], e.strerror))
    sys.exit(127)
"""


@attrs.frozen
class Launch:
    """What to hand to spawnProcess."""

    executable: str
    args: tuple[str, ...]
    #: spawnProcess's `path`; set only without the launcher.
    path: str | None
    #: The child leads a new session and process group, whose id is its pid.
    new_session: bool = False


def launch(executable: str, argv: Sequence[str], cwd: str | None, parent_pid: int) -> Launch:
    """Through the launcher (new session, death signal) on Linux, else as is.

    The launcher also changes directory itself, so spawnProcess never needs
    `path=`: with it Twisted forks and runs Python in the child before exec,
    and a SIGTERM sent in that window is lost to the parent's copied handlers.
    Without `path=` Twisted uses posix_spawn, which has no such window.
    """
    if not sys.platform.startswith("linux"):
        return Launch(executable, tuple(argv), cwd)
    python = sys.executable
    args = (python, "-I", "-S", "-c", _LAUNCHER, str(parent_pid), cwd or "", executable, *argv)
    return Launch(python, args, None, new_session=True)


def resolve_executable(command: str, cwd: str | None, path: str | None) -> str | None:
    """The file that would run, or None: a clean error beats a fork-path exit 1."""
    if os.sep in command:
        candidate = command if os.path.isabs(command) else os.path.join(cwd or os.getcwd(), command)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return os.path.abspath(candidate)
        return None
    return shutil.which(command, path=path)


def port_answers(reactor: Any, url: str, timeout_s: float) -> defer.Deferred[str | None]:
    """'something answers on HOST:PORT' if a TCP connection to the URL's host
    and port is accepted, else None (refused, or no answer within timeout_s).

    Accepting a connection is enough: a frozen server's port still accepts
    (the kernel's backlog) though nothing reads the request.
    """
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    endpoint = HostnameEndpoint(reactor, host, port, timeout=timeout_s)

    def connected(protocol: TwistedProtocol) -> str:
        assert protocol.transport is not None
        protocol.transport.loseConnection()
        return f"something already answers on {where} (its url's port)"

    def refused(failure: Failure) -> None:
        failure.trap(error.ConnectError)
        return None

    return connectProtocol(endpoint, TwistedProtocol()).addCallbacks(connected, refused)


def spawn_problems(spec: ProcessConfig, environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """(key under `process`, problem) for a command or cwd that cannot run here.

    What `_spawn` would find at the first start, found by check-config
    instead: a bare name is looked up on the PATH the process would get.
    """
    problems = []
    cwd = spec.cwd
    if cwd is not None and not os.path.isdir(cwd):
        problems.append(("cwd", f"{cwd!r} does not exist or is not a directory"))
        if os.sep in spec.command[0] and not os.path.isabs(spec.command[0]):
            return problems  # relative to a cwd that is not there
    path = spec.env.get("PATH", environ.get("PATH", os.defpath))
    if resolve_executable(spec.command[0], cwd, path) is None:
        where = "" if os.sep in spec.command[0] else " on PATH"
        problems.append(("command[0]", f"{spec.command[0]!r} not found{where} or not executable"))
    return problems


class ProcessGroups(Protocol):
    """The kernel's process groups, as far as stopping a service needs them."""

    def signal(self, pgid: int, sig: int) -> None:
        """killpg(2): ProcessLookupError if no process is in the group."""

    def has_live_members(self, pgid: int) -> bool:
        """Whether a process that is not a zombie is still in the group."""


class _OsProcessGroups:
    def signal(self, pgid: int, sig: int) -> None:
        os.killpg(pgid, sig)

    def has_live_members(self, pgid: int) -> bool:
        # Where gpumgr is PID 1 (a container) or a subreaper, the group's
        # orphans are its children, and nobody else would reap them.
        try:
            while os.waitpid(-pgid, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # someone is there
        # killpg counts zombies, and an orphan whose reaper (PID 1 in a
        # container) never reaps stays one forever: it holds no memory.
        try:
            entries = os.listdir("/proc")
        except OSError:
            return True
        wanted = str(pgid).encode()
        for entry in entries:
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except (OSError, IndexError):
                continue
            # fields: state, ppid, pgrp, ...
            if len(fields) > 2 and fields[2] == wanted and fields[0] not in (b"Z", b"X"):
                return True
        return False


OS_PROCESS_GROUPS: ProcessGroups = _OsProcessGroups()


@attrs.define
class LogBudget:
    """At most `per_s` lines a second; the rest are counted, then reported."""

    per_s: int
    _window_start: float = -math.inf
    _used: int = 0
    _suppressed: int = 0

    def admit(self, now: float) -> tuple[bool, int]:
        """(log this line?, lines suppressed so far that should be reported first)."""
        report = 0
        if now - self._window_start >= 1.0:
            self._window_start, self._used = now, 0
            report, self._suppressed = self._suppressed, 0
        if self._used < self.per_s:
            self._used += 1
            return True, report
        self._suppressed += 1
        return False, report

    def drain(self) -> int:
        """Suppressed lines not yet reported (at the end of the output)."""
        count, self._suppressed = self._suppressed, 0
        return count


class _LineSplitter:
    """Bytes in, whole lines out; a line that never ends is cut, so memory stays bounded."""

    def __init__(self, emit: Callable[[str], None], max_chars: int = LINE_MAX_CHARS) -> None:
        self._emit = emit
        self._max_chars = max_chars
        self._max_bytes = 4 * max_chars
        self._buffer = b""
        self._discarding = False  # the rest of an over-long line

    def feed(self, data: bytes) -> None:
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            if self._discarding:
                self._discarding = False
            else:
                self._line(line)
        if len(self._buffer) > self._max_bytes:
            if not self._discarding:
                self._line(self._buffer)
            self._discarding = True
            self._buffer = b""

    def flush(self) -> None:
        if self._buffer and not self._discarding:
            self._line(self._buffer)
        self._buffer, self._discarding = b"", False

    def _line(self, raw: bytes) -> None:
        text = raw.rstrip(b"\r").decode("utf-8", "replace")
        if len(text) > self._max_chars:
            text = text[: self._max_chars] + f" [cut {len(text) - self._max_chars} chars]"
        self._emit(text)


class _Run:
    """One spawned process: its timers, its protocol, what has happened to it."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.protocol: _ServiceProtocol | None = None
        #: Its process group, when the launcher made it lead one.
        self.pgid: int | None = None
        #: Fires when a probe passes; its deadline is the start timeout.
        self.healthy: defer.Deferred[None] | None = None
        self.probing = True
        self.probe: defer.Deferred[None] | None = None
        self.poll_timer: IDelayedCall | None = None
        #: Stop and pipe-drain timers.
        self.timers: list[IDelayedCall] = []
        self.group_timer: IDelayedCall | None = None
        #: The direct child has exited (and been reaped).
        self.exited = False
        #: processEnded: the exit, and our pipes closed; with its status.
        self.ended = False
        self.exit_code: int | None = None
        self.exit_signal: int | None = None
        #: Live processes are left in its group after the direct child exited.
        self.group_alive = False
        self.term_sent = False
        #: SIGTERM reached the group, not only the direct child.
        self.group_termed = False
        self.stop_requested = False
        self.start_pending = True
        #: Set when gpumgr ended the start (timeout, stop): the start's error.
        self.start_error: str | None = None
        #: A stop, or every caller giving up, ended the start: no failed start.
        self.start_cancelled = False
        self.last_probe_error: str | None = None

    def cancel_timers(self) -> None:
        for timer in [*self.timers, self.group_timer]:
            if timer is not None and timer.active():
                timer.cancel()
        self.timers = []
        self.group_timer = None


class _ServiceProtocol(ProcessProtocol):
    def __init__(self, owner: ManagedProcess, run: _Run) -> None:
        self._owner = owner
        self._run: _Run | None = run

    def detach(self) -> None:
        """After gpumgr gave up on the process, its late events mean nothing."""
        self._run = None

    def outReceived(self, data: bytes) -> None:
        if self._run is not None:
            self._owner._stdout.feed(data)

    def errReceived(self, data: bytes) -> None:
        if self._run is not None:
            self._owner._stderr.feed(data)

    def processExited(self, reason: Failure) -> None:
        if self._run is not None:
            self._owner._exited(self._run)

    def processEnded(self, reason: Failure) -> None:
        if self._run is not None:
            run, self._run = self._run, None
            code = getattr(reason.value, "exitCode", None)
            sig = getattr(reason.value, "signal", None)
            self._owner._ended(run, code, sig)


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
        kill_grace_s: float = KILL_GRACE_S,
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
        self._stderr_lines: collections.deque[str] = collections.deque(maxlen=STDERR_KEPT_LINES)
        self._budget = LogBudget(log_lines_per_s)
        self._stdout = _LineSplitter(lambda line: self._output("stdout", line))
        self._stderr = _LineSplitter(lambda line: self._output("stderr", line))
        self._run: _Run | None = None
        self._start_waiters: list[defer.Deferred[None]] = []
        #: start() while stopping: spawned after the stop, if a caller still waits.
        self._queued_starts: list[defer.Deferred[None]] = []
        self._stop_waiters: list[defer.Deferred[None]] = []
        self._consecutive_failures = 0
        self._last_failure_at: float | None = None
        self._last_start_error: str | None = None
        self._last_end_unexpected = False

    @property
    def last_stderr(self) -> tuple[str, ...]:
        return tuple(self._stderr_lines)

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
            run.start_cancelled = True
            self._abort_health_wait(run)
        if self.state is not ProcessState.STOPPING:
            self.state = ProcessState.STOPPING
            self._terminate(run)
        return waiter

    def when_stopped(self) -> defer.Deferred[None]:
        """Fires once a stop in progress has ended; at once when none is.

        For a caller that gave up on a start: the start is being stopped
        (`_withdraw`), and the GPU is not free until it has.
        """
        if self.state is ProcessState.STOPPING and self._run is not None:
            return self._wait(self._stop_waiters)
        return defer.succeed(None)

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "pid": self.pid,
            "started_at": self.started_at,
            "exit_code": self.exit_code,
            "restarts": self.restarts,
            "last_stderr": list(self._stderr_lines),
        }

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
            # Not counted toward the start backoff: nothing was spawned, the
            # look is cheap, and the next start after the stranger left must
            # spawn at once rather than wait out a crash loop's backoff.
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
        self._stderr_lines.clear()
        self.exit_code = None
        env = dict(os.environ)
        env.update(self.spec.env)
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
        run = _Run()
        run.protocol = _ServiceProtocol(self, run)
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
        self.pid = run.transport.pid
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

    def _poll(self, run: _Run) -> None:
        run.poll_timer = None
        if not run.probing:
            return
        run.probe = defer.maybeDeferred(self._probe)
        run.probe.addCallbacks(lambda _: self._probe_passed(run),
                               lambda f: self._probe_failed(run, f))

    def _probe_passed(self, run: _Run) -> None:
        run.probe = None
        if run.exited:
            return  # whoever answered, it was not our process: its exit ends the start
        if run.probing and run.healthy is not None:
            run.probing = False
            run.healthy.callback(None)

    def _probe_failed(self, run: _Run, failure: Failure) -> None:
        run.probe = None
        if run.probing:
            run.last_probe_error = describe_failure(failure)
            run.poll_timer = self._clock.callLater(PROBE_INTERVAL_S, self._poll, run)

    def _stop_probing(self, run: _Run) -> None:
        run.probing = False
        if run.poll_timer is not None and run.poll_timer.active():
            run.poll_timer.cancel()
        run.poll_timer = None
        if run.probe is not None:
            run.probe.cancel()

    def _abort_health_wait(self, run: _Run) -> None:
        """The start ended some other way (exit, stop): no more probes, no verdict."""
        self._stop_probing(run)
        if run.healthy is not None and not run.healthy.called:
            run.healthy.cancel()

    def _became_healthy(self, run: _Run) -> None:
        if run is not self._run or self.state is not ProcessState.STARTING:
            return
        self.state = ProcessState.RUNNING
        run.start_pending = False
        self._consecutive_failures = 0
        self._last_end_unexpected = False
        took_s = self._clock.seconds() - (self.started_at or 0)
        log.info("{name}: healthy after {took_s:.2f}s", name=self.name, took_s=took_s)
        self._fire(self._start_waiters, None)

    def _never_healthy(self, run: _Run, failure: Failure) -> None:
        if not isinstance(failure.value, defer.TimeoutError) or run is not self._run:
            return None  # cancelled: whoever cancelled it says why
        detail = f" (last probe: {run.last_probe_error})" if run.last_probe_error else ""
        run.start_error = (
            f"{self.name} did not become healthy within {self.spec.start_timeout_s:g}s"
            f"{detail}; stopped it")
        log.warn("{message}", message=run.start_error)
        self.state = ProcessState.STOPPING
        self._terminate(run)
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

    # -- stopping --

    def _signal(self, run: _Run, sig: str) -> bool:
        """To its whole process group; True if the group got it.

        Until the launcher has called setsid() there is no group yet, and
        only the direct child (still the launcher) can be signalled.
        """
        if run.pgid is not None:
            try:
                self._groups.signal(run.pgid, getattr(signal, "SIG" + sig))
                return True
            except ProcessLookupError:
                pass
            except PermissionError:
                log.warn("{name}: may not signal process group {pgid}",
                         name=self.name, pgid=run.pgid)
                return False
        if not run.exited:
            try:
                run.transport.signalProcess(sig)
            except error.ProcessExitedAlready:
                pass
        return False

    def _terminate(self, run: _Run) -> None:
        run.stop_requested = True
        self._send_term(run)

    def _send_term(self, run: _Run) -> None:
        """SIGTERM once, and SIGKILL for whatever is left stop_timeout_s later."""
        if run.term_sent or (run.exited and not run.group_alive):
            return  # on its way; or only the pipes are left, and the drain timer closes them
        run.term_sent = True
        run.group_termed = self._signal(run, "TERM")
        run.timers.append(self._clock.callLater(self.spec.stop_timeout_s, self._kill, run))

    def _kill(self, run: _Run) -> None:
        if not run.exited:
            log.warn("{name}: no exit {t:g}s after SIGTERM; sending SIGKILL",
                     name=self.name, t=self.spec.stop_timeout_s)
        elif self._group_has_live_members(run):
            log.warn("{name}: its process group {pgid} outlived SIGTERM by {t:g}s; "
                     "sending SIGKILL", name=self.name, pgid=run.pgid,
                     t=self.spec.stop_timeout_s)
        else:
            return
        self._signal(run, "KILL")
        run.timers.append(self._clock.callLater(self._kill_grace_s, self._give_up, run))

    def _give_up(self, run: _Run) -> None:
        """A process that outlives KILL (D-state): forget it rather than hang."""
        if run is not self._run:
            return
        if run.exited and not self._group_has_live_members(run):
            return  # only the pipes are left: the group watch and the drain timer end it
        if run.exited:
            log.error("{name}: processes in its group {pgid} did not exit after SIGKILL; "
                      "gave up on them", name=self.name, pgid=run.pgid)
        else:
            log.error("{name}: pid {pid} did not exit after SIGKILL; gave up on it",
                      name=self.name, pid=self.pid)
        if run.protocol is not None:
            run.protocol.detach()
        if not run.ended:
            run.transport.loseConnection()
        self._finish(run, gave_up=True)

    # -- exits --

    def _exited(self, run: _Run) -> None:
        """The direct child is gone; the rest of its group may not be."""
        run.exited = True
        if not self._group_has_live_members(run):
            self._group_gone(run)
            return
        run.group_alive = True
        if not run.group_termed:
            if not run.stop_requested:
                log.warn("{name}: pid {pid} exited, but processes are left in its group "
                         "{pgid}; stopping them", name=self.name, pid=self.pid, pgid=run.pgid)
            if run.term_sent:  # it reached the direct child only
                run.group_termed = self._signal(run, "TERM")
            else:
                self._send_term(run)
        run.group_timer = self._clock.callLater(GROUP_POLL_S, self._watch_group, run)

    def _watch_group(self, run: _Run) -> None:
        run.group_timer = None
        if run is not self._run or not run.group_alive:
            return
        if self._group_has_live_members(run):
            run.group_timer = self._clock.callLater(GROUP_POLL_S, self._watch_group, run)
        else:
            self._group_gone(run)

    def _group_has_live_members(self, run: _Run) -> bool:
        return run.pgid is not None and self._groups.has_live_members(run.pgid)

    def _group_gone(self, run: _Run) -> None:
        """Nothing of it runs any more, but a process outside the group may hold our pipes."""
        run.group_alive = False
        if run.ended:
            self._finish(run)
        else:
            run.timers.append(self._clock.callLater(self._pipe_drain_s,
                                                    run.transport.loseConnection))

    def _ended(self, run: _Run, code: int | None, sig: int | None) -> None:
        """processEnded: the direct child is gone and our pipes are closed."""
        run.ended = True
        run.exit_code, run.exit_signal = code, sig
        if not run.exited:
            self._exited(run)  # Twisted always says so first; fakes need not
        elif not run.group_alive:
            self._finish(run)

    def _finish(self, run: _Run, gave_up: bool = False) -> None:
        if run is not self._run:
            return
        self._run = None
        run.cancel_timers()
        self._abort_health_wait(run)
        self._stdout.flush()
        self._stderr.flush()
        self._report_suppressed(self._budget.drain())
        code, sig = run.exit_code, run.exit_signal
        self.pid = None
        self.started_at = None
        self.exit_code = -sig if sig else code
        during_start, expected = run.start_pending, run.stop_requested
        run.start_pending = False
        if gave_up:
            description = "did not exit after SIGKILL; gave up on it"
        else:
            description = describe_exit(code, sig)

        start_error: ProcessStartFailed | None = None
        if during_start:
            message = run.start_error or self._exit_during_start(description)
            if not run.start_cancelled:
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
        elif run.start_cancelled or (expected and not during_start):
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
        # whisper-server ends "couldn't bind to server socket: ..." with a blank line.
        last_line = next((line for line in reversed(self._stderr_lines) if line.strip()), None)
        message = f"{self.name} {description} during start" + (
            f": {last_line}" if last_line else " (nothing on stderr)")
        log.warn("{message}", message=message)
        return message

    # -- output --

    def _output(self, stream: str, line: str) -> None:
        if stream == "stderr":
            self._stderr_lines.append(line)
        admitted, suppressed = self._budget.admit(self._clock.seconds())
        self._report_suppressed(suppressed)
        if admitted:
            log.info("{name} {stream}: {line}", name=self.name, stream=stream, line=line)

    def _report_suppressed(self, count: int) -> None:
        if count:
            log.info("{name}: suppressed {count} lines of output", name=self.name, count=count)

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
            run.start_cancelled = True
            self._abort_health_wait(run)
            self.state = ProcessState.STOPPING
            self._terminate(run)

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
