"""Simulated consumers and a simulated GPU, for the demo and for tests.

Like `twisted.internet.testing` and `treq.testing`, this ships with the
package: `twistd gpumgr --demo` runs on it, and so does the test suite.

    world = make_world(reactor, state_dir)       # four consumers, one GPU
    world.listen(reactor)                        # ephemeral loopback ports
    config = world_config(world)                 # a validated gpumgr Config
"""

from __future__ import annotations

import os
import shlex
import sys
from typing import Any

from gpumgr.config import Config, parse_config
from gpumgr.testing.consumers import (
    Behaviour,
    ComfyUISim,
    MvoiceSim,
    OllamaSim,
    RecordedRequest,
    SimulatedConsumer,
    SimulatedWorld,
    WhisperSim,
    make_wav,
)
from gpumgr.testing.comfyui import make_png
from gpumgr.testing.gpu import SimulatedGpu
from gpumgr.testing.stranger import free_port

__all__ = [
    "Behaviour",
    "ComfyUISim",
    "MvoiceSim",
    "OllamaSim",
    "RecordedRequest",
    "SimulatedConsumer",
    "SimulatedGpu",
    "SimulatedWorld",
    "WhisperSim",
    "make_png",
    "make_wav",
    "make_world",
    "sim_nvidia_smi_command",
    "whisper_server_argv",
    "world_config",
    "world_config_raw",
    "managed_whisper_entry",
    "write_world_config",
]

#: How each flavour is described to gpumgr: its real API routes.
_CONSUMER_CONFIG: dict[type, dict[str, Any]] = {
    OllamaSim: {
        "driver": "ollama",  # health /api/version; unload: every model in /api/ps
        "paths": {"llm": "/api/generate"},
        "load": {"method": "POST", "path": "/api/generate", "body": '{"model":"llama3"}',
                 "content_type": "application/json"},
    },
    ComfyUISim: {
        "driver": "comfyui",  # health /system_stats; unload /free; renders tracked
        "paths": {"image": "/prompt"},
    },
    WhisperSim: {"driver": "whisper.cpp", "paths": {"stt": "/inference"}},
    MvoiceSim: {
        "health": "/health",
        "paths": {"tts": "/tts"},
        "load": {"method": "POST", "path": "/load"},
        "unload": {"method": "POST", "path": "/unload"},
    },
}


def whisper_server_argv(port: int, state_dir: str, **options: Any) -> list[str]:
    """The simulated whisper.cpp server's command line (see
    `gpumgr.testing.whisper_server`). Imported late: that module runs as
    `python -m`, and importing it here would load it twice."""
    from gpumgr.testing import whisper_server

    return whisper_server.whisper_server_argv(port, state_dir, **options)


def sim_nvidia_smi_command(state_path: str) -> str:
    """The simulated nvidia-smi, run as a file in isolated mode: it needs only
    the standard library, and skipping site and package imports makes each
    call ~15 ms instead of ~190 ms, which matters when eviction re-samples."""
    from gpumgr.testing import nvidia_smi

    script = nvidia_smi.__file__
    return " ".join(
        shlex.quote(a) for a in (sys.executable, "-I", "-S", script, "--state", state_path)
    )


def make_world(clock: Any, state_dir: str, total_mib: int = 24576,
               behaviours: dict[str, Behaviour] | None = None,
               managed_whisper: bool = False,
               cards_mib: tuple[int, ...] | None = None) -> SimulatedWorld:
    """The standard four: ollama, comfyui, whisper and mvoice on one GPU (on
    card 0 of `cards_mib`, a box of several cards, until placed elsewhere).

    With `managed_whisper`, whisper is not simulated in this process: give
    `world_config` a `managed_whisper_entry` and gpumgr starts the simulated
    whisper.cpp server as its own process, on demand.
    """
    behaviours = behaviours or {}
    gpu = SimulatedGpu(os.path.join(state_dir, "gpu-state.json"), total_mib=total_mib,
                       cards_mib=cards_mib)
    world = SimulatedWorld(clock, gpu)
    defaults = {
        "ollama": Behaviour(vram_mib=9000),
        "comfyui": Behaviour(vram_mib=7000, job_s=0.2),
        "whisper": Behaviour(vram_mib=1500),
        "mvoice": Behaviour(vram_mib=2500),
    }
    for name, behaviour in defaults.items():
        if name == "whisper" and managed_whisper:
            continue
        world.add(name, name, behaviours.get(name, behaviour))
    return world


