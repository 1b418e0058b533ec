"""nvidia-smi's answers as typed values: the queries gpumgr asks, their CSV
parsed (pure), and the `GpuSample` the rest of gpumgr reads.

NVIDIA does not promise stable output across drivers, so the parser is
tolerant: bracketed values (``[N/A]``, ``[Not Supported]``) are unknown, stray
units are stripped, and names may contain commas. Memory figures that cannot
be true make the sample unavailable rather than wrong.

A box may have several cards: each row carries its UUID, and each compute
process the UUID of its card, so a process is attributed to its card
(`GpuSample.processes_on`). Output without UUIDs (older queries, fixtures)
still parses: a lone card then owns every process.
"""

from __future__ import annotations

import re

import attrs

#: The queries whose answers the parsers below read (field order matters).
GPU_QUERY = (
    "--query-gpu=index,uuid,name,memory.total,memory.used,memory.free,"
    "utilization.gpu,temperature.gpu"
)
APPS_QUERY = "--query-compute-apps=gpu_uuid,pid,process_name,used_memory"
CSV_FORMAT = "--format=csv,noheader,nounits"

class GpuParseError(ValueError):
    pass


@attrs.frozen
class GpuInfo:
    index: int
    name: str
    memory_total_mib: int | None
    memory_used_mib: int | None
    memory_free_mib: int | None
    utilization_pct: int | None
    temperature_c: int | None
    #: ``GPU-...``; None where the output carried none.
    uuid: str | None = None


@attrs.frozen
class GpuProcess:
    pid: int
    name: str
    used_mib: int | None
    #: The UUID of the card it runs on; None where the output carried none.
    gpu_uuid: str | None = None


@attrs.frozen
class GpuSample:
    """One reading. `error` is set (and the lists empty) when sampling failed."""

    sampled_at: float | None
    gpus: tuple[GpuInfo, ...] = ()
    processes: tuple[GpuProcess, ...] = ()
    error: str | None = None

    @property
    def available(self) -> bool:
        return self.error is None and self.sampled_at is not None

    @property
    def memory_free_mib(self) -> int | None:
        """Free memory summed over GPUs; None if any GPU's figure is unknown."""
        if not self.available or not self.gpus:
            return None
        free = [g.memory_free_mib for g in self.gpus]
        return None if None in free else sum(free)  # type: ignore[arg-type]

    # -- per card: admission and eviction read these, never the sum above ----------

    @property
    def card_indexes(self) -> tuple[int, ...]:
        return tuple(g.index for g in self.gpus) if self.available else ()

    def card(self, index: int) -> GpuInfo | None:
        """Card `index`, or None (no sample, or its row is missing)."""
        if not self.available:
            return None
        return next((g for g in self.gpus if g.index == index), None)

    def card_missing(self, index: int) -> bool:
        """The sample is good but card `index` has no row (gone, or never there)."""
        return self.available and self.card(index) is None

    def free_mib_on(self, index: int) -> int | None:
        """Card `index`'s free memory; None if unknown or the card has no row."""
        gpu = self.card(index)
        return None if gpu is None else gpu.memory_free_mib

    def processes_on(self, index: int) -> tuple[GpuProcess, ...]:
        """The compute processes of card `index`, by their card's UUID. Without
        UUIDs in the output, a lone card owns them all; several cannot be told apart."""
        gpu = self.card(index)
        if gpu is None:
            return ()
        if gpu.uuid is None or all(p.gpu_uuid is None for p in self.processes):
            return self.processes if len(self.gpus) == 1 else ()
        return tuple(p for p in self.processes if p.gpu_uuid == gpu.uuid)


NOT_SAMPLED = GpuSample(sampled_at=None, error="not sampled yet")


def _unknown(field: str) -> bool:
    return not field or (field.startswith("[") and field.endswith("]")) or field == "N/A"


def _int_field(field: str, what: str, line_no: int) -> int | None:
    field = field.strip()
    if _unknown(field):
        return None
    for unit in (" MiB", "MiB", " %", "%", " C"):
        if field.endswith(unit):
            field = field[: -len(unit)].strip()
            break
    try:
        return int(float(field))
    except (ValueError, OverflowError):  # OverflowError: "inf"
        raise GpuParseError(f"line {line_no}: {what} is not a number: {field!r}") from None


#: A whole (or decimal) count of MiB, as nvidia-smi prints it; no sign, no exponent.
_MIB_RE = re.compile(r"\A[0-9]{1,15}(\.[0-9]{1,6})?\Z")
#: No GPU has this much memory (4 TiB); a bigger figure is a driver's garbage.
MAX_GPU_MIB = 4 * 1024 * 1024


