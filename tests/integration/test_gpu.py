import os
import signal

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from gpumgr.gpu import GpuSampler, run_command
from gpumgr.testing import SimulatedGpu, sim_nvidia_smi_command

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "nvidia-smi")


def fixture(name: str) -> str:
    with open(os.path.join(FIXTURES, name)) as f:
        return f.read()


# -- the sampler against the simulated executable, through real subprocesses --


@pytest.fixture
def sim_gpu(tmp_path):
    return SimulatedGpu(str(tmp_path / "state.json"), total_mib=10000, baseline_mib=300)


@pytest_twisted.ensureDeferred
async def test_sampler_reads_the_simulated_nvidia_smi(sim_gpu):
    sim_gpu.allocate("ollama", 4242, "/usr/local/bin/ollama", 6000)
    sampler = GpuSampler(reactor, sim_nvidia_smi_command(sim_gpu.state_path), 2, 10)
    sample = await sampler.sample_now()
    assert sample.available, sample.error
    assert sample.gpus[0].memory_free_mib == 10000 - 300 - 6000
    assert sample.memory_free_mib == 3700
    assert [(p.pid, p.name, p.used_mib) for p in sample.processes] == [
        (4242, "/usr/local/bin/ollama", 6000)]
    assert sampler.latest is sample


@pytest.mark.parametrize("mode,message", [
    ("driver", "exited with status 9: NVIDIA-SMI has failed"),
    ("garbage", "unreadable nvidia-smi output"),
    ("negative_memory", "unreadable nvidia-smi output: line 1: memory.used is not a whole "
                        "number of MiB: '-3616'"),
    ("huge_memory", "unreadable nvidia-smi output: line 1: memory.free is not a whole "
                    "number of MiB: '1e+23'"),
])
@pytest_twisted.ensureDeferred
async def test_sampler_reports_failures(sim_gpu, mode, message):
    sim_gpu.set_smi_failure(mode)
    sampler = GpuSampler(reactor, sim_nvidia_smi_command(sim_gpu.state_path), 2, 10)
    sample = await sampler.sample_now()
    assert not sample.available
    assert message in sample.error
    assert sample.gpus == ()


@pytest_twisted.ensureDeferred
async def test_hung_nvidia_smi_is_killed_at_the_deadline(sim_gpu):
    sim_gpu.set_smi_failure("hang")
    sampler = GpuSampler(reactor, sim_nvidia_smi_command(sim_gpu.state_path), 2, 0.5)
    sample = await sampler.sample_now()
    assert not sample.available and "timed out after 0.5s" in sample.error


@pytest_twisted.ensureDeferred
async def test_child_gets_the_environment():
    os.environ["GPUMGR_ENV_PROBE"] = "present"
    try:
        out = await run_command(reactor, ["sh", "-c", "echo $GPUMGR_ENV_PROBE"], 5)
    finally:
        del os.environ["GPUMGR_ENV_PROBE"]
    assert out == b"present\n"


# -- a hung nvidia-smi must never hold anything up (regression) --

_FAKE_SMI = """#!/bin/sh
# Healthy while ./healthy exists; otherwise hangs like a wrapper whose child
# keeps stdout open: TERM ends the main process, but the pipe stays open.
dir=$(dirname "$0")
if [ -e "$dir/healthy" ]; then
  case "$1" in
    --query-gpu=*) echo "0, Fake GPU, 1000, 100, 900, 0, 30" ;;
  esac
  exit 0
fi
sleep 300 &
echo $! >> "$dir/children"
exec sleep 300
"""


@pytest.fixture
def fake_smi(tmp_path):
    """A fake nvidia-smi (initially hanging); leftover children are killed at teardown."""
    script = tmp_path / "nvidia-smi"
    script.write_text(_FAKE_SMI)
    script.chmod(0o755)
    yield script
    children = tmp_path / "children"
    if children.exists():
        for pid in children.read_text().split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest_twisted.ensureDeferred
async def test_a_hung_nvidia_smi_whose_child_holds_stdout_still_ends_the_sample(fake_smi):
    sampler = GpuSampler(reactor, str(fake_smi), 2, 0.3, kill_grace_s=0.1)
    # Before the fix this never fired: processEnded waits for the held pipe.
    sample = await sampler.sample_now().addTimeout(10, reactor)
    assert not sample.available
    assert sample.error == "nvidia-smi timed out after 0.3s"
    assert sampler.latest is sample
    assert [line for line in (fake_smi.parent / "children").read_text().split()]


@pytest_twisted.ensureDeferred
async def test_the_sampling_loop_outlives_a_hung_nvidia_smi_and_recovers(fake_smi):
    (fake_smi.parent / "healthy").touch()
    sampler = GpuSampler(reactor, str(fake_smi), 0.05, 0.3, kill_grace_s=0.1)
    samples: defer.DeferredQueue = defer.DeferredQueue()
    sampler.listeners.append(samples.put)

    async def next_sample():
        return await samples.get().addTimeout(10, reactor)

    sampler.start()
    try:
        assert (await next_sample()).available
        (fake_smi.parent / "healthy").unlink()
        sample = await next_sample()
        while sample.available:  # a tick may have begun before the switch
            sample = await next_sample()
        assert "timed out after 0.3s" in sample.error
        assert not sampler.latest.available  # status no longer shows the stale sample
        (fake_smi.parent / "healthy").touch()
        sample = await next_sample()
        while not sample.available:
            sample = await next_sample()
        assert sample.memory_free_mib == 900
    finally:
        sampler.stop()


