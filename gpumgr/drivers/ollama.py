"""ollama.

It can hold several models at once, so unloading one configured model name
would leave the others resident: its unload lists `GET /api/ps` and sends
`keep_alive: 0` for every loaded model. ollama answers that at once and frees
the memory afterwards; gpumgr's settle wait covers that gap.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from twisted.internet import defer

from gpumgr.config import ConsumerConfig
from gpumgr.drivers.base import BaseDriver, ControlCallFailed, ControlHttp, call

#: Each runs a model (server/routes.go). /v1/responses (0.13.3), /v1/messages
#: (Anthropic's API, 0.14.0) and /v1/audio/transcriptions (0.20.0) run its
#: ChatHandler like /v1/chat/completions does.
_GPU_PATHS = frozenset({
    "/api/generate", "/api/chat", "/api/embed", "/api/embeddings",
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings",
    "/v1/responses", "/v1/messages", "/v1/audio/transcriptions",
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


def model_sizes_mib(ps_body: bytes) -> dict[str, int]:
    """Each loaded model's `size_vram` in a `GET /api/ps` answer, in MiB (pure).

    ollama's own figure for the model (weights and context), not a
    measurement; a model without a whole, non-negative `size_vram` is left out."""
    loaded_models(ps_body)  # the same checks: JSON with a models list
    sizes: dict[str, int] = {}
    for m in json.loads(ps_body)["models"]:
        if not isinstance(m, dict):
            continue
        name = m.get("model") or m.get("name")
        size = m.get("size_vram")
        if isinstance(name, str) and name and isinstance(size, int) and not isinstance(
                size, bool) and size >= 0:
            sizes[name] = -(-size // (1 << 20))
    return sizes


#: The unload request: these routes with nothing to do and `keep_alive: 0`.
_UNLOAD_ROUTES = {"/api/generate": "prompt", "/api/chat": "messages"}

#: Go folds keys by Unicode *simple* folding (bytes.EqualFold): besides ASCII
#: letters, only the Kelvin sign and the long s fold to an ASCII letter.
#: (Python's casefold is full folding: it made "meßages" "messages".)
_GO_FOLD = {"\u212a": "k", "\u017f": "s"}
_GO_UNIT_NS = {"ns": 1, "us": 10**3, "\u00b5s": 10**3, "\u03bcs": 10**3, "ms": 10**6,
               "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9}
_INT64_LIMIT = 1 << 63
_SECOND_NS = 10**9


def _go_key(key: str) -> str:
    return "".join(c.lower() if c.isascii() else _GO_FOLD.get(c, c) for c in key)


def _go_fields(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object as Go's encoding/json fills a struct: keys match by
    Go's case folding, and the last one wins."""
    fields: dict[str, Any] = {}
    for key, value in pairs:
        fields[_go_key(key)] = value
    return fields


def _digits(s: str) -> int:
    """How many ASCII digits `s` starts with."""
    i = 0
    while i < len(s) and "0" <= s[i] <= "9":
        i += 1
    return i


def go_parse_duration(text: str) -> int | None:
    """Go's `time.ParseDuration` in nanoseconds, step for step (its fraction
    in float64 included); None where Go answers an error (pure)."""
    s, negative = text, False
    if s[:1] in ("-", "+"):
        negative, s = s[0] == "-", s[1:]
    if s == "0":
        return 0
    if not s:
        return None
    total = 0
    while s:
        if not (s[0] == "." or "0" <= s[0] <= "9"):
            return None
        n = _digits(s)
        significant = s[:n].lstrip("0")
        if len(significant) > 19 or int(significant or "0") > _INT64_LIMIT:
            return None
        whole = int(significant or "0")
        s = s[n:]
        fraction, scale, m = 0, 1.0, 0
        if s[:1] == ".":
            s = s[1:]
            m = _digits(s)
            for c in s[:m]:  # leadingFraction: digits past int64 are dropped
                if fraction > (_INT64_LIMIT - 1) // 10 or fraction * 10 + int(c) > _INT64_LIMIT:
                    break
                fraction, scale = fraction * 10 + int(c), scale * 10
            s = s[m:]
        if not n and not m:
            return None
        u = 0
        while u < len(s) and not (s[u] == "." or "0" <= s[u] <= "9"):
            u += 1
        unit = _GO_UNIT_NS.get(s[:u])
        s = s[u:]
        if unit is None or whole > _INT64_LIMIT // unit:
            return None
        value = whole * unit
        if fraction:
            value += int(float(fraction) * (float(unit) / scale))
        total += value
        if value > _INT64_LIMIT or total > _INT64_LIMIT:
            return None
    if negative:
        return -total
    return None if total > _INT64_LIMIT - 1 else total


def _zero_duration(value: Any) -> bool:
    """Would an ollama, old or new, take this JSON `keep_alive` for an
    unload (pure)? Leaning to "zero" where in doubt is safe: it only makes
    the request an admin one.

    Go decodes a number as a float64 `t`. Since 0.11.8 it is `t * 1e9` ns
    and the unload test is `Duration == 0`; before, it was `int(t) * 1e9`
    in int64, which wraps (2**55 s is 0 ns; on amd64 anything from 2**63
    is), and the test was `int(Seconds()) == 0`, any duration under 1 s. A
    negative number or duration is "forever"; -0 is 0."""
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        t = float(value)
        return 0 <= t < 1 or t * 1e9 >= _INT64_LIMIT
    if isinstance(value, str):
        ns = go_parse_duration(value)
        return ns is not None and 0 <= ns < _SECOND_NS
    return False


_TOO_DEEP = object()


def request_document(body: bytes) -> Any:
    """The body's first JSON value as ollama reads it (see `is_unload_request`);
    None when it is not JSON, `_TOO_DEEP` when too deep to read (pure)."""
    text = body.decode("utf-8", "replace").lstrip(" \t\r\n")
    try:
        doc, _ = json.JSONDecoder(object_pairs_hook=_go_fields,
                                  parse_int=float).raw_decode(text)
    except ValueError:
        return None  # ollama refuses it too
    except RecursionError:
        return _TOO_DEEP
    return doc


def model_of_request(path: str, body: bytes | None) -> str | None:
    """The `model` a GPU request names (pure), read as `is_unload_request` reads it."""
    if path not in _GPU_PATHS or body is None:
        return None
    doc = request_document(body)
    model = doc.get("model") if isinstance(doc, dict) else None
    return model if isinstance(model, str) and model else None


def is_unload_request(path: str, body: bytes | None) -> bool:
    """`POST /api/generate` or `/api/chat` that unloads its model: no prompt
    (no messages) and `keep_alive` 0 (pure). ollama reads only the first
    JSON value of the body (gin's ShouldBindJSON), as Go's encoding/json
    does: numbers are float64 (Go skips an unknown field's number however
    long; Python's int() refuses over 4,300 digits), nesting goes 10 times
    deeper than Python's. A body too large to read (None), or too deep,
    counts as an unload: it could be one."""
    field = _UNLOAD_ROUTES.get(path)
    if field is None:
        return False
    if body is None:
        return True
    doc = request_document(body)
    if doc is _TOO_DEEP:
        return True
    if not isinstance(doc, dict) or "keep_alive" not in doc:
        return False
    if doc.get(field) not in (None, "", []):
        return False
    return _zero_duration(doc["keep_alive"])


class OllamaDriver(BaseDriver):
    name = "ollama"

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

    def model_of(self, method: str, path: str, body: Callable[[], bytes | None]) -> str | None:
        return model_of_request(path, body()) if method == "POST" else None


__all__ = ["OllamaDriver", "call", "is_unload_request", "loaded_models", "model_of_request"]
