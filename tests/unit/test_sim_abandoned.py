"""The simulation of work a client abandoned: a service computes on after its client left.

The simulated ollama evaluates a prompt (`prompt_eval_s`) without looking at
its client and notices a closed connection only at its next write; meanwhile
its job holds working memory (`working_mib`) and the simulated card reads
busy. The simulated card records any overlap of two jobs' working periods.
"""

from __future__ import annotations


from twisted.internet.task import Clock

from gpumgr.testing.nvidia_smi import sim_uuid
from gpumgr.testing import SimulatedGpu
from gpumgr.testing.gpu import BUSY_UTILIZATION_PCT, WorkOverlap


def test_the_card_records_jobs_that_overlap_and_not_those_that_follow(tmp_path):
    gpu = SimulatedGpu(str(tmp_path / "gpu-state.json"))
    gpu.clock = clock = Clock()
    gpu.begin_work("ollama")
    clock.advance(1)
    gpu.end_work("ollama")
    gpu.begin_work("mvoice")
    assert gpu.overlaps == [] and gpu.max_concurrent_work == 1
    clock.advance(1)
    gpu.begin_work("whisper")
    assert gpu.overlaps == [WorkOverlap(2.0, "whisper", ("mvoice",))]
    assert gpu.max_concurrent_work == 2
    gpu.end_work("mvoice")
    gpu.end_work("whisper")
    assert not gpu.busy


def test_the_card_reads_busy_only_while_a_job_computes(tmp_path):
    gpu = SimulatedGpu(str(tmp_path / "gpu-state.json"))
    gpu.allocate("ollama", 4242, "/usr/local/bin/ollama", 4000)
    assert gpu.state()["gpus"][0]["utilization_pct"] == 0  # loaded, idle
    gpu.begin_work("ollama")
    assert gpu.state()["gpus"][0]["utilization_pct"] == BUSY_UTILIZATION_PCT
    gpu.end_work("ollama")
    assert gpu.state()["gpus"][0]["utilization_pct"] == 0


def test_one_process_is_one_row_whatever_it_allocated(tmp_path):
    gpu = SimulatedGpu(str(tmp_path / "gpu-state.json"))
    gpu.allocate("ollama/llama3", 4242, "/usr/local/bin/ollama", 4000)
    gpu.allocate("ollama/work#1", 4242, "/usr/local/bin/ollama", 600)
    assert gpu.state()["processes"] == [
        {"pid": 4242, "name": "/usr/local/bin/ollama", "used_mib": 4600,
         "gpu_uuid": sim_uuid(0)}]  # one row per process and card (issue 17)


