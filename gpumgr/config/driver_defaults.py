"""What each driver gives a consumer whose config leaves a key out.

The parser completes a consumer with these (`health`, `load`, `unload`,
`abandoned_grace_s`, whether it can unload with no call configured), and a
consumer's `driver:` must name one of them. They live here, with the config,
so that the parser never imports `gpumgr.drivers`: the drivers read
ConsumerConfig, so they import the config, and the dependency goes one way.
A driver's behaviour (probe, unload, what is GPU work) is in its module in
`gpumgr.drivers`; a test checks that both name the same drivers.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

import attrs

from gpumgr.config.schema import HttpCall


@attrs.frozen
class DriverDefaults:
    name: str
    #: Health path when the config sets none; None: the config must set one.
    health: str | None = None
    #: The call used when the config sets no `load`, or None.
    load: HttpCall | None = None
    #: The call used when the config sets no `unload`, or None.
    unload: HttpCall | None = None
    #: It can unload with no unload call configured (its driver knows how).
    native_unload: bool = False
    #: Default of consumers.<name>.abandoned_grace_s: how long a job whose
    #: client left holds the GPU at most, waiting for evidence that the
    #: service stopped its work. 30 s when nothing is known of the service.
    abandoned_grace_s: float = 30.0


_DEFAULTS = (
    # Everything comes from the config: its health route is required.
    DriverDefaults("http"),
    DriverDefaults(
        "ollama",
        health="/api/version",
        # It unloads every loaded model through its API (gpumgr.drivers.ollama).
        native_unload=True,
        # It stops at its next token write, but not while it evaluates a prompt
        # (ollama#11889); nothing in its API says whether a request still runs.
        abandoned_grace_s=15.0,
    ),
    DriverDefaults(
        "comfyui",
        health="/system_stats",
        unload=HttpCall(method="POST", path="/free",
                        body=b'{"unload_models": true, "free_memory": true}',
                        content_type="application/json"),
        # A prompt it took is followed as a render whether or not its client
        # stays; this bounds other GPU work whose client left.
        abandoned_grace_s=30.0,
    ),
    DriverDefaults(
        "whisper.cpp",
        health="/health",
        # It aborts an inference whose client disconnected (and answers 499)
        # since May 2025; an empty POST /inference waits for its inference
        # lock (gpumgr.drivers.whisper_cpp, work_barrier).
        abandoned_grace_s=5.0,
    ),
    DriverDefaults(
        "vllm",
        health="/health",
        # Sleep level 1 moves the weights to CPU RAM; waking is much faster
        # than a cold load (needs --enable-sleep-mode, VLLM_SERVER_DEV_MODE=1).
        unload=HttpCall(method="POST", path="/sleep?level=1", body=b"", content_type=None),
        load=HttpCall(method="POST", path="/wake_up", body=b"", content_type=None),
        # It aborts a request whose client disconnected, and its /metrics say
        # whether requests still run.
        abandoned_grace_s=5.0,
    ),
)

#: driver name -> its defaults, in the order the drivers are listed.
DRIVER_DEFAULTS: Mapping[str, DriverDefaults] = MappingProxyType({d.name: d for d in _DEFAULTS})
