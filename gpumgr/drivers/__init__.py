"""Drivers: what gpumgr knows about one kind of GPU service.

A consumer's `driver` key names one. Its config defaults (`health`, `load`,
`unload`, `abandoned_grace_s`; keys set in the config override them) are in
`gpumgr.config.driver_defaults`, so that the config parser needs nothing from
here: the drivers import the config, never the other way round. A driver
supplies the behaviour no config key can express:

- `probe`: is it up, starting, or down?
- `load` / `unload`: how to get its memory back, and to warm it again
  (ollama unloads every loaded model; vLLM sleeps and wakes up).
- `is_gpu_work`: which requests of its native API use the GPU, and so go
  through the scheduler (the rest are relayed at once).
- `is_control`: which requests of its native API change the service's state
  (load, unload, free, interrupt): through pass-through they are admin
  routes, and gpumgr forgets what it believed the service holds.
- `model_of`: the model a GPU request runs (ollama's body `model`), whose
  memory profile admits it under `scheduler.capacity: auto`.
- `render_id` / `render_state` / `interrupt`: GPU work that goes on after the
  answer (a ComfyUI render); gpumgr keeps the GPU slot until it is over.

What a driver may use of the rest of gpumgr is `ControlHttp` (small bounded
HTTP calls to its service); it never touches the scheduler or the registry.
Services whose process gpumgr owns (`process:`) are started and stopped by
gpumgr itself, whatever their driver.

Adding a driver: write a module here with a class implementing `IDriver`
(subclass `BaseDriver` for the common parts), add it to `_DRIVERS` below and
its defaults to `gpumgr.config.driver_defaults.DRIVER_DEFAULTS` (a test checks
that both list the same names), and give it tests against a simulated service
in `gpumgr.testing`.
"""

from __future__ import annotations

from typing import Mapping

from gpumgr.drivers.base import BaseDriver, ControlHttp, IDriver, RenderState
from gpumgr.drivers.comfyui import ComfyUIDriver
from gpumgr.drivers.http import HttpDriver
from gpumgr.drivers.ollama import OllamaDriver
from gpumgr.drivers.vllm import VllmDriver
from gpumgr.drivers.whisper_cpp import WhisperCppDriver

_DRIVERS: Mapping[str, IDriver] = {
    d.name: d
    for d in (HttpDriver(), OllamaDriver(), ComfyUIDriver(), WhisperCppDriver(), VllmDriver())
}

DRIVER_NAMES = tuple(_DRIVERS)


def get_driver(name: str) -> IDriver:
    """The driver called `name`; config validation guarantees it exists."""
    return _DRIVERS[name]


__all__ = ["BaseDriver", "ControlHttp", "DRIVER_NAMES", "IDriver", "RenderState", "get_driver"]
