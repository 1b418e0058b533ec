"""The simulated GPU and nvidia-smi: memory of other processes, and the hang_child failure."""

from __future__ import annotations

import os

import pytest

from gpumgr.testing import SimulatedGpu
from gpumgr.testing.nvidia_smi import write_external


@pytest.fixture
def gpu(tmp_path):
    g = SimulatedGpu(str(tmp_path / "gpu-state.json"), total_mib=10000, baseline_mib=300)
    yield g
    g.kill_smi_children()


# -- memory held by other processes ---------------------------------------------------------------


def test_a_reused_pid_does_not_keep_a_dead_processs_memory(gpu):
    path = write_external(gpu.procs_dir, os.getpid(), "me", 100)
    assert [a.used_mib for a in gpu.external_allocations()] == [100]
    # The same pid with another start time is another process (the pid was reused).
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text.replace('"start_time": "', '"start_time": "1'))
    assert gpu.external_allocations() == [] and not os.path.exists(path)


def test_unreadable_records_are_ignored(gpu):
    os.makedirs(gpu.procs_dir, exist_ok=True)
    with open(os.path.join(gpu.procs_dir, "123.json"), "w") as f:
        f.write("{half a record")
    assert gpu.external_allocations() == [] and gpu.free_mib == 10000 - 300
