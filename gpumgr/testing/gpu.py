"""A simulated GPU whose memory the simulated consumers allocate and free.

Its state is mirrored into a JSON file after every change; the simulated
`nvidia-smi` executable (`gpumgr.testing.nvidia_smi`) reads that file, so the
broker samples it through a real subprocess exactly as it would the real one.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import attrs


@attrs.define
class Allocation:
    pid: int
    process_name: str
    used_mib: int


class SimulatedGpu:
    def __init__(
        self,
        state_path: str,
        total_mib: int = 24576,
        baseline_mib: int = 350,
        name: str = "NVIDIA GeForce RTX 4090",
    ) -> None:
        self.state_path = state_path
        self.total_mib = total_mib
        self.baseline_mib = baseline_mib
        self.name = name
        self.allocations: dict[str, Allocation] = {}
        self.oom_count = 0
        #: Failure modes for the nvidia-smi simulator: None, "driver", "hang", "garbage".
        self.smi_failure: str | None = None
        self.write_state()

    @property
    def used_mib(self) -> int:
        return self.baseline_mib + sum(a.used_mib for a in self.allocations.values())

    @property
    def free_mib(self) -> int:
        return self.total_mib - self.used_mib

    def allocate(self, owner: str, pid: int, process_name: str, mib: int) -> bool:
        """Take `mib` for `owner`; False (and an OOM counted) if it does not fit."""
        if owner in self.allocations:
            return True
        if mib > self.free_mib:
            self.oom_count += 1
            return False
        self.allocations[owner] = Allocation(pid, process_name, mib)
        self.write_state()
        return True

    def free(self, owner: str) -> None:
        if self.allocations.pop(owner, None) is not None:
            self.write_state()

    def set_smi_failure(self, mode: str | None) -> None:
        self.smi_failure = mode
        self.write_state()

    def state(self) -> dict[str, Any]:
        busy = any(True for _ in self.allocations)
        return {
            "failure": self.smi_failure,
            "gpus": [
                {
                    "index": 0,
                    "name": self.name,
                    "memory_total_mib": self.total_mib,
                    "memory_used_mib": self.used_mib,
                    "memory_free_mib": self.free_mib,
                    "utilization_pct": 37 if busy else 0,
                    "temperature_c": 48 if busy else 34,
                }
            ],
            "processes": [
                {"pid": a.pid, "name": a.process_name, "used_mib": a.used_mib}
                for a in self.allocations.values()
            ],
        }

    def write_state(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.state_path))
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".gpu-state-")
        with os.fdopen(fd, "w") as f:
            json.dump(self.state(), f)
        os.replace(tmp, self.state_path)
