"""A stand-in `nvidia-smi` that prints nvidia-smi's own CSV formats.

It reads the simulated GPU's state file (``--state PATH`` or
``$GPUMGR_SIM_STATE``) and answers the two queries gpumgr makes, in the
formats of the real tool: ``csv,noheader,nounits`` or ``csv`` with headers
and units. Failure modes written into the state file reproduce the real
tool's misbehaviour: a driver error (exit 9), a hang, garbage output,
impossible memory figures (``negative_memory``: -3616 MiB used,
``huge_memory``: 1e+23 MiB free), or
``hang_child``: a hang after starting a child that inherits stdout and keeps it
open (for ``hang_child_s`` seconds), so killing nvidia-smi alone does not
close its pipe.

Memory held by other processes (e.g. `gpumgr.testing.whisper_server`) is
read from ``<state dir>/gpu-procs/<pid>.json``: only files whose process is
still alive count, and stale ones are removed, the way the driver frees a
dead process's memory even after SIGKILL. This module must stay standard
library only: it runs as ``python -I -S nvidia_smi.py`` to start fast.

With ``--loop-ms=N`` it prints a reading every N ms until killed, as the real
tool does: the header once, and nothing at all in a period with no compute
process (so a reader cannot tell such a period from a hung tool); ``timestamp``
is a valid field of both queries.

Run as ``python -m gpumgr.testing.nvidia_smi`` or ``gpumgr-sim-nvidia-smi``.
"""

from __future__ import annotations

import json
import os
import sys
import time

_GPU_FIELDS = {
    "timestamp": ("timestamp", ""),
    "index": ("index", ""),
    "uuid": ("uuid", ""),
    "name": ("name", ""),
    "memory.total": ("memory_total_mib", " MiB"),
    "memory.used": ("memory_used_mib", " MiB"),
    "memory.free": ("memory_free_mib", " MiB"),
    "utilization.gpu": ("utilization_pct", " %"),
    "temperature.gpu": ("temperature_c", ""),
}
_APP_FIELDS = {
    "timestamp": ("timestamp", ""),
    "gpu_uuid": ("gpu_uuid", ""),
    "pid": ("pid", ""),
    "process_name": ("name", ""),
    "used_memory": ("used_mib", " MiB"),
}
#: Failure modes that print well-formed CSV with impossible memory figures.
_IMPOSSIBLE = {
    "negative_memory": ("memory_used_mib", -3616),
    "huge_memory": ("memory_free_mib", "1e+23"),
}
#: Beside the state file: one JSON file per external process holding GPU memory.
PROCS_DIR = "gpu-procs"
#: Beside the state file: one empty file per ``hang_child`` child, named by its pid.
CHILDREN_DIR = "smi-children"
_DRIVER_FAILURE = (
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
    "Make sure that the latest NVIDIA driver is installed and running.\n"
)


def sim_uuid(index: int) -> str:
    """The simulated card `index`'s UUID, in the real tool's shape."""
    return f"GPU-00000000-0000-4000-8000-{index:012d}"


def visible_cards(environ: dict | None = None) -> list[int]:
    """The cards a process was given (``CUDA_VISIBLE_DEVICES`` as indexes; card 0 without it)."""
    value = (os.environ if environ is None else environ).get("CUDA_VISIBLE_DEVICES", "")
    cards = [int(v) for v in value.split(",") if v.strip().isdigit()]
    return cards or [0]


def procs_dir_for(state_path: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(state_path)), PROCS_DIR)


def children_dir_for(state_path: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(state_path)), CHILDREN_DIR)


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time) from /proc, or None where there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = data.rpartition(")")[2].split()
    return fields[0], fields[19]


def process_start_time(pid: int) -> str | None:
    """A token that changes when a pid is reused (Linux: clock ticks since boot)."""
    stat = _proc_stat(pid)
    return None if stat is None else stat[1]


