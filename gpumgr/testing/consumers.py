"""Simulated GPU consumers that speak the real services' APIs.

Each one allocates simulated VRAM when it loads and frees it when it unloads,
answers ``500 CUDA out of memory`` when a load does not fit, and records every
request it receives so tests can assert what reached it (and what did not).
The `SimulatedWorld` counts GPU jobs across all consumers, so a test can see
whether two ever overlapped.

Flavours (see shared CONSUMERS-NOTES for the real behaviour they copy):
- `OllamaSim`: /api/generate (NDJSON stream; ``keep_alive: 0`` unloads; no
  prompt loads), /api/chat, /api/version, /api/ps.
- `ComfyUISim`: /prompt answers at once and works in the background;
  /free only sets a flag that the worker honours between jobs;
  /system_stats reports VRAM in bytes.
- `WhisperSim`: /inference, /health; no unload route (pinned).
- `MvoiceSim`: /tts returns a WAV and keeps it for GET /audio/<name>;
  /health, /load, /unload.
"""

from __future__ import annotations

import datetime
import hashlib
import itertools
import json
import struct
from typing import Any, Callable

import attrs
from twisted.internet import defer, task
from twisted.web import server
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from gpumgr.testing.gpu import SimulatedGpu

_pids = itertools.count(41000)


@attrs.define
class Behaviour:
    """Knobs a test turns. Times are simulated-work durations, in seconds."""

    vram_mib: int = 2000
    job_s: float = 0.02
    stream_chunks: int = 8
    chunk_interval_s: float = 0.01
    #: The memory really comes back this long after the unload reply.
    unload_settle_s: float = 0.0
    unload_fails: bool = False
    healthy: bool = True
    #: Tests only: before writing chunk i (i >= 1), wait for stream_gate(i).
    stream_gate: Callable[[int], defer.Deferred] | None = None
    audio_bytes: int = 256 * 1024


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


def _json_body(request, value: Any, code: int = 200) -> bytes:
    body = json.dumps(value).encode("utf-8")
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
    request.setHeader(b"Content-Length", str(len(body)).encode("ascii"))
    return body


class SimulatedConsumer(Resource):
    isLeaf = True
    process_name = "/usr/bin/sim-consumer"
    #: Whether the model is loaded when the process starts.
    loaded_at_start = False

    def __init__(self, world: SimulatedWorld, name: str, behaviour: Behaviour) -> None:
        super().__init__()
        self.world = world
        self.name = name
        self.behaviour = behaviour
        self.pid = next(_pids)
        self.loaded = False
        self.requests: list[RecordedRequest] = []
        self.jobs_started = 0
        self.jobs_cancelled = 0
        self.unloads = 0
        self.loads = 0
        self.url: str | None = None
        if self.loaded_at_start:
            self.load()

    @property
    def clock(self):
        return self.world.clock

    # -- what tests read ---------------------------------------------------

    def work_requests(self) -> list[RecordedRequest]:
        """Requests that were GPU work (not health checks or control calls)."""
        return [r for r in self.requests if self.is_work(r.method, r.path, r.body_head)]

    def is_work(self, method: str, path: str, body_head: bytes) -> bool:
        return False

    # -- memory --------------------------------------------------------------

    def load(self) -> bool:
        if self.loaded:
            return True
        if not self.world.gpu.allocate(self.name, self.pid, self.process_name, self.behaviour.vram_mib):
            return False
        self.loaded = True
        self.loads += 1
        return True

    def unload(self) -> None:
        """Drop the model; the memory comes back after `unload_settle_s`."""
        self.unloads += 1
        self.loaded = False
        if self.behaviour.unload_settle_s > 0:
            self.clock.callLater(self.behaviour.unload_settle_s, self._free_if_unloaded)
        else:
            self.world.gpu.free(self.name)

    def _free_if_unloaded(self) -> None:
        if not self.loaded:
            self.world.gpu.free(self.name)

    def oom_body(self) -> dict:
        return {
            "error": (
                f"CUDA out of memory: tried to allocate {self.behaviour.vram_mib} MiB; "
                f"{self.world.gpu.free_mib} MiB free"
            )
        }

    # -- HTTP --------------------------------------------------------------

    def render(self, request):
        size, sha, head = _digest(request.content)
        path = request.path.decode("utf-8", "replace")
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
            )
        )
        handler = self.route(request.method.decode("ascii"), path)
        if handler is None:
            return _json_body(request, {"error": f"no route {path}"}, 404)
        return handler(request)

    def route(self, method: str, path: str):  # pragma: no cover - overridden
        return None

    def health(self, request):
        if self.behaviour.healthy:
            return _json_body(request, {"status": "ok"})
        return _json_body(request, {"status": "loading model"}, 503)

    # -- jobs --------------------------------------------------------------

    def run_job(self, request, work: Callable[[Callable[[], bool]], defer.Deferred]):
        """Load if needed (or answer OOM), then do `work` while counted as a GPU job.

        `work(gone)` gets a function telling whether the client left.
        """
        if not self.load():
            return _json_body(request, self.oom_body(), 500)
        gone = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        self.jobs_started += 1
        self.world.job_started(self)

        def ended(result):
            self.world.job_ended(self)
            if gone:
                self.jobs_cancelled += 1
            return result

        d = defer.maybeDeferred(work, lambda: bool(gone))
        d.addBoth(ended)
        d.addErrback(lambda f: None if gone else f)
        return server.NOT_DONE_YET

    def finish_with(self, request, body: bytes) -> None:
        if not request._disconnected:
            request.write(body)
            request.finish()


