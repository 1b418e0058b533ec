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

The card also knows when it computes: a simulated job's working period runs
from `begin_work` to `end_work` (the service's own view, which may outlast
the HTTP exchange that asked for it). While any period is open nvidia-smi
reports the card busy (`utilization.gpu`); a period that begins while another
is open is recorded in `overlaps`, so a test can assert that two jobs never
shared the card.

A box may have several cards (`cards_mib`): each has its own memory, its
own busy flag and its own overlap record, and nvidia-smi prints one row per
card with its UUID. An owner's memory goes on the cards it was placed on
(`place`, default card 0); a process of its own records its cards from
``CUDA_VISIBLE_DEVICES``. A card can be hidden (`hide_card`): its row
disappears from nvidia-smi, as when a card falls off the bus.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
from typing import Any, Sequence

import attrs
from twisted.internet.interfaces import IReactorTime

from gpumgr.testing.nvidia_smi import (
    children_dir_for,
    pid_alive,
    procs_dir_for,
    read_external,
    sim_uuid,
)


@attrs.define
class Allocation:
    pid: int
    process_name: str
    used_mib: int
    #: Every card it holds `used_mib` on.
    cards: tuple[int, ...] = (0,)


#: What nvidia-smi's utilization.gpu reads while a job computes, and while none does.
BUSY_UTILIZATION_PCT = 97
IDLE_UTILIZATION_PCT = 0


@attrs.frozen
class WorkOverlap:
    """A job began computing while others still did (`SimulatedGpu.overlaps`)."""

    at: float | None
    began: str
    already_working: tuple[str, ...]


