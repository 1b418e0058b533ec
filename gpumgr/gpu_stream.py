"""nvidia-smi as a stream: long-lived ``--loop-ms`` processes, read line by line.

Spawning nvidia-smi every few hundred milliseconds to catch a memory peak
costs a process start (tens of ms of driver initialisation) per reading;
``nvidia-smi --loop-ms=N`` keeps one process that prints a reading every N ms.

nvidia-smi takes one selective query per run (its help lists `--query-gpu`,
`--query-compute-apps`, ... as "one of"), so the stream is two processes,
one per query, paired here:

- the GPU stream prints one line per GPU per period; a block ends when the
  GPU index stops increasing (one GPU: every line is a block);
- the apps stream prints one line per process per period, and *nothing* in a
  period with no process; each line starts with the query's `timestamp`, so
  the lines of one period are told apart from the next. A period's rows are
  complete half a period after the last one. No row for 1.5 periods means no
  process *or* a hung stream: the periodic sampler's process list is used.

A sample is published only once the processes are known, so a stream that is
starting never reports a loaded consumer's process as gone. A stream that
ends, prints an unreadable line or a line longer than `MAX_LINE_BYTES`, or
prints nothing for `HANG_PERIODS` periods is killed and restarted after a
back-off (doubling up to `MAX_BACKOFF_S`); the periodic sampler
(`GpuSampler`, one spawn per sample) runs on regardless and is the fallback.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Callable, Sequence

from twisted.internet import error
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from gpumgr.gpu_sample import (
    APPS_QUERY,
    CSV_FORMAT,
    GPU_QUERY,
    GpuInfo,
    GpuParseError,
    GpuProcess,
    GpuSample,
    parse_apps_csv,
    parse_gpu_csv,
)

log = Logger()

#: Apps rows carry the period's timestamp first, then the sampler's own fields.
APPS_STREAM_QUERY = APPS_QUERY.replace("=", "=timestamp,", 1)
#: A line longer than this is not nvidia-smi's CSV: the stream is restarted.
MAX_LINE_BYTES = 4096
#: No GPU line for this many periods (at least `MIN_HANG_S`): the stream hangs.
HANG_PERIODS = 4
MIN_HANG_S = 2.0
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
_KILL_GRACE_S = 1.0


def loop_argv(base: Sequence[str], query: str, loop_ms: int) -> list[str]:
    return list(base) + [query, CSV_FORMAT, f"--loop-ms={loop_ms}"]


class _Lines(ProcessProtocol):
    """Complete stdout lines to `line`; a partial line is held up to MAX_LINE_BYTES."""

    def __init__(self, line: Callable[[str], None], bad: Callable[[str], None],
                 ended: Callable[["_Lines", Failure], None]) -> None:
        self._line, self._bad, self._ended = line, bad, ended
        self._partial = b""
        self._err = b""
        self.exited = False
        #: Ended, or its pipes closed after KILL: it holds nothing of ours any more.
        self.gone = False
        #: TERM sent (KILL follows after a grace).
        self.killing = False

    def outReceived(self, data: bytes) -> None:
        if self.killing:
            return  # stopped: what it still prints is no one's (and no reason to restart again)
        self._partial += data
        *complete, self._partial = self._partial.split(b"\n")
        if len(self._partial) > MAX_LINE_BYTES:
            self._partial = b""
            self._bad(f"a line over {MAX_LINE_BYTES} bytes")
            return
        for raw in complete:
            text = raw.decode("utf-8", "replace").strip()
            if text:
                self._line(text)

    def errReceived(self, data: bytes) -> None:
        self._err = (self._err + data)[-512:]

    @property
    def stderr(self) -> str:
        return self._err.decode("utf-8", "replace").strip()

    def kill(self) -> None:
        try:
            self.transport.signalProcess("TERM")  # type: ignore[union-attr]
        except (error.ProcessExitedAlready, AttributeError, OSError):
            pass

    def force(self) -> None:
        try:
            self.transport.signalProcess("KILL")  # type: ignore[union-attr]
        except (error.ProcessExitedAlready, AttributeError, OSError):
            pass
        if self.transport is not None:
            self.transport.loseConnection()
        self.gone = True

    def processEnded(self, reason: Failure) -> None:
        self.exited = True
        self.gone = True
        self._ended(self, reason)


class GpuStream:
    """Two nvidia-smi loop processes, paired into `GpuSample`s given to `publish`."""

    def __init__(self, reactor: Any, argv: Callable[[], list[str]], loop_ms: Callable[[], int],
                 publish: Callable[[GpuSample], None],
                 fallback: Callable[[], tuple[GpuProcess, ...] | None] = lambda: None) -> None:
        self._reactor = reactor
        self._clock = IReactorTime(reactor)
        self._argv = argv
        self._loop_ms = loop_ms
        self._publish = publish
        self._fallback = fallback
        self._wanted = False
        self._closed = False
        self._procs: dict[str, _Lines] = {}
        #: Every process it spawned that has not ended: what `stop` kills, and
        #: what `live_processes` counts, whatever path lost sight of one.
        self._spawned: set[_Lines] = set()
        self._restart: IDelayedCall | None = None
        self._watchdog: IDelayedCall | None = None
        self._backoff_s = FIRST_BACKOFF_S
        self._block: list[GpuInfo] = []
        self._gpus_per_block: int | None = None
        self._apps_current: tuple[GpuProcess, ...] | None = None
        self._apps_pending: list[GpuProcess] = []
        self._apps_ts: str | None = None
        self._apps_last_at: float | None = None
        self.samples = 0
        self.restarts = 0

    @property
    def period_s(self) -> float:
        return self._loop_ms() / 1000.0

    @property
    def running(self) -> bool:
        return bool(self._procs)

    @property
    def live_processes(self) -> int:
        """Its processes not ended yet, stopped ones included (they hold pipes)."""
        self._spawned = {p for p in self._spawned if not p.gone}
        return len(self._spawned)

    @property
    def wanted(self) -> bool:
        return self._wanted

    def start(self) -> None:
        """Wanted from now on (no-op if running or waiting to restart, or closed)."""
        if self._closed:
            return
        self._wanted = True
        if self._procs or (self._restart is not None and self._restart.active()):
            return
        self._spawn()

    def close(self) -> None:
        """Stopped for good (the service stops): `start` does nothing until `reopen`."""
        self._closed = True
        self.stop()

    def reopen(self) -> None:
        self._closed = False

    def stop(self) -> None:
        """Not wanted: kill both processes, forget partial state."""
        self._wanted = False
        self._cancel(self._restart)
        self._restart = None
        self._kill_all()

    # -- processes ---------------------------------------------------------------

    def _spawn(self) -> None:
        base = self._argv()
        executable = shutil.which(base[0]) if base else None
        if executable is None:
            self._failed(f"{base[0] if base else 'nvidia-smi'} not found")
            return
        self._block, self._gpus_per_block = [], None
        self._apps_current, self._apps_pending, self._apps_ts = None, [], None
        self._apps_last_at = None
        queries = {"gpu": GPU_QUERY, "apps": APPS_STREAM_QUERY}
        handlers = {"gpu": self._gpu_line, "apps": self._apps_line}
        for name, query in queries.items():
            proto = _Lines(handlers[name], self._garbage, self._ended)
            argv = loop_argv(base, query, self._loop_ms())
            try:
                IReactorProcess(self._reactor).spawnProcess(
                    proto, executable, argv, env=dict(os.environ))
            except OSError as e:
                self._kill_all()
                self._failed(f"cannot run {base[0]}: {e}")
                return
            self._procs[name] = proto
            self._spawned.add(proto)
        self._arm_watchdog()

    def _kill_all(self) -> None:
        self._cancel(self._watchdog)
        self._watchdog = None
        self._procs = {}
        procs = [p for p in self._spawned if not p.gone and not p.killing]
        for proto in procs:
            proto.killing = True
            proto.kill()
            # Whatever it does with TERM, it is gone (or given up on) shortly.
            self._clock.callLater(_KILL_GRACE_S, lambda p=proto: None if p.exited else p.force())

    def _ended(self, proto: _Lines, reason: Failure) -> None:
        if proto not in self._procs.values():
            return  # one we stopped
        why = proto.stderr or getattr(reason.value, "exitCode", None)
        self._failed(f"nvidia-smi --loop-ms ended ({why})")

    def _garbage(self, why: str) -> None:
        self._failed(f"nvidia-smi --loop-ms printed {why}")

    def _failed(self, why: str) -> None:
        self._kill_all()
        if not self._wanted or (self._restart is not None and self._restart.active()):
            return  # a restart is already on its way: two would spawn two pairs
        log.warn("GPU stream: {why}; restarting in {s:g}s (periodic sampling goes on)",
                 why=why, s=self._backoff_s)
        self.restarts += 1
        self._restart = self._clock.callLater(self._backoff_s, self._respawn)
        self._backoff_s = min(self._backoff_s * 2, MAX_BACKOFF_S)

    def _respawn(self) -> None:
        self._restart = None
        if self._wanted:
            self._spawn()

    def _arm_watchdog(self) -> None:
        self._cancel(self._watchdog)
        hang_s = max(HANG_PERIODS * self.period_s, MIN_HANG_S)
        self._watchdog = self._clock.callLater(hang_s, self._failed,
                                               f"nothing for {hang_s:g}s")

    @staticmethod
    def _cancel(call: IDelayedCall | None) -> None:
        if call is not None and call.active():
            call.cancel()

    # -- lines -------------------------------------------------------------------

    def _gpu_line(self, line: str) -> None:
        try:
            (gpu,) = parse_gpu_csv(line)
        except (GpuParseError, ValueError) as e:
            self._garbage(f"an unreadable GPU line: {e}")
            return
        self._arm_watchdog()
        if self._block and gpu.index <= self._block[-1].index:
            self._gpus_per_block = len(self._block)
            self._emit(tuple(self._block))
            self._block = []
        self._block.append(gpu)
        if self._gpus_per_block is not None and len(self._block) == self._gpus_per_block:
            self._emit(tuple(self._block))
            self._block = []

    def _apps_line(self, line: str) -> None:
        ts, sep, rest = line.partition(",")
        try:
            if not sep:
                raise GpuParseError(f"no timestamp: {line!r}")
            rows = parse_apps_csv(rest)
        except GpuParseError as e:
            self._garbage(f"an unreadable process line: {e}")
            return
        if ts != self._apps_ts:
            if self._apps_ts is not None:
                self._apps_current = tuple(self._apps_pending)
            self._apps_pending, self._apps_ts = [], ts
        self._apps_pending.extend(rows)
        self._apps_last_at = self._clock.seconds()

    def _processes(self) -> tuple[GpuProcess, ...] | None:
        """The processes now, or None while not known.

        A silent apps stream may mean no process, or a hung stream: then the
        periodic sampler's processes (`fallback`) are used, never "none"."""
        now, period = self._clock.seconds(), self.period_s
        last = self._apps_last_at
        if last is None or now - last >= 1.5 * period:
            return self._fallback()
        if now - last >= 0.5 * period:
            return tuple(self._apps_pending)  # that period's rows are all in
        return self._apps_current if self._apps_current is not None else self._fallback()

    def _emit(self, gpus: tuple[GpuInfo, ...]) -> None:
        self._backoff_s = FIRST_BACKOFF_S
        processes = self._processes()
        if processes is None:
            return
        self.samples += 1
        self._publish(GpuSample(sampled_at=self._clock.seconds(), gpus=gpus,
                                processes=processes))


class StreamDemand:
    """Runs the stream while `busy()` (jobs hold the GPU), checked every loop
    period; stops it after two idle checks. `busy` may raise: logged, and the
    check goes on (a LoopingCall whose function raises stops for good)."""

    def __init__(self, clock: IReactorTime, stream: GpuStream, busy: Callable[[], bool]) -> None:
        self._clock = clock
        self._stream = stream
        self._busy = busy
        self._idle_checks = 0
        self._timer: IDelayedCall | None = None

    def start(self) -> None:
        self._stream.reopen()
        if self._timer is None:
            self._timer = self._clock.callLater(0, self._check)

    def _check(self) -> None:
        self._timer = None
        try:
            busy = self._busy()
        except Exception:
            log.failure("GPU stream: cannot tell whether jobs run")
            busy = False
        if busy:
            self._idle_checks = 0
            self._stream.start()
        else:
            self._idle_checks += 1
            if self._idle_checks >= 2 and self._stream.wanted:
                self._stream.stop()
        self._timer = self._clock.callLater(self._stream.period_s, self._check)

    def stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._stream.close()