class OllamaSim(SimulatedConsumer):
    process_name = "/usr/local/bin/ollama"

    def route(self, method, path):
        return {
            ("GET", "/"): lambda r: b"Ollama is running",
            ("GET", "/api/version"): lambda r: _json_body(r, {"version": "0.12.3-sim"}),
            ("GET", "/api/ps"): self.ps,
            ("POST", "/api/generate"): self.generate,
            ("POST", "/api/chat"): self.generate,
        }.get((method, path))

    def is_work(self, method, path, body_head):
        if path not in ("/api/generate", "/api/chat"):
            return False
        try:
            body = json.loads(body_head or b"{}")
        except ValueError:
            return True
        return "prompt" in body or "messages" in body

    def ps(self, request):
        models = []
        if self.loaded:
            models.append({"name": "llama3", "size_vram": self.behaviour.vram_mib << 20})
        return _json_body(request, {"models": models})

    def generate(self, request):
        try:
            body = json.loads(request.content.read() or b"{}")
        except ValueError:
            return _json_body(request, {"error": "invalid JSON body"}, 400)
        model = body.get("model", "llama3")
        if "prompt" not in body and "messages" not in body:
            if body.get("keep_alive") in (0, "0", "0s"):
                self.unload()
                reason = "unload"
            else:
                if not self.load():
                    return _json_body(request, self.oom_body(), 500)
                reason = "load"
            return _json_body(
                request, {"model": model, "created_at": _now_iso(self.clock), "response": "",
                          "done": True, "done_reason": reason}
            )
        return self.run_job(request, lambda gone: self._stream(request, model, body, gone))

    @defer.inlineCallbacks
    def _stream(self, request, model, body, gone):
        b = self.behaviour
        if body.get("stream", True) is False:
            yield task.deferLater(self.clock, b.job_s, lambda: None)
            reply = {"model": model, "response": "simulated " * b.stream_chunks,
                     "done": True, "done_reason": "stop"}
            self.finish_with(request, json.dumps(reply).encode() + b"\n")
            return
        request.setHeader(b"Content-Type", b"application/x-ndjson")
        for i in range(b.stream_chunks):
            if i:
                if b.stream_gate is not None:
                    yield b.stream_gate(i)
                else:
                    yield task.deferLater(self.clock, b.chunk_interval_s, lambda: None)
            if gone():
                return
            last = i == b.stream_chunks - 1
            chunk = {"model": model, "created_at": _now_iso(self.clock),
                     "response": f"tok{i} ", "done": last, "seq": i,
                     "sent_at": self.clock.seconds()}
            if last:
                chunk["done_reason"] = "stop"
            request.write(json.dumps(chunk).encode() + b"\n")
        if not gone():
            request.finish()


