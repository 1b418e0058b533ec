"""ollama.

It can hold several models at once, so unloading one configured model name
would leave the others resident: its unload lists `GET /api/ps` and sends
`keep_alive: 0` for every loaded model. ollama answers that at once and frees
the memory afterwards; gpumgr's settle wait covers that gap.
"""

from __future__ import annotations

import json

from twisted.internet import defer

from gpumgr.config import ConsumerConfig
from gpumgr.drivers.base import BaseDriver, ControlCallFailed, ControlHttp, call

_GPU_PATHS = frozenset({
    "/api/generate", "/api/chat", "/api/embed", "/api/embeddings",
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings",
})


def loaded_models(ps_body: bytes) -> list[str]:
    """Model names in a `GET /api/ps` answer (pure; tolerant of extra fields)."""
    try:
        doc = json.loads(ps_body)
    except ValueError:
        raise ControlCallFailed("GET /api/ps did not answer JSON") from None
    models = doc.get("models") if isinstance(doc, dict) else None
    if not isinstance(models, list):
        raise ControlCallFailed("GET /api/ps answered without a models list")
    names = []
    for m in models:
        if isinstance(m, dict):
            name = m.get("model") or m.get("name")
            if isinstance(name, str) and name:
                names.append(name)
    return names


class OllamaDriver(BaseDriver):
    name = "ollama"
    default_health = "/api/version"
    native_unload = True
    #: It stops at its next token write, but not while it evaluates a prompt
    #: (ollama#11889); nothing in its API says whether a request still runs.
    abandoned_grace_s = 15.0

    def unload(self, http: ControlHttp, consumer: ConsumerConfig) -> defer.Deferred[None]:
        if consumer.unload is not None:
            return super().unload(http, consumer)
        return defer.ensureDeferred(self._unload_all(http, consumer))

    async def _unload_all(self, http: ControlHttp, consumer: ConsumerConfig) -> None:
        ps = await http.request("GET", consumer.url_for("/api/ps"))
        if not ps.ok:
            raise ControlCallFailed(f"GET /api/ps answered HTTP {ps.code}: {ps.snippet()}")
        failed = []
        for model in loaded_models(ps.body):
            body = json.dumps({"model": model, "keep_alive": 0}).encode()
            reply = await http.request("POST", consumer.url_for("/api/generate"), body,
                                       "application/json")
            if not reply.ok:
                failed.append(f"{model}: HTTP {reply.code} {reply.snippet()}")
        if failed:
            raise ControlCallFailed("unloading failed for " + "; ".join(failed))

    def is_gpu_work(self, method: str, path: str) -> bool:
        return method == "POST" and path in _GPU_PATHS


__all__ = ["OllamaDriver", "call", "loaded_models"]
