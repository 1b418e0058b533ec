"""ManagedProcess: real subprocesses on the real reactor (the Clock-driven fakes are in
tests/unit/test_process.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import formatEvent
from twisted.python.failure import Failure

from gpumgr.config import ProcessConfig
from gpumgr.errors import ProcessStartFailed
from gpumgr.process import ManagedProcess, ProcessExit, ProcessState, launch
from tests.helpers import free_port, outcome, texts, wait_for

# -- the pure parts --


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

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="process groups come from the Linux launcher")


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
    port = free_port()  # the server binds it after "loading"
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
