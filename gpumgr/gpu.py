"""nvidia-smi: a subprocess runner with a hard timeout, and the sampler.

Its output is parsed into `GpuSample` values by gpumgr.gpu_sample (pure);
those names are re-exported here.
"""

from __future__ import annotations

import functools
import os
import shlex
import shutil
from typing import TYPE_CHECKING, Any, Callable, Generator, NoReturn, Sequence

from twisted.internet import defer, error
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from gpumgr.errors import describe_failure
from gpumgr.gpu_sample import (
    APPS_QUERY,
    CSV_FORMAT,
    GPU_QUERY,
    MAX_GPU_MIB,
    NOT_SAMPLED,
    GpuInfo,
    GpuParseError,
    GpuProcess,
    GpuSample,
    memory_problem,
    parse_apps_csv,
    parse_gpu_csv,
)
from gpumgr.terminate import TermThenKill

if TYPE_CHECKING:
    from gpumgr.gpu_stream import GpuStream

__all__ = [
    "APPS_QUERY",
    "CSV_FORMAT",
    "GPU_QUERY",
    "MAX_GPU_MIB",
    "NOT_SAMPLED",
    "GpuCommandError",
    "GpuInfo",
    "GpuParseError",
    "GpuProcess",
    "GpuSample",
    "GpuSampler",
    "memory_problem",
    "nvidia_smi_argv",
    "parse_apps_csv",
    "parse_gpu_csv",
    "run_command",
]

_OUTPUT_LIMIT_BYTES = 1024 * 1024
_KILL_GRACE_S = 1.0

log = Logger()


class GpuCommandError(Exception):
    pass


