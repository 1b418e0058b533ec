"""whisper.cpp's server (`whisper-server`).

It loads its model before it binds its port, and holds it until it exits: it
has no unload route. Freeing its memory means stopping the process, so run it
with a `process:` block (gpumgr starts and stops it); without one it is
pinned. `/health` answers 503 `{"status": "loading model"}` while a
`POST /load` swaps models: that is starting, not down.

It runs one inference at a time, under one lock (`whisper_mutex` in
`examples/server/server.cpp`), and its inference handler takes that lock
*before* it looks for the `file` field. So an empty `POST` to its inference
route is answered only once every inference it took before has ended:
`work_barrier`, the evidence that work a client left is over. It costs no GPU
time, and the server prints one line to its stderr. The answer, by version:

- from March 2026 (whisper.cpp #3707): 400 with the body `Invalid request`
  (text/plain): the handler's own JSON error is replaced by the server's
  error handler, which cpp-httplib runs for every status from 400 up;
- from its first version (November 2023) until then: 200 with
  `{"error":"no 'file' field in the request"}`.
"""

from __future__ import annotations

from twisted.internet import defer

from gpumgr.config import ConsumerConfig
from gpumgr.drivers.base import BaseDriver, ControlHttp, HttpReply
from gpumgr.states import Health

#: What whisper-server answers an empty `POST /inference`, by version (see above).
NO_FILE_FIELD = b"no 'file' field in the request"
INVALID_REQUEST = b"Invalid request"
#: Its inference route unless `paths.stt` says otherwise (`--inference-path`).
INFERENCE_PATH = "/inference"


def passed_barrier(reply: HttpReply) -> bool | None:
    """Is this whisper-server's answer to the empty `POST /inference`? (pure)"""
    if reply.code == 400 and reply.body.strip() == INVALID_REQUEST:
        return True
    if reply.code == 200 and NO_FILE_FIELD in reply.body:
        return True
    return None


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

    def work_barrier(self, http: ControlHttp,
                     consumer: ConsumerConfig) -> defer.Deferred[bool | None]:
        path = consumer.paths.get("stt", INFERENCE_PATH)
        d = http.request("POST", consumer.url_for(path), b"")
        return d.addCallback(passed_barrier)
