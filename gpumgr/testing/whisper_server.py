"""whisper.cpp's server, simulated as its own process, for gpumgr to start and stop.

    python -m gpumgr.testing.whisper_server --port P --state-dir D [--vram-mib N]
        [--load-s S] [--fail-load MSG] [--host 127.0.0.1] [--job-s S]

It behaves like the real one (see shared CONSUMERS-NOTES), where that matters
to a supervisor:

- It loads its model (waits ``--load-s``, then takes ``--vram-mib`` on the
  simulated GPU) BEFORE it binds its port: while it starts, connections are
  refused. A model that does not fit in the free memory, or ``--fail-load
  MSG``, prints to stderr and exits 1.
- ``GET /health``: 200 ``{"status": "ok"}`` (503 ``{"status": "loading model"}``
  only during a ``POST /load``).
- ``POST /inference``: multipart with a ``file`` field; answers ``{"text": ...}``
  (or ``response_format`` text, verbose_json, srt, vtt). Inference is
  serialised, and the lock is taken before the fields are looked at: without
  ``file`` it answers what the real server (since March 2026) does, once
  every inference before it ended: a line on stderr, then 400 ``Invalid
  request`` (text/plain: its error handler replaces the handler's JSON).
- ``POST /load`` (multipart ``model``) reloads under the inference lock. There is
  no unload route: stopping the process is the unload.
- SIGTERM or SIGINT: it frees its memory and exits 0 at once. After SIGKILL its
  memory record names a dead pid, which the simulated GPU no longer counts.
- Its socket has ``SO_REUSEPORT`` (cpp-httplib sets it): a second server on
  the same port starts fine and the kernel shares connections between the
  two. Where it cannot bind (a listener without ``SO_REUSEPORT`` holds the
  port) it prints ``couldn't bind to server socket: hostname=H port=P`` and a
  blank line to stderr, and exits 1.
- SIGSTOP freezes it like any process: the kernel's backlog still accepts
  connections, so probes time out rather than being refused; SIGCONT thaws it.

Its memory lives in ``<state-dir>/gpu-procs/<pid>.json`` (see
`gpumgr.testing.nvidia_smi`); ``<state-dir>/gpu-state.json`` (the simulated
GPU's state file, ``--gpu-state`` to point elsewhere) tells it how much is free.
Standard library only, so it starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from gpumgr.testing.multipart import parse_multipart
from gpumgr.testing.nvidia_smi import (
    PROCS_DIR,
    read_external,
    visible_cards,
    with_external,
    write_external,
)

PROCESS_NAME = "/opt/whisper.cpp/build/bin/whisper-server"


def whisper_server_argv(port: int, state_dir: str, *, vram_mib: int = 1500, load_s: float = 0.0,
                        fail_load: str | None = None, host: str = "127.0.0.1",
                        job_s: float = 0.05, transcript: str | None = None) -> list[str]:
    """The command line that starts this simulated server (for spawnProcess or config)."""
    argv = [sys.executable, "-m", "gpumgr.testing.whisper_server", "--port", str(port),
            "--state-dir", state_dir, "--vram-mib", str(vram_mib), "--load-s", str(load_s),
            "--host", host, "--job-s", str(job_s)]
    if fail_load is not None:
        argv += ["--fail-load", fail_load]
    if transcript is not None:
        argv += ["--transcript", transcript]
    return argv


def _log(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def _free_mib(gpu_state: str, procs_dir: str, cards: list[int]) -> int | None:
    """The least free memory of `cards` (those CUDA_VISIBLE_DEVICES gave it)
    as nvidia-smi would show it, or None without a simulated GPU."""
    try:
        with open(gpu_state) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return None
    gpus = with_external(state, read_external(procs_dir))["gpus"]
    free = [g["memory_free_mib"] for g in gpus if g["index"] in cards]
    return min(free) if free else None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def server_bind(self) -> None:
        # cpp-httplib's default socket options: SO_REUSEADDR and SO_REUSEPORT.
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def __init__(self, address: tuple[str, int], options: argparse.Namespace) -> None:
        self.options = options
        self.inference_lock = threading.Lock()
        self.loading = False
        self.inferences = 0
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "whisper.cpp-sim"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the real server logs requests only with --verbose

    def _send(self, code: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, value: Any, code: int = 200) -> None:
        self._send(code, json.dumps(value).encode("utf-8"))

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/health":
            if self.server.loading:
                self._json({"status": "loading model"}, 503)
            else:
                self._json({"status": "ok"})
        elif path == "/":
            self._send(200, b"<html><body>whisper.cpp server (simulated)</body></html>",
                       "text/html")
        else:
            self._send(404, b"", "text/plain")

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        body = self._body()
        fields = parse_multipart(self.headers.get("Content-Type"), body)
        if path == "/inference":
            self._inference(fields)
        elif path == "/load":
            self._load(fields)
        else:
            self._send(404, b"", "text/plain")

    def _inference(self, fields: dict) -> None:
        with self.server.inference_lock:
            if "file" not in fields:
                _log("error: no 'file' field in the request")
                self._send(400, b"Invalid request", "text/plain")
                return
            _log("[REQUEST] New inference request received")
            time.sleep(self.server.options.job_s)
            self.server.inferences += 1
            _log("[REQUEST] inference done")
        audio = fields["file"].data
        text = f" {self.server.options.transcript} of {len(audio)} bytes of audio."
        fmt = fields["response_format"].data.decode() if "response_format" in fields else "json"
        if fmt == "text":
            self._send(200, (text + "\n").encode(), "text/plain; charset=utf-8")
        elif fmt in ("srt", "vtt"):
            cue = f"1\n00:00:00,000 --> 00:00:01,000\n{text.strip()}\n"
            if fmt == "vtt":
                cue = "WEBVTT\n\n" + cue.replace(",", ".")
            self._send(200, cue.encode(), "text/plain; charset=utf-8")
        elif fmt == "verbose_json":
            language = fields["language"].data.decode() if "language" in fields else "en"
            self._json({"task": "transcribe", "language": language, "duration": 1.0,
                        "text": text, "segments": [{"id": 0, "start": 0.0, "end": 1.0,
                                                    "text": text, "tokens": [], "temperature": 0.0,
                                                    "avg_logprob": -0.2, "no_speech_prob": 0.01}]})
        else:
            self._json({"text": text})

    def _load(self, fields: dict) -> None:
        if "model" not in fields:
            self._json({"error": "no 'model' field in the request"}, 400)
            return
        with self.server.inference_lock:
            self.server.loading = True
            try:
                time.sleep(self.server.options.load_s)
            finally:
                self.server.loading = False
        self._send(200, b"Load was successful!", "application/text")


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="whisper_server", description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--state-dir", required=True, help="the simulated GPU's directory")
    p.add_argument("--gpu-state", help="the simulated GPU's state file "
                   "(default: STATE_DIR/gpu-state.json)")
    p.add_argument("--vram-mib", type=int, default=1500)
    p.add_argument("--load-s", type=float, default=0.0, help="how long loading the model takes")
    p.add_argument("--fail-load", metavar="MSG", help="print MSG to stderr and exit 1 while loading")
    p.add_argument("--job-s", type=float, default=0.05, help="how long one inference takes")
    p.add_argument("--transcript", default="simulated transcript",
                   help="what every transcript says (a stranger's is told apart by it)")
    p.add_argument("--model", default="models/ggml-base.en.bin")
    p.add_argument("--process-name", default=PROCESS_NAME, help="the name nvidia-smi shows")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    options = _arguments(argv)
    procs_dir = os.path.join(options.state_dir, PROCS_DIR)
    record: list[str] = []

    def forget_memory() -> None:
        for path in record:
            try:
                os.unlink(path)
            except OSError:
                pass

    def stop(signum: int, frame: Any) -> None:
        forget_memory()
        sys.stdout.flush()
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    _log(f"whisper_init_from_file_with_params_no_state: loading model from '{options.model}'")
    time.sleep(options.load_s)
    if options.fail_load is not None:
        _log(options.fail_load)
        return 1
    gpu_state = options.gpu_state or os.path.join(options.state_dir, "gpu-state.json")
    cards = visible_cards()
    free = _free_mib(gpu_state, procs_dir, cards)
    if free is not None and options.vram_mib > free:
        _log(f"ggml_backend_cuda_buffer_type_alloc_buffer: allocating {options.vram_mib} MiB "
             f"on device {cards[0]}: cudaMalloc failed: out of memory ({free} MiB free)")
        _log("whisper_init_with_params_no_state: failed to load model")
        return 1
    record.append(write_external(procs_dir, os.getpid(), options.process_name, options.vram_mib,
                                 cards))
    try:
        httpd = _Server((options.host, options.port), options)
    except OSError:
        # The real server's words, and its blank line after them.
        _log(f"couldn't bind to server socket: hostname={options.host} port={options.port}\n")
        forget_memory()
        return 1
    print(f"\nwhisper server listening at http://{options.host}:{options.port}\n", flush=True)
    try:
        httpd.serve_forever(poll_interval=0.5)
    finally:
        forget_memory()
    return 0


if __name__ == "__main__":
    sys.exit(main())
