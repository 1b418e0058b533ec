"""ManagedProcess: real subprocesses on the real reactor, plus Clock-driven fakes
for what real processes cannot do on demand (ignore SIGKILL, hold pipes)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.error import ConnectionRefusedError, ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from gpumgr.config import ProcessConfig
from gpumgr.errors import ProcessStartFailed, ProcessStopFailed
from gpumgr.process import (
    OS_PROCESS_GROUPS,
    LineSplitter,
    LogBudget,
    ManagedProcess,
    ProcessExit,
    ProcessState,
    describe_exit,
    launch,
    resolve_executable,
    start_backoff_s,
)
from tests.helpers import wait_for

# -- the pure parts --


@pytest.mark.parametrize("failures,wait_s", [
    (0, None), (1, None), (2, None), (3, 30.0), (4, 60.0), (5, 120.0), (6, 240.0),
    (7, 480.0), (8, 600.0), (9, 600.0), (100, 600.0), (10**9, 600.0),
])
def test_start_backoff(failures, wait_s):
    assert start_backoff_s(failures) == wait_s


def test_start_backoff_is_monotonic_and_capped_everywhere():
    waits = [start_backoff_s(n, after=2, first_s=1.5, max_s=100.0) for n in range(200)]
    assert waits[:2] == [None, None] and waits[2] == 1.5
    numbers = [w for w in waits[2:] if w is not None]
    assert len(numbers) == 198 and numbers == sorted(numbers) and max(numbers) == 100.0
    for a, b in zip(numbers, numbers[1:]):
        assert b == min(100.0, 2 * a)


@pytest.mark.parametrize("code,sig,text", [
    (0, None, "exited with status 0"),
    (1, None, "exited with status 1"),
    (None, 9, "was killed by signal 9 (SIGKILL)"),
    (None, 15, "was killed by signal 15 (SIGTERM)"),
    (None, 200, "was killed by signal 200"),
])
def test_describe_exit(code, sig, text):
    assert describe_exit(code, sig) == text


def test_log_budget_admits_per_second_then_reports_what_it_suppressed():
    budget = LogBudget(2)
    assert [budget.admit(10.0), budget.admit(10.1), budget.admit(10.2), budget.admit(10.9)] == [
        (True, 0), (True, 0), (False, 0), (False, 0)]
    assert budget.admit(11.0) == (True, 2)  # a new window reports the old one's losses
    assert budget.admit(11.5) == (True, 0)
    assert budget.admit(11.6) == (False, 0)
    assert budget.drain() == 1 and budget.drain() == 0
    assert budget.admit(50.0) == (True, 0)


def test_line_splitter_buffers_partial_lines_and_cuts_long_ones():
    lines: list[str] = []
    split = LineSplitter(lines.append, max_chars=10)
    split.feed(b"hel")
    assert lines == []
    split.feed(b"lo\r\nwor")
    split.feed(b"ld\n" + b"x" * 15 + b"\n\xff\n")
    assert lines == ["hello", "world", "xxxxxxxxxx [cut 5 chars]", "\ufffd"]
    split.feed(b"tail")
    split.flush()
    assert lines[-1] == "tail"


def test_line_splitter_memory_is_bounded_for_a_line_that_never_ends():
    lines: list[str] = []
    split = LineSplitter(lines.append, max_chars=10)
    for _ in range(1000):
        split.feed(b"y" * 7)
        assert len(split._buffer) <= 40 + 7
    assert lines == ["yyyyyyyyyy [cut 32 chars]"]  # once, not once per chunk
    split.feed(b"rest of it\nnext\n")
    assert lines[1:] == ["next"]


def test_resolve_executable(tmp_path):
    tool = tmp_path / "tool"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    plain = tmp_path / "plain"
    plain.write_text("")
    assert resolve_executable("./tool", str(tmp_path), None) == str(tool)
    assert resolve_executable(str(tool), None, None) == str(tool)
    assert resolve_executable("tool", None, str(tmp_path)) == str(tool)
    assert resolve_executable("./plain", str(tmp_path), None) is None  # not executable
    assert resolve_executable("./missing", str(tmp_path), None) is None
    assert resolve_executable("tool", None, "/nonexistent") is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the launcher is Linux-only")
@pytest.mark.parametrize("executable,cwd,stderr", [
    ("/nonexistent/whisper-server", None,
     b"cannot run /nonexistent/whisper-server: No such file or directory\n"),
    ("/bin/true", "/nonexistent", b"cannot change directory to /nonexistent: "
                                  b"No such file or directory\n"),
])
def test_the_launcher_reports_what_vanished_after_the_checks(executable, cwd, stderr):
    how = launch(executable, ["whisper-server"], cwd, os.getpid())
    assert how.path is None  # never Twisted's fork path
    done = subprocess.run(how.args, executable=how.executable, capture_output=True, timeout=30)
    assert (done.returncode, done.stderr) == (127, stderr)


# -- a fake process reactor, for what real processes cannot do on demand --

#: Above Linux's PID_MAX_LIMIT (2**22): a fake pid that reaches the real
#: killpg() or waitpid() (ManagedProcess's default groups) finds nothing.
FAKE_PID_BASE = 5_000_000

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="process groups come from the Linux launcher")


class FakeTransport:
    def __init__(self, proto, pid: int) -> None:
        self.proto = proto
        self.pid = pid
        self.signals: list[str] = []
        self.pipes_closed = False

    def signalProcess(self, sig: str) -> None:
        self.signals.append(sig)

    def loseConnection(self) -> None:
        self.pipes_closed = True


class FakeProcessReactor(Clock):
    def __init__(self, fail_with: Exception | None = None) -> None:
        super().__init__()
        self.spawned: list[tuple[str, list[str], dict, str | None]] = []
        self.transports: list[FakeTransport] = []
        self.fail_with = fail_with

    def spawnProcess(self, proto, executable, args, env=None, path=None, **kw):
        if self.fail_with is not None:
            raise self.fail_with
        self.spawned.append((executable, args, env, path))
        transport = FakeTransport(proto, FAKE_PID_BASE + len(self.spawned))
        self.transports.append(transport)
        proto.makeConnection(transport)
        return transport


class FakeGroups:
    """Process groups whose members the test decides; records what they were sent."""

    def __init__(self) -> None:
        #: Groups with a live process in them.
        self.live: set[int] = set()
        self.signals: list[tuple[int, str]] = []

    def signal(self, pgid: int, sig: int) -> None:
        if pgid not in self.live:
            raise ProcessLookupError(3, "No such process")
        if sig:
            self.signals.append((pgid, signal.Signals(sig).name))

    def has_live_members(self, pgid: int) -> bool:
        return pgid in self.live


class ScriptedProbe:
    """Fails ('connection refused') until `healthy` is set; counts calls."""

    def __init__(self) -> None:
        self.healthy = False
        self.calls = 0

    def __call__(self) -> defer.Deferred[None]:
        self.calls += 1
        if self.healthy:
            return defer.succeed(None)
        return defer.fail(ConnectionRefusedError("connection refused"))


def spec(command=(sys.executable, "-c", "pass"), **kw) -> ProcessConfig:
    return ProcessConfig(command=tuple(command), **kw)


def outcome(d: defer.Deferred):
    results: list = []
    d.addBoth(results.append)
    return results[0] if results else None


def test_spawn_uses_argv_env_cwd_and_the_launcher(tmp_path, monkeypatch):
    monkeypatch.setenv("GPUMGR_PASSED_THROUGH", "yes")
    fake = FakeProcessReactor()
    mp = ManagedProcess(fake, "whisper", spec((sys.executable, "-V"), cwd=str(tmp_path),
                                              env={"MODEL": "base.en"}), ScriptedProbe())
    mp.start()
    ((executable, args, env, path),) = fake.spawned
    if sys.platform.startswith("linux"):
        assert executable == sys.executable and args[:3] == [sys.executable, "-I", "-S"]
        assert args[5:] == [str(os.getpid()), str(tmp_path), sys.executable, sys.executable, "-V"]
        assert path is None  # the launcher changes directory
    else:
        assert args == [sys.executable, "-V"] and path == str(tmp_path)
    assert env["MODEL"] == "base.en" and env["GPUMGR_PASSED_THROUGH"] == "yes"
    assert mp.state is ProcessState.STARTING and mp.pid == FAKE_PID_BASE + 1


def test_start_probes_every_quarter_second_until_healthy():
    fake, probe = FakeProcessReactor(), ScriptedProbe()
    mp = ManagedProcess(fake, "whisper", spec(start_timeout_s=5), probe)
    d = mp.start()
    assert probe.calls == 1 and outcome(d) is None
    fake.advance(0.25)
    fake.advance(0.25)
    assert probe.calls == 3 and mp.state is ProcessState.STARTING
    probe.healthy = True
    fake.advance(0.25)
    assert probe.calls == 4 and mp.state is ProcessState.RUNNING
    assert outcome(d) is None and d.called
    assert mp.start().called  # RUNNING: at once
    fake.advance(10)
    assert probe.calls == 4  # no probing, no timeout, once running


def test_start_timeout_stops_it_and_fails_clearly():
    fake, probe = FakeProcessReactor(), ScriptedProbe()
    exits: list[ProcessExit] = []
    mp = ManagedProcess(fake, "whisper", spec(start_timeout_s=2, stop_timeout_s=1), probe,
                        exits.append)
    d = mp.start()
    fake.advance(1.99)
    assert not d.called and fake.transports[0].signals == []
    fake.advance(0.01)
    assert fake.transports[0].signals == ["TERM"] and mp.state is ProcessState.STOPPING
    assert not d.called  # it fails once the process is gone
    fake.transports[0].proto.processEnded(Failure(ProcessTerminated(signal=15)))
    failure = outcome(d)
    assert failure.check(ProcessStartFailed)
    assert failure.value.message == (
        "whisper did not become healthy within 2s "
        "(last probe: Connection was refused by other side: connection refused.); stopped it")
    assert mp.state is ProcessState.FAILED and mp.exit_code == -15
    assert exits == [ProcessExit("whisper", -15, True, True, "was killed by signal 15 (SIGTERM)")]
    assert fake.getDelayedCalls() == []


def test_a_spawn_that_raises_is_a_clean_failure():
    fake = FakeProcessReactor(fail_with=FileNotFoundError(2, "No such file or directory"))
    mp = ManagedProcess(fake, "whisper", spec(), ScriptedProbe())
    failure = outcome(mp.start())
    assert failure.check(ProcessStartFailed)
    assert "No such file or directory" in failure.value.message
    assert mp.state is ProcessState.FAILED and mp.pid is None


def test_a_process_that_outlives_kill_is_given_up_once():
    fake, probe = FakeProcessReactor(), ScriptedProbe()
    probe.healthy = True
    exits: list[ProcessExit] = []
    mp = ManagedProcess(fake, "whisper", spec(stop_timeout_s=3), probe, exits.append,
                        kill_grace_s=2)
    mp.start()
    transport = fake.transports[0]
    stopped = mp.stop()
    assert mp.stop() is not stopped and transport.signals == ["TERM"]
    fake.advance(3)
    assert transport.signals == ["TERM", "KILL"] and not stopped.called
    fake.advance(2)
    failure = outcome(stopped)
    assert failure.check(ProcessStopFailed)
    assert failure.value.message == "whisper did not exit after SIGKILL; gave up"
    assert transport.pipes_closed and mp.state is ProcessState.FAILED and mp.pid is None
    assert [e.description for e in exits] == ["did not exit after SIGKILL; gave up on it"]
    # It dies at last: nothing fires twice, nothing changes.
    transport.proto.processExited(Failure(ProcessTerminated(signal=9)))
    transport.proto.processEnded(Failure(ProcessTerminated(signal=9)))
    assert len(exits) == 1 and mp.state is ProcessState.FAILED and fake.getDelayedCalls() == []


def test_a_child_holding_the_pipes_does_not_hold_up_the_stop():
    fake, probe = FakeProcessReactor(), ScriptedProbe()
    probe.healthy = True
    mp = ManagedProcess(fake, "whisper", spec(), probe, pipe_drain_s=0.5)
    mp.start()
    transport = fake.transports[0]
    stopped = mp.stop()
    transport.proto.processExited(Failure(ProcessTerminated(signal=15)))
    fake.advance(0.5)
    assert transport.pipes_closed and not stopped.called
    transport.proto.processEnded(Failure(ProcessTerminated(signal=15)))  # what closing brings
    assert outcome(stopped) is None and mp.state is ProcessState.STOPPED


def test_cancelling_one_start_waiter_leaves_the_shared_start_alone():
    fake, probe = FakeProcessReactor(), ScriptedProbe()
    mp = ManagedProcess(fake, "whisper", spec(), probe)
    first, second = mp.start(), mp.start()
    assert len(fake.spawned) == 1
    first.cancel()
    assert outcome(first).check(defer.CancelledError)
    probe.healthy = True
    fake.advance(0.25)
    assert outcome(second) is None and mp.state is ProcessState.RUNNING


def test_start_while_stopping_starts_after_the_stop():
    fake, probe = FakeProcessReactor(), ScriptedProbe()
    probe.healthy = True
    mp = ManagedProcess(fake, "whisper", spec(), probe)
    mp.start()
    stopped = mp.stop()
    started = mp.start()
    assert len(fake.spawned) == 1
    fake.transports[0].proto.processEnded(Failure(ProcessTerminated(signal=15)))
    assert outcome(stopped) is None
    assert len(fake.spawned) == 2 and outcome(started) is None
    assert mp.state is ProcessState.RUNNING and mp.restarts == 0


def test_a_start_queued_behind_a_stop_spawns_only_for_callers_still_waiting():
    fake, probe = FakeProcessReactor(), ScriptedProbe()
    probe.healthy = True
    mp = ManagedProcess(fake, "whisper", spec(), probe)
    mp.start()
    mp.stop()
    gone, kept = mp.start(), mp.start()
    gone.cancel()
    fake.transports[0].proto.processEnded(Failure(ProcessTerminated(signal=15)))
    assert outcome(gone).check(defer.CancelledError)
    assert len(fake.spawned) == 2 and outcome(kept) is None and mp.state is ProcessState.RUNNING


def test_a_start_queued_behind_a_stop_shares_a_start_made_when_the_stop_ended():
    fake, probe = FakeProcessReactor(), ScriptedProbe()
    mp = ManagedProcess(fake, "whisper", spec(), probe)
    probe.healthy = True
    mp.start()
    probe.healthy = False
    stopped = mp.stop()
    from_the_stop: list[defer.Deferred[None]] = []
    stopped.addCallback(lambda _: from_the_stop.append(mp.start()))
    queued = mp.start()
    fake.transports[0].proto.processEnded(Failure(ProcessTerminated(signal=15)))
    assert len(fake.spawned) == 2 and mp.state is ProcessState.STARTING
    probe.healthy = True
    fake.advance(0.25)
    assert outcome(queued) is None and outcome(from_the_stop[0]) is None


def test_a_start_every_caller_cancelled_is_stopped_and_is_no_failed_start():
    fake, probe = FakeProcessReactor(), ScriptedProbe()
    exits: list[ProcessExit] = []
    mp = ManagedProcess(fake, "whisper", spec(), probe, exits.append)
    first, second = mp.start(), mp.start()
    transport = fake.transports[0]
    first.cancel()
    assert mp.state is ProcessState.STARTING and transport.signals == []
    second.cancel()  # nobody would record it as loaded, so eviction would never stop it
    assert outcome(second).check(defer.CancelledError)
    assert mp.state is ProcessState.STOPPING and transport.signals == ["TERM"]
    fake.advance(1)
    assert probe.calls == 1  # no more probes
    transport.proto.processEnded(Failure(ProcessTerminated(signal=15)))
    assert mp.state is ProcessState.STOPPED
    assert [(e.expected, e.during_start) for e in exits] == [(True, True)]
    for _ in range(3):  # no back-off, no restart counted
        mp.start()
        mp.stop()
        fake.transports[-1].proto.processEnded(Failure(ProcessTerminated(signal=15)))
    assert len(fake.spawned) == 4 and mp.restarts == 0 and fake.getDelayedCalls() == []


# -- process groups, with fake groups --


def _running_in_a_group(**spec_kw):
    fake, probe, groups = FakeProcessReactor(), ScriptedProbe(), FakeGroups()
    probe.healthy = True
    exits: list[ProcessExit] = []
    mp = ManagedProcess(fake, "whisper", spec(**spec_kw), probe, exits.append, kill_grace_s=2,
                        groups=groups)
    mp.start()
    transport = fake.transports[0]
    groups.live.add(transport.pid)  # the launcher's setsid()
    return fake, groups, mp, transport, exits


def _leader_ends(transport: FakeTransport, reason: Failure, pipes_too: bool = True) -> None:
    transport.proto.processExited(reason)
    if pipes_too:
        transport.proto.processEnded(reason)


@linux_only
def test_stop_waits_for_the_group_not_only_for_its_leader():
    fake, groups, mp, transport, exits = _running_in_a_group(stop_timeout_s=3)
    pgid = transport.pid
    stopped = mp.stop()
    assert groups.signals == [(pgid, "SIGTERM")] and transport.signals == []
    # The wrapper dies at once; the server it ran is still unloading its model.
    _leader_ends(transport, Failure(ProcessTerminated(signal=15)))
    fake.advance(1)
    assert not stopped.called and mp.state is ProcessState.STOPPING and exits == []
    groups.live.discard(pgid)
    fake.advance(0.1)
    assert outcome(stopped) is None and mp.state is ProcessState.STOPPED
    assert mp.exit_code == -15 and [e.expected for e in exits] == [True]
    assert groups.signals == [(pgid, "SIGTERM")] and fake.getDelayedCalls() == []


@linux_only
def test_a_group_that_outlives_term_gets_kill_at_the_stop_deadline(log_events):
    fake, groups, mp, transport, _ = _running_in_a_group(stop_timeout_s=3)
    pgid = transport.pid
    stopped = mp.stop()
    fake.advance(0.5)
    _leader_ends(transport, Failure(ProcessTerminated(signal=15)), pipes_too=False)
    fake.advance(2.4)
    assert groups.signals == [(pgid, "SIGTERM")] and not stopped.called
    fake.advance(0.1)
    assert groups.signals == [(pgid, "SIGTERM"), (pgid, "SIGKILL")]
    assert (f"whisper: its process group {pgid} outlived SIGTERM by 3s; sending SIGKILL"
            in texts(log_events))
    groups.live.discard(pgid)
    fake.advance(0.1)
    assert not stopped.called  # the pipes: the drain timer closes them
    fake.advance(1)
    assert transport.pipes_closed
    transport.proto.processEnded(Failure(ProcessTerminated(signal=15)))
    assert outcome(stopped) is None and mp.state is ProcessState.STOPPED
    assert fake.getDelayedCalls() == []


@linux_only
def test_a_group_that_outlives_kill_is_given_up():
    fake, groups, mp, transport, exits = _running_in_a_group(stop_timeout_s=3)
    stopped = mp.stop()
    _leader_ends(transport, Failure(ProcessTerminated(signal=15)))
    fake.advance(3)
    fake.advance(2)
    failure = outcome(stopped)
    assert failure.check(ProcessStopFailed) and mp.state is ProcessState.FAILED
    assert [e.description for e in exits] == ["did not exit after SIGKILL; gave up on it"]
    assert fake.getDelayedCalls() == []


@linux_only
def test_a_term_sent_before_the_group_existed_reaches_the_group_at_the_exit():
    fake, probe, groups = FakeProcessReactor(), ScriptedProbe(), FakeGroups()
    mp = ManagedProcess(fake, "whisper", spec(stop_timeout_s=3), probe, groups=groups)
    starting = mp.start()
    stopped = mp.stop()  # before the launcher's setsid(): the launcher alone gets it
    transport = fake.transports[0]
    pgid = transport.pid
    assert transport.signals == ["TERM"] and groups.signals == []
    groups.live.add(pgid)  # it had started the service, which forked, before it died
    _leader_ends(transport, Failure(ProcessTerminated(signal=15)))
    assert groups.signals == [(pgid, "SIGTERM")]
    groups.live.discard(pgid)
    fake.advance(0.1)
    assert outcome(stopped) is None and outcome(starting).check(ProcessStartFailed)
    assert transport.signals == ["TERM"] and fake.getDelayedCalls() == []


@linux_only
def test_a_leader_that_exits_alone_has_its_group_stopped(log_events):
    fake, groups, mp, transport, exits = _running_in_a_group(stop_timeout_s=3)
    pgid = transport.pid
    _leader_ends(transport, Failure(ProcessTerminated(exitCode=1)))
    assert groups.signals == [(pgid, "SIGTERM")] and mp.state is ProcessState.RUNNING
    assert (f"whisper: pid {pgid} exited, but processes are left in its group {pgid}; "
            "stopping them") in texts(log_events)
    fake.advance(3)
    assert groups.signals == [(pgid, "SIGTERM"), (pgid, "SIGKILL")] and exits == []
    groups.live.discard(pgid)
    fake.advance(0.1)
    assert mp.state is ProcessState.FAILED and mp.exit_code == 1
    assert [(e.expected, e.during_start) for e in exits] == [(False, False)]
    assert fake.getDelayedCalls() == []


def test_the_os_groups_find_nothing_in_a_group_that_cannot_exist():
    assert not OS_PROCESS_GROUPS.has_live_members(FAKE_PID_BASE)
    with pytest.raises(ProcessLookupError):
        OS_PROCESS_GROUPS.signal(FAKE_PID_BASE, 0)


def test_stop_when_not_running_is_a_no_op():
    mp = ManagedProcess(FakeProcessReactor(), "whisper", spec(), ScriptedProbe())
    assert outcome(mp.stop()) is None and mp.state is ProcessState.STOPPED


def test_a_failing_on_exit_is_logged_not_raised(log_events):
    fake, probe = FakeProcessReactor(), ScriptedProbe()
    probe.healthy = True

    def on_exit(_event):
        raise RuntimeError("broker bug")

    mp = ManagedProcess(fake, "whisper", spec(), probe, on_exit)
    mp.start()
    fake.transports[0].proto.processEnded(Failure(ProcessDone(0)))
    assert mp.state is ProcessState.FAILED
    assert any("on_exit failed" in formatEvent(e) for e in log_events)


# -- real subprocesses on the real reactor --

_PRELUDE = """\
import os, signal, sys, time
def ready():
    open("ready-%d" % os.getpid(), "w").close()
