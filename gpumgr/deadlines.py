"""How long gpumgr waits for a consumer to load or unload: one home for both deadlines.

A driver's load or unload is one HTTP call. An owned process's load is a
start, which may first wait for a stop in progress, and its unload is a stop,
which may take the whole SIGTERM-then-SIGKILL escalation.
"""

from __future__ import annotations

from gpumgr.config import ProcessConfig
from gpumgr.terminate import PROCESS_KILL_GRACE_S

#: Deadline of a load or unload call to a service gpumgr does not own.
CONTROL_TIMEOUT_S = 30.0
#: Slack past the process's own deadlines, for the health probe and the reactor.
PROCESS_SLACK_S = 5.0


def load_deadline_s(process: ProcessConfig | None) -> float:
    """A start may queue behind a stop (stop_timeout_s), then wait start_timeout_s."""
    if process is None:
        return CONTROL_TIMEOUT_S
    return process.start_timeout_s + process.stop_timeout_s + PROCESS_SLACK_S


def unload_deadline_s(process: ProcessConfig | None) -> float:
    """A stop: stop_timeout_s until SIGKILL, then SIGKILL's grace before giving up."""
    if process is None:
        return CONTROL_TIMEOUT_S
    return max(CONTROL_TIMEOUT_S, process.stop_timeout_s + PROCESS_KILL_GRACE_S + PROCESS_SLACK_S)
