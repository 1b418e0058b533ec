"""What a managed process tells the rest of gpumgr: its status, its exits, its back-off."""

from __future__ import annotations

import signal

import attrs

from gpumgr.process.phases import ProcessState

#: Failed starts in a row before start() refuses at once.
BACKOFF_AFTER_FAILURES = 3
BACKOFF_FIRST_S = 30.0
BACKOFF_MAX_S = 600.0


@attrs.frozen
class ProcessStatus:
    """`ManagedProcess.status()`: what /v1/status and /metrics show of a process."""

    state: ProcessState
    pid: int | None
    #: Epoch seconds of the latest spawn, while it runs.
    started_at: float | None
    #: The latest exit's status; minus the signal number when a signal ended it.
    exit_code: int | None
    #: Spawns that followed a crash or a failed start.
    restarts: int
    #: The latest lines on stderr, oldest first.
    last_stderr: tuple[str, ...]


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
