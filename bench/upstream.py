"""The bench's own upstream: a Twisted process with the timed behaviours.

    python bench/upstream.py PORT STATE_FILE

Routes:
  GET  /health              200
  POST /small               1 KiB reply (used when nginx is not installed)
  POST /sink                reads the body, answers its size
  GET  /audio/big.bin?mib=N N MiB, streamed (used when nginx is not installed)
  POST /stream              200 NDJSON lines, 5 ms apart, each with its send time
  POST /<c>/job             a 10 ms "GPU job" of consumer c; ?hold=1 holds until /release
  GET  /jobs                the (start, end) of every job so far, then forgets them
  GET  /release             finishes every held job
  POST /<c>/unload          frees c's simulated VRAM
The simulated GPU (for the eviction scenario) is written to STATE_FILE,
which the simulated nvidia-smi reads.
"""

from __future__ import annotations

import json
import sys
import time

from twisted.internet import reactor
from twisted.web import server
from twisted.web.resource import Resource

from gpumgr.testing import SimulatedGpu

SMALL = b"x" * 1024
STREAM_LINES = 200
STREAM_GAP_S = 0.005
JOB_S = 0.010
VRAM_MIB = 6000


class Upstream(Resource):
    isLeaf = True

    def __init__(self, gpu: SimulatedGpu) -> None:
        super().__init__()
        self.gpu = gpu
        self.jobs: list[tuple[float, float]] = []
        self.held: list = []

    def render(self, request):
        path = request.path.decode()
        method = request.method.decode()
        if path == "/health":
            return b"ok"
        if path == "/small":
            request.setHeader(b"Content-Type", b"application/octet-stream")
            return SMALL
        if path == "/sink":
            request.content.seek(0, 2)
            return str(request.content.tell()).encode()
        if path == "/audio/big.bin":
            return self.big(request)
        if path == "/stream":
            return self.stream(request)
        if path == "/jobs":
            jobs, self.jobs = self.jobs, []
            return json.dumps(jobs).encode()
        if path == "/release":
            held, self.held = self.held, []
            for finish in held:
                finish()
            return str(len(held)).encode()
        parts = path.strip("/").split("/")
        if len(parts) == 2 and method == "POST" and parts[1] == "job":
            return self.job(request, parts[0])
        if len(parts) == 2 and method == "POST" and parts[1] == "unload":
            self.gpu.free(parts[0])
            return b"{}"
        request.setResponseCode(404)
        return b"no such route"

    def big(self, request):
        remaining = int(request.args.get(b"mib", [b"1024"])[0]) * 1024 * 1024
        block = b"\0" * (256 * 1024)
        request.setHeader(b"Content-Length", str(remaining).encode())

        class Pump:
            def resumeProducing(self):
                nonlocal remaining
                if remaining <= 0 or request._disconnected:
                    return
                n = min(len(block), remaining)
                remaining -= n
                request.write(block[:n])
                if remaining <= 0:
                    request.unregisterProducer()
                    request.finish()

            def stopProducing(self):
                nonlocal remaining
                remaining = 0

            def pauseProducing(self):
                pass

        request.registerProducer(Pump(), False)
        return server.NOT_DONE_YET

    def stream(self, request):
        request.setHeader(b"Content-Type", b"application/x-ndjson")
        state = {"i": 0}

        def tick():
            if request._disconnected:
                return
            i = state["i"]
            line = json.dumps({"seq": i, "sent": time.time(), "response": "tok"}).encode() + b"\n"
            request.write(line)
            state["i"] += 1
            if state["i"] >= STREAM_LINES:
                request.finish()
            else:
                reactor.callLater(STREAM_GAP_S, tick)

        tick()
        return server.NOT_DONE_YET

    def job(self, request, consumer: str):
        start = time.time()
        if not self.gpu.allocate(consumer, 1000 + len(consumer), consumer, VRAM_MIB):
            request.setResponseCode(500)
            return b'{"error":"CUDA out of memory"}'

        def finish():
            if not request._disconnected:
                self.jobs.append((start, time.time()))
                request.finish()

        request.write(b"{}")
        if request.args.get(b"hold"):
            self.held.append(finish)
        else:
            reactor.callLater(JOB_S, finish)
        return server.NOT_DONE_YET


def main() -> None:
    port, state_file = int(sys.argv[1]), sys.argv[2]
    gpu = SimulatedGpu(state_file, total_mib=10000, baseline_mib=350)
    site = server.Site(Upstream(gpu), parsePOSTFormSubmission=False)
    site.log = lambda request: None
    reactor.listenTCP(port, site, interface="127.0.0.1", backlog=2048)
    reactor.run()


if __name__ == "__main__":
    main()
