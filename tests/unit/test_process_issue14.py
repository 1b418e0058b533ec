"""ManagedProcess and the real world (issue 14): a stranger on the service's port,
a probe answered by someone else, a blank last stderr line, and a caller that
gives up on a start. Clock-driven fakes, no sleeps."""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.error import ProcessTerminated
from twisted.python.failure import Failure

from gpumgr.errors import ProcessStartFailed
from gpumgr.process import ManagedProcess, ProcessState
from tests.helpers import FakeProcessReactor, NoSample, PortCheck, ScriptedProbe, outcome, spec


def test_an_exit_during_start_names_the_last_non_blank_stderr_line():
    fake = FakeProcessReactor()
    mp = ManagedProcess(fake, "whisper", spec(), ScriptedProbe())
    d = mp.start()
    proto = fake.transports[0].proto
    # The real whisper-server's words, then a blank line, then exit 1.
    proto.errReceived(b"couldn't bind to server socket: hostname=127.0.0.1 port=8178\n\n")
    proto.processEnded(Failure(ProcessTerminated(exitCode=1)))
    failure = outcome(d)
    assert failure.check(ProcessStartFailed)
    assert failure.value.message == ("whisper exited with status 1 during start: "
                                     "couldn't bind to server socket: hostname=127.0.0.1 "
                                     "port=8178")


def test_nothing_on_stderr_is_still_said_when_every_line_is_blank():
    fake = FakeProcessReactor()
    mp = ManagedProcess(fake, "whisper", spec(), ScriptedProbe())
    d = mp.start()
    proto = fake.transports[0].proto
    proto.errReceived(b"\n  \n")
    proto.processEnded(Failure(ProcessTerminated(exitCode=3)))
    assert outcome(d).value.message == "whisper exited with status 3 during start (nothing on stderr)"


def test_a_port_that_answers_refuses_the_start_and_spawns_nothing():
    fake, check = FakeProcessReactor(), PortCheck()
    mp = ManagedProcess(fake, "whisper", spec(), ScriptedProbe(), port_check=check)
    d = mp.start()
    assert mp.state is ProcessState.STARTING and fake.spawned == [] and not d.called
    assert mp.start() is not d and len(check.pending) == 1  # one look, shared
    check.pending[0].callback("something already answers on 127.0.0.1:8178 (its url's port)")
    failure = outcome(d)
    assert failure.check(ProcessStartFailed)
    assert failure.value.message == (
        "whisper: refusing to start: something already answers on 127.0.0.1:8178 (its url's "
        "port), and gpumgr did not start it; stop that server or give this one another port")
    assert fake.spawned == [] and mp.state is ProcessState.FAILED and mp.pid is None


def test_a_stranger_on_the_port_does_not_back_the_start_off():
    """A start refused because something else answers on the port spawned
    nothing: it is no crash loop, and once the stranger left the next start
    spawns at once (found by the fault suite: three refusals while a stranger
    held whisper's port kept gpumgr's whisper down for 30 s after it left)."""
    fake, check = FakeProcessReactor(), PortCheck()
    mp = ManagedProcess(fake, "whisper", spec(), ScriptedProbe(), port_check=check)
    for n in range(5):
        d = mp.start()
        assert len(check.pending) == n + 1  # looked at the port again, not refused unseen
        check.pending[-1].callback("something already answers on 127.0.0.1:8178 (its url's port)")
        assert outcome(d).check(ProcessStartFailed)
        fake.advance(1)
    mp.start()
    check.pending[-1].callback(None)  # the stranger left
    assert len(fake.spawned) == 1 and mp.state is ProcessState.STARTING


def test_a_port_check_that_fails_is_a_clean_failed_start():
    fake = FakeProcessReactor()
    mp = ManagedProcess(fake, "whisper", spec(), ScriptedProbe(),
                        port_check=lambda: defer.fail(OSError("no such host")))
    failure = outcome(mp.start())
    assert failure.value.message == "whisper: cannot start: checking its port failed: no such host"
    assert fake.spawned == [] and mp.state is ProcessState.FAILED


def test_every_caller_gone_during_the_port_check_spawns_nothing():
    fake, check = FakeProcessReactor(), PortCheck()
    mp = ManagedProcess(fake, "whisper", spec(), ScriptedProbe(), port_check=check)
    first, second = mp.start(), mp.start()
    first.cancel()
    assert check.cancelled == 0 and mp.state is ProcessState.STARTING
    second.cancel()
    assert check.cancelled == 1 and mp.state is ProcessState.STOPPED
    assert outcome(second).check(defer.CancelledError) and fake.spawned == []
    assert mp.when_stopped().called
    # No failed start was counted: the next start looks again and spawns.
    d = mp.start()
    check.pending[1].callback(None)
    assert len(fake.spawned) == 1 and not d.called


