"""ollama.

It can hold several models at once, so unloading one configured model name
would leave the others resident: its unload lists `GET /api/ps` and sends
`keep_alive: 0` for every loaded model. ollama answers that at once and frees
the memory afterwards; gpumgr's settle wait covers that gap.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

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


#: The unload request: these routes with nothing to do and `keep_alive: 0`.
_UNLOAD_ROUTES = {"/api/generate": "prompt", "/api/chat": "messages"}
_GO_DURATION = re.compile(r"[+-]?(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|\u00b5s|\u03bcs|ms|s|m|h))+\Z")


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")
_UNIT_NS = {"ns": 1.0, "us": 1e3, "\u00b5s": 1e3, "\u03bcs": 1e3, "ms": 1e6, "s": 1e9,
            "m": 60e9, "h": 3600e9}


def _go_fields(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object as Go's encoding/json fills a struct: keys match
    case-insensitively, and the last one wins."""
    fields: dict[str, Any] = {}
    for key, value in pairs:
        fields[key.casefold()] = value
    return fields


def _zero_duration(value: Any) -> bool:
    """ollama's `api.Duration` of this JSON value is 0 (pure).

    A number is whole seconds, truncated (0.5 is 0; negative is forever);
    a string is a Go duration ("0", "0s", "0m"...). Leaning to "zero" where
    in doubt is safe: it only makes the request an admin one."""
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return 0 <= value < 1
    if isinstance(value, str):
        if value in ("0", "+0", "-0"):
            return True
        if _GO_DURATION.match(value) is None:
            return False
        ns = sum(float(number) * _UNIT_NS[unit]
                 for number, unit in _DURATION_PART.findall(value))
        return ns < 1  # Go truncates to whole nanoseconds; -0s is 0, not negative
    return False


def is_unload_request(path: str, body: bytes | None) -> bool:
    """`POST /api/generate` or `/api/chat` that unloads its model: no prompt
    (no messages) and `keep_alive` 0 (pure). ollama reads only the first
    JSON value of the body (gin's ShouldBindJSON). A body too large to read
    (None) counts as an unload: it could be one."""
    field = _UNLOAD_ROUTES.get(path)
    if field is None:
        return False
    if body is None:
        return True
    text = body.decode("utf-8", "replace").lstrip(" \t\r\n")
    try:
        doc, _ = json.JSONDecoder(object_pairs_hook=_go_fields).raw_decode(text)
    except ValueError:
        return False  # ollama refuses it too
    if not isinstance(doc, dict) or "keep_alive" not in doc:
        return False
    if doc.get(field) not in (None, "", []):
        return False
    return _zero_duration(doc["keep_alive"])


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

    def is_control(self, consumer: ConsumerConfig, method: str, path: str,
                   body: Callable[[], bytes | None]) -> bool:
        # A configured load or unload is a generate too: there, only the body tells.
        if method == "POST" and path in _UNLOAD_ROUTES:
            return is_unload_request(path, body())
        return super().is_control(consumer, method, path, body)


__all__ = ["OllamaDriver", "call", "is_unload_request", "loaded_models"]