def managed_whisper_entry(world: SimulatedWorld, port: int | None = None, vram_mib: int = 1500,
                          start_timeout_s: float = 30.0, stop_timeout_s: float = 5.0,
                          **server: Any) -> dict[str, Any]:
    """A config entry for the simulated whisper.cpp server as a process gpumgr
    owns (`server` goes to `whisper_server_argv`: load_s, fail_load, job_s)."""
    if port is None:
        port = free_port()
    state_dir = os.path.dirname(os.path.abspath(world.gpu.state_path))
    return {
        "url": f"http://127.0.0.1:{port}",
        "driver": "whisper.cpp",
        "paths": {"stt": "/inference"},
        "vram_resident_mib": vram_mib,
        "process": {
            "command": whisper_server_argv(port, state_dir, vram_mib=vram_mib, **server),
            "start_timeout_s": start_timeout_s,
            "stop_timeout_s": stop_timeout_s,
        },
    }


def world_config_raw(
    world: SimulatedWorld,
    kinds: dict[str, str] | None = None,
    consumers: dict[str, dict[str, Any]] | None = None,
    managed: dict[str, dict[str, Any]] | None = None,
    **sections: Any,
) -> dict[str, Any]:
    """The raw config document (as YAML would load it) routing kinds to the
    world's consumers; `world_config` validates it.

    `kinds` serves a consumer under another kind than its flavour's (e.g.
    ``{"B": "stt"}`` for a second mvoice); `consumers` adds or replaces keys of
    a consumer's entry (``{"C": {"can_coexist_with": ["A"]}}``); `managed` adds
    whole entries for services not simulated in this process
    (``{"whisper": managed_whisper_entry(world)}``). Other keyword
    arguments replace or extend top-level sections, e.g.
    ``world_config(world, health={"interval_s": 0.2})``.
    """
    kinds = kinds or {}
    entries = {}
    for name, consumer in world.consumers.items():
        if consumer.url is None:
            raise ValueError(f"simulated consumer {name} is not listening; call world.listen()")
        entry = dict(_CONSUMER_CONFIG[type(consumer)])
        if name in kinds:
            (path,) = entry["paths"].values()
            entry["paths"] = {kinds[name]: path}
        entry["url"] = consumer.url
        entry["vram_resident_mib"] = consumer.behaviour.vram_mib
        entry.update((consumers or {}).get(name, {}))
        entries[name] = entry
    for name, entry in (managed or {}).items():
        entries[name] = {**entry, **(consumers or {}).get(name, {})}
    routes: dict[str, str] = {}
    for name in entries:
        for kind in entries[name].get("paths", {}):
            routes.setdefault(kind, name)
    for name, consumer in world.consumers.items():
        if isinstance(consumer, MvoiceSim):
            routes.setdefault("audio_proxy", name)
    raw: dict[str, Any] = {
        "listen": "tcp:0:interface=127.0.0.1",
        "gpu": {"nvidia_smi": sim_nvidia_smi_command(world.gpu.state_path)},
        "routes": routes,
        "consumers": entries,
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return raw


def world_config(
    world: SimulatedWorld,
    kinds: dict[str, str] | None = None,
    consumers: dict[str, dict[str, Any]] | None = None,
    managed: dict[str, dict[str, Any]] | None = None,
    **sections: Any,
) -> Config:
    """A validated Config routing kinds to the world's consumers (see
    `world_config_raw` for the arguments)."""
    return parse_config(world_config_raw(world, kinds, consumers, managed, **sections),
                        "<simulated world>")


def write_world_config(world: SimulatedWorld, path: str, **kwargs: Any) -> Config:
    """Write the world's config as a YAML file and load it from there, so that
    a reload (SIGHUP, POST /v1/admin/reload) has a file to read again."""
    import yaml

    from gpumgr.config import load_config

    with open(path, "w") as f:
        yaml.safe_dump(world_config_raw(world, **kwargs), f, sort_keys=False)
    return load_config(path)