def test_stop_during_the_port_check_fails_the_start_and_spawns_nothing():
    fake, check = FakeProcessReactor(), PortCheck()
    mp = ManagedProcess(fake, "whisper", spec(), ScriptedProbe(), port_check=check)
    d = mp.start()
    assert outcome(mp.stop()) is None
    failure = outcome(d)
    assert failure.check(ProcessStartFailed) and "stop() was called" in failure.value.message
    assert check.cancelled == 1 and fake.spawned == [] and mp.state is ProcessState.STOPPED


def test_a_probe_answered_after_our_process_exited_does_not_count():
    # A stranger on the port answers; our process died of "address in use".
    fake, probe = FakeProcessReactor(), ScriptedProbe()
    mp = ManagedProcess(fake, "whisper", spec(), probe, pipe_drain_s=1.0)
    d = mp.start()
    proto = fake.transports[0].proto
    proto.processExited(Failure(ProcessTerminated(exitCode=1)))
    probe.healthy = True
    fake.advance(0.25)
    assert mp.state is not ProcessState.RUNNING and not d.called
    proto.processEnded(Failure(ProcessTerminated(exitCode=1)))
    assert outcome(d).check(ProcessStartFailed) and mp.state is ProcessState.FAILED


def test_when_stopped_waits_for_a_start_every_caller_gave_up():
    fake, probe = FakeProcessReactor(), ScriptedProbe()
    mp = ManagedProcess(fake, "whisper", spec(), probe)
    d = mp.start()
    transport = fake.transports[0]
    d.cancel()
    assert mp.state is ProcessState.STOPPING and transport.signals == ["TERM"]
    stopped = mp.when_stopped()
    assert not stopped.called
    transport.proto.processEnded(Failure(ProcessTerminated(signal=15)))
    assert outcome(stopped) is None and mp.state is ProcessState.STOPPED
    assert mp.when_stopped().called  # nothing in progress: at once


# -- admission: a load nobody waits for any more ----------------------------------------------


class _ProcessControl:
    """Admission's Control over one ManagedProcess, as the broker's `_Control` does it."""

    def __init__(self, process: ManagedProcess) -> None:
        self.process = process

    def load(self, name):
        return self.process.start()

    def unload(self, name):
        return self.process.stop()

    def load_timeout_s(self, name):
        return 60.0


def test_a_cancelled_load_says_so_and_its_process_is_stopped():
    from gpumgr.admission import Admission
    from gpumgr.config import parse_config
    from gpumgr.registry import Registry

    config = parse_config({
        "routes": {"stt": "whisper"},
        "consumers": {"whisper": {
            "url": "http://127.0.0.1:9", "driver": "whisper.cpp", "paths": {"stt": "/inference"},
            "vram_resident_mib": 1500, "process": {"command": ["/bin/true"]}}}}, "<issue14>")
    fake = FakeProcessReactor()
    mp = ManagedProcess(fake, "whisper", spec(), ScriptedProbe())
    registry = Registry(config.consumers)
    admission = Admission(fake, lambda: config, registry, NoSample(), _ProcessControl(mp),
                          runner=None)  # type: ignore[arg-type]
    load = admission.load("whisper", "demand", evicting=False)
    assert mp.state is ProcessState.STARTING
    load.cancel()
    assert outcome(load).check(defer.CancelledError)  # not turned into control_failed
    assert [(e.kind, e.reason) for e in admission.events] == [("load_cancelled", "demand")]
    assert mp.state is ProcessState.STOPPING and fake.transports[0].signals == ["TERM"]
    stopped = mp.when_stopped()
    fake.transports[0].proto.processEnded(Failure(ProcessTerminated(signal=15)))
    assert outcome(stopped) is None and mp.state is ProcessState.STOPPED
    assert not registry["whisper"].loaded


def test_a_job_that_outlived_its_process_does_not_mark_it_loaded():
    from gpumgr.admission import Admission
    from gpumgr.config import parse_config
    from gpumgr.proxy import Outcome, Result
    from gpumgr.registry import Health, Registry

    config = parse_config({
        "routes": {"stt": "whisper"},
        "consumers": {"whisper": {
            "url": "http://127.0.0.1:9", "driver": "whisper.cpp", "paths": {"stt": "/inference"},
            "vram_resident_mib": 1500, "process": {"command": ["/bin/true"]}}}}, "<issue14>")
    registry = Registry(config.consumers)
    registry.mark_unloaded("whisper")
    registry.set_health("whisper", Health.STOPPED)  # stopped frozen while the job ran
    admission = Admission(FakeProcessReactor(), lambda: config, registry, NoSample(),
                          control=None, runner=None)  # type: ignore[arg-type]
    admission.job_ended("whisper", Result(Outcome.REFUSED, 502, reached_consumer=True))
    assert registry["whisper"].loaded is False