class SimulatedGpu:
    def __init__(
        self,
        state_path: str,
        total_mib: int = 24576,
        baseline_mib: int = 350,
        name: str = "NVIDIA GeForce RTX 4090",
        cards_mib: Sequence[int] | None = None,
    ) -> None:
        self.state_path = state_path
        #: Each card's memory; card 0's is `total_mib`.
        self.cards_mib: tuple[int, ...] = tuple(cards_mib) if cards_mib else (total_mib,)
        self.total_mib = self.cards_mib[0]
        #: Owner (a consumer's name, before any "/") -> the cards its memory goes on.
        self.placements: dict[str, tuple[int, ...]] = {}
        #: Cards whose row nvidia-smi leaves out.
        self.hidden_cards: set[int] = set()
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
        #: Open working periods: owner -> how many jobs of it compute now.
        self.working: dict[str, int] = {}
        self.overlaps: list[WorkOverlap] = []
        self.max_concurrent_work = 0
        #: Set by the world, so that overlaps carry a time.
        self.clock: IReactorTime | None = None
        #: False: nvidia-smi prints utilization.gpu as [N/A], as under MIG.
        self.reports_utilization = True
        self.write_state()

    # -- cards -----------------------------------------------------------------

    @property
    def card_count(self) -> int:
        return len(self.cards_mib)

    def place(self, owner: str, cards: Sequence[int]) -> None:
        """`owner`'s memory (and its jobs' work) goes on `cards` from now on."""
        self.placements[owner] = tuple(cards)

    def cards_of(self, owner: str) -> tuple[int, ...]:
        return self.placements.get(owner.split("/", 1)[0], (0,))

    def hide_card(self, index: int, hidden: bool = True) -> None:
        """nvidia-smi stops (or starts again) printing card `index`'s row."""
        (self.hidden_cards.add if hidden else self.hidden_cards.discard)(index)
        self.write_state()

    # -- working periods -------------------------------------------------------

    @property
    def busy(self) -> bool:
        return bool(self.working)

    def busy_on(self, card: int) -> bool:
        return any(card in self.cards_of(o) for o in self.working)

    def begin_work(self, owner: str) -> None:
        """A job of `owner` starts computing; recorded as an overlap if another
        does on one of its cards."""
        mine = set(self.cards_of(owner))
        sharing = [o for o in self.working if mine & set(self.cards_of(o))]
        if sharing:
            at = None if self.clock is None else self.clock.seconds()
            self.overlaps.append(WorkOverlap(at, owner, tuple(sorted(sharing))))
        self.working[owner] = self.working.get(owner, 0) + 1
        self.max_concurrent_work = max(self.max_concurrent_work, sum(self.working.values()))
        self.write_state()

    def end_work(self, owner: str) -> None:
        left = self.working.get(owner, 0) - 1
        if left > 0:
            self.working[owner] = left
        else:
            self.working.pop(owner, None)
        self.write_state()

    def external_allocations(self) -> list[Allocation]:
        """Memory held by other live processes (stale records are dropped)."""
        return [Allocation(r["pid"], r["name"], r["used_mib"], tuple(r.get("cards", [0])))
                for r in read_external(self.procs_dir)]

    @property
    def used_mib(self) -> int:
        """Card 0's (see `used_mib_on`)."""
        return self.used_mib_on(0)

    def used_mib_on(self, card: int) -> int:
        return self._own_used_mib_on(card) + sum(
            a.used_mib for a in self.external_allocations() if card in a.cards)

    def _own_used_mib_on(self, card: int) -> int:
        return self.baseline_mib + sum(
            a.used_mib for a in self.allocations.values() if card in a.cards)

    @property
    def free_mib(self) -> int:
        """Card 0's (see `free_mib_on`)."""
        return self.free_mib_on(0)

    def free_mib_on(self, card: int) -> int:
        return self.cards_mib[card] - self.used_mib_on(card)

    def allocate(self, owner: str, pid: int, process_name: str, mib: int,
                 cards: Sequence[int] | None = None) -> bool:
        """Take `mib` for `owner` on each of its cards (default: where it was
        placed); False (and an OOM counted) if it does not fit on one of them."""
        if owner in self.allocations:
            return True
        on = tuple(cards) if cards is not None else self.cards_of(owner)
        if any(mib > self.free_mib_on(c) for c in on):  # external processes' memory included
            self.oom_count += 1
            self.write_state()
            return False
        self.allocations[owner] = Allocation(pid, process_name, mib, on)
        self.write_state()
        return True

    def resize(self, owner: str, mib: int) -> bool:
        """Grow or shrink `owner`'s allocation (a KV cache growing); False (and
        an OOM counted) if the growth does not fit; False for an owner that holds
        nothing (`allocate` first)."""
        held = self.allocations.get(owner)
        if held is None:
            return False
        if mib - held.used_mib > self.free_mib:
            self.oom_count += 1
            self.write_state()
            return False
        held.used_mib = mib
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
        external processes' memory itself when it runs. Allocations of one
        process are one row, as the real tool shows them."""
        per_pid: dict[tuple[int, int], dict[str, Any]] = {}
        shown = [i for i in range(self.card_count) if i not in self.hidden_cards]
        for a in self.allocations.values():
            for card in a.cards:
                if card not in shown:
                    continue
                row = per_pid.setdefault((card, a.pid), {
                    "pid": a.pid, "name": a.process_name, "used_mib": 0,
                    "gpu_uuid": sim_uuid(card)})
                row["used_mib"] += a.used_mib
        gpus = []
        for index in shown:
            busy, used = self.busy_on(index), self._own_used_mib_on(index)
            gpus.append({
                "index": index,
                "uuid": sim_uuid(index),
                "name": self.name,
                "memory_total_mib": self.cards_mib[index],
                "memory_used_mib": used,
                "memory_free_mib": self.cards_mib[index] - used,
                "utilization_pct": None if not self.reports_utilization
                else BUSY_UTILIZATION_PCT if busy else IDLE_UTILIZATION_PCT,
                "temperature_c": 48 if busy else 34,
            })
        return {
            "oom_count": self.oom_count,
            "failure": self.smi_failure,
            "hang_child_s": self.hang_child_s,
            "procs_dir": self.procs_dir,
            "gpus": gpus,
            "processes": list(per_pid.values()),
        }

    def write_state(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.state_path))
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".gpu-state-")
        with os.fdopen(fd, "w") as f:
            json.dump(self.state(), f)
        os.replace(tmp, self.state_path)
