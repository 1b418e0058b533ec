"""ollama, simulated: several models at once, its native API and its OpenAI-compatible one.

What it copies from the real server (shared CONSUMERS-NOTES):

- Each model has its own VRAM size (`Behaviour.models`); a loaded model is
  its own runner process holding one allocation (process name
  ``/usr/local/bin/ollama``). A model that does not fit answers 500 with
  "CUDA out of memory" (the real scheduler would first evict its own idle
  models; this one leaves eviction to gpumgr).
- ``/api/generate`` and ``/api/chat`` stream NDJSON by default, one write per
  token, after `Behaviour.prompt_eval_s` of prompt evaluation. A client that
  leaves is noticed only at the next write: the runner goes on computing
  (and holding its working memory, `Behaviour.working_mib`) until then, as
  the real runner does (ollama#11889); ``"stream": false`` gives one object. No prompt (or no messages)
  loads the model; with ``keep_alive: 0`` it unloads it: the reply comes at
  once, the unload waits for that model's in-flight requests, and the memory
  comes back `unload_settle_s` later.
- ``/api/embed``, ``/api/embeddings``, ``/api/tags``, ``/api/ps``, ``/api/show``,
  ``/api/version``, ``/``.
- ``/v1/chat/completions``, ``/v1/completions`` (SSE when streamed, ending with
  ``data: [DONE]``), ``/v1/embeddings``, ``/v1/models``.
- ``/v1/responses`` (OpenAI, since 0.13.3), ``/v1/messages`` (Anthropic, since
  0.14.0) and ``/v1/audio/transcriptions`` (since 0.20.0): the real server
  runs each as a chat (its ChatHandler), so each is a GPU job here too; the
  answer keeps the chat-completions shape.

Streamed NDJSON lines also carry ``seq`` and ``sent_at`` (clock seconds at
the write), which tests use to prove each line travelled on its own.
With `Behaviour.models` unset there is one model, ``llama3``, and any model
name means it (older tests and the demo send ``"model": "m"`` or none).
"""

from __future__ import annotations

import base64
import datetime
import functools
import hashlib
import itertools
import json
import re
import struct
from typing import Any, Callable

import attrs
from twisted.internet import defer

from gpumgr.testing.base import SimulatedConsumer, json_body, next_pid, now_iso, read_json
from gpumgr.testing.contention import DEFAULT_CONTENTION

