"""The nvidia-smi stream (gpumgr.gpu_stream) with a fake process reactor and a Clock."""

import pytest
from zope.interface import implementer
from twisted.internet import error
from twisted.internet.interfaces import IReactorProcess
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from gpumgr.gpu_sample import GpuProcess
from gpumgr.gpu_stream import (
    APPS_STREAM_QUERY,
    FIRST_BACKOFF_S,
    MAX_LINE_BYTES,
    GpuStream,
    StreamDemand,
)


class FakeTransport:
    def __init__(self, proto):
        self.proto, self.signals, self.closed = proto, [], False

    def signalProcess(self, sig):
        if self.proto.exited:
            raise error.ProcessExitedAlready()
        self.signals.append(sig)

    def loseConnection(self):
        self.closed = True


@implementer(IReactorProcess)
class FakeReactor(Clock):
    """A Clock that 'spawns' processes: their protocols, argv, and a way to end them."""

    def __init__(self):
        super().__init__()
        self.spawned = []

    def spawnProcess(self, proto, executable, args, env=None, **kw):
        assert env  # never the empty environment
        proto.makeConnection(FakeTransport(proto))
        self.spawned.append((args, proto))
        return proto.transport

    def live(self, which):
        """The newest process of `which` ('gpu' or 'apps')."""
        for args, proto in reversed(self.spawned):
            if (APPS_STREAM_QUERY in args) == (which == "apps"):
                return proto
        raise AssertionError(which)


def gpu_line(used, index=0):
    return f"{index}, sim GPU, 24576, {used}, {24576 - used}, 50, 40\n".encode()


def make(loop_ms=200, fallback=lambda: ()):
    reactor = FakeReactor()
    published = []
    stream = GpuStream(reactor, lambda: ["true"], lambda: loop_ms, published.append,
                       fallback=fallback)
    return reactor, stream, published


def test_two_loop_processes_one_query_each():
    reactor, stream, _ = make()
    stream.start()
    assert len(reactor.spawned) == 2
    for args, _ in reactor.spawned:
        assert "--loop-ms=200" in args and "--format=csv,noheader,nounits" in args
        assert sum(a.startswith("--query-") for a in args) == 1
    stream.start()  # already running: nothing more
    assert len(reactor.spawned) == 2


def test_a_gpu_line_per_period_becomes_a_sample_with_the_period_processes():
    reactor, stream, published = make()
    stream.start()
    gpu, apps = reactor.live("gpu"), reactor.live("apps")
    apps.outReceived(b"2024/01/01 00:00:00.000, 42, ollama, 5000\n")
    gpu.outReceived(gpu_line(6000))
    reactor.advance(0.2)
    gpu.outReceived(gpu_line(6500))  # the first block ends where the index stops increasing
    assert [s.gpus[0].memory_used_mib for s in published] == [6000, 6500]  # one GPU, now known
    reactor.advance(0.2)
    apps.outReceived(b"2024/01/01 00:00:00.400, 42, ollama, 5600\n")
    gpu.outReceived(gpu_line(7000))  # one GPU: every line is a block from now on
    assert [s.gpus[0].memory_used_mib for s in published] == [6000, 6500, 7000]
    assert published[-1].processes == (GpuProcess(42, "ollama", 5000),)  # that period not done
    reactor.advance(0.15)
    gpu.outReceived(gpu_line(7100))
    assert published[-1].processes == (GpuProcess(42, "ollama", 5600),)
    assert all(s.available for s in published)


def test_lines_split_across_reads_are_joined():
    reactor, stream, published = make()
    stream.start()
    gpu = reactor.live("gpu")
    line = gpu_line(1000) + gpu_line(1100)
    for i in range(len(line)):
        gpu.outReceived(line[i:i + 1])
    gpu.outReceived(gpu_line(1200))
    assert [s.gpus[0].memory_used_mib for s in published] == [1000, 1100, 1200]


