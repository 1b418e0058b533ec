import os

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from gpumgr.gpu import (
    GpuCommandError,
    GpuParseError,
    NOT_SAMPLED,
    GpuSampler,
    _CaptureProtocol,
    parse_apps_csv,
    parse_gpu_csv,
)

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "nvidia-smi")


def fixture(name: str) -> str:
    with open(os.path.join(FIXTURES, name)) as f:
        return f.read()


def test_single_gpu():
    (gpu,) = parse_gpu_csv(fixture("gpu-rtx4090.csv"))
    assert gpu.index == 0 and gpu.name == "NVIDIA GeForce RTX 4090"
    assert (gpu.memory_total_mib, gpu.memory_used_mib, gpu.memory_free_mib) == (24564, 1203, 22962)
    assert (gpu.utilization_pct, gpu.temperature_c) == (3, 41)


def test_several_gpus():
    gpus = parse_gpu_csv(fixture("gpu-2xa100.csv"))
    assert [g.index for g in gpus] == [0, 1]
    assert gpus[1].memory_used_mib == 72011 and gpus[1].utilization_pct == 98


@pytest.mark.parametrize("name,field", [("gpu-mig.csv", "utilization_pct"),
                                        ("gpu-not-supported.csv", "temperature_c")])
def test_bracketed_values_are_unknown(name, field):
    (gpu,) = parse_gpu_csv(fixture(name))
    assert getattr(gpu, field) is None
    assert gpu.memory_total_mib is not None


def test_header_and_units_are_tolerated():
    (gpu,) = parse_gpu_csv(fixture("gpu-with-header-and-units.csv").split("\n", 1)[1])
    assert gpu.memory_free_mib == 22962 and gpu.utilization_pct == 3


def test_name_with_comma():
    (gpu,) = parse_gpu_csv("0, NVIDIA RTX 6000 Ada, Generation, 49140, 1, 49139, 0, 30\n")
    assert gpu.name == "NVIDIA RTX 6000 Ada, Generation" and gpu.memory_total_mib == 49140


def test_processes():
    procs = parse_apps_csv(fixture("apps-three.csv"))
    assert [(p.pid, p.name, p.used_mib) for p in procs] == [
        (1234, "/usr/local/bin/ollama", 9120),
        (2345, "/opt/whisper.cpp/build/bin/whisper-server", 1490),
        (3456, "python3", 6980),
    ]


def test_no_processes():
    assert parse_apps_csv(fixture("apps-none.csv")) == ()
    assert parse_apps_csv("No running processes found\n") == ()


def test_process_memory_unknown():
    (p,) = parse_apps_csv("77, [Insufficient Permissions], [N/A]\n")
    assert p.used_mib is None and p.name == "[Insufficient Permissions]"


@pytest.mark.parametrize("text,match", [
    ("", "no GPUs"),
    ("garbage\n", "expected 7 fields"),
    ("0, X, lots, 1, 2, 3, 4\n", "memory.total is not a whole number of MiB"),
    ("[N/A], X, 1, 1, 0, 1, 1\n", "index is unknown"),
])
def test_gpu_garbage_is_rejected_readably(text, match):
    with pytest.raises(GpuParseError, match=match):
        parse_gpu_csv(text)


@pytest.mark.parametrize("line,match", [
    ("0, X, 8192, -3616, 11808, 0, 30", "memory.used is not a whole number of MiB: '-3616'"),
    ("0, X, 8192, 100, 1e23, 0, 30", "memory.free is not a whole number of MiB: '1e23'"),
    ("0, X, 8192, 100, inf, 0, 30", "memory.free is not a whole number of MiB: 'inf'"),
    ("0, X, 8192, 100, nan, 0, 30", "memory.free is not a whole number of MiB: 'nan'"),
    ("0, X, 0x2000, 100, 8092, 0, 30", "memory.total is not a whole number of MiB"),
    ("0, X, 8192, 9000, 0, 0, 30", "GPU 0: memory.used 9000 MiB is more than memory.total "
                                   "8192 MiB"),
    ("0, X, 8192, 0, 9000, 0, 30", "GPU 0: memory.free 9000 MiB is more than memory.total "
                                   "8192 MiB"),
    ("0, X, 8192, 5000, 5000, 0, 30", "GPU 0: memory.used 5000 + memory.free 5000 MiB is "
                                      "more than memory.total 8192 MiB"),
    ("0, X, 99999999999, 0, 99999999999, 0, 30", "GPU 0: memory.total 99999999999 MiB is "
                                                 "not a real GPU's"),
    ("0, X, 0, 0, 0, 0, 30", "GPU 0: memory.total is 0 MiB"),
])
def test_impossible_memory_figures_are_refused_with_a_reason(line, match):
    """Issue 14.10: nvidia-smi figures of -3,616 or 1e23 MiB were taken as given."""
    with pytest.raises(GpuParseError) as e:
        parse_gpu_csv(line + "\n")
    assert match in str(e.value)


def test_plausible_memory_figures_still_parse():
    (gpu,) = parse_gpu_csv("0, X, 81559, 0, 81050, 0, 30\n")  # an H100: some is reserved
    assert (gpu.memory_total_mib, gpu.memory_used_mib, gpu.memory_free_mib) == (81559, 0, 81050)
    (gpu,) = parse_gpu_csv("0, X, 8192.0, 10.0, 8000, 0, 30\n")
    assert gpu.memory_total_mib == 8192


@pytest.mark.parametrize("line,match", [
    ("77, python, -5", "used_memory is not a whole number of MiB: '-5'"),
    ("77, python, 1e23", "used_memory is not a whole number of MiB: '1e23'"),
])
def test_impossible_process_memory_is_refused(line, match):
    with pytest.raises(GpuParseError) as e:
        parse_apps_csv(line + "\n")
    assert match in str(e.value)


