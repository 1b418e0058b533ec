"""ComfyUI.

`POST /prompt` answers at once with a `prompt_id` and renders afterwards, for
seconds or minutes: the GPU slot is held until `GET /history/<id>` is no
longer empty (the render succeeded or failed). `/free` only sets flags the
worker honours between renders, so its 200 says nothing about freed memory.
Every route is also served under `/api/`.
"""

from __future__ import annotations

import json
from urllib.parse import quote

from twisted.internet import defer

from gpumgr.config import ConsumerConfig, HttpCall
from gpumgr.drivers.base import BaseDriver, ControlCallFailed, ControlHttp

_PROMPT_PATHS = ("/prompt", "/api/prompt")


def prompt_id_of(body_head: bytes) -> str | None:
    """The prompt id in a `/prompt` answer (pure); None if there is none."""
    try:
        doc = json.loads(body_head)
    except ValueError:
        return None
    pid = doc.get("prompt_id") if isinstance(doc, dict) else None
    return pid if isinstance(pid, str) and pid else None


def history_done(body: bytes, prompt_id: str) -> bool:
    """`GET /history/<id>` is `{}` until the prompt has finished (pure)."""
    try:
        doc = json.loads(body)
    except ValueError:
        raise ControlCallFailed("GET /history did not answer JSON") from None
    return isinstance(doc, dict) and prompt_id in doc


class ComfyUIDriver(BaseDriver):
    name = "comfyui"
    default_health = "/system_stats"
    default_unload = HttpCall(method="POST", path="/free",
                              body=b'{"unload_models": true, "free_memory": true}',
                              content_type="application/json")
    tracks_renders = True

    def is_gpu_work(self, method: str, path: str) -> bool:
        return method == "POST" and path in _PROMPT_PATHS

    def render_id(self, method: str, path: str, status: int, body_head: bytes) -> str | None:
        if method != "POST" or path not in _PROMPT_PATHS or not 200 <= status < 300:
            return None
        return prompt_id_of(body_head)

    def render_done(self, http: ControlHttp, consumer: ConsumerConfig,
                    render_id: str) -> defer.Deferred[bool]:
        return defer.ensureDeferred(self._render_done(http, consumer, render_id))

    async def _render_done(self, http: ControlHttp, consumer: ConsumerConfig,
                           render_id: str) -> bool:
        reply = await http.request("GET", consumer.url_for("/history/" + quote(render_id, safe="")))
        if not reply.ok:
            raise ControlCallFailed(f"GET /history answered HTTP {reply.code}: {reply.snippet()}")
        return history_done(reply.body, render_id)

    def interrupt(self, http: ControlHttp, consumer: ConsumerConfig,
                  render_id: str) -> defer.Deferred[None]:
        body = json.dumps({"prompt_id": render_id}).encode()
        d = http.request("POST", consumer.url_for("/interrupt"), body, "application/json")
        return d.addCallback(lambda _: None)
