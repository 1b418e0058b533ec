"""A simulated GPU whose memory the simulated consumers allocate and free.

Its in-process state is mirrored into a JSON file after every change; the
simulated `nvidia-smi` executable (`gpumgr.testing.nvidia_smi`) reads that
file, so the broker samples it through a real subprocess exactly as it would
the real one.

Other processes (the whisper server, `gpumgr.testing.whisper_server`) hold
memory too: each records its allocation in ``<state dir>/gpu-procs/<pid>.json``.
Both this class and nvidia-smi count such a file only while its process lives,
so memory comes back when the process dies, even by SIGKILL, as with the real
driver. In-process OOM decisions include that memory.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
from typing import Any

import attrs

from gpumgr.testing.nvidia_smi import (
    children_dir_for,
    pid_alive,
    procs_dir_for,
    read_external,
)


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
        self.procs_dir = procs_dir_for(state_path)
        self.allocations: dict[str, Allocation] = {}
        self.oom_count = 0
        #: Failure modes for the nvidia-smi simulator: None, "driver", "hang",
        #: "hang_child" (see `gpumgr.testing.nvidia_smi`), "garbage".
        self.smi_failure: str | None = None
        #: How long a "hang_child" child keeps nvidia-smi's stdout open.
        self.hang_child_s = 60.0
        self.write_state()

    def external_allocations(self) -> list[Allocation]:
        """Memory held by other live processes (stale records are dropped)."""
        return [Allocation(r["pid"], r["name"], r["used_mib"])
                for r in read_external(self.procs_dir)]

    @property
    def used_mib(self) -> int:
        return (self.baseline_mib + sum(a.used_mib for a in self.allocations.values())
                + sum(a.used_mib for a in self.external_allocations()))

    @property
    def _own_used_mib(self) -> int:
        return self.baseline_mib + sum(a.used_mib for a in self.allocations.values())

    @property
    def free_mib(self) -> int:
        return self.total_mib - self.used_mib

    def allocate(self, owner: str, pid: int, process_name: str, mib: int) -> bool:
        """Take `mib` for `owner`; False (and an OOM counted) if it does not fit."""
        if owner in self.allocations:
            return True
        if mib > self.free_mib:  # external processes' memory included
            self.oom_count += 1
            return False
        self.allocations[owner] = Allocation(pid, process_name, mib)
        self.write_state()
        return True

    def free(self, owner: str) -> None:
        if self.allocations.pop(owner, None) is not None:
            self.write_state()

    def set_smi_failure(self, mode: str | None, hang_child_s: float | None = None) -> None:
        self.smi_failure = mode
        if hang_child_s is not None:
            self.hang_child_s = hang_child_s
        self.write_state()

    def smi_children(self) -> list[int]:
        """Live children that "hang_child" nvidia-smi runs left holding their pipe."""
        directory = children_dir_for(self.state_path)
        try:
            pids = [int(n) for n in os.listdir(directory) if n.isdigit()]
        except OSError:
            return []
        return sorted(p for p in pids if pid_alive(p))

    def kill_smi_children(self) -> int:
        """SIGKILL every "hang_child" child (tests call this when done); returns how many."""
        directory = children_dir_for(self.state_path)
        killed = 0
        for pid in self.smi_children():
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        for name in os.listdir(directory) if os.path.isdir(directory) else ():
            try:
                os.unlink(os.path.join(directory, name))
            except OSError:
                pass
        return killed

    def state(self) -> dict[str, Any]:
        """What the state file holds: the in-process view. nvidia-smi adds the
        external processes' memory itself when it runs."""
        busy = any(True for _ in self.allocations)
        return {
            "failure": self.smi_failure,
            "hang_child_s": self.hang_child_s,
            "procs_dir": self.procs_dir,
            "gpus": [
                {
                    "index": 0,
                    "name": self.name,
                    "memory_total_mib": self.total_mib,
                    "memory_used_mib": self._own_used_mib,
                    "memory_free_mib": self.total_mib - self._own_used_mib,
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