def test_a_silent_apps_stream_uses_the_periodic_processes_never_none():
    known = [None]
    reactor, stream, published = make(fallback=lambda: known[0])
    stream.start()
    gpu = reactor.live("gpu")
    for used in (1000, 1000):
        gpu.outReceived(gpu_line(used))
    assert published == []  # processes not known: nothing published
    known[0] = (GpuProcess(7, "whisper-server", 900),)
    gpu.outReceived(gpu_line(1000))
    assert published[-1].processes == known[0]


def test_processes_gone_for_a_period_and_a_half_fall_back():
    reactor, stream, published = make(fallback=lambda: ())
    stream.start()
    gpu, apps = reactor.live("gpu"), reactor.live("apps")
    apps.outReceived(b"t1, 42, ollama, 5000\n")
    gpu.outReceived(gpu_line(6000))
    gpu.outReceived(gpu_line(6000))
    assert published[-1].processes == ()  # t1's rows may not all be in: the periodic list
    reactor.advance(0.1)  # half a period after t1's last row: t1 is complete
    gpu.outReceived(gpu_line(6000))
    assert published[-1].processes == (GpuProcess(42, "ollama", 5000),)
    reactor.advance(0.3)
    gpu.outReceived(gpu_line(900))
    assert published[-1].processes == ()


@pytest.mark.parametrize("bad", [
    b"this is not csv\n",
    b"0, sim, 24576, -3616, 1000, 1, 1\n",
    b"x" * (MAX_LINE_BYTES + 10),  # no newline at all, and too long
])
def test_garbage_kills_both_and_restarts_with_back_off(bad):
    reactor, stream, published = make()
    stream.start()
    first = [p for _, p in reactor.spawned]
    reactor.live("gpu").outReceived(bad)
    assert all(p.transport.signals == ["TERM"] for p in first)
    assert len(reactor.spawned) == 2
    reactor.advance(FIRST_BACKOFF_S)
    assert len(reactor.spawned) == 4 and stream.restarts == 1
    # Killed ones that ignore TERM get KILL and their pipes closed.
    reactor.advance(1.0)
    assert all(p.transport.signals == ["TERM", "KILL"] and p.transport.closed for p in first)


def test_an_unreadable_apps_line_restarts_too():
    reactor, stream, _ = make()
    stream.start()
    reactor.live("apps").outReceived(b"no timestamp here\n")
    reactor.advance(FIRST_BACKOFF_S)
    assert len(reactor.spawned) == 4


def test_a_hung_stream_is_restarted_and_the_back_off_doubles_then_resets():
    reactor, stream, published = make(loop_ms=200)
    stream.start()
    reactor.advance(2.0)  # nothing for HANG_PERIODS periods (at least 2 s)
    assert stream.restarts == 1
    reactor.advance(FIRST_BACKOFF_S)
    assert len(reactor.spawned) == 4
    reactor.advance(2.0)
    assert stream.restarts == 2
    reactor.advance(FIRST_BACKOFF_S)
    assert len(reactor.spawned) == 4  # doubled: not yet
    reactor.advance(FIRST_BACKOFF_S)
    assert len(reactor.spawned) == 6
    gpu = reactor.live("gpu")
    gpu.outReceived(gpu_line(1) + gpu_line(1))  # a reading: the back-off is back to the first
    reactor.live("apps").processEnded(Failure(error.ProcessTerminated(exitCode=1)))
    reactor.advance(FIRST_BACKOFF_S)
    assert len(reactor.spawned) == 8


def test_an_ended_process_restarts_but_a_stopped_one_does_not():
    reactor, stream, _ = make()
    stream.start()
    reactor.live("gpu").processEnded(Failure(error.ProcessDone(0)))
    reactor.advance(FIRST_BACKOFF_S)
    assert len(reactor.spawned) == 4
    stream.stop()
    for _, p in reactor.spawned[2:]:
        p.processEnded(Failure(error.ProcessTerminated(signal=15)))
    reactor.advance(60)
    assert len(reactor.spawned) == 4 and not stream.running
    assert not reactor.getDelayedCalls()


