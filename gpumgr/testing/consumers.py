"""Simulated GPU consumers that speak the real services' APIs, and the box they share.

Each one allocates simulated VRAM when it loads and frees it when it unloads,
answers ``500 CUDA out of memory`` when a load does not fit, and records every
request it receives so tests can assert what reached it (and what did not).
The `SimulatedWorld` counts GPU jobs across all consumers, so a test can see
whether two ever overlapped, and can stop and restart a consumer's process.

Flavours (see shared CONSUMERS-NOTES for the real behaviour they copy):
- `OllamaSim` (`gpumgr.testing.ollama`): several models, the native API
  (NDJSON streams, load and unload through /api/generate) and the
  OpenAI-compatible one (SSE).
- `ComfyUISim` (`gpumgr.testing.comfyui`): /prompt answers at once; one
  worker renders in order; /history, /queue, /interrupt, /free (a flag the
  worker honours between renders), /view, /upload/image and a WebSocket.
- `WhisperSim`: /inference, /health; no unload route (pinned). Inference is
  serialised under one lock, taken before the request's fields are read, so
  an empty /inference is answered (400 `Invalid request`, as whisper-server
  since March 2026) once every inference before it ended. For the real shape, a separate process, see
  `gpumgr.testing.whisper_server`.
- `MvoiceSim`: /tts returns a WAV and keeps it for GET /audio/<name>;
  /health, /load, /unload.
"""

from __future__ import annotations

import itertools
import json
import struct
from typing import Any

from twisted.internet import defer
from twisted.protocols.policies import WrappingFactory
from twisted.web import server

from gpumgr.testing.base import (
    Behaviour,
    RecordedRequest,
    SimulatedConsumer,
    json_body,
)
from gpumgr.testing.comfyui import ComfyUISim
from gpumgr.testing.contention import DEFAULT_CONTENTION, SharedCompute
from gpumgr.testing.multipart import parse_multipart
from gpumgr.testing.gpu import SimulatedGpu
from gpumgr.testing.ollama import OllamaSim

__all__ = [
    "Behaviour",
    "ComfyUISim",
    "MvoiceSim",
    "OllamaSim",
    "RecordedRequest",
    "SimulatedConsumer",
    "SimulatedWorld",
    "WhisperSim",
    "make_wav",
]


class WhisperSim(SimulatedConsumer):
    process_name = "/opt/whisper.cpp/build/bin/whisper-server"
    loaded_at_start = True
    default_contention = DEFAULT_CONTENTION["whisper"]

    def route(self, method, path):
        return {
            ("GET", "/health"): self.health,
            ("POST", "/inference"): self.inference,
            ("POST", "/load"): lambda r: json_body(r, {"status": "ok"}),
        }.get((method, path))

    def is_work(self, method, path, body_head):
        return path == "/inference"

    def __init__(self, world, name, behaviour):
        super().__init__(world, name, behaviour)
        #: whisper-server's `whisper_mutex`: one inference at a time, taken
        #: before the request's fields are looked at.
        self.turn = defer.DeferredLock()

    def inference(self, request):
        seen = self.requests[-1]
        size = seen.body_len
        # Any body but an empty one or a form without `file` is the audio (the
        # real server wants the form; the in-process one is lenient for tests).
        request.content.seek(0)
        form = parse_multipart(seen.content_type, request.content.read())
        no_file = size == 0 or (bool(form) and "file" not in form)

        @defer.inlineCallbacks
        def work(gone):
            yield self.compute(self.behaviour.job_s)
            if not gone():
                request.setHeader(b"Content-Type", b"application/json")
                self.finish_with(request, json.dumps(
                    {"text": f" simulated transcript of {size} bytes of audio."}).encode())

        def my_turn(_):
            released: list[bool] = []

            def release():
                if not released:
                    released.append(True)
                    self.turn.release()

            if no_file:  # its JSON error, replaced by the server's error handler
                release()
                request.setResponseCode(400)
                request.setHeader(b"Content-Type", b"text/plain")
                self.finish_with(request, b"Invalid request")
                return
            answer = self.run_job(request, work, ended=release)
            if answer is not server.NOT_DONE_YET:
                release()
                self.finish_with(request, answer)

        self.turn.acquire().addCallback(my_turn)
        return server.NOT_DONE_YET


