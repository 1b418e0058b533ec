"""Learned memory profiles at the edges: samples in, figures out, a state file.

`LearnedProfiles` implements `gpumgr.memory.MemoryProfiles`. Each GPU sample
is folded in by the pure decisions of `gpumgr.profiles`; what a service says
of its models (ollama's `GET /api/ps`) is asked after one of its jobs ends and
when it becomes loaded. What was learned survives restarts in
``<gpu.state_dir>/memory-profiles.json``, written atomically (temp file,
fsync, rename) at most once per `STATE_WRITE_INTERVAL_S`, and on stop.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from gpumgr.config import ConsumerConfig
from gpumgr.errors import describe_failure
from gpumgr.gpu_sample import GpuSample
from gpumgr.memory import MemoryProfile
from gpumgr.profiles import (
    NOTHING_LEARNED,
    Activity,
    Baseline,
    Key,
    Learned,
    fold,
    next_baseline,
    profile_of,
    raise_oom,
    readings_for,
    service_readings,
)

log = Logger()

STATE_FILE = "memory-profiles.json"
STATE_VERSION = 1
#: Figures change often while a peak climbs; the file is rewritten at most this often.
STATE_WRITE_INTERVAL_S = 30.0
_FIELDS = ("resident_mib", "resident_samples", "job_peak_mib", "job_peak_samples",
           "oom_peak_mib")


class StateFileError(ValueError):
    pass


def encode_state(learned: Mapping[Key, Learned]) -> bytes:
    rows = [{"consumer": c, "model": m, **attrs.asdict(lr)}
            for (c, m), lr in sorted(learned.items(), key=lambda kv: (kv[0][0], kv[0][1] or ""))]
    return json.dumps({"version": STATE_VERSION, "profiles": rows}, indent=1).encode() + b"\n"


def _count(row: Mapping[str, Any], key: str, optional: bool) -> int | None:
    value = row.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise StateFileError(f"profiles[].{key} is not a non-negative integer: {value!r}")
    return value


def decode_state(data: bytes) -> dict[Key, Learned]:
    """The state file's figures (pure); StateFileError if it is not what we write."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise StateFileError(f"not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("version") != STATE_VERSION:
        raise StateFileError(f"not a version {STATE_VERSION} memory profile file")
    rows = doc.get("profiles")
    if not isinstance(rows, list):
        raise StateFileError("no profiles list")
    out: dict[Key, Learned] = {}
    for row in rows:
        if not isinstance(row, dict):
            raise StateFileError("a profile is not an object")
        consumer, model = row.get("consumer"), row.get("model")
        if not isinstance(consumer, str) or not (model is None or isinstance(model, str)):
            raise StateFileError("a profile has no consumer name")
        values = {k: _count(row, k, optional=k.endswith("_mib")) for k in _FIELDS}
        out[(consumer, model)] = Learned(**values)  # type: ignore[arg-type]
    return out