def pid_alive(pid: int, start_time: str | None = None) -> bool:
    """Whether `pid` still runs: a zombie has already given back its memory,
    and a different start time means the pid was reused."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    stat = _proc_stat(pid)
    if stat is None:
        return True
    state, started = stat
    if state in ("Z", "X"):
        return False
    return start_time is None or started == start_time


def write_external(procs_dir: str, pid: int, process_name: str, used_mib: int,
                   cards: list | None = None) -> str:
    """Record that `pid` holds `used_mib` on each of `cards` (default: card 0),
    written atomically; returns the file."""
    os.makedirs(procs_dir, exist_ok=True)
    path = os.path.join(procs_dir, f"{pid}.json")
    tmp = os.path.join(procs_dir, f".{pid}.json.tmp")
    with open(tmp, "w") as f:
        json.dump({"pid": pid, "process_name": process_name, "used_mib": used_mib,
                   "start_time": process_start_time(pid), "cards": list(cards or [0])}, f)
    os.replace(tmp, path)
    return path


def read_external(procs_dir: str | None) -> list[dict]:
    """Live external allocations as nvidia-smi process rows; stale files are removed."""
    rows: list[dict] = []
    if not procs_dir:
        return rows
    try:
        names = sorted(os.listdir(procs_dir))
    except OSError:
        return rows
    for name in names:
        if not name.endswith(".json") or name.startswith("."):
            continue
        path = os.path.join(procs_dir, name)
        try:
            with open(path) as f:
                entry = json.load(f)
            pid, used = int(entry["pid"]), int(entry["used_mib"])
            cards = [int(c) for c in entry.get("cards") or [0]]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not pid_alive(pid, entry.get("start_time")):
            try:
                os.unlink(path)
            except OSError:
                pass
            continue
        rows.append({"pid": pid, "name": entry.get("process_name", "?"), "used_mib": used,
                     "busy": bool(entry.get("busy")), "cards": cards})
    return rows


def with_external(state: dict, rows: list[dict]) -> dict:
    """The state file's in-process view plus memory held by external processes.

    Holding memory is not computing: the card reads busy only for a row that
    says so (``"busy": true`` in its record)."""
    if not rows:
        return state
    gpus = [dict(g) for g in state["gpus"]]
    processes = list(state["processes"])
    for g in gpus:
        mine = [r for r in rows if g["index"] in r.get("cards", [0])]
        extra = sum(r["used_mib"] for r in mine)
        g["memory_used_mib"] += extra
        g["memory_free_mib"] -= extra
        if any(r.get("busy") for r in mine) and g.get("utilization_pct") is not None:
            g["utilization_pct"] = max(g["utilization_pct"], 97)
            g["temperature_c"] = max(g.get("temperature_c") or 0, 48)
        processes += [{"pid": r["pid"], "name": r["name"], "used_mib": r["used_mib"],
                       "gpu_uuid": g.get("uuid") or sim_uuid(g["index"])} for r in mine]
    return {**state, "gpus": gpus, "processes": processes}


def _hold_stdout_in_a_child(state_path: str, seconds: float) -> None:
    """Fork a child that inherits stdout and outlives us, bounded by `seconds`."""
    pid = os.fork()
    if pid == 0:
        try:
            time.sleep(seconds)
        finally:
            os._exit(0)
    directory = children_dir_for(state_path)
    os.makedirs(directory, exist_ok=True)
    open(os.path.join(directory, str(pid)), "w").close()


def _render(rows, fields, table, header: bool, units: bool) -> str:
    lines = []
    if header:
        names = []
        for f in fields:
            unit = table[f][1].strip()
            names.append(f"{f} [{unit}]" if unit and units else f)
        lines.append(", ".join(names))
    for row in rows:
        values = []
        for f in fields:
            key, unit = table[f]
            value = row.get(key)
            if value is None:
                values.append("[N/A]")
            else:
                values.append(f"{value}{unit if units else ''}")
        lines.append(", ".join(values))
    return "".join(line + "\n" for line in lines)


def _options(args: list[str]) -> dict:
    opts: dict = {"state": os.environ.get("GPUMGR_SIM_STATE"), "query": None, "fmt": "csv",
                  "loop_s": None}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--state":
            opts["state"] = args[i + 1]
            i += 1
        elif arg.startswith("--state="):
            opts["state"] = arg.split("=", 1)[1]
        elif arg.startswith("--query-gpu=") or arg.startswith("--query-compute-apps="):
            opts["query"] = arg  # one selective query per run: the last one given
        elif arg.startswith("--format="):
            opts["fmt"] = arg.split("=", 1)[1]
        elif arg.startswith("--loop-ms=") or arg in ("-lms", "--loop-ms"):
            value = arg.split("=", 1)[1] if "=" in arg else args[i + 1]
            i += 0 if "=" in arg else 1
            opts["loop_s"] = max(int(value), 1) / 1000.0
        elif arg.startswith("--loop=") or arg in ("-l", "--loop"):
            value = arg.split("=", 1)[1] if "=" in arg else args[i + 1]
            i += 0 if "=" in arg else 1
            opts["loop_s"] = float(value)
        i += 1
    return opts


def _reading(opts: dict, header: bool) -> tuple[str, int | None]:
    """One reading's output, and an exit status to end with (None: go on)."""
    state_path = opts["state"]
    try:
        with open(state_path) as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        sys.stderr.write(f"simulated nvidia-smi: cannot read state: {e}\n")
        return _DRIVER_FAILURE, 9
    state = with_external(state, read_external(state.get("procs_dir") or procs_dir_for(state_path)))
    failure = state.get("failure")
    if failure == "driver":
        return _DRIVER_FAILURE, 9
    if failure == "hang":
        time.sleep(3600)
        return "", 0
    if failure == "hang_child":
        _hold_stdout_in_a_child(state_path, float(state.get("hang_child_s", 60)))
        time.sleep(3600)
        return "", 0
    if failure == "garbage":
        return "\x00\x7fthis is not csv at all\n", None
    if failure in _IMPOSSIBLE:  # well-formed CSV, impossible figures (seen on real drivers)
        key, value = _IMPOSSIBLE[failure]
        state = {**state, "gpus": [{**g, key: value} for g in state["gpus"]]}
    fmt = opts["fmt"].split(",")
    units = "nounits" not in fmt
    query = opts["query"]
    if query is None:
        return f"{len(state['gpus'])} simulated GPU(s)\n", 0
    kind, _, field_list = query.partition("=")
    fields = [f.strip() for f in field_list.split(",") if f.strip()]
    table, rows = (
        (_GPU_FIELDS, state["gpus"]) if kind == "--query-gpu" else (_APP_FIELDS, state["processes"])
    )
    unknown = [f for f in fields if f not in table]
    if unknown:
        return f'Field "{unknown[0]}" is not a valid field to query.\n', 2
    now = time.time()
    stamp = time.strftime("%Y/%m/%d %H:%M:%S", time.localtime(now)) + f".{int(now * 1000) % 1000:03d}"
    rows = [{**r, "timestamp": stamp} for r in rows]
    return _render(rows, fields, table, header, units), None


def main(argv: list[str] | None = None) -> int:
    """One reading, or with ``--loop-ms=N`` (``-lms``, ``--loop``/``-l`` seconds) one
    every N ms until killed, as the real tool: the header (when asked for) comes
    once, and a period with no compute process prints nothing at all."""
    opts = _options(sys.argv[1:] if argv is None else argv)
    if opts["state"] is None:
        sys.stderr.write("simulated nvidia-smi: no --state PATH or $GPUMGR_SIM_STATE\n")
        return 2
    header = "noheader" not in opts["fmt"].split(",")
    while True:
        began = time.monotonic()
        text, rc = _reading(opts, header)
        sys.stdout.write(text)
        sys.stdout.flush()
        if rc is not None or opts["loop_s"] is None:
            return rc or 0
        header = False
        time.sleep(max(0.0, opts["loop_s"] - (time.monotonic() - began)))


if __name__ == "__main__":
    sys.exit(main())
