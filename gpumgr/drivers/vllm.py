"""vLLM's OpenAI-compatible server, started with `--enable-sleep-mode`
(and `VLLM_SERVER_DEV_MODE=1`, which exposes the sleep routes).

Sleep level 1 moves the weights to CPU RAM; waking is 18-200x faster than a
cold load, which makes it the cheapest eviction there is.

It aborts a request whose client disconnected, and its Prometheus `/metrics`
counts the requests it runs and queues (`vllm:num_requests_running`,
`vllm:num_requests_waiting`): after a client left, gpumgr asks it.
"""

from __future__ import annotations

from twisted.internet import defer

from gpumgr.config import ConsumerConfig
from gpumgr.drivers.base import BaseDriver, ControlHttp

_IN_FLIGHT_GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting")


def requests_in_flight(metrics_text: str) -> int | None:
    """Requests running or waiting, from vLLM's Prometheus text (pure);
    None when neither gauge is there or a value is unreadable."""
    total = 0.0
    seen = False
    for line in metrics_text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name not in _IN_FLIGHT_GAUGES:
            continue
        try:
            total += float(line.rsplit(" ", 1)[1])
        except (IndexError, ValueError):
            return None
        seen = True
    return int(total) if seen else None

#: Inference, and the control routes that put weights back on the GPU
#: (`/wake_up`; `/collective_rpc` can reload them): admin routes, and GPU
#: work too, so that they wait for the lock like a load does.
_GPU_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
              "/v1/audio/transcriptions", "/v1/score", "/v1/rerank", "/pooling",
              "/wake_up", "/collective_rpc")


class VllmDriver(BaseDriver):
    name = "vllm"
    #: Sleeping and waking whatever the config's load and unload say;
    #: `/collective_rpc` can reload the weights.
    control_routes = frozenset(("POST", p) for p in ("/sleep", "/wake_up", "/collective_rpc"))

    def is_gpu_work(self, method: str, path: str) -> bool:
        return method == "POST" and path in _GPU_PATHS

    def work_stopped(self, http: ControlHttp,
                     consumer: ConsumerConfig) -> defer.Deferred[bool | None]:
        return defer.ensureDeferred(self._work_stopped(http, consumer))

    async def _work_stopped(self, http: ControlHttp, consumer: ConsumerConfig) -> bool | None:
        reply = await http.request("GET", consumer.url_for("/metrics"))
        if not reply.ok:
            return None
        n = requests_in_flight(reply.body.decode("utf-8", "replace"))
        return None if n is None else n == 0
