"""vLLM's OpenAI-compatible server, started with `--enable-sleep-mode`
(and `VLLM_SERVER_DEV_MODE=1`, which exposes the sleep routes).

Sleep level 1 moves the weights to CPU RAM; waking is 18-200x faster than a
cold load, which makes it the cheapest eviction there is.
"""

from __future__ import annotations

from gpumgr.config import HttpCall
from gpumgr.drivers.base import BaseDriver

#: Inference, and the control routes that put weights back on the GPU
#: (`/wake_up`; `/collective_rpc` can reload them): admin routes, and GPU
#: work too, so that they wait for the lock like a load does.
_GPU_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
              "/v1/audio/transcriptions", "/v1/score", "/v1/rerank", "/pooling",
              "/wake_up", "/collective_rpc")


class VllmDriver(BaseDriver):
    name = "vllm"
    default_health = "/health"
    default_unload = HttpCall(method="POST", path="/sleep?level=1", body=b"", content_type=None)
    default_load = HttpCall(method="POST", path="/wake_up", body=b"", content_type=None)
    #: Sleeping and waking whatever the config's load and unload say;
    #: `/collective_rpc` can reload the weights.
    control_routes = frozenset(("POST", p) for p in ("/sleep", "/wake_up", "/collective_rpc"))

    def is_gpu_work(self, method: str, path: str) -> bool:
        return method == "POST" and path in _GPU_PATHS