class MvoiceSim(SimulatedConsumer):
    process_name = "python3 -m mvoice.server"
    default_contention = DEFAULT_CONTENTION["mvoice"]

    def __init__(self, world, name, behaviour):
        super().__init__(world, name, behaviour)
        self._names = itertools.count(1)
        self.audio: dict[str, bytes] = {}

    def route(self, method, path):
        if method in ("GET", "HEAD") and path.startswith("/audio/"):
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
            return json_body(request, self.oom_body(), 500)
        return json_body(request, {"status": "loaded"})

    def control_unload(self, request):
        if self.behaviour.unload_fails:
            return json_body(request, {"error": "simulated unload failure"}, 500)
        self.unload()
        return json_body(request, {"status": "unloaded"})

    def tts(self, request):
        text_len = self.requests[-1].body_len

        @defer.inlineCallbacks
        def work(gone):
            yield self.compute(self.behaviour.job_s)
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
            return json_body(request, {"error": f"no such audio {name}"}, 404)
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


class SimulatedWorld:
    """The simulated box: one GPU, several consumers, and the job overlap record."""

    FLAVOURS = {"ollama": OllamaSim, "comfyui": ComfyUISim, "whisper": WhisperSim,
                "mvoice": MvoiceSim}

    def __init__(self, clock, gpu: SimulatedGpu) -> None:
        self.clock = clock
        self.gpu = gpu
        gpu.clock = clock
        #: The card's compute, shared: jobs at once slow each other down.
        self.compute = SharedCompute(clock)
        self.consumers: dict[str, SimulatedConsumer] = {}
        self.active_jobs = 0
        self.max_active_jobs = 0
        self.total_jobs = 0
        #: Consumer names in the order their GPU jobs started.
        self.work_log: list[str] = []
        #: name -> (listening port, the factory that tracks its connections).
        self._listening: dict[str, tuple[Any, WrappingFactory]] = {}
        self._reactor: Any = None
        self._interface = "127.0.0.1"

    def add(self, flavour: str, name: str | None = None, behaviour: Behaviour | None = None,
            cards: tuple[int, ...] | None = None):
        """`cards`: where its memory goes on a box of several (default card 0)."""
        if cards is not None:
            self.gpu.place(name or flavour, cards)
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
        self.gpu.begin_work(consumer.name)
        self.compute.set_jobs(self.active_jobs)

    def job_ended(self, consumer: SimulatedConsumer) -> None:
        self.active_jobs -= 1
        self.gpu.end_work(consumer.name)
        self.compute.set_jobs(self.active_jobs)

    def listen(self, reactor, interface: str = "127.0.0.1") -> None:
        """Serve every consumer on its own ephemeral loopback port."""
        self._reactor = reactor
        self._interface = interface
        for name, consumer in self.consumers.items():
            if consumer.url is None:
                port = self._listen(name, 0)
                consumer.url = f"http://{interface}:{port.getHost().port}"

    def _listen(self, name: str, port_number: int):
        site = server.Site(self.consumers[name], parsePOSTFormSubmission=False)
        site.log = lambda request: None  # type: ignore[method-assign]
        factory = WrappingFactory(site)
        port = self._reactor.listenTCP(port_number, factory, interface=self._interface)
        self._listening[name] = (port, factory)
        return port

    def open_connections(self, name: str) -> int:
        """TCP connections a consumer holds open (HTTP and WebSocket alike)."""
        entry = self._listening.get(name)
        return 0 if entry is None else len(entry[1].protocols)

    def stop_consumer(self, name: str) -> defer.Deferred:
        """Its process dies: the port closes, every connection drops, the memory
        comes back at once and in-flight work is lost. The URL stays the same
        for `restart_consumer`."""
        consumer = self.consumers[name]
        entry = self._listening.pop(name, None)
        consumer.process_stopped()
        if entry is None:
            return defer.succeed(None)
        port, factory = entry
        for protocol in list(factory.protocols):
            protocol.transport.abortConnection()
        return defer.maybeDeferred(port.stopListening)

    def restart_consumer(self, name: str) -> None:
        """Start a stopped consumer again, on the port its URL names."""
        consumer = self.consumers[name]
        if name in self._listening:
            raise RuntimeError(f"simulated consumer {name} is already running")
        if consumer.url is None:
            raise RuntimeError(f"simulated consumer {name} never listened; call world.listen()")
        self._listen(name, int(consumer.url.rsplit(":", 1)[1]))
        consumer.process_started()

    def stop(self) -> defer.Deferred:
        """Close every port and connection (WebSockets included), for teardown."""
        listening, self._listening = self._listening, {}
        for c in self.consumers.values():
            c.url = None
            if c.running:
                c.process_stopped()  # no render timer fires after teardown
        for _, factory in listening.values():
            for protocol in list(factory.protocols):
                protocol.transport.abortConnection()
        return defer.gatherResults(
            [defer.maybeDeferred(port.stopListening) for port, _ in listening.values()])
