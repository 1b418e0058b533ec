"""A service's output: whole lines, cut when too long, logged at a bounded rate,
the latest stderr lines kept for the status and for the error of a failed start."""

from __future__ import annotations

import collections
import math
from typing import Callable

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger(namespace="gpumgr.process")

LINE_MAX_CHARS = 2000
LOG_LINES_PER_S = 50
STDERR_KEPT_LINES = 20


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


class LineSplitter:
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


class ServiceOutput:
    """One service's stdout and stderr, across its runs."""

    def __init__(self, name: str, clock: IReactorTime, log_lines_per_s: int = LOG_LINES_PER_S,
                 kept_stderr_lines: int = STDERR_KEPT_LINES) -> None:
        self._name = name
        self._clock = clock
        self._budget = LogBudget(log_lines_per_s)
        self._stderr_lines: collections.deque[str] = collections.deque(maxlen=kept_stderr_lines)
        self.stdout = LineSplitter(lambda line: self._line("stdout", line))
        self.stderr = LineSplitter(lambda line: self._line("stderr", line))

    @property
    def last_stderr(self) -> tuple[str, ...]:
        return tuple(self._stderr_lines)

    def last_stderr_line(self) -> str | None:
        """The latest stderr line that is not blank, or None.

        whisper-server ends "couldn't bind to server socket: ..." with a blank line.
        """
        return next((line for line in reversed(self._stderr_lines) if line.strip()), None)

    def new_run(self) -> None:
        """A new spawn: what the previous one said on stderr is no longer news."""
        self._stderr_lines.clear()

    def end_run(self) -> None:
        """The run ended: lines without a newline, and the count of lines not logged."""
        self.stdout.flush()
        self.stderr.flush()
        self._report_suppressed(self._budget.drain())

    def _line(self, stream: str, line: str) -> None:
        if stream == "stderr":
            self._stderr_lines.append(line)
        admitted, suppressed = self._budget.admit(self._clock.seconds())
        self._report_suppressed(suppressed)
        if admitted:
            log.info("{name} {stream}: {line}", name=self._name, stream=stream, line=line)

    def _report_suppressed(self, count: int) -> None:
        if count:
            log.info("{name}: suppressed {count} lines of output", name=self._name, count=count)
