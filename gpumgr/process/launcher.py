"""Spawning a service: the launcher that gives it its own session, and what
check-config and a start look at before spawning (the command, the cwd, the port).

On Linux the child is spawned through a tiny launcher that starts a new
session: the service and everything it forks share one process group (its id
is the pid gpumgr logs), which `ProcessGroups` signals and watches as a whole.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any, Mapping, Protocol, Sequence
from urllib.parse import urlsplit

import attrs
from twisted.internet import defer, error
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.python.failure import Failure

from gpumgr.config import ProcessConfig


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

    def refused(failure: Failure) -> Failure | None:
        return None if isinstance(failure.value, error.ConnectError) else failure

    connecting = endpoint.connect(Factory.forProtocol(TwistedProtocol))
    return connecting.addCallbacks(connected, refused)


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