class ComfyUISim(SimulatedConsumer):
    process_name = "python3 main.py --listen"

    def __init__(self, world, name, behaviour):
        super().__init__(world, name, behaviour)
        self._prompts = itertools.count(1)
        self._busy = 0
        self._free_requested = False
        self.history: dict[str, dict] = {}

    def route(self, method, path):
        if path.startswith("/api/"):
            path = path[4:]
        if method == "GET" and path.startswith("/history/"):
            return lambda r: _json_body(r, {k: v for k, v in self.history.items()
                                            if k == path.rsplit("/", 1)[1]})
        return {
            ("GET", "/system_stats"): self.system_stats,
            ("GET", "/queue"): lambda r: _json_body(r, {"queue_running": [], "queue_pending": []}),
            ("POST", "/prompt"): self.prompt,
            ("POST", "/free"): self.free,
        }.get((method, path))

    def is_work(self, method, path, body_head):
        return path in ("/prompt", "/api/prompt")

    def system_stats(self, request):
        gpu = self.world.gpu
        return _json_body(request, {"system": {"comfyui_version": "0.3-sim"}, "devices": [
            {"name": f"cuda:0 {gpu.name}", "type": "cuda", "index": 0,
             "vram_total": gpu.total_mib << 20, "vram_free": gpu.free_mib << 20}]})

    def prompt(self, request):
        """Like ComfyUI: answer at once, run the workflow in the background."""
        if not self.load():
            return _json_body(request, self.oom_body(), 500)
        number = next(self._prompts)
        prompt_id = f"sim-{number:06d}"
        self.history[prompt_id] = {"status": {"completed": False}}
        self.jobs_started += 1
        self._busy += 1
        self.world.job_started(self)
        self.clock.callLater(self.behaviour.job_s, self._prompt_done, prompt_id)
        return _json_body(request, {"prompt_id": prompt_id, "number": number, "node_errors": {}})

    def _prompt_done(self, prompt_id: str) -> None:
        self._busy -= 1
        self.world.job_ended(self)
        self.history[prompt_id] = {"status": {"completed": True, "status_str": "success"}}
        if self._free_requested and not self._busy:
            self._free_requested = False
            self.unload()

    def free(self, request):
        """Only sets a flag: the worker acts on it between jobs, never during one."""
        if self.behaviour.unload_fails:
            return _json_body(request, {"error": "simulated unload failure"}, 500)
        if self._busy:
            self._free_requested = True
        elif self.loaded:
            self.unload()
        return b""


class WhisperSim(SimulatedConsumer):
    process_name = "/opt/whisper.cpp/build/bin/whisper-server"
    loaded_at_start = True

    def route(self, method, path):
        return {
            ("GET", "/health"): self.health,
            ("POST", "/inference"): self.inference,
            ("POST", "/load"): lambda r: _json_body(r, {"status": "ok"}),
        }.get((method, path))

    def is_work(self, method, path, body_head):
        return path == "/inference"

    def inference(self, request):
        size = self.requests[-1].body_len

        @defer.inlineCallbacks
        def work(gone):
            yield task.deferLater(self.clock, self.behaviour.job_s, lambda: None)
            if not gone():
                request.setHeader(b"Content-Type", b"application/json")
                self.finish_with(request, json.dumps(
                    {"text": f" simulated transcript of {size} bytes of audio."}).encode())

        return self.run_job(request, work)