def test_apps_garbage_is_rejected():
    with pytest.raises(GpuParseError, match="expected 3 fields"):
        parse_apps_csv("12 python\n")


# -- the sampler against the simulated executable, through real subprocesses --


@pytest_twisted.ensureDeferred
async def test_missing_binary_is_an_error_not_a_crash():
    sampler = GpuSampler(reactor, "/nonexistent/nvidia-smi", 2, 1)
    sample = await sampler.sample_now()
    assert not sample.available and "not found" in sample.error


def test_sampling_loop_survives_failures_and_keeps_its_interval():
    clock = Clock()
    calls = []
    outputs = iter([defer.fail(OSError("boom")), defer.fail(OSError("boom")),
                    defer.succeed(b"0, G, 100, 10, 90, 1, 30\n"), defer.succeed(b"")])

    def run(_reactor, argv, timeout_s):
        calls.append((clock.seconds(), argv[-2]))
        return next(outputs)

    sampler = GpuSampler(clock, "nvidia-smi --id=0", 2, 5, run=run)
    sampler.start()
    assert not sampler.latest.available and "boom" in sampler.latest.error
    clock.advance(2)
    assert sampler.latest.available and sampler.latest.gpus[0].memory_free_mib == 90
    assert [t for t, _ in calls] == [0, 0, 2, 2]
    assert calls[0][1].startswith("--query-gpu=") and calls[1][1].startswith("--query-compute-apps=")
    sampler.stop()


# -- a hung nvidia-smi must never hold anything up (regression) --


class _UnkillableProcess:
    """The transport of a D-state child: signals and closed pipes change nothing."""

    def __init__(self) -> None:
        self.signals: list[str] = []
        self.pipes_closed = False

    def signalProcess(self, sig: str) -> None:
        self.signals.append(sig)

    def loseConnection(self) -> None:
        self.pipes_closed = True


def test_a_child_that_ignores_kill_is_given_up_on_once_and_only_once():
    clock = Clock()
    proto = _CaptureProtocol(clock, 5, "nvidia-smi", kill_grace_s=1)
    transport = _UnkillableProcess()
    proto.makeConnection(transport)
    results = []
    proto.done.addBoth(results.append)
    clock.advance(5)
    assert transport.signals == ["TERM"] and results == []
    clock.advance(1)
    assert transport.signals == ["TERM", "KILL"] and results == []
    clock.advance(1)
    (failure,) = results
    assert failure.check(GpuCommandError)
    assert failure.getErrorMessage() == (
        "nvidia-smi timed out after 5s: it did not exit after KILL; gave up")
    assert transport.pipes_closed and clock.getDelayedCalls() == []
    # The child ends at last: nothing fires twice, nothing is rescheduled.
    proto.processExited(Failure(ProcessTerminated(signal=9)))
    proto.processEnded(Failure(ProcessTerminated(signal=9)))
    assert len(results) == 1 and clock.getDelayedCalls() == []


def test_a_child_that_exits_but_leaves_its_output_open_is_read_after_a_grace():
    clock = Clock()
    proto = _CaptureProtocol(clock, 5, "nvidia-smi", kill_grace_s=1)
    transport = _UnkillableProcess()
    proto.makeConnection(transport)
    results = []
    proto.done.addBoth(results.append)
    proto.outReceived(b"0, G, 100, 10, 90, 1, 30\n")
    proto.processExited(Failure(ProcessDone(0)))
    clock.advance(1)
    assert transport.pipes_closed and results == []
    proto.processEnded(Failure(ProcessDone(0)))  # what closing the pipes brings
    assert results == [b"0, G, 100, 10, 90, 1, 30\n"] and clock.getDelayedCalls() == []


def test_cancelling_a_command_kills_the_child_and_fires_once():
    clock = Clock()
    proto = _CaptureProtocol(clock, 5, "nvidia-smi", kill_grace_s=1)
    transport = _UnkillableProcess()
    proto.makeConnection(transport)
    results = []
    proto.done.addBoth(results.append)
    proto.done.cancel()
    assert transport.signals == ["KILL"] and transport.pipes_closed
    assert results[0].check(defer.CancelledError) and clock.getDelayedCalls() == []
    proto.processEnded(Failure(ProcessTerminated(signal=9)))
    assert len(results) == 1


def test_a_runner_that_never_answers_fails_the_sample_at_its_deadline():
    clock = Clock()
    pending: list[defer.Deferred] = []

    def run(_reactor, argv, timeout_s):
        pending.append(defer.Deferred())
        return pending[-1]

    sampler = GpuSampler(clock, "nvidia-smi", 2, 5, run=run, kill_grace_s=1)
    results = []
    sampler.sample_now().addBoth(results.append)
    clock.advance(7.9)
    assert results == [] and sampler.latest is NOT_SAMPLED
    clock.advance(0.1)
    (sample,) = results
    assert not sample.available and sample.error == "nvidia-smi gave no answer within 8s"
    assert sampler.latest is sample
    assert all(d.called for d in pending)  # cancelled, so real children get killed


def test_the_loop_keeps_ticking_after_a_sample_that_never_answered():
    clock = Clock()
    answers = iter([defer.Deferred(), defer.Deferred(),
                    defer.succeed(b"0, G, 100, 10, 90, 1, 30\n"), defer.succeed(b"")])
    sampler = GpuSampler(clock, "nvidia-smi", 2, 5, run=lambda *a: next(answers), kill_grace_s=1)
    sampler.start()
    clock.advance(8)
    assert not sampler.latest.available and "no answer" in sampler.latest.error
    clock.advance(2)
    assert sampler.latest.available and sampler.latest.memory_free_mib == 90
    sampler.stop()