def test_a_missing_command_waits_for_the_back_off():
    reactor = FakeReactor()
    stream = GpuStream(reactor, lambda: ["/nonexistent/nvidia-smi"], lambda: 200, print)
    stream.start()
    assert reactor.spawned == [] and stream.restarts == 1
    stream.stop()
    assert not reactor.getDelayedCalls()


def test_demand_runs_the_stream_only_while_busy_and_stops_on_stop():
    reactor, stream, _ = make()
    busy = [False]
    demand = StreamDemand(reactor, stream, lambda: busy[0])
    demand.start()
    reactor.advance(0)
    assert reactor.spawned == []
    busy[0] = True
    reactor.advance(0.2)
    assert stream.running
    busy[0] = False
    reactor.advance(0.2)
    assert stream.running  # one idle check: kept
    reactor.advance(0.2)
    assert not stream.running
    busy[0] = True
    reactor.advance(0.2)
    assert stream.running
    demand.stop()
    reactor.advance(5)
    assert not stream.running and not reactor.getDelayedCalls()


def test_a_failing_busy_check_is_logged_and_checking_goes_on():
    reactor, stream, _ = make()
    calls = []

    def busy():
        calls.append(1)
        raise RuntimeError("boom")

    demand = StreamDemand(reactor, stream, busy)
    demand.start()
    reactor.advance(0)
    reactor.advance(0.2)
    assert len(calls) == 2
    demand.stop()


def test_a_stopped_stream_counts_its_processes_until_they_are_gone():
    reactor, stream, _ = make()
    stream.start()
    assert stream.live_processes == 2
    stream.stop()
    assert not stream.running and stream.live_processes == 2  # TERM sent, still there
    gpu, apps = (p for _, p in reactor.spawned)
    gpu.processEnded(Failure(error.ProcessTerminated(signal=15)))
    assert stream.live_processes == 1
    # The other ignores TERM (or a child of it holds its output): after the
    # grace it is killed and its pipes closed; it holds nothing of ours then.
    reactor.advance(60)
    assert apps.transport.closed and stream.live_processes == 0


def test_a_closed_stream_never_starts_again_until_reopened():
    # A late caller (a settle wait finishing as the service stops) must not
    # leave nvidia-smi running behind a stopped service.
    reactor, stream, _ = make()
    stream.close()
    stream.start()
    assert reactor.spawned == [] and not stream.wanted
    stream.reopen()
    stream.start()
    assert len(reactor.spawned) == 2


def test_stopping_the_demand_closes_the_stream_and_starting_it_reopens():
    reactor, stream, _ = make()
    demand = StreamDemand(reactor, stream, busy=lambda: True)
    demand.start()
    reactor.advance(0)
    assert stream.running
    demand.stop()
    stream.start()
    assert not stream.running and not stream.wanted
    demand.start()
    reactor.advance(0)
    assert stream.running


def test_a_stopped_process_that_still_prints_garbage_does_not_restart_twice():
    # The smi_garbage fault: the killed pair's buffered output arrived after
    # the kill, failed the stream a second time, and two restarts spawned two
    # pairs; the first went untracked and outlived the service.
    reactor, stream, _ = make()
    stream.start()
    gpu, apps = (p for _, p in reactor.spawned)
    gpu.outReceived(b"\x00\x7fthis is not csv at all\n")  # kills both, one restart
    apps.outReceived(b"\x00\x7fmore garbage\n")  # from a killed process: ignored
    stream._failed("the watchdog fired as well")  # and a second failure meanwhile
    reactor.advance(FIRST_BACKOFF_S * 4)
    assert len(reactor.spawned) == 4  # one new pair, not two
    assert stream.live_processes == 2  # the new pair; the old one was killed after its grace
    stream.stop()
    reactor.advance(60)
    assert stream.live_processes == 0
