"""What every simulated consumer shares: knobs, the request record, memory, jobs.

Each flavour (`ollama`, `comfyui`, and whisper and mvoice in `consumers`) is
a leaf twisted.web Resource that routes on method and path, allocates
simulated VRAM when it loads, and records every request it receives so tests
can assert what reached it (and what did not).
"""

from __future__ import annotations

import datetime
import hashlib
import itertools
import json
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import unquote_to_bytes

import attrs
from twisted.internet import defer
from twisted.web import server
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

if TYPE_CHECKING:
    from gpumgr.testing.consumers import SimulatedWorld

_pids = itertools.count(41000)
_work_ids = itertools.count(1)


def next_pid() -> int:
    """A fresh simulated process id (each ollama runner is its own process)."""
    return next(_pids)


@attrs.define
class Behaviour:
    """Knobs a test turns. Times are simulated-work durations, in seconds."""

    vram_mib: int = 2000
    #: ollama: a non-streamed answer or an embedding; ComfyUI: one render.
    job_s: float = 0.02
    #: ollama: lines (or SSE events) in a stream, the final "done" one included.
    stream_chunks: int = 8
    chunk_interval_s: float = 0.01
    #: The memory really comes back this long after the unload reply.
    unload_settle_s: float = 0.0
    unload_fails: bool = False
    healthy: bool = True
    #: Tests only: before writing chunk i (i >= 1), wait for stream_gate(i).
    stream_gate: Callable[[int], defer.Deferred] | None = None
    audio_bytes: int = 256 * 1024
    #: ollama: model name -> VRAM MiB. None: one model, ``llama3`` of
    #: `vram_mib`, which any model name in a request means.
    models: dict[str, int] | None = None
    #: ollama: the length of the vectors /api/embed and /v1/embeddings return.
    embedding_dim: int = 16
    #: ComfyUI: progress events per render.
    render_steps: int = 4
    #: ComfyUI: the time of one node of a render; None: `job_s` spread over the nodes.
    render_node_s: float | None = None
    #: ComfyUI: the sampler never finishes (history never fills) until interrupted;
    #: it sees the interrupt at its next step (one node time).
    render_hangs: bool = False
    #: ComfyUI: the sampler never finishes and never looks at the interrupt flag
    #: (a hung node): only the process dying ends the render.
    render_stuck: bool = False
    #: ComfyUI: renders end in execution_error with this exception message.
    render_error: str | None = None
    #: Tests only: a render ends once `job_s` passed AND render_gate(prompt_id) fired.
    render_gate: Callable[[str], defer.Deferred] | None = None
    #: ollama: evaluating the prompt before the first token is written. The
    #: runner does not look at its client meanwhile: one that left is noticed
    #: only at the first write (ollama#11889).
    prompt_eval_s: float = 0.0
    #: Memory a job allocates beside the model while it computes (activations,
    #: a KV cache grown for the request), freed when the job ends. It shows in
    #: the process's nvidia-smi row.
    working_mib: int = 0
    #: Tests only: a ComfyUI node ends once its time passed AND
    #: node_gate(prompt_id, node_id) fired (not a hanging sampler's steps).
    node_gate: Callable[[str, str], defer.Deferred] | None = None
    #: ollama: the working memory (a KV cache) grows by this much over a reply,
    #: a share at each token written, on top of `working_mib`; a step that
    #: does not fit ends the reply with an out-of-memory error.
    working_growth_mib: int = 0
    #: How much the job slows when others compute beside it, in [0, 1]
    #: (`gpumgr.testing.contention`); None: the flavour's default.
    contention: float | None = None


@attrs.define
class RecordedRequest:
    method: str
    path: str
    query: bytes
    headers: Headers
    content_type: str | None
    body_len: int
    body_sha256: str
    body_head: bytes
    at: float
    #: The request target exactly as it arrived (path and query, encoded).
    raw_target: bytes = b""