def wait_for(name, limit_s=60):
    end = time.monotonic() + limit_s
    while not os.path.exists(name) and time.monotonic() < end:
        time.sleep(0.02)
"""


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie is gone
    except OSError:
        return True


class Procs:
    """Makes ManagedProcesses running scripts in tmp_path; remembers every pid."""

    def __init__(self, tmp_path) -> None:
        self.dir = tmp_path
        self.made: list[ManagedProcess] = []
        self.pids: list[int] = []

    def make(self, body: str, name: str = "whisper", probe=None, on_exit=None,
             clock=None, log_lines_per_s: int = 50, **spec_kw) -> ManagedProcess:
        script = self.dir / f"{name}-{len(self.made)}.py"
        script.write_text(_PRELUDE + textwrap.dedent(body))
        spec_kw.setdefault("cwd", str(self.dir))
        process_spec = ProcessConfig(command=(sys.executable, str(script)), **spec_kw)
        holder: list[ManagedProcess] = []
        mp = ManagedProcess(reactor, name, process_spec,
                            probe or (lambda: self.ready_probe(holder[0])), on_exit,
                            clock=clock, kill_grace_s=2, pipe_drain_s=0.2,
                            log_lines_per_s=log_lines_per_s)
        holder.append(mp)
        self.made.append(mp)
        return mp

    def ready_probe(self, mp: ManagedProcess) -> defer.Deferred[None]:
        if mp.pid is not None and (self.dir / f"ready-{mp.pid}").exists():
            return defer.succeed(None)
        return defer.fail(ConnectionRefusedError("not ready"))

    def start(self, mp: ManagedProcess) -> defer.Deferred[None]:
        d = mp.start()
        if mp.pid is not None:
            self.pids.append(mp.pid)
        return d


@pytest_twisted.async_yield_fixture
async def procs(tmp_path):
    p = Procs(tmp_path)
    yield p
    for mp in p.made:
        await mp.stop().addTimeout(30, reactor)
    for pid in p.pids:
        await wait_for(lambda: _gone(pid), timeout_s=10)


@pytest.fixture
def log_events():
    events: list[dict] = []

    def observe(event: dict) -> None:
        if event.get("log_namespace") == "gpumgr.process":
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def texts(events) -> list[str]:
    return [formatEvent(e) for e in events]


async def failure_of(d: defer.Deferred) -> Failure:
    try:
        await d.addTimeout(30, reactor)
    except Exception:
        return Failure()
    raise AssertionError("expected a failure")


_HTTP_SERVER = """\
import http.server, os, sys, time
time.sleep(0.3)  # "loading the model": the port is not bound yet
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health)
server.serve_forever()
"""


@pytest_twisted.ensureDeferred
async def test_start_waits_for_a_real_http_health_check(tmp_path, procs, client):
    with socket.socket() as s:  # a free port; the server binds it after "loading"
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "server.py"
    script.write_text(_HTTP_SERVER)
    probe_errors: list[str] = []

    async def check() -> None:
        try:
            reply = await client.request("GET", f"http://127.0.0.1:{port}/health")
        except Exception as e:
            probe_errors.append(type(e).__name__)
            raise
        if not 200 <= reply.code < 300:
            raise RuntimeError(f"health answered {reply.code}")

    mp = ManagedProcess(reactor, "whisper", ProcessConfig(
        command=(sys.executable, str(script), str(port)), start_timeout_s=30),
        lambda: defer.ensureDeferred(check()))
    procs.made.append(mp)
    await procs.start(mp).addTimeout(30, reactor)
    assert mp.state is ProcessState.RUNNING
    assert probe_errors and set(probe_errors) == {"ConnectionRefusedError"}
    status = mp.status()
    assert status.state is ProcessState.RUNNING and status.pid == mp.pid
    assert isinstance(status.started_at, float) and status.exit_code is None
    await mp.stop().addTimeout(30, reactor)
    assert mp.status().state is ProcessState.STOPPED and mp.exit_code == -signal.SIGTERM
    assert mp.pid is None


@pytest_twisted.ensureDeferred
async def test_start_times_out_and_the_process_is_stopped(procs):
    exits: list[ProcessExit] = []
    mp = procs.make("time.sleep(60)\n", on_exit=exits.append, start_timeout_s=0.5)
    failure = await failure_of(procs.start(mp))
    assert failure.check(ProcessStartFailed)
    assert failure.value.message == (
        "whisper did not become healthy within 0.5s "
        "(last probe: Connection was refused by other side: not ready.); stopped it")
    assert mp.state is ProcessState.FAILED and mp.pid is None
    assert [(e.expected, e.during_start, e.exit_code) for e in exits] == [(True, True, -15)]


@pytest_twisted.ensureDeferred
async def test_an_exit_during_start_fails_it_with_the_last_stderr_line(procs):
    exits: list[ProcessExit] = []
    mp = procs.make("""\
        print("whisper_init: loading model", file=sys.stderr)
        print("failed to load model", file=sys.stderr, end="")  # no newline: still reported
        sys.exit(1)
    """, on_exit=exits.append)
    failure = await failure_of(procs.start(mp))
    assert failure.check(ProcessStartFailed)
    assert failure.value.message == (
        "whisper exited with status 1 during start: failed to load model")
    assert failure.value.consumer == "whisper" and failure.value.retry_after_s is None
    assert mp.state is ProcessState.FAILED and mp.exit_code == 1
    assert mp.last_stderr == ("whisper_init: loading model", "failed to load model")
    assert mp.status().last_stderr == ("whisper_init: loading model", "failed to load model")
    assert [(e.expected, e.during_start, e.exit_code) for e in exits] == [(False, True, 1)]


@pytest_twisted.ensureDeferred
async def test_a_crash_is_recorded_and_the_next_start_restarts_it(procs, log_events):
    exited: defer.Deferred[ProcessExit] = defer.Deferred()
    mp = procs.make("""\
        ready()
        wait_for("crash")
        print("CUDA error: an illegal memory access", file=sys.stderr)
        sys.exit(3)
    """, on_exit=lambda e: exited.callback(e) if not exited.called else None)
    await procs.start(mp).addTimeout(30, reactor)
    (procs.dir / "crash").touch()
    event = await exited.addTimeout(30, reactor)
    assert (event.expected, event.during_start, event.exit_code) == (False, False, 3)
    assert event.last_stderr == ("CUDA error: an illegal memory access",)
    assert mp.state is ProcessState.FAILED and mp.exit_code == 3 and mp.pid is None
    assert any(t.startswith("whisper exited with status 3 unexpectedly; last stderr:")
               and "illegal memory access" in t for t in texts(log_events))
    (procs.dir / "crash").unlink()
    await procs.start(mp).addTimeout(30, reactor)
    assert mp.state is ProcessState.RUNNING and mp.restarts == 1 and mp.exit_code is None


@pytest_twisted.ensureDeferred
async def test_three_failed_starts_then_start_refuses_at_once_until_the_backoff_passes(procs):
    clock = Clock()  # back-off time only; the processes run on the real reactor
    probe_passes = [False]

    def probe() -> defer.Deferred[None]:
        if probe_passes[0]:
            return defer.succeed(None)
        return defer.fail(ConnectionRefusedError("not ready"))

    mp = procs.make("""\
        if os.path.exists("good"):
            time.sleep(60)
        print("failed to load model", file=sys.stderr)
        sys.exit(1)
    """, probe=probe, clock=clock)
    for _ in range(3):
        failure = await failure_of(procs.start(mp))
        assert failure.value.retry_after_s is None
    refused = procs.start(mp)
    assert refused.called and mp.pid is None  # at once: nothing spawned
    failure = await failure_of(refused)
    assert failure.check(ProcessStartFailed)
    assert failure.value.message == (
        "whisper exited with status 1 during start: failed to load model; "
        "3 failed starts in a row, next try in 30s")
    assert failure.value.retry_after_s == 30
    clock.advance(29.5)
    failure = await failure_of(procs.start(mp))
    assert failure.value.retry_after_s == 0.5 and failure.value.message.endswith("next try in 1s")
    clock.advance(0.5)
    failure = await failure_of(procs.start(mp))  # tried again, and failed again
    assert "3 failed starts" not in failure.value.message and mp.restarts == 3
    failure = await failure_of(procs.start(mp))
    assert failure.value.retry_after_s == 60 and "4 failed starts in a row" in failure.value.message
    clock.advance(60)
    (procs.dir / "good").touch()
    probe_passes[0] = True
    await procs.start(mp).addTimeout(30, reactor)
    assert mp.state is ProcessState.RUNNING
    # Success resets the count: a single failure later is retried at once.
    await mp.stop().addTimeout(30, reactor)
    (procs.dir / "good").unlink()
    probe_passes[0] = False
    await failure_of(procs.start(mp))
    (procs.dir / "good").touch()
    probe_passes[0] = True
    await procs.start(mp).addTimeout(30, reactor)
    assert mp.state is ProcessState.RUNNING


@pytest_twisted.ensureDeferred
async def test_stop_sends_term_and_waits_for_the_exit(procs):
    exits: list[ProcessExit] = []
    mp = procs.make("""\
        def on_term(*_):
            print("caught SIGTERM, unloading", file=sys.stderr, flush=True)
            sys.exit(0)
        signal.signal(signal.SIGTERM, on_term)
        ready()
        time.sleep(60)
    """, on_exit=exits.append)
    await procs.start(mp).addTimeout(30, reactor)
    pid = mp.pid
    await mp.stop().addTimeout(30, reactor)
    assert mp.state is ProcessState.STOPPED and mp.exit_code == 0 and _gone(pid)
    assert mp.last_stderr == ("caught SIGTERM, unloading",)
    assert [(e.expected, e.during_start) for e in exits] == [(True, False)]
    assert outcome(mp.stop()) is None  # again: nothing to do


@pytest_twisted.ensureDeferred
async def test_a_process_that_ignores_term_gets_kill(procs, log_events):
    mp = procs.make("""\
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        ready()
        time.sleep(60)
    """, stop_timeout_s=0.3)
    await procs.start(mp).addTimeout(30, reactor)
    pid = mp.pid
    await mp.stop().addTimeout(30, reactor)
    assert mp.state is ProcessState.STOPPED and mp.exit_code == -signal.SIGKILL and _gone(pid)
    assert "whisper: no exit 0.3s after SIGTERM; sending SIGKILL" in texts(log_events)


@pytest_twisted.ensureDeferred
async def test_a_child_holding_the_pipes_open_does_not_hold_up_a_real_stop(procs):
    # Outside the service's process group (a daemon in a session of its own),
    # gpumgr cannot stop it; it must not hold up the stop either.
    mp = procs.make("""\
        import subprocess
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                 start_new_session=True)
        open("grandchild", "w").write(str(child.pid))
        ready()
        time.sleep(60)
    """)
    await procs.start(mp).addTimeout(30, reactor)
    grandchild = int((procs.dir / "grandchild").read_text())
    try:
        await mp.stop().addTimeout(30, reactor)
        assert mp.state is ProcessState.STOPPED and mp.exit_code == -signal.SIGTERM
        assert not _gone(grandchild)  # not ours to stop
    finally:
        _kill_quietly(grandchild)


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@linux_only
@pytest_twisted.ensureDeferred
async def test_stop_ends_the_whole_group_even_a_grandchild_that_ignores_term(procs, log_events):
    # A wrapper (sh -c, uv run, conda run) whose server ignores SIGTERM, or is slow to obey it.
    mp = procs.make("""\
        import subprocess
        child = subprocess.Popen([sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "open('grandchild-ready', 'w').close(); time.sleep(60)"])
        open("grandchild", "w").write(str(child.pid))
        wait_for("grandchild-ready")
        ready()
        time.sleep(60)
    """, stop_timeout_s=0.5)
    await procs.start(mp).addTimeout(30, reactor)
    pid = mp.pid
    assert pid is not None
    grandchild = int((procs.dir / "grandchild").read_text())
    try:
        assert os.getsid(pid) == pid and os.getpgid(grandchild) == pid  # the launcher's session
        await mp.stop().addTimeout(30, reactor)
        assert _gone(grandchild)  # before the stop fired, not after
        assert mp.state is ProcessState.STOPPED and mp.exit_code == -signal.SIGTERM
        assert (f"whisper: its process group {pid} outlived SIGTERM by 0.5s; sending SIGKILL"
                in texts(log_events))
    finally:
        _kill_quietly(grandchild)


@linux_only
@pytest_twisted.ensureDeferred
async def test_a_leader_that_exits_alone_takes_its_group_with_it(procs, log_events):
    gone_at_exit: list[bool] = []
    exited: defer.Deferred[ProcessExit] = defer.Deferred()

    def on_exit(event: ProcessExit) -> None:
        gone_at_exit.append(_gone(grandchild))
        exited.callback(event)

    mp = procs.make("""\
        import subprocess
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open("grandchild", "w").write(str(child.pid))
        ready()
        wait_for("crash")
        os._exit(3)
    """, on_exit=on_exit)
    await procs.start(mp).addTimeout(30, reactor)
    pid = mp.pid
    grandchild = int((procs.dir / "grandchild").read_text())
    try:
        (procs.dir / "crash").touch()
        event = await exited.addTimeout(30, reactor)
        assert (event.expected, event.exit_code) == (False, 3) and gone_at_exit == [True]
        assert mp.state is ProcessState.FAILED
        assert (f"whisper: pid {pid} exited, but processes are left in its group {pid}; "
                "stopping them") in texts(log_events)
    finally:
        _kill_quietly(grandchild)


@pytest_twisted.ensureDeferred
async def test_stop_during_start_cancels_the_start(procs):
    # A long stop_timeout_s: a SIGTERM lost in the spawn window would show as a KILL.
    mp = procs.make("time.sleep(60)\n", stop_timeout_s=60)
    starting = procs.start(mp)
    stopped = mp.stop()
    failure = await failure_of(starting)
    assert failure.check(ProcessStartFailed)
    assert failure.value.message == (
        "whisper: start cancelled: stop() was called while it was starting")
    await stopped.addTimeout(30, reactor)
    assert mp.state is ProcessState.STOPPED and mp.pid is None
    assert mp.exit_code == -signal.SIGTERM
    # A cancelled start is no failed start: no back-off, and no restart counted.
    again = procs.start(mp)
    assert mp.state is ProcessState.STARTING and mp.restarts == 0
    await mp.stop().addTimeout(30, reactor)
    await failure_of(again)


@pytest_twisted.ensureDeferred
async def test_env_and_cwd_reach_the_process(procs, monkeypatch, tmp_path, log_events):
    monkeypatch.setenv("GPUMGR_FROM_PARENT", "inherited")
    workdir = tmp_path / "work"
    workdir.mkdir()
    mp = procs.make("""\
        print("cwd=" + os.getcwd())
        print("spec=" + os.environ.get("WHISPER_MODEL", "-"))
        print("parent=" + os.environ.get("GPUMGR_FROM_PARENT", "-"))
        sys.exit(5)
    """, cwd=str(workdir), env={"WHISPER_MODEL": "ggml-base.en.bin"})
    await failure_of(procs.start(mp))
    assert [e["line"] for e in log_events if e.get("stream") == "stdout"] == [
        f"cwd={workdir}", "spec=ggml-base.en.bin", "parent=inherited"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest_twisted.ensureDeferred
async def test_the_service_does_not_inherit_pythons_ignored_signals(procs, log_events):
    # Python ignores SIGPIPE; a C server that inherited that would miss broken pipes.
    mp = ManagedProcess(reactor, "whisper", ProcessConfig(
        command=("sh", "-c", "grep SigIgn /proc/$$/status; exit 7")), lambda: defer.fail(
            ConnectionRefusedError()))
    failure = await failure_of(procs.start(mp))
    assert failure.value.message == "whisper exited with status 7 during start (nothing on stderr)"
    (line,) = [e["line"] for e in log_events if e.get("stream") == "stdout"]
    ignored = int(line.split()[1], 16)
    assert line.startswith("SigIgn:")
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        assert not ignored & (1 << (sig - 1)), f"{sig.name} is ignored in the service"


@pytest_twisted.ensureDeferred
async def test_a_missing_executable_or_cwd_is_a_clean_failure(procs, tmp_path):
    for command, cwd, message in [
        (("/nonexistent/whisper-server",), None,
         "whisper: cannot start: '/nonexistent/whisper-server' not found or not executable"),
        (("gpumgr-no-such-command",), str(tmp_path),
         "whisper: cannot start: 'gpumgr-no-such-command' not found or not executable"),
        ((sys.executable,), str(tmp_path / "nope"),
         f"whisper: cannot start: cwd {str(tmp_path / 'nope')!r} is not a directory"),
    ]:
        mp = ManagedProcess(reactor, "whisper", ProcessConfig(command=command, cwd=cwd),
                            lambda: defer.succeed(None))
        failure = await failure_of(mp.start())
        assert failure.check(ProcessStartFailed) and failure.value.message == message
        assert mp.state is ProcessState.FAILED and mp.pid is None


@pytest_twisted.ensureDeferred
async def test_output_is_logged_by_line_with_the_name_cut_and_rate_limited(procs, log_events):
    mp = procs.make("""\
        for i in range(300):
            print("line %d" % i)
        print("L" * 5000)
        for i in range(30):
            print("err %d" % i, file=sys.stderr)
        sys.stdout.write("partial")
    """, name="mvoice", log_lines_per_s=20)
    await failure_of(procs.start(mp))
    lines = [e for e in log_events if "stream" in e]
    assert all(formatEvent(e).startswith(f"mvoice {e['stream']}: ") for e in lines)
    suppressed = [e["count"] for e in log_events if "suppressed" in e["log_format"]]
    assert suppressed and f"mvoice: suppressed {suppressed[0]} lines of output" in texts(log_events)
    assert len(lines) + sum(suppressed) == 300 + 1 + 30 + 1  # every line logged or counted
    assert len(lines) < 300
    assert formatEvent(lines[0]) == "mvoice stdout: line 0"
    # stderr is kept whole for errors and status, logged or not: the last 20 lines
    assert mp.last_stderr == tuple(f"err {i}" for i in range(10, 30))
    assert all(len(line) <= 2000 + 20 for line in mp.last_stderr)


def test_long_output_lines_are_cut():
    fake, probe = FakeProcessReactor(), ScriptedProbe()
    mp = ManagedProcess(fake, "ollama", spec(), probe)
    mp.start()
    mp._output.stderr.feed(b"E" * 5000 + b"\n")
    (line,) = mp.last_stderr
    assert line == "E" * 2000 + " [cut 3000 chars]"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
@pytest_twisted.ensureDeferred
async def test_no_orphan_when_the_parent_is_sigkilled():
    intermediate = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent("""\
            import os, shutil, subprocess, sys, time
            from gpumgr.process import launch
            how = launch(shutil.which("sleep"), ["sleep", "300"], None, os.getpid())
            child = subprocess.Popen(how.args, executable=how.executable)
            print(child.pid, flush=True)
            time.sleep(300)
        """)],
        stdout=subprocess.PIPE)
    child = int(intermediate.stdout.readline())
    try:
        # Once it has exec'd, the death signal is armed.
        await wait_for(lambda: _comm(child) == "sleep", timeout_s=10)
        os.kill(intermediate.pid, signal.SIGKILL)
        intermediate.wait(timeout=10)
        await wait_for(lambda: _gone(child), timeout_s=10)
    finally:
        intermediate.stdout.close()
        for pid in (child, intermediate.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _comm(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None
