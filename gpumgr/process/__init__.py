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

The package, one job a module:

- `launcher`: the launcher script, what to spawn, check-config's checks, process groups;
- `output`: output lines: cutting, rate-limited logging, the last stderr lines;
- `phases`: the phases of one spawn and the pure rule that moves them;
- `run`: one spawn: signalling its group, knowing when it is over;
- `managed`: `ManagedProcess`: shared starts, stops, back-off, waiters;
- `values`: `ProcessStatus`, `ProcessExit`, the back-off rule.
"""

from gpumgr.process.launcher import (
    OS_PROCESS_GROUPS,
    Launch,
    ProcessGroups,
    launch,
    port_answers,
    resolve_executable,
    spawn_problems,
)
from gpumgr.process.managed import PROBE_INTERVAL_S, ManagedProcess
from gpumgr.process.output import (
    LINE_MAX_CHARS,
    LOG_LINES_PER_S,
    STDERR_KEPT_LINES,
    LineSplitter,
    LogBudget,
    ServiceOutput,
)
from gpumgr.process.phases import ProcessState
from gpumgr.process.run import GROUP_POLL_S, PIPE_DRAIN_S
from gpumgr.process.values import (
    BACKOFF_AFTER_FAILURES,
    BACKOFF_FIRST_S,
    BACKOFF_MAX_S,
    ProcessExit,
    ProcessStatus,
    describe_exit,
    start_backoff_s,
)

__all__ = [
    "BACKOFF_AFTER_FAILURES", "BACKOFF_FIRST_S", "BACKOFF_MAX_S", "GROUP_POLL_S",
    "LINE_MAX_CHARS", "LOG_LINES_PER_S", "OS_PROCESS_GROUPS",
    "PIPE_DRAIN_S", "PROBE_INTERVAL_S", "STDERR_KEPT_LINES", "Launch", "LineSplitter",
    "LogBudget", "ManagedProcess", "ProcessExit", "ProcessGroups", "ProcessState",
    "ProcessStatus", "ServiceOutput", "describe_exit", "launch", "port_answers",
    "resolve_executable", "spawn_problems", "start_backoff_s",
]
