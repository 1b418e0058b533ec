"""The nvidia-smi stream against the simulated nvidia-smi, as real subprocesses."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor

from gpumgr.gpu import GpuSampler, nvidia_smi_argv
from gpumgr.gpu_stream import GpuStream
from gpumgr.testing import SimulatedGpu, sim_nvidia_smi_command
from gpumgr.testing.nvidia_smi import main as smi_main
from tests.helpers import wait_for


@pytest.fixture
def gpu(tmp_path):
    g = SimulatedGpu(str(tmp_path / "gpu-state.json"), total_mib=10000, baseline_mib=300)
    yield g
    g.kill_smi_children()


def _stream(gpu, published, fallback=lambda: None, loop_ms=50):
    return GpuStream(reactor, lambda: nvidia_smi_argv(sim_nvidia_smi_command(gpu.state_path)),
                     lambda: loop_ms, published.append, fallback=fallback)


def test_the_simulated_nvidia_smi_loops_with_the_header_once(gpu, capsys, monkeypatch):
    gpu.allocate("ollama", 4242, "/usr/local/bin/ollama", 4000)
    sleeps = []

    def sleep(s):
        sleeps.append(s)
        if len(sleeps) == 3:
            raise KeyboardInterrupt  # "until killed"

    monkeypatch.setattr("gpumgr.testing.nvidia_smi.time.sleep", sleep)
    with pytest.raises(KeyboardInterrupt):
        smi_main(["--state", gpu.state_path, "--query-compute-apps=timestamp,pid,used_memory",
                  "--format=csv", "--loop-ms=100"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "timestamp, pid, used_memory [MiB]"
    assert len(lines) == 1 + 3 and all(line.endswith(", 4242, 4000 MiB") for line in lines[1:])
    assert all(0 <= s <= 0.1 for s in sleeps)


def test_a_period_without_compute_processes_prints_nothing(gpu, capsys, monkeypatch):
    sleeps = []

    def sleep(s):
        sleeps.append(s)
        if len(sleeps) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr("gpumgr.testing.nvidia_smi.time.sleep", sleep)
    with pytest.raises(KeyboardInterrupt):
        smi_main(["--state", gpu.state_path, "--query-compute-apps=pid,used_memory",
                  "--format=csv,noheader,nounits", "--loop-ms=100"])
    assert capsys.readouterr().out == ""


@pytest_twisted.ensureDeferred
async def test_the_stream_follows_memory_as_it_moves_and_stops_its_processes(gpu):
    published = []
    stream = _stream(gpu, published)
    stream.start()
    try:
        gpu.allocate("ollama", 4242, "/usr/local/bin/ollama", 4000)
        await wait_for(lambda: any(s.processes and s.gpus[0].memory_used_mib == 4300
                                   for s in published), timeout_s=20)
        gpu.allocate("ollama-kv", 4242, "/usr/local/bin/ollama", 1500)  # a job's working memory
        await wait_for(lambda: published[-1].gpus[0].memory_used_mib == 5800, timeout_s=20)
        gpu.free("ollama-kv")
        await wait_for(lambda: published[-1].gpus[0].memory_used_mib == 4300, timeout_s=20)
        assert stream.restarts == 0 and stream.samples >= 3
    finally:
        stream.stop()
    assert not stream.running


@pytest_twisted.ensureDeferred
async def test_garbage_restarts_the_stream_and_it_recovers(gpu):
    published = []
    stream = _stream(gpu, published, fallback=lambda: ())
    gpu.set_smi_failure("garbage")
    stream.start()
    try:
        await wait_for(lambda: stream.restarts >= 1, timeout_s=20)
        gpu.set_smi_failure(None)
        await wait_for(lambda: len(published) >= 2, timeout_s=30)
        assert published[-1].gpus[0].memory_total_mib == 10000
    finally:
        stream.stop()


@pytest_twisted.ensureDeferred
async def test_fresh_sample_reads_the_stream_while_it_runs(gpu):
    sampler = GpuSampler(reactor, sim_nvidia_smi_command(gpu.state_path), 60, 10)
    published = []
    stream = GpuStream(reactor, lambda: nvidia_smi_argv(sim_nvidia_smi_command(gpu.state_path)),
                       lambda: 50, lambda s: (published.append(s), sampler.publish(s)),
                       fallback=lambda: ())
    sampler.stream = stream
    try:
        first = await sampler.fresh_sample()  # no stream yet: this one is spawned
        assert first.available and sampler.samples_taken == 1
        assert not stream.wanted  # and it does not start one: the demand does
        stream.start()  # as the stream's demand does while the GPU is held
        await wait_for(lambda: len(published) >= 1, timeout_s=20)
        gpu.allocate("comfyui", 4243, "python3 main.py", 3000)
        while True:
            s = await sampler.fresh_sample()
            if s.gpus[0].memory_used_mib == 3300:
                break
        assert sampler.samples_taken == 1  # from the stream, not a spawn each
    finally:
        stream.stop()
