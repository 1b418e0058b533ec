"""Wiring memory measurement into the broker: the learner, the nvidia-smi
stream and what they read of the broker (who runs, a service's model sizes).

Kept out of broker.py: the broker builds one `Measuring` and starts/stops it.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer

from gpumgr.config import Config, ConsumerConfig
from gpumgr.drivers import ControlHttp
from gpumgr.drivers.base import ControlCallFailed
from gpumgr.drivers.ollama import model_sizes_mib
from gpumgr.gpu import GpuSampler, nvidia_smi_argv
from gpumgr.gpu_stream import GpuStream, StreamDemand
from gpumgr.profile_store import LearnedProfiles
from gpumgr.profiles import Activity
from gpumgr.eviction import Residency
from gpumgr.registry import Registry
from gpumgr.scheduler import Scheduler


def activity_of(registry: Registry, scheduler: Scheduler) -> Activity:
    """Who holds or may hold the card now: jobs running (the registry counts
    them in every scheduler mode), consumers not known to be unloaded, and
    whether a load or unload holds the GPU."""
    running = {s.name: s.active for s in registry if s.active > 0}
    loaded = frozenset(s.name for s in registry if s.residency is not Residency.UNLOADED)
    changing = any(h.control for h in scheduler.stats().holders)
    return Activity(running=running, loaded=loaded, changing=changing)


def _busy(activity: Activity) -> bool:
    """Jobs run, or a load or unload (and its settle wait) holds the GPU."""
    return bool(activity.running) or activity.changing


def ask_model_sizes(
    http: ControlHttp,
) -> Callable[[ConsumerConfig], defer.Deferred[dict[str, int]] | None]:
    """ollama's `GET /api/ps` sizes; None for services that report no models."""
    async def ask(c: ConsumerConfig) -> dict[str, int]:
        reply = await http.request("GET", c.url_for("/api/ps"))
        if not reply.ok:
            raise ControlCallFailed(f"GET /api/ps answered HTTP {reply.code}")
        return model_sizes_mib(reply.body)

    def sizes(c: ConsumerConfig) -> defer.Deferred[dict[str, int]] | None:
        return defer.ensureDeferred(ask(c)) if c.driver == "ollama" else None

    return sizes


class Measuring:
    """The learned profiles and, for a sampler that runs nvidia-smi, its stream."""

    def __init__(self, reactor: Any, config: Callable[[], Config], gpu: GpuSampler,
                 registry: Registry, scheduler: Callable[[], Scheduler],
                 http: ControlHttp) -> None:
        self.profiles = LearnedProfiles(
            reactor, lambda: config().consumers, lambda: activity_of(registry, scheduler()),
            state_dir=lambda: config().gpu.state_dir, model_sizes=ask_model_sizes(http))
        gpu.listeners.append(self.profiles.observe)
        self.stream: GpuStream | None = None
        self._demand: StreamDemand | None = None
        if gpu.runs_nvidia_smi:
            self.stream = GpuStream(
                reactor, lambda: nvidia_smi_argv(config().gpu.nvidia_smi),
                lambda: config().gpu.loop_ms, gpu.publish,
                fallback=lambda: gpu.latest.processes if gpu.latest.available else None)
            gpu.stream = self.stream
            self._demand = StreamDemand(
                reactor, self.stream,
                busy=lambda: _busy(activity_of(registry, scheduler())))

    def start(self) -> None:
        self.profiles.start()
        if self._demand is not None:
            self._demand.start()

    def stop(self) -> None:
        if self._demand is not None:
            self._demand.stop()
        self.profiles.stop()