class _CaptureProtocol(ProcessProtocol):
    """Collects stdout (bounded) and enforces a TERM-then-KILL deadline.

    `done` fires exactly once, whatever the child does: a child that exits
    while a grandchild holds its stdout open, or one that ignores KILL (a
    D-state process), is given up on and its pipes are closed, so a hung
    nvidia-smi can never hold up a sample (or the GPU lock waiting on it).
    """

    def __init__(
        self, clock: IReactorTime, timeout_s: float, label: str, kill_grace_s: float = _KILL_GRACE_S
    ) -> None:
        self.done: defer.Deferred[bytes] = defer.Deferred(lambda _: self._abandon())
        self._clock = clock
        self._timeout_s = timeout_s
        self._kill_grace_s = kill_grace_s
        self._label = label
        self._out: list[bytes] = []
        self._err: list[bytes] = []
        self._size = 0
        self._timer: IDelayedCall | None = None
        self._drain_timer: IDelayedCall | None = None
        self._ending = TermThenKill(
            clock, kill_after_s=kill_grace_s, give_up_after_s=kill_grace_s,
            send_term=lambda: self._signal("TERM"), send_kill=self._kill, give_up=self._give_up)
        self._timed_out = False
        self._exited = False

    def connectionMade(self) -> None:
        self._timer = self._clock.callLater(self._timeout_s, self._expire)

    def outReceived(self, data: bytes) -> None:
        self._size += len(data)
        if self._size <= _OUTPUT_LIMIT_BYTES:
            self._out.append(data)

    def errReceived(self, data: bytes) -> None:
        if sum(map(len, self._err)) < 4096:
            self._err.append(data)

    def _signal(self, sig: str) -> None:
        try:
            self.transport.signalProcess(sig)  # type: ignore[union-attr]
        except error.ProcessExitedAlready:
            pass

    def _expire(self) -> None:
        self._timer = None
        self._timed_out = True
        self._ending.start()

    def _kill(self) -> bool:
        self._signal("KILL")
        return True

    def _give_up(self) -> None:
        if self._exited:
            why = "it exited, but a child of it kept its output open"
        else:
            why = "it did not exit after KILL; gave up"
        self._finish(GpuCommandError(f"{self._label} timed out after {self._timeout_s:g}s: {why}"))
        self._close_pipes()

    def processExited(self, reason: Failure) -> None:
        # processEnded waits for the pipes too; a grandchild may hold them open.
        self._exited = True
        if self.done.called:
            return
        self._drain_timer = self._clock.callLater(self._kill_grace_s, self._close_pipes)

    def _close_pipes(self) -> None:
        self._drain_timer = None
        if self.transport is not None:
            self.transport.loseConnection()

    def _abandon(self) -> None:
        """The caller gave up waiting (cancelled `done`): kill and forget the child."""
        self._signal("KILL")
        self._cancel_timers()
        self._close_pipes()

    def _cancel_timers(self) -> None:
        for timer in (self._timer, self._drain_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._drain_timer = None
        self._ending.cancel()

    def _finish(self, result: bytes | Exception) -> None:
        self._cancel_timers()
        if self.done.called:  # given up, or cancelled, already: a late end changes nothing
            return
        if isinstance(result, Exception):
            self.done.errback(result)
        else:
            self.done.callback(result)

    def processEnded(self, reason: Failure) -> None:
        if self._timed_out:
            msg = f"{self._label} timed out after {self._timeout_s:g}s"
            self._finish(GpuCommandError(msg))
        elif self._size > _OUTPUT_LIMIT_BYTES:
            self._finish(GpuCommandError(f"{self._label} printed over 1 MiB"))
        elif isinstance(reason.value, error.ProcessDone):
            self._finish(b"".join(self._out))
        else:
            stderr = b"".join(self._err).decode("utf-8", "replace").strip()
            stdout = b"".join(self._out).decode("utf-8", "replace").strip()
            code = getattr(reason.value, "exitCode", None)
            detail = (stderr or stdout)[:300]
            msg = f"{self._label} exited with status {code}" + (f": {detail}" if detail else "")
            self._finish(GpuCommandError(msg))


def run_command(
    reactor: IReactorProcess,
    argv: Sequence[str],
    timeout_s: float,
    env: dict[str, str] | None = None,
    kill_grace_s: float = _KILL_GRACE_S,
) -> defer.Deferred[bytes]:
    """Run argv, returning stdout; fails with GpuCommandError on any trouble.

    It always fires: by ``timeout_s + 2 * kill_grace_s`` at the latest.
    Cancelling it kills the child.
    """
    label = os.path.basename(argv[0])
    executable = shutil.which(argv[0])
    if executable is None:
        return defer.fail(GpuCommandError(f"{argv[0]} not found"))
    proto = _CaptureProtocol(IReactorTime(reactor), timeout_s, label, kill_grace_s)
    try:
        IReactorProcess(reactor).spawnProcess(
            proto,
            executable,
            list(argv),
            env=dict(os.environ) if env is None else env,
        )
    except OSError as e:
        return defer.fail(GpuCommandError(f"cannot run {argv[0]}: {e}"))
    return proto.done


def nvidia_smi_argv(command: str) -> list[str]:
    """The configured command may carry arguments (the simulator does)."""
    return shlex.split(command)


class GpuSampler:
    """Samples nvidia-smi periodically; `latest` always holds the newest reading."""

    def __init__(
        self,
        reactor: Any,
        command: str,
        interval_s: float,
        timeout_s: float,
        run: Callable[..., defer.Deferred[bytes]] | None = None,
        kill_grace_s: float = _KILL_GRACE_S,
    ) -> None:
        self._reactor = reactor
        self._argv = nvidia_smi_argv(command)
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._run = run or functools.partial(run_command, kill_grace_s=kill_grace_s)
        #: Samples come from the nvidia-smi command (not an injected runner):
        #: it can also be streamed (gpumgr.gpu_stream).
        self.runs_nvidia_smi = run is None
        #: A backstop past run_command's own give-up point, so that a sample
        #: always fires even if a runner never does.
        self.sample_deadline_s = timeout_s + 3 * kill_grace_s
        self.latest: GpuSample = NOT_SAMPLED
        self._loop: LoopingCall | None = None
        self._last_logged_error: str | None = None
        self.samples_taken = 0
        self.samples_failed = 0
        #: Wall time spent waiting for nvidia-smi, over all samples.
        self.sampling_s_total = 0.0
        #: Called with every new sample (the registry measures residency).
        self.listeners: list[Callable[[GpuSample], None]] = []
        self._waiting: list[defer.Deferred[GpuSample]] = []
        #: The long-lived nvidia-smi stream, where one runs (gpumgr.gpu_stream).
        self.stream: GpuStream | None = None

    def start(self) -> None:
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self._reactor
        self._loop.start(self._interval_s, now=True)

    def configure(self, command: str, interval_s: float, timeout_s: float) -> None:
        """New settings from a reload; the loop keeps its rhythm unless the
        interval changed."""
        self._argv = nvidia_smi_argv(command)
        self.sample_deadline_s += timeout_s - self._timeout_s
        self._timeout_s = timeout_s
        if interval_s != self._interval_s:
            self._interval_s = interval_s
            if self._loop is not None and self._loop.running:
                self._loop.stop()
                self.start()

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def _tick(self) -> defer.Deferred[None]:
        # sample_now never fails; the loop would die silently if it did.
        return self.sample_now().addCallback(lambda _: None)

    @defer.inlineCallbacks
    def sample_now(self) -> Generator[defer.Deferred[Any], Any, GpuSample]:
        """Take a reading now and make it `latest`. Never fails."""
        self.samples_taken += 1
        began = self._reactor.seconds()
        try:
            both = defer.gatherResults(
                [
                    self._run(self._reactor, self._argv + [GPU_QUERY, CSV_FORMAT], self._timeout_s),
                    self._run(self._reactor, self._argv + [APPS_QUERY, CSV_FORMAT], self._timeout_s),
                ],
                consumeErrors=True,
            )
            gpu_out, apps_out = yield both.addTimeout(
                self.sample_deadline_s, self._reactor, onTimeoutCancel=_no_answer
            )
            sample = GpuSample(
                sampled_at=self._reactor.seconds(),
                gpus=parse_gpu_csv(gpu_out.decode("utf-8", "replace")),
                processes=parse_apps_csv(apps_out.decode("utf-8", "replace")),
            )
        except defer.FirstError as e:
            sample = self._failed(describe_failure(e))
        except GpuCommandError as e:
            sample = self._failed(str(e))
        except GpuParseError as e:
            sample = self._failed(f"unreadable nvidia-smi output: {e}")
        except Exception as e:  # never let the loop die
            sample = self._failed(f"{type(e).__name__}: {e}")
        else:
            if self._last_logged_error is not None:
                log.info("GPU sampling recovered")
                self._last_logged_error = None
        self.sampling_s_total += self._reactor.seconds() - began
        self.publish(sample)
        return sample

    def publish(self, sample: GpuSample) -> None:
        """A new reading (a periodic one, or the stream's): `latest`, and every listener."""
        self.latest = sample
        waiting, self._waiting = self._waiting, []
        for listener in self.listeners:
            try:
                listener(sample)
            except Exception:
                log.failure("a GPU sample listener failed")
        for d in waiting:
            d.callback(sample)

    def fresh_sample(self) -> defer.Deferred[GpuSample]:
        """A reading taken from now on: the stream's next (within a loop period)
        while it runs, else one taken now. Never fails."""
        stream = self.stream
        if stream is None or not stream.running:
            # The stream's demand starts it while the GPU is held (a load or an
            # unload included): starting it here, it outlived a stopped service.
            return self.sample_now()
        d: defer.Deferred[GpuSample] = defer.Deferred(lambda d: self._waiting.remove(d))
        self._waiting.append(d)
        d.addTimeout(2 * stream.period_s + 1.0, self._reactor)
        return d.addErrback(lambda _: self.sample_now())

    def _failed(self, message: str) -> GpuSample:
        self.samples_failed += 1
        if message != self._last_logged_error:
            log.warn("GPU sampling failed: {message}", message=message)
            self._last_logged_error = message
        return GpuSample(sampled_at=self._reactor.seconds(), error=message)


def _no_answer(result: object, timeout_s: float) -> NoReturn:
    """Whatever cancelling left behind (a FirstError of CancelledErrors), say why plainly."""
    raise GpuCommandError(f"nvidia-smi gave no answer within {timeout_s:g}s")
