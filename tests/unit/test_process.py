"""ManagedProcess on Clock-driven fakes, for what real processes cannot do on demand
(ignore SIGKILL, hold pipes); the real subprocesses are in tests/integration/test_process.py."""

from __future__ import annotations

import os
import signal
import sys

import pytest
from twisted.internet import defer
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.logger import formatEvent
from twisted.python.failure import Failure

from gpumgr.errors import ProcessStartFailed, ProcessStopFailed
from gpumgr.process import (
    OS_PROCESS_GROUPS,
    LogBudget,
    ManagedProcess,
    ProcessExit,
    ProcessState,
    LineSplitter,
    describe_exit,
    resolve_executable,
    start_backoff_s,
)
from tests.helpers import (
    FAKE_PID_BASE,
    FakeProcessReactor,
    FakeTransport,
    ScriptedProbe,
    outcome,
    spec,
    texts,
)

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


# -- a fake process reactor, for what real processes cannot do on demand --


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="process groups come from the Linux launcher")


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


def test_long_output_lines_are_cut():
    fake, probe = FakeProcessReactor(), ScriptedProbe()
    mp = ManagedProcess(fake, "ollama", spec(), probe)
    mp.start()
    mp._output.stderr.feed(b"E" * 5000 + b"\n")
    (line,) = mp.last_stderr
    assert line == "E" * 2000 + " [cut 3000 chars]"