class MvoiceSim(SimulatedConsumer):
    process_name = "python3 -m mvoice.server"

    def __init__(self, world, name, behaviour):
        super().__init__(world, name, behaviour)
        self._names = itertools.count(1)
        self.audio: dict[str, bytes] = {}

    def route(self, method, path):
        if method == "GET" and path.startswith("/audio/"):
            return self.get_audio
        return {
            ("GET", "/health"): self.health,
            ("POST", "/tts"): self.tts,
            ("POST", "/load"): self.control_load,
            ("POST", "/unload"): self.control_unload,
        }.get((method, path))

    def is_work(self, method, path, body_head):
        return path == "/tts"

    def control_load(self, request):
        if not self.load():
            return _json_body(request, self.oom_body(), 500)
        return _json_body(request, {"status": "loaded"})

    def control_unload(self, request):
        if self.behaviour.unload_fails:
            return _json_body(request, {"error": "simulated unload failure"}, 500)
        self.unload()
        return _json_body(request, {"status": "unloaded"})

    def tts(self, request):
        text_len = self.requests[-1].body_len

        @defer.inlineCallbacks
        def work(gone):
            yield task.deferLater(self.clock, self.behaviour.job_s, lambda: None)
            if gone():
                return
            wav = make_wav(max(1, text_len) * 320)
            name = f"tts-{next(self._names):05d}.wav"
            self.audio[name] = wav
            request.setHeader(b"Content-Type", b"audio/wav")
            request.setHeader(b"X-Audio-Url", f"/audio/{name}".encode())
            request.setHeader(b"Content-Length", str(len(wav)).encode())
            for i in range(0, len(wav), 16384):
                request.write(wav[i : i + 16384])
            request.finish()

        return self.run_job(request, work)

    def get_audio(self, request):
        name = self.requests[-1].path[len("/audio/"):]
        data = self.audio.get(name)
        if data is None and name.startswith("sample"):
            data = make_wav(self.behaviour.audio_bytes)
        if data is None:
            return _json_body(request, {"error": f"no such audio {name}"}, 404)
        request.setHeader(b"Content-Type", b"audio/wav")
        # No Content-Length: streamed in chunks, the way a generator would.
        chunks = [data[i : i + 32768] for i in range(0, len(data), 32768)]

        def pump():
            if request._disconnected:
                return
            if chunks:
                request.write(chunks.pop(0))
                self.clock.callLater(0, pump)
            else:
                request.finish()

        pump()
        return server.NOT_DONE_YET


def make_wav(n_samples: int, rate: int = 22050) -> bytes:
    """A valid mono 16-bit WAV of a soft deterministic waveform."""
    size = min(n_samples * 2, 1 << 26)
    data = (bytes(range(0, 256, 7)) * (size // 37 + 1))[:size]
    header = b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE"
    header += b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
    return header + b"data" + struct.pack("<I", len(data)) + data


def _now_iso(clock) -> str:
    return datetime.datetime.fromtimestamp(clock.seconds(), datetime.timezone.utc).isoformat()


class SimulatedWorld:
    """The simulated box: one GPU, several consumers, and the job overlap record."""

    FLAVOURS = {"ollama": OllamaSim, "comfyui": ComfyUISim, "whisper": WhisperSim,
                "mvoice": MvoiceSim}

    def __init__(self, clock, gpu: SimulatedGpu) -> None:
        self.clock = clock
        self.gpu = gpu
        self.consumers: dict[str, SimulatedConsumer] = {}
        self.active_jobs = 0
        self.max_active_jobs = 0
        self.total_jobs = 0
        #: Consumer names in the order their GPU jobs started.
        self.work_log: list[str] = []
        self._ports: list[Any] = []

    def add(self, flavour: str, name: str | None = None, behaviour: Behaviour | None = None):
        consumer = self.FLAVOURS[flavour](self, name or flavour, behaviour or Behaviour())
        self.consumers[consumer.name] = consumer
        return consumer

    def __getitem__(self, name: str) -> SimulatedConsumer:
        return self.consumers[name]

    def job_started(self, consumer: SimulatedConsumer) -> None:
        self.active_jobs += 1
        self.total_jobs += 1
        self.work_log.append(consumer.name)
        self.max_active_jobs = max(self.max_active_jobs, self.active_jobs)

    def job_ended(self, consumer: SimulatedConsumer) -> None:
        self.active_jobs -= 1

    def listen(self, reactor, interface: str = "127.0.0.1") -> None:
        """Serve every consumer on its own ephemeral loopback port."""
        for consumer in self.consumers.values():
            if consumer.url is not None:
                continue
            site = server.Site(consumer, parsePOSTFormSubmission=False)
            site.log = lambda request: None
            port = reactor.listenTCP(0, site, interface=interface)
            self._ports.append(port)
            consumer.url = f"http://{interface}:{port.getHost().port}"

    def stop(self) -> defer.Deferred:
        ports, self._ports = self._ports, []
        for c in self.consumers.values():
            c.url = None
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])