DEFAULT_MODEL = "llama3"
DEFAULT_KEEP_ALIVE_S = 300.0
_FOREVER_S = 10 * 365 * 86400.0
_DURATION = re.compile(r"(\d+(?:\.\d*)?)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def canonical_name(name: str) -> str:
    """``llama3`` -> ``llama3:latest``, as ollama names models."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def keep_alive_s(value: Any) -> float:
    """ollama's keep_alive: a number of seconds or a Go duration string; < 0 is forever."""
    if value is None:
        return DEFAULT_KEEP_ALIVE_S
    if isinstance(value, bool):
        raise ValueError(f"invalid keep_alive {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        text = text.lstrip("+-")
        if text == "0":
            return 0.0
        parts = _DURATION.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise ValueError(f'time: invalid duration "{value}"')
        seconds = sign * sum(float(n) * _UNIT_S[u] for n, u in parts)
    else:
        raise ValueError(f"invalid keep_alive {value!r}")
    return _FOREVER_S if seconds < 0 else seconds


@attrs.frozen
class ModelInfo:
    name: str
    vram_mib: int

    @property
    def embedding_only(self) -> bool:
        return "embed" in self.name

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.name.encode()).hexdigest()

    @property
    def file_bytes(self) -> int:
        return int(self.vram_mib * 0.85) << 20

    def details(self) -> dict[str, Any]:
        family = "bert" if self.embedding_only else "llama"
        return {"parent_model": "", "format": "gguf", "family": family, "families": [family],
                "parameter_size": "137M" if self.embedding_only else "8.0B",
                "quantization_level": "F16" if self.embedding_only else "Q4_K_M"}


_kv_ids = itertools.count(1)


@attrs.define
class _KvCache:
    """A reply's KV cache on the card: its allocation's owner and size so far."""

    owner: str
    model: str
    mib: int = 0


@attrs.define
class _Resident:
    """A loaded model: its runner process and its allocation."""

    model: ModelInfo
    pid: int
    owner: str
    expires_at: float
    in_flight: int = 0
    unload_pending: bool = False


class OllamaSim(SimulatedConsumer):
    process_name = "/usr/local/bin/ollama"
    default_contention = DEFAULT_CONTENTION["ollama"]

    def __init__(self, world, name, behaviour):
        self.resident: dict[str, _Resident] = {}
        super().__init__(world, name, behaviour)
        self._ids = itertools.count(1)
        self._created = int(self.clock.seconds())

    # -- models ------------------------------------------------------------------

    def catalogue(self) -> dict[str, ModelInfo]:
        """Every model this ollama has pulled, by canonical name."""
        models = self.behaviour.models
        if models is None:
            models = {DEFAULT_MODEL: self.behaviour.vram_mib}
        return {canonical_name(n): ModelInfo(canonical_name(n), mib) for n, mib in models.items()}

    def resolve(self, name: Any) -> ModelInfo | None:
        catalogue = self.catalogue()
        if self.behaviour.models is None:
            return next(iter(catalogue.values()))
        if not isinstance(name, str) or not name:
            return None
        return catalogue.get(canonical_name(name))

    @property
    def loaded(self) -> bool:
        return bool(self.resident)

    def loaded_models(self) -> list[str]:
        return sorted(self.resident)

    def load(self, model: str | None = None, keep_alive: float = DEFAULT_KEEP_ALIVE_S) -> bool:
        """Start `model`'s runner (default: the first model); False if it does not fit."""
        info = self.resolve(model) if model is not None else next(iter(self.catalogue().values()))
        if info is None:
            return False
        expires_at = self.clock.seconds() + keep_alive
        resident = self.resident.get(info.name)
        if resident is not None:
            resident.expires_at = expires_at
            return True
        pid = next_pid()
        owner = f"{self.name}/{info.name}#{pid}"
        if not self.world.gpu.allocate(owner, pid, self.process_name, info.vram_mib):
            return False
        self.resident[info.name] = _Resident(info, pid, owner, expires_at)
        self.loads += 1
        return True

    def unload(self, model: str | None = None) -> None:
        """Unload `model` (None: all) once its in-flight requests are done."""
        self.unloads += 1
        names = list(self.resident) if model is None else [canonical_name(model)]
        for name in names:
            resident = self.resident.get(name)
            if resident is None:
                continue
            if resident.in_flight:
                resident.unload_pending = True
            else:
                self._stop_runner(resident)

    def _stop_runner(self, resident: _Resident) -> None:
        del self.resident[resident.model.name]
        if self.behaviour.unload_settle_s > 0:
            self.clock.callLater(self.behaviour.unload_settle_s, self.world.gpu.free, resident.owner)
        else:
            self.world.gpu.free(resident.owner)

    def _acquire(self, info: ModelInfo, keep_alive: float) -> bool:
        if not self.load(info.name, keep_alive):
            return False
        self.resident[info.name].in_flight += 1
        return True

    def _release(self, info: ModelInfo) -> None:
        resident = self.resident.get(info.name)
        if resident is None:
            return
        resident.in_flight -= 1
        if resident.in_flight == 0 and resident.unload_pending:
            self._stop_runner(resident)

    def process_stopped(self) -> None:
        self.running = False
        for resident in list(self.resident.values()):
            del self.resident[resident.model.name]
            self.world.gpu.free(resident.owner)

    # -- routing -------------------------------------------------------------------

    def route(self, method, path):
        if method == "GET" and path.startswith("/v1/models/"):
            return lambda r: self.openai_model(r, path[len("/v1/models/"):])
        return {
            ("GET", "/"): self.root,
            ("HEAD", "/"): self.root,
            ("GET", "/api/version"): lambda r: json_body(r, {"version": "0.12.3"}),
            ("GET", "/api/tags"): self.tags,
            ("GET", "/api/ps"): self.ps,
            ("POST", "/api/show"): self.show,
            ("POST", "/api/generate"): self.generate,
            ("POST", "/api/chat"): self.chat,
            ("POST", "/api/embed"): self.embed,
            ("POST", "/api/embeddings"): self.embeddings_legacy,
            ("POST", "/v1/chat/completions"): self.openai_chat,
            ("POST", "/v1/completions"): self.openai_completions,
            ("POST", "/v1/embeddings"): self.openai_embeddings,
            ("POST", "/v1/responses"): self.compat_chat,
            ("POST", "/v1/messages"): self.compat_chat,
            ("POST", "/v1/audio/transcriptions"): self.compat_chat,
            ("GET", "/v1/models"): self.openai_models,
        }.get((method, path))

    def is_work(self, method, path, body_head):
        if method != "POST" or not path.startswith(("/api/", "/v1/")) or path == "/api/show":
            return False
        if path not in ("/api/generate", "/api/chat"):
            return True
        try:
            body = json.loads(body_head or b"{}")
        except ValueError:
            return True
        return bool(body.get("prompt") or body.get("messages"))

    # -- small GET routes --------------------------------------------------------------

    def root(self, request):
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"Ollama is running"

    def _model_entry(self, info: ModelInfo) -> dict[str, Any]:
        return {"name": info.name, "model": info.name, "size": info.file_bytes,
                "digest": info.digest, "details": info.details()}

    def tags(self, request):
        modified = now_iso(self.clock)
        return json_body(request, {"models": [
            {**self._model_entry(i), "modified_at": modified} for i in self.catalogue().values()]})

    def ps(self, request):
        models = []
        for name in sorted(self.resident):
            r = self.resident[name]
            models.append({**self._model_entry(r.model), "size": r.model.vram_mib << 20,
                           "size_vram": r.model.vram_mib << 20,
                           "expires_at": _iso(r.expires_at), "context_length": 4096})
        return json_body(request, {"models": models})

    def show(self, request):
        body, error = self._parse(request)
        if error is not None:
            return error
        info, error = self._model(request, body.get("model") or body.get("name"))
        if error is not None:
            return error
        caps = ["embedding"] if info.embedding_only else ["completion"]
        return json_body(request, {
            "license": "", "modelfile": f"# Modelfile generated by \"ollama show\"\nFROM {info.name}\n",
            "parameters": "stop \"<|eot_id|>\"", "template": "{{ .Prompt }}",
            "details": info.details(), "capabilities": caps, "modified_at": now_iso(self.clock),
            "model_info": {"general.architecture": info.details()["family"],
                           "general.parameter_count": 8030261248, "llama.context_length": 8192}})

    # -- request plumbing ---------------------------------------------------------------

    def _parse(self, request, openai: bool = False):
        """(body, None), or (None, an error answer) when the body is not a JSON object."""
        try:
            body = read_json(request)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return None, self._error(request, 400, "invalid request body: expected a JSON object",
                                     openai)
        return body, None

    def _error(self, request, code: int, message: str, openai: bool = False) -> bytes:
        if not openai:
            return json_body(request, {"error": message}, code)
        kind = {400: "invalid_request_error", 404: "not_found_error"}.get(code, "api_error")
        return json_body(request, {"error": {"message": message, "type": kind, "param": None,
                                             "code": None}}, code)

    def _model(self, request, name: Any, openai: bool = False):
        """(ModelInfo, None), or (None, a 400 or 404 answer)."""
        if self.behaviour.models is not None and not name:
            return None, self._error(request, 400, "model is required", openai)
        info = self.resolve(name)
        if info is None:
            return None, self._error(request, 404, f'model "{name}" not found, try pulling it first',
                                     openai)
        return info, None

    def _job(self, request, info: ModelInfo, keep_alive: float, work, openai: bool = False):
        """Run `work(gone)` as a GPU job holding `info` loaded (or answer OOM)."""
        kv = _KvCache(f"{self.name}/kv#{next(_kv_ids)}", info.name)
        request.sim_kv = kv  # the growing KV cache (`_grow_kv`), freed when the job ends

        def ended() -> None:
            self.world.gpu.free(kv.owner)
            self._release(info)

        return self.run_job(
            request, work,
            load=lambda: self._acquire(info, keep_alive),
            oom=lambda: self._error(request, 500, self.oom_message(info.vram_mib), openai),
            ended=ended, pid=lambda: self.resident[info.name].pid)

    def _grow_kv(self, request, written: int, total: int) -> bool:
        """The KV cache after `written` of `total` frames: `working_growth_mib`
        times their share. False: the growth did not fit (an OOM counted)."""
        growth = self.behaviour.working_growth_mib
        kv: _KvCache | None = getattr(request, "sim_kv", None)
        if growth <= 0 or kv is None or total <= 0:
            return True
        target = growth * min(written, total) // total
        if target <= kv.mib:
            return True
        gpu = self.world.gpu
        runner = self.resident.get(kv.model)
        pid = runner.pid if runner is not None else self.pid
        fits = (gpu.resize(kv.owner, target) if kv.mib
                else gpu.allocate(kv.owner, pid, self.process_name, target))
        if fits:
            kv.mib = target
        return fits

    def _tokens(self) -> list[str]:
        return [f"tok{i} " for i in range(max(0, self.behaviour.stream_chunks - 1))]

    @defer.inlineCallbacks
    def _emit(self, request, frames: list[Callable[[], bytes]], gone):
        """Write each frame on its own, spaced by chunk_interval_s (or the test's
        gate), after the prompt's evaluation (prompt_eval_s), during which a
        client that left goes unnoticed."""
        b = self.behaviour
        if b.prompt_eval_s > 0:
            yield self.compute(b.prompt_eval_s)
        for i, frame in enumerate(frames):
            if i:
                if b.stream_gate is not None:
                    yield b.stream_gate(i)
                else:
                    yield self.compute(b.chunk_interval_s)
            if gone():
                return
            if not self._grow_kv(request, i + 1, len(frames)):
                # As the runner does: the stream ends with an error line.
                request.write(json.dumps({"error": self.oom_message(
                    b.working_growth_mib)}).encode() + b"\n")
                request.finish()
                return
            request.write(frame())
        if not gone():
            request.finish()

    @defer.inlineCallbacks
    def _answer_later(self, request, make_body: Callable[[], bytes], gone):
        b = self.behaviour
        yield self.compute(b.prompt_eval_s + b.job_s)
        if not self._grow_kv(request, 1, 1):
            self.finish_with(request, json_body(request, {"error": self.oom_message(
                b.working_growth_mib)}, 500))
            return
        if not gone():
            body = make_body()
            request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
            request.setHeader(b"Content-Length", str(len(body)).encode())
            self.finish_with(request, body)

    def _durations(self, started: float, prompt: str, tokens: int) -> dict[str, int]:
        total = max(1, int((self.clock.seconds() - started) * 1e9))
        return {"total_duration": total, "load_duration": 0,
                "prompt_eval_count": max(1, len(prompt.split())),
                "prompt_eval_duration": total // 10, "eval_count": tokens,
                "eval_duration": total - total // 10}

    # -- /api/generate and /api/chat -------------------------------------------------------

    def generate(self, request):
        return self._native(request, chat=False)

    def chat(self, request):
        return self._native(request, chat=True)

    def _native(self, request, chat: bool):
        body, error = self._parse(request)
        if error is not None:
            return error
        requested = body.get("model")
        if requested is None and self.behaviour.models is None:
            requested = DEFAULT_MODEL
        info, error = self._model(request, requested)
        if error is not None:
            return error
        try:
            keep = keep_alive_s(body.get("keep_alive"))
        except ValueError as e:
            return self._error(request, 400, str(e))
        work_given = body.get("messages") if chat else body.get("prompt")
        if not work_given:
            return self._load_or_unload(request, info, requested, keep, chat)
        if info.embedding_only:
            return self._error(request, 400, f'"{requested}" does not support '
                                             f'{"chat" if chat else "generate"}')
        prompt = _message_text(work_given) if chat else str(work_given)
        return self._job(request, info, keep,
                         lambda gone: self._native_reply(request, requested, chat, prompt,
                                                         body.get("stream", True) is not False,
                                                         gone))

    def _load_or_unload(self, request, info, requested, keep: float, chat: bool):
        if keep == 0 and self.behaviour.unload_fails:
            return self._error(request, 500, "simulated unload failure")
        if keep == 0:
            self.unload(info.name)
            reason = "unload"
        else:
            if not self.load(info.name, keep):
                return self._error(request, 500, self.oom_message(info.vram_mib))
            reason = "load"
        reply: dict[str, Any] = {"model": requested, "created_at": now_iso(self.clock)}
        if chat:
            reply["message"] = {"role": "assistant", "content": ""}
        else:
            reply["response"] = ""
        reply.update(done=True, done_reason=reason)
        return json_body(request, reply)

    def _native_reply(self, request, model, chat: bool, prompt: str, stream: bool, gone):
        started = self.clock.seconds()
        tokens = self._tokens()

        def piece(text: str) -> dict[str, Any]:
            if chat:
                return {"message": {"role": "assistant", "content": text}}
            return {"response": text}

        def final() -> dict[str, Any]:
            extra = {} if chat else {"context": [1, 2, 3]}
            return {"done": True, "done_reason": "stop", **extra,
                    **self._durations(started, prompt, len(tokens))}

        if not stream:
            return self._answer_later(request, lambda: json.dumps(
                {"model": model, "created_at": now_iso(self.clock), **piece("".join(tokens)),
                 **final()}).encode(), gone)

        def line(i: int) -> bytes:
            head = {"model": model, "created_at": now_iso(self.clock)}
            if i < len(tokens):
                value = {**head, **piece(tokens[i]), "done": False}
            else:
                value = {**head, **piece(""), **final()}
            value.update(seq=i, sent_at=self.clock.seconds())
            return json.dumps(value).encode() + b"\n"

        request.setHeader(b"Content-Type", b"application/x-ndjson")
        return self._emit(request, [functools.partial(line, i) for i in range(len(tokens) + 1)],
                          gone)

    # -- embeddings ---------------------------------------------------------------------------

    def _vector(self, model: str, text: str, normalise: bool = True) -> list[float]:
        out: list[float] = []
        seed = f"{model}\0{text}".encode()
        while len(out) < self.behaviour.embedding_dim:
            seed = hashlib.sha256(seed).digest()
            out += [(b - 127.5) / 127.5 for b in seed]
        out = out[: self.behaviour.embedding_dim]
        if normalise:
            norm = sum(x * x for x in out) ** 0.5 or 1.0
            out = [x / norm for x in out]
        return [round(x, 6) for x in out]

    def _inputs(self, value: Any) -> list[str] | None:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        return None

    def embed(self, request):
        body, error = self._parse(request)
        if error is not None:
            return error
        info, error = self._model(request, body.get("model"))
        if error is not None:
            return error
        inputs = self._inputs(body.get("input", []))
        if inputs is None:
            return self._error(request, 400, "invalid input type")
        started = self.clock.seconds()
        name = body.get("model") or DEFAULT_MODEL
        return self._job(request, info, DEFAULT_KEEP_ALIVE_S, lambda gone: self._answer_later(
            request, lambda: json.dumps({
                "model": name, "embeddings": [self._vector(info.name, t) for t in inputs],
                **{k: v for k, v in self._durations(started, " ".join(inputs), 0).items()
                   if k in ("total_duration", "load_duration", "prompt_eval_count")},
            }).encode(), gone))

    def embeddings_legacy(self, request):
        body, error = self._parse(request)
        if error is not None:
            return error
        info, error = self._model(request, body.get("model"))
        if error is not None:
            return error
        prompt = body.get("prompt", "")
        if not isinstance(prompt, str):
            return self._error(request, 400, "prompt must be a string")
        return self._job(request, info, DEFAULT_KEEP_ALIVE_S, lambda gone: self._answer_later(
            request, lambda: json.dumps(
                {"embedding": self._vector(info.name, prompt, normalise=False)}).encode(), gone))

    # -- the OpenAI-compatible API -------------------------------------------------------------

    def _openai_begin(self, request):
        """(body, model info, name as asked) or an error answer in OpenAI's format."""
        body, error = self._parse(request, openai=True)
        if error is not None:
            return None, None, None, error
        name = body.get("model")
        info, error = self._model(request, name if name or self.behaviour.models is not None
                                  else DEFAULT_MODEL, openai=True)
        return body, info, name or DEFAULT_MODEL, error

    def openai_chat(self, request):
        body, info, name, error = self._openai_begin(request)
        if error is not None:
            return error
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return self._error(request, 400, "[] is too short - 'messages'", openai=True)
        return self._openai_text(request, body, info, name, chat=True,
                                 prompt=_message_text(messages))

    def compat_chat(self, request):
        """/v1/responses, /v1/messages, /v1/audio/transcriptions: a chat job."""
        body, info, name, error = self._openai_begin(request)
        if error is not None:
            return error
        words = body.get("messages") or body.get("input") or ""
        prompt = _message_text(words) if isinstance(words, list) else str(words)
        return self._openai_text(request, body, info, name, chat=True, prompt=prompt)

    def openai_completions(self, request):
        body, info, name, error = self._openai_begin(request)
        if error is not None:
            return error
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            return self._error(request, 400, "prompt must be a string", openai=True)
        return self._openai_text(request, body, info, name, chat=False, prompt=prompt)

    def _openai_text(self, request, body, info, name, chat: bool, prompt: str):
        if info.embedding_only:
            return self._error(request, 400, f'"{name}" does not support generate', openai=True)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{next(self._ids)}"
        created = int(self.clock.seconds())
        stream = body.get("stream") is True
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return self._job(request, info, DEFAULT_KEEP_ALIVE_S, lambda gone: self._openai_reply(
            request, ident, created, name, chat, prompt, stream, include_usage, gone), openai=True)

    def _openai_reply(self, request, ident, created, model, chat, prompt, stream, include_usage,
                      gone):
        tokens = self._tokens()
        usage = {"prompt_tokens": max(1, len(prompt.split())), "completion_tokens": len(tokens),
                 "total_tokens": max(1, len(prompt.split())) + len(tokens)}
        head = {"id": ident, "object": "chat.completion" if chat else "text_completion",
                "created": created, "model": model, "system_fingerprint": "fp_ollama"}
        if not stream:
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": "".join(tokens)},
                          "finish_reason": "stop"}
            else:
                choice = {"text": "".join(tokens), "index": 0, "finish_reason": "stop"}
            return self._answer_later(request, lambda: json.dumps(
                {**head, "choices": [choice], "usage": usage}).encode(), gone)
        if chat:
            head["object"] = "chat.completion.chunk"

        def choice_for(text: str, finish: str | None) -> dict[str, Any]:
            if chat:
                return {"index": 0, "delta": {"role": "assistant", "content": text},
                        "finish_reason": finish}
            return {"text": text, "index": 0, "finish_reason": finish}

        def event(i: int) -> bytes:
            if i < len(tokens):
                return _sse({**head, "choices": [choice_for(tokens[i], None)]})
            out = _sse({**head, "choices": [choice_for("", "stop")]})
            if include_usage:
                out += _sse({**head, "choices": [], "usage": usage})
            return out + b"data: [DONE]\n\n"

        request.setHeader(b"Content-Type", b"text/event-stream")
        request.setHeader(b"Cache-Control", b"no-cache")
        return self._emit(request, [functools.partial(event, i) for i in range(len(tokens) + 1)],
                          gone)

    def openai_embeddings(self, request):
        body, info, name, error = self._openai_begin(request)
        if error is not None:
            return error
        inputs = self._inputs(body.get("input"))
        if not inputs:
            return self._error(request, 400, "invalid input", openai=True)
        as_base64 = body.get("encoding_format") == "base64"

        def encoded(vector: list[float]) -> Any:
            if as_base64:
                return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            return vector

        tokens = sum(max(1, len(t.split())) for t in inputs)
        return self._job(request, info, DEFAULT_KEEP_ALIVE_S, lambda gone: self._answer_later(
            request, lambda: json.dumps({
                "object": "list", "model": name,
                "data": [{"object": "embedding", "index": i,
                          "embedding": encoded(self._vector(info.name, t))}
                         for i, t in enumerate(inputs)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}).encode(), gone),
            openai=True)

    def _openai_model(self, info: ModelInfo) -> dict[str, Any]:
        return {"id": info.name, "object": "model", "created": self._created,
                "owned_by": "library"}

    def openai_models(self, request):
        return json_body(request, {"object": "list", "data": [
            self._openai_model(i) for i in self.catalogue().values()]})

    def openai_model(self, request, name: str):
        info = self.catalogue().get(canonical_name(name)) if name else None
        if info is None:
            return self._error(request, 404, f'model "{name}" not found', openai=True)
        return json_body(request, self._openai_model(info))


def _message_text(messages: Any) -> str:
    """The words a chat's messages carry, for token counts."""
    if not isinstance(messages, list):
        return ""
    return " ".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))


def _sse(value: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(value).encode() + b"\n\n"


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(
        min(seconds, 253402300799), datetime.timezone.utc).isoformat()