def _digest(content) -> tuple[int, str, bytes]:
    content.seek(0)
    h = hashlib.sha256()
    size = 0
    head = b""
    while True:
        block = content.read(1 << 20)
        if not block:
            break
        if size < 4096:
            head += block[: 4096 - size]
        size += len(block)
        h.update(block)
    content.seek(0)
    return size, h.hexdigest(), head


def json_body(request, value: Any, code: int = 200) -> bytes:
    body = json.dumps(value).encode("utf-8")
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
    request.setHeader(b"Content-Length", str(len(body)).encode("ascii"))
    return body


def read_json(request) -> Any:
    """The request body as JSON; raises ValueError when it is not."""
    return json.loads(request.content.read() or b"{}")


def now_iso(clock) -> str:
    return datetime.datetime.fromtimestamp(clock.seconds(), datetime.timezone.utc).isoformat()


class SimulatedConsumer(Resource):
    isLeaf = True
    process_name = "/usr/bin/sim-consumer"
    #: Whether the model is loaded when the process starts.
    loaded_at_start = False
    #: The flavour's contention factor when `Behaviour.contention` is None.
    default_contention = 0.5

    def __init__(self, world: SimulatedWorld, name: str, behaviour: Behaviour) -> None:
        super().__init__()
        self.world = world
        self.name = name
        self.behaviour = behaviour
        self.pid = next_pid()
        self._loaded = False
        self.requests: list[RecordedRequest] = []
        self.jobs_started = 0
        self.jobs_cancelled = 0
        self.unloads = 0
        self.loads = 0
        self.url: str | None = None
        #: False between `world.stop_consumer` and `world.restart_consumer`.
        self.running = True
        if self.loaded_at_start:
            self.load()

    @property
    def clock(self):
        return self.world.clock

    @property
    def loaded(self) -> bool:
        return self._loaded

    @property
    def contention(self) -> float:
        c = self.behaviour.contention
        return self.default_contention if c is None else c

    def compute(self, seconds: float) -> defer.Deferred[None]:
        """`seconds` of this job's work alone, slowed while others compute
        (`gpumgr.testing.contention`); alone it is a plain `deferLater`."""
        return self.world.compute.work(seconds, self.contention)

    # -- what tests read ---------------------------------------------------

    def client_requests(self) -> list[RecordedRequest]:
        """Requests a client sent, through gpumgr or not: not gpumgr's own
        (health probes, control calls, ollama's /api/ps asks), which say so in
        their User-Agent (`gpumgr/<version>`) and come when they come."""
        return [r for r in self.requests
                if not any(ua.startswith(b"gpumgr/")
                           for ua in r.headers.getRawHeaders(b"user-agent", []))]

    def work_requests(self) -> list[RecordedRequest]:
        """Requests that were GPU work (not health checks or control calls)."""
        return [r for r in self.requests if self.is_work(r.method, r.path, r.body_head)]

    def is_work(self, method: str, path: str, body_head: bytes) -> bool:
        return False

    # -- memory --------------------------------------------------------------

    def load(self) -> bool:
        if self._loaded:
            return True
        if not self.world.gpu.allocate(self.name, self.pid, self.process_name, self.behaviour.vram_mib):
            return False
        self._loaded = True
        self.loads += 1
        return True

    def unload(self) -> None:
        """Drop the model; the memory comes back after `unload_settle_s`."""
        self.unloads += 1
        self._loaded = False
        if self.behaviour.unload_settle_s > 0:
            self.clock.callLater(self.behaviour.unload_settle_s, self._free_if_unloaded)
        else:
            self.world.gpu.free(self.name)

    def _free_if_unloaded(self) -> None:
        if not self._loaded:
            self.world.gpu.free(self.name)

    def oom_body(self, mib: int | None = None) -> dict:
        return {"error": self.oom_message(self.behaviour.vram_mib if mib is None else mib)}

    def oom_message(self, mib: int) -> str:
        return f"CUDA out of memory: tried to allocate {mib} MiB; {self.world.gpu.free_mib} MiB free"

    # -- the process's life (world.stop_consumer / restart_consumer) -------------

    def process_stopped(self) -> None:
        """The process died: its work is lost and the driver takes its memory back at once."""
        self.running = False
        self._loaded = False
        self.world.gpu.free(self.name)

    def process_started(self) -> None:
        self.running = True
        self.pid = next_pid()
        if self.loaded_at_start:
            self.load()

    # -- HTTP --------------------------------------------------------------

    def render(self, request):
        size, sha, head = _digest(request.content)
        # Like gin and aiohttp, route on the percent-decoded path.
        path = unquote_to_bytes(request.path).decode("utf-8", "replace")
        self.requests.append(
            RecordedRequest(
                method=request.method.decode("ascii"),
                path=path,
                query=request.uri.partition(b"?")[2],
                headers=Headers(dict(request.requestHeaders.getAllRawHeaders())),
                content_type=(request.getHeader(b"content-type") or b"").decode() or None,
                body_len=size,
                body_sha256=sha,
                body_head=head,
                at=self.clock.seconds(),
                raw_target=request.uri,
            )
        )
        method = request.method.decode("ascii")
        handler = self.route(method, path)
        if handler is None and method == "HEAD":  # as real servers do; twisted.web drops the body
            handler = self.route("GET", path)
        if handler is None:
            return json_body(request, {"error": f"no route {path}"}, 404)
        return handler(request)

    def route(self, method: str, path: str):  # pragma: no cover - overridden
        return None

    def health(self, request):
        if self.behaviour.healthy:
            return json_body(request, {"status": "ok"})
        return json_body(request, {"status": "loading model"}, 503)

    # -- jobs --------------------------------------------------------------

    def run_job(self, request, work: Callable[[Callable[[], bool]], Any],
                load: Callable[[], bool] | None = None, oom: Callable[[], bytes] | None = None,
                ended: Callable[[], None] | None = None, pid: Callable[[], int] | None = None):
        """Load if needed (or answer OOM), then do `work` while counted as a GPU job.

        `work(gone)` gets a function telling whether the client left; `load`
        and `oom` replace the default model load and OOM answer, and `ended`
        runs when the job is over. The job's working memory
        (`Behaviour.working_mib`) is held by process `pid()` (default: this
        consumer's) from its start to its end; if it does not fit, the job
        answers out of memory.
        """
        if not (load or self.load)():
            return oom() if oom is not None else json_body(request, self.oom_body(), 500)
        working = self._take_working_memory(pid() if pid is not None else self.pid)
        if working is False:
            if ended is not None:
                ended()
            mib = self.behaviour.working_mib
            return (json_body(request, {"error": self.oom_message(mib)}, 500))
        gone = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        self.jobs_started += 1
        self.world.job_started(self)

        def job_ended(result):
            if isinstance(working, str):
                self.world.gpu.free(working)
            self.world.job_ended(self)
            if gone:
                self.jobs_cancelled += 1
            if ended is not None:
                ended()
            return result

        d = defer.maybeDeferred(work, lambda: bool(gone))
        d.addBoth(job_ended)
        d.addErrback(lambda f: None if gone else f)
        return server.NOT_DONE_YET

    def _take_working_memory(self, pid: int) -> str | bool:
        """The owner of the job's working memory; True when it needs none,
        False when it does not fit (an out-of-memory is counted)."""
        mib = self.behaviour.working_mib
        if mib <= 0:
            return True
        owner = f"{self.name}/work#{next(_work_ids)}"
        if not self.world.gpu.allocate(owner, pid, self.process_name, mib):
            return False
        return owner

    def finish_with(self, request, body: bytes) -> None:
        if not request._disconnected:
            request.write(body)
            request.finish()
