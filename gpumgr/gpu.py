"""nvidia-smi: pure CSV parsing, a subprocess runner with a hard timeout, and a sampler.

NVIDIA does not promise stable output across drivers, so the parser is
tolerant: bracketed values (``[N/A]``, ``[Not Supported]``) are unknown, stray
units are stripped, and names may contain commas.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import shutil
from typing import Any, Callable, Generator, NoReturn, Sequence

import attrs
from twisted.internet import defer, error
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from gpumgr.errors import describe_failure
from gpumgr.terminate import TermThenKill

GPU_QUERY = (
    "--query-gpu=index,name,memory.total,memory.used,memory.free,"
    "utilization.gpu,temperature.gpu"
)
APPS_QUERY = "--query-compute-apps=pid,process_name,used_memory"
CSV_FORMAT = "--format=csv,noheader,nounits"
_OUTPUT_LIMIT_BYTES = 1024 * 1024
_KILL_GRACE_S = 1.0

log = Logger()


class GpuParseError(ValueError):
    pass


class GpuCommandError(Exception):
    pass


@attrs.frozen
class GpuInfo:
    index: int
    name: str
    memory_total_mib: int | None
    memory_used_mib: int | None
    memory_free_mib: int | None
    utilization_pct: int | None
    temperature_c: int | None


@attrs.frozen
class GpuProcess:
    pid: int
    name: str
    used_mib: int | None


@attrs.frozen
class GpuSample:
    """One reading. `error` is set (and the lists empty) when sampling failed."""

    sampled_at: float | None
    gpus: tuple[GpuInfo, ...] = ()
    processes: tuple[GpuProcess, ...] = ()
    error: str | None = None

    @property
    def available(self) -> bool:
        return self.error is None and self.sampled_at is not None

    @property
    def memory_free_mib(self) -> int | None:
        """Free memory summed over GPUs; None if any GPU's figure is unknown."""
        if not self.available or not self.gpus:
            return None
        free = [g.memory_free_mib for g in self.gpus]
        return None if None in free else sum(free)  # type: ignore[arg-type]


NOT_SAMPLED = GpuSample(sampled_at=None, error="not sampled yet")


def _unknown(field: str) -> bool:
    return not field or (field.startswith("[") and field.endswith("]")) or field == "N/A"


def _int_field(field: str, what: str, line_no: int) -> int | None:
    field = field.strip()
    if _unknown(field):
        return None
    for unit in (" MiB", "MiB", " %", "%", " C"):
        if field.endswith(unit):
            field = field[: -len(unit)].strip()
            break
    try:
        return int(float(field))
    except (ValueError, OverflowError):  # OverflowError: "inf"
        raise GpuParseError(f"line {line_no}: {what} is not a number: {field!r}") from None


#: A whole (or decimal) count of MiB, as nvidia-smi prints it; no sign, no exponent.
_MIB_RE = re.compile(r"\A[0-9]{1,15}(\.[0-9]{1,6})?\Z")
#: No GPU has this much memory (4 TiB); a bigger figure is a driver's garbage.
MAX_GPU_MIB = 4 * 1024 * 1024


def _mib_field(field: str, what: str, line_no: int) -> int | None:
    """A memory figure: unknown, or a non-negative whole number of MiB (pure).

    `int(float(...))` took -3616 and 1e23 as given, and "inf" raised
    OverflowError; a figure that cannot be memory makes the sample unavailable.
    """
    field = field.strip()
    if _unknown(field):
        return None
    for unit in (" MiB", "MiB"):
        if field.endswith(unit):
            field = field[: -len(unit)].strip()
            break
    if not _MIB_RE.match(field):
        raise GpuParseError(f"line {line_no}: {what} is not a whole number of MiB: {field!r}")
    return int(float(field))


