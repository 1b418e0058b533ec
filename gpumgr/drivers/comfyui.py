"""ComfyUI.

`POST /prompt` answers at once with a `prompt_id` and renders afterwards, for
seconds or minutes: the GPU slot is held while the prompt is in `GET /queue`
(running or pending); then `GET /history/<id>` says it is over, or, empty,
that ComfyUI has forgotten it (it restarted) or deleted it from its queue.
`/interrupt` only sets a flag seen between nodes, and is skipped for a prompt
that is not running, so its 200 says nothing: a stopped prompt is followed
until `/queue` no longer lists it. `/free` only sets flags the
worker honours between renders, so its 200 says nothing about freed memory.
Every route is also served under `/api/`.
"""

from __future__ import annotations

import json
import re
from typing import Callable
from urllib.parse import quote

from twisted.internet import defer

from gpumgr.config import ConsumerConfig
from gpumgr.drivers.base import BaseDriver, ControlCallFailed, ControlHttp, RenderState

_PROMPT_PATHS = ("/prompt", "/api/prompt")


_PROMPT_ID = re.compile(rb'"prompt_id"\s*:\s*"((?:[^"\\]|\\.){1,256})"')


def prompt_id_of(body_head: bytes) -> str | None:
    """The prompt id in a `/prompt` answer (pure); None if there is none.

    The answer may be longer than what gpumgr keeps of it (large
    `node_errors`): then the id is found in the head as text."""
    try:
        doc = json.loads(body_head)
    except ValueError:
        match = _PROMPT_ID.search(body_head)
        return json.loads(b'"' + match.group(1) + b'"') if match else None
    pid = doc.get("prompt_id") if isinstance(doc, dict) else None
    return pid if isinstance(pid, str) and pid else None


def queued_ids(body: bytes) -> set[str]:
    """Prompt ids in a `GET /queue` answer, running and pending (pure).

    Each entry is `[number, prompt_id, prompt, extra_data, outputs]`."""
    try:
        doc = json.loads(body)
    except ValueError:
        raise ControlCallFailed("GET /queue did not answer JSON") from None
    if not isinstance(doc, dict):
        raise ControlCallFailed("GET /queue did not answer a JSON object")
    ids = set()
    for key in ("queue_running", "queue_pending"):
        for entry in doc.get(key) or ():
            if isinstance(entry, list) and len(entry) > 1 and isinstance(entry[1], str):
                ids.add(entry[1])
    return ids


def history_done(body: bytes, prompt_id: str) -> bool:
    """`GET /history/<id>` is `{}` until the prompt has finished (pure)."""
    try:
        doc = json.loads(body)
    except ValueError:
        raise ControlCallFailed("GET /history did not answer JSON") from None
    return isinstance(doc, dict) and prompt_id in doc


class ComfyUIDriver(BaseDriver):
    name = "comfyui"
    tracks_renders = True
    #: Interrupting, freeing memory, and clearing or deleting from the queue
    #: (`POST /queue {"clear"|"delete"}`), each also under /api/.
    control_routes = frozenset(
        ("POST", prefix + route) for prefix in ("", "/api")
        for route in ("/interrupt", "/free", "/queue"))

    def is_control(self, consumer: ConsumerConfig, method: str, path: str,
                   body: Callable[[], bytes | None]) -> bool:
        # Newer versions cancel one job with POST /api/jobs/<id>/cancel.
        if method == "POST" and path.startswith(("/api/jobs/", "/jobs/")) \
                and path.endswith("/cancel"):
            return True
        return super().is_control(consumer, method, path, body)

    def is_gpu_work(self, method: str, path: str) -> bool:
        return method == "POST" and path in _PROMPT_PATHS

    def render_id(self, method: str, path: str, status: int, body_head: bytes) -> str | None:
        if method != "POST" or path not in _PROMPT_PATHS or not 200 <= status < 300:
            return None
        return prompt_id_of(body_head)

    def render_state(self, http: ControlHttp, consumer: ConsumerConfig,
                     render_id: str) -> defer.Deferred[RenderState]:
        return defer.ensureDeferred(self._render_state(http, consumer, render_id))

    async def _render_state(self, http: ControlHttp, consumer: ConsumerConfig,
                            render_id: str) -> RenderState:
        """Queued or running: RUNNING. Otherwise its history says DONE; with no
        history either, ComfyUI has forgotten it (a restart): GONE. The queue
        comes first, so a reused prompt id with an old history entry still
        holds the GPU while it renders again."""
        queue = await http.request("GET", consumer.url_for("/queue"))
        if not queue.ok:
            raise ControlCallFailed(f"GET /queue answered HTTP {queue.code}: {queue.snippet()}")
        if render_id in queued_ids(queue.body):
            return RenderState.RUNNING
        reply = await http.request("GET", consumer.url_for("/history/" + quote(render_id, safe="")))
        if not reply.ok:
            raise ControlCallFailed(f"GET /history answered HTTP {reply.code}: {reply.snippet()}")
        return RenderState.DONE if history_done(reply.body, render_id) else RenderState.GONE

    def interrupt(self, http: ControlHttp, consumer: ConsumerConfig,
                  render_id: str) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._interrupt(http, consumer, render_id))

    async def _interrupt(self, http: ControlHttp, consumer: ConsumerConfig,
                         render_id: str) -> None:
        """Delete it from the queue (pending prompts only), then interrupt it
        (the running prompt only; ComfyUI skips it otherwise). In this order
        a prompt that starts between the two calls is still caught. Neither
        answer is evidence: the caller polls until /queue no longer lists it."""
        for path, body in (("/queue", {"delete": [render_id]}),
                           ("/interrupt", {"prompt_id": render_id})):
            reply = await http.request("POST", consumer.url_for(path),
                                       json.dumps(body).encode(), "application/json")
            if not reply.ok:
                raise ControlCallFailed(f"POST {path} answered HTTP {reply.code}: "
                                        f"{reply.snippet()}")