def write_atomically(path: str, data: bytes) -> None:
    """Readers see the old file or the new one, never a part (and it survives a crash)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_state(path: str) -> dict[Key, Learned]:
    """What the file holds; missing, unreadable, corrupt or wrong-shaped: nothing, one warning."""
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)
        return decode_state(data)
    except FileNotFoundError:
        log.warn("no memory profile state in {path} yet: starting from the config's figures",
                 path=path)
    except (OSError, StateFileError) as e:
        log.warn("ignoring the memory profile state in {path}: {why}", path=path, why=str(e))
    return {}


class LearnedProfiles:
    """The learned figures (a `MemoryProfiles`), fed by GPU samples and service reports."""

    def __init__(
        self,
        clock: IReactorTime,
        consumers: Callable[[], Mapping[str, ConsumerConfig]],
        activity: Callable[[], Activity],
        state_dir: Callable[[], str | None] = lambda: None,
        model_sizes: Callable[[ConsumerConfig], defer.Deferred[dict[str, int]] | None]
        = lambda c: None,
    ) -> None:
        self._clock = clock
        self._consumers = consumers
        self._activity = activity
        self._state_dir = state_dir
        self._model_sizes = model_sizes
        self._learned: dict[Key, Learned] = {}
        self._baseline: Baseline | None = None
        #: The latest report of each service's loaded models (name -> MiB).
        self._models: dict[str, dict[str, int]] = {}
        self._before = Activity()
        self._write_timer: IDelayedCall | None = None
        self._written_at: float | None = None
        self._write_error: str | None = None
        self.writes = 0

    # -- MemoryProfiles --------------------------------------------------------

    def profile(self, consumer: ConsumerConfig, model: str | None = None) -> MemoryProfile:
        wide = self._learned.get((consumer.name, None), NOTHING_LEARNED)
        own = self._learned.get((consumer.name, model)) if model is not None else None
        return profile_of(consumer, wide, own)

    def raise_peak(self, consumer: str, model: str | None, seen_mib: int) -> None:
        key = (consumer, model)
        self._set({**self._learned, key: raise_oom(self._learned.get(key, NOTHING_LEARNED),
                                                     seen_mib)})

    # -- learning --------------------------------------------------------------

    def observe(self, sample: GpuSample) -> None:
        """A GPU sample listener."""
        consumers = self._consumers()
        activity = self._activity()
        self._baseline = next_baseline(self._baseline, sample, activity)
        readings = readings_for(sample, consumers.values(), activity, self._baseline)
        single = {c: next(iter(m)) for c, m in self._models.items() if len(m) == 1}
        self._set(fold(self._learned, readings, _residents(consumers), single))
        self._ask_services(consumers, self._before, activity)
        self._before = activity

    def observe_models(self, consumer: str, sizes_mib: Mapping[str, int]) -> None:
        self._models[consumer] = dict(sizes_mib)
        self._set(fold(self._learned, service_readings(consumer, sizes_mib),
                       _residents(self._consumers())))

    def _ask_services(self, consumers: Mapping[str, ConsumerConfig], before: Activity,
                      now: Activity) -> None:
        for name, c in consumers.items():
            ended = before.running.get(name, 0) > now.running.get(name, 0)
            became_loaded = name in now.loaded and name not in before.loaded
            if not (ended or became_loaded):
                continue
            d = self._model_sizes(c)
            if d is None:
                continue
            d.addCallbacks(lambda sizes, n=name: self.observe_models(n, sizes),
                           lambda f, n=name: _ask_failed(n, f))

    # -- what status and metrics show -----------------------------------------

    def profiles_of(self, c: ConsumerConfig) -> tuple[tuple[str | None, MemoryProfile], ...]:
        """(None, the consumer's figures), then (model, its figures) per learned model."""
        models = sorted(m for (name, m) in self._learned if name == c.name and m is not None)
        return tuple((m, self.profile(c, m)) for m in [None, *models])

    # -- persistence -------------------------------------------------------------

    def _path(self) -> str | None:
        directory = self._state_dir()
        return None if directory is None else os.path.join(directory, STATE_FILE)

    def start(self) -> None:
        path = self._path()
        if path is not None:
            self._learned = {**read_state(path), **self._learned}

    def _set(self, learned: dict[Key, Learned]) -> None:
        if learned == self._learned:
            return
        self._learned = learned
        if self._path() is None or (self._write_timer is not None and self._write_timer.active()):
            return
        now = self._clock.seconds()
        wait = 0.0 if self._written_at is None else max(
            0.0, self._written_at + STATE_WRITE_INTERVAL_S - now)
        self._write_timer = self._clock.callLater(wait, self.write_now)

    def write_now(self) -> None:
        if self._write_timer is not None and self._write_timer.active():
            self._write_timer.cancel()
        self._write_timer = None
        path = self._path()
        if path is None:
            return
        self._written_at = self._clock.seconds()
        try:
            write_atomically(path, encode_state(self._learned))
        except OSError as e:
            if str(e) != self._write_error:
                log.warn("cannot write memory profiles to {path}: {why}", path=path, why=str(e))
            self._write_error = str(e)
            return
        self._write_error = None
        self.writes += 1

    def stop(self) -> None:
        """Write what is pending now (shutdown)."""
        if self._write_timer is not None and self._write_timer.active():
            self.write_now()


def _residents(consumers: Mapping[str, ConsumerConfig]) -> dict[str, int]:
    return {n: c.vram_resident_mib for n, c in consumers.items()}


def _ask_failed(name: str, f: Failure) -> None:
    log.info("{name}: could not read its loaded models' sizes: {why}", name=name,
             why=describe_failure(f))