def memory_problem(gpu: GpuInfo) -> str | None:
    """Why a GPU's memory figures cannot be true, or None (pure)."""
    total, used, free = gpu.memory_total_mib, gpu.memory_used_mib, gpu.memory_free_mib
    where = f"GPU {gpu.index}"
    if total is None:
        return None
    if total == 0:
        return f"{where}: memory.total is 0 MiB"
    if total > MAX_GPU_MIB:
        return f"{where}: memory.total {total} MiB is not a real GPU's"
    for name, value in (("memory.used", used), ("memory.free", free)):
        if value is not None and value > total:
            return f"{where}: {name} {value} MiB is more than memory.total {total} MiB"
    # used + free is total less the driver's reserve; rounding each may add a MiB.
    if used is not None and free is not None and used + free > total + max(16, total // 100):
        return (f"{where}: memory.used {used} + memory.free {free} MiB is more than "
                f"memory.total {total} MiB")
    return None


def _lines(text: str) -> list[tuple[int, str]]:
    return [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1) if line.strip()]


def parse_gpu_csv(text: str) -> tuple[GpuInfo, ...]:
    """Parse ``--query-gpu=index,name,memory.total,memory.used,memory.free,
    utilization.gpu,temperature.gpu --format=csv,noheader,nounits``."""
    gpus = []
    for line_no, line in _lines(text):
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 7:
            raise GpuParseError(f"line {line_no}: expected 7 fields, got {len(fields)}: {line!r}")
        # The name is the only free-text field; rejoin any commas inside it.
        index, name, rest = fields[0], ", ".join(fields[1:-5]), fields[-5:]
        idx = _int_field(index, "index", line_no)
        if idx is None:
            raise GpuParseError(f"line {line_no}: GPU index is unknown: {line!r}")
        gpu = GpuInfo(
            index=idx,
            name=name,
            memory_total_mib=_mib_field(rest[0], "memory.total", line_no),
            memory_used_mib=_mib_field(rest[1], "memory.used", line_no),
            memory_free_mib=_mib_field(rest[2], "memory.free", line_no),
            utilization_pct=_int_field(rest[3], "utilization.gpu", line_no),
            temperature_c=_int_field(rest[4], "temperature.gpu", line_no),
        )
        problem = memory_problem(gpu)
        if problem is not None:
            raise GpuParseError(f"impossible memory figures: {problem}")
        gpus.append(gpu)
    if not gpus:
        raise GpuParseError("no GPUs in nvidia-smi output")
    return tuple(gpus)


def parse_apps_csv(text: str) -> tuple[GpuProcess, ...]:
    """Parse ``--query-compute-apps=pid,process_name,used_memory``; empty means none."""
    procs = []
    for line_no, line in _lines(text):
        if line.lower().startswith("no running"):
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 3:
            raise GpuParseError(f"line {line_no}: expected 3 fields, got {len(fields)}: {line!r}")
        pid = _int_field(fields[0], "pid", line_no)
        if pid is None:
            raise GpuParseError(f"line {line_no}: pid is unknown: {line!r}")
        procs.append(
            GpuProcess(
                pid=pid,
                name=", ".join(fields[1:-1]),
                used_mib=_mib_field(fields[-1], "used_memory", line_no),
            )
        )
    return tuple(procs)


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
        self.latest = sample
        for listener in self.listeners:
            try:
                listener(sample)
            except Exception:
                log.failure("a GPU sample listener failed")
        return sample

    def _failed(self, message: str) -> GpuSample:
        self.samples_failed += 1
        if message != self._last_logged_error:
            log.warn("GPU sampling failed: {message}", message=message)
            self._last_logged_error = message
        return GpuSample(sampled_at=self._reactor.seconds(), error=message)


def _no_answer(result: object, timeout_s: float) -> NoReturn:
    """Whatever cancelling left behind (a FirstError of CancelledErrors), say why plainly."""
    raise GpuCommandError(f"nvidia-smi gave no answer within {timeout_s:g}s")
