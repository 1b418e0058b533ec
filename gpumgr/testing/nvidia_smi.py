"""A stand-in `nvidia-smi` that prints nvidia-smi's own CSV formats.

It reads the simulated GPU's state file (``--state PATH`` or
``$GPUMGR_SIM_STATE``) and answers the two queries gpumgr makes, in the
formats of the real tool: ``csv,noheader,nounits`` or ``csv`` with headers
and units. Failure modes written into the state file reproduce the real
tool's misbehaviour: a driver error (exit 9), a hang, or garbage output.

Run as ``python -m gpumgr.testing.nvidia_smi`` or ``gpumgr-sim-nvidia-smi``.
"""

from __future__ import annotations

import json
import os
import sys
import time

_GPU_FIELDS = {
    "index": ("index", ""),
    "name": ("name", ""),
    "memory.total": ("memory_total_mib", " MiB"),
    "memory.used": ("memory_used_mib", " MiB"),
    "memory.free": ("memory_free_mib", " MiB"),
    "utilization.gpu": ("utilization_pct", " %"),
    "temperature.gpu": ("temperature_c", ""),
}
_APP_FIELDS = {
    "pid": ("pid", ""),
    "process_name": ("name", ""),
    "used_memory": ("used_mib", " MiB"),
}
_DRIVER_FAILURE = (
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
    "Make sure that the latest NVIDIA driver is installed and running.\n"
)


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


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    state_path = os.environ.get("GPUMGR_SIM_STATE")
    query = None
    fmt = "csv"
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--state":
            state_path = args[i + 1]
            i += 1
        elif arg.startswith("--state="):
            state_path = arg.split("=", 1)[1]
        elif arg.startswith("--query-gpu=") or arg.startswith("--query-compute-apps="):
            query = arg
        elif arg.startswith("--format="):
            fmt = arg.split("=", 1)[1]
        i += 1
    if state_path is None:
        sys.stderr.write("simulated nvidia-smi: no --state PATH or $GPUMGR_SIM_STATE\n")
        return 2
    try:
        with open(state_path) as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        sys.stdout.write(_DRIVER_FAILURE)
        sys.stderr.write(f"simulated nvidia-smi: cannot read state: {e}\n")
        return 9
    failure = state.get("failure")
    if failure == "driver":
        sys.stdout.write(_DRIVER_FAILURE)
        return 9
    if failure == "hang":
        time.sleep(3600)
        return 0
    if failure == "garbage":
        sys.stdout.write("\x00\x7fthis is not csv at all\n")
        return 0
    opts = fmt.split(",")
    header, units = "noheader" not in opts, "nounits" not in opts
    if query is None:
        sys.stdout.write(f"{len(state['gpus'])} simulated GPU(s)\n")
        return 0
    kind, _, field_list = query.partition("=")
    fields = [f.strip() for f in field_list.split(",") if f.strip()]
    table, rows = (
        (_GPU_FIELDS, state["gpus"]) if kind == "--query-gpu" else (_APP_FIELDS, state["processes"])
    )
    unknown = [f for f in fields if f not in table]
    if unknown:
        sys.stdout.write(f'Field "{unknown[0]}" is not a valid field to query.\n')
        return 2
    sys.stdout.write(_render(rows, fields, table, header, units))
    return 0


if __name__ == "__main__":
    sys.exit(main())
