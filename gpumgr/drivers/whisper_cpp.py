"""whisper.cpp's server (`whisper-server`).

It loads its model before it binds its port, and holds it until it exits: it
has no unload route. Freeing its memory means stopping the process, so run it
with a `process:` block (gpumgr starts and stops it); without one it is
pinned. `/health` answers 503 `{"status": "loading model"}` while a
`POST /load` swaps models: that is starting, not down.
"""

from __future__ import annotations

from gpumgr.drivers.base import BaseDriver, HttpReply
from gpumgr.states import Health


class WhisperCppDriver(BaseDriver):
    name = "whisper.cpp"
    #: Swaps the model (and exits if the new one cannot be loaded).
    control_routes = frozenset({("POST", "/load")})

    def health_of_failed_probe(self, reply: HttpReply) -> Health:
        if reply.code == 503 and b"loading" in reply.body.lower():
            return Health.STARTING
        return super().health_of_failed_probe(reply)

    def is_gpu_work(self, method: str, path: str) -> bool:
        return method == "POST" and path in ("/inference", "/load")