def _mib_field(field: str, what: str, line_no: int) -> int | None:
    """A memory figure: unknown, or a non-negative whole number of MiB (pure).

    `int(float(...))` took -3616 and 1e23 as given, and "inf" raised
    OverflowError; a figure that cannot be memory makes the sample unavailable.
    """
    field = field.strip()
    if _unknown(field):
        return None
    for unit in (" MiB", "MiB"):
        if field.endswith(unit):
            field = field[: -len(unit)].strip()
            break
    if not _MIB_RE.match(field):
        raise GpuParseError(f"line {line_no}: {what} is not a whole number of MiB: {field!r}")
    return int(float(field))


def memory_problem(gpu: GpuInfo) -> str | None:
    """Why a GPU's memory figures cannot be true, or None (pure)."""
    total, used, free = gpu.memory_total_mib, gpu.memory_used_mib, gpu.memory_free_mib
    where = f"GPU {gpu.index}"
    if total is None:
        return None
    if total == 0:
        return f"{where}: memory.total is 0 MiB"
    if total > MAX_GPU_MIB:
        return f"{where}: memory.total {total} MiB is not a real GPU's"
    for name, value in (("memory.used", used), ("memory.free", free)):
        if value is not None and value > total:
            return f"{where}: {name} {value} MiB is more than memory.total {total} MiB"
    # used + free is total less the driver's reserve; rounding each may add a MiB.
    if used is not None and free is not None and used + free > total + max(16, total // 100):
        return (f"{where}: memory.used {used} + memory.free {free} MiB is more than "
                f"memory.total {total} MiB")
    return None


#: A card's UUID as nvidia-smi prints it (``GPU-8f2c...``, ``MIG-...``).
_UUID_RE = re.compile(r"\A(GPU|MIG)-[0-9A-Za-z/_-]{1,120}\Z")


def _is_uuid(field: str) -> bool:
    return bool(_UUID_RE.match(field))


def _lines(text: str) -> list[tuple[int, str]]:
    return [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1) if line.strip()]


def parse_gpu_csv(text: str) -> tuple[GpuInfo, ...]:
    """Parse ``--query-gpu=index,uuid,name,memory.total,memory.used,memory.free,
    utilization.gpu,temperature.gpu --format=csv,noheader,nounits``; rows
    without the uuid (the older query) parse too."""
    gpus = []
    for line_no, line in _lines(text):
        fields = [f.strip() for f in line.split(",")]
        uuid = fields.pop(1) if len(fields) >= 8 and _is_uuid(fields[1]) else None
        if len(fields) < 7:
            raise GpuParseError(f"line {line_no}: expected 7 fields, got {len(fields)}: {line!r}")
        # The name is the only free-text field; rejoin any commas inside it.
        index, name, rest = fields[0], ", ".join(fields[1:-5]), fields[-5:]
        idx = _int_field(index, "index", line_no)
        if idx is None:
            raise GpuParseError(f"line {line_no}: GPU index is unknown: {line!r}")
        gpu = GpuInfo(
            index=idx,
            name=name,
            memory_total_mib=_mib_field(rest[0], "memory.total", line_no),
            memory_used_mib=_mib_field(rest[1], "memory.used", line_no),
            memory_free_mib=_mib_field(rest[2], "memory.free", line_no),
            utilization_pct=_int_field(rest[3], "utilization.gpu", line_no),
            temperature_c=_int_field(rest[4], "temperature.gpu", line_no),
            uuid=uuid,
        )
        problem = memory_problem(gpu)
        if problem is not None:
            raise GpuParseError(f"impossible memory figures: {problem}")
        gpus.append(gpu)
    if not gpus:
        raise GpuParseError("no GPUs in nvidia-smi output")
    return tuple(gpus)


def parse_apps_csv(text: str) -> tuple[GpuProcess, ...]:
    """Parse ``--query-compute-apps=gpu_uuid,pid,process_name,used_memory``
    (or the older ``pid,process_name,used_memory``); empty means none."""
    procs = []
    for line_no, line in _lines(text):
        if line.lower().startswith("no running"):
            continue
        fields = [f.strip() for f in line.split(",")]
        gpu_uuid = fields.pop(0) if len(fields) >= 4 and _is_uuid(fields[0]) else None
        if len(fields) < 3:
            raise GpuParseError(f"line {line_no}: expected 3 fields, got {len(fields)}: {line!r}")
        pid = _int_field(fields[0], "pid", line_no)
        if pid is None:
            raise GpuParseError(f"line {line_no}: pid is unknown: {line!r}")
        procs.append(
            GpuProcess(
                pid=pid,
                name=", ".join(fields[1:-1]),
                used_mib=_mib_field(fields[-1], "used_memory", line_no),
                gpu_uuid=gpu_uuid,
            )
        )
    return tuple(procs)
