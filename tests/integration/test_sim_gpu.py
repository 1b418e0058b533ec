"""The simulated GPU and nvidia-smi: memory of other processes, and the hang_child failure."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.protocol import ProcessProtocol

from gpumgr.gpu import GpuSampler, nvidia_smi_argv
from gpumgr.testing import SimulatedGpu, sim_nvidia_smi_command
from gpumgr.testing.nvidia_smi import pid_alive, write_external
from tests.helpers import wait_for


@pytest.fixture
def gpu(tmp_path):
    g = SimulatedGpu(str(tmp_path / "gpu-state.json"), total_mib=10000, baseline_mib=300)
    yield g
    g.kill_smi_children()


# -- memory held by other processes ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_other_processes_memory_counts_while_they_live(gpu):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_external(gpu.procs_dir, sleeper.pid, "/opt/whisper-server", 2500)
        gpu.allocate("ollama", 4242, "/usr/local/bin/ollama", 4000)
        assert [(a.pid, a.used_mib) for a in gpu.external_allocations()] == [(sleeper.pid, 2500)]
        assert gpu.free_mib == 10000 - 300 - 4000 - 2500
        sample = await GpuSampler(reactor, sim_nvidia_smi_command(gpu.state_path), 2, 10
                                  ).sample_now()
        assert sample.gpus[0].memory_free_mib == gpu.free_mib
        assert sorted((p.name, p.used_mib) for p in sample.processes) == [
            ("/opt/whisper-server", 2500), ("/usr/local/bin/ollama", 4000)]
        # In-process OOM decisions see it too.
        assert not gpu.allocate("comfyui", 4243, "python3 main.py", 3500)
        assert gpu.oom_count == 1

        sleeper.kill()
        # Not reaped yet: a zombie has already given its memory back.
        await wait_for(lambda: not pid_alive(sleeper.pid), timeout_s=10)
        assert os.path.exists(f"/proc/{sleeper.pid}")  # still a zombie: nobody reaped it
        assert gpu.external_allocations() == [] and gpu.free_mib == 10000 - 300 - 4000
        sample = await GpuSampler(reactor, sim_nvidia_smi_command(gpu.state_path), 2, 10
                                  ).sample_now()
        assert [p.name for p in sample.processes] == ["/usr/local/bin/ollama"]
        assert gpu.allocate("comfyui", 4243, "python3 main.py", 3500)
    finally:
        sleeper.kill()
        sleeper.wait()


# -- nvidia-smi's hang_child mode ------------------------------------------------------------------


class Smi(ProcessProtocol):
    def __init__(self) -> None:
        self.exited: defer.Deferred = defer.Deferred()
        self.ended: defer.Deferred = defer.Deferred()

    def processExited(self, reason) -> None:
        self.exited.callback(None)

    def processEnded(self, reason) -> None:
        self.ended.callback(None)


def _spawn_smi(gpu) -> Smi:
    argv = nvidia_smi_argv(sim_nvidia_smi_command(gpu.state_path)) + [
        "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"]
    proto = Smi()
    reactor.spawnProcess(proto, argv[0], argv, env=os.environ)
    return proto


@pytest_twisted.ensureDeferred
async def test_hang_child_keeps_the_pipe_open_after_nvidia_smi_is_killed(gpu):
    gpu.set_smi_failure("hang_child", hang_child_s=60)
    smi = _spawn_smi(gpu)
    await wait_for(lambda: gpu.smi_children(), timeout_s=10)
    smi.transport.signalProcess("KILL")
    await smi.exited.addTimeout(10, reactor)
    # nvidia-smi is dead and reaped, but its stdout is still open in the child.
    assert not smi.ended.called and len(gpu.smi_children()) == 1
    assert gpu.kill_smi_children() == 1
    await smi.ended.addTimeout(10, reactor)
    assert gpu.smi_children() == []


@pytest_twisted.ensureDeferred
async def test_the_hang_child_ends_by_itself(gpu):
    gpu.set_smi_failure("hang_child", hang_child_s=0.5)
    smi = _spawn_smi(gpu)
    await wait_for(lambda: gpu.smi_children(), timeout_s=10)
    smi.transport.signalProcess("KILL")
    await smi.ended.addTimeout(20, reactor)  # bounded: the child gave up the pipe on its own
    await wait_for(lambda: not gpu.smi_children(), timeout_s=10)
