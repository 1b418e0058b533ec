"""The scheduling bench's simulated box, as its own process (see bench/sched.py).

    python bench/sched_world.py STATE_DIR READY_JSON --scale S [--contention 1]

Four simulated services on one simulated 24 GiB card (gpumgr.testing), with
working memory and contention: TTS (mvoice, 2 GiB resident), STT (whisper,
1.5 GiB), LLM (ollama, 9 GiB, a KV cache growing with the tokens) and image
(ComfyUI, 7 GiB resident, 4 GiB peak per render). Durations are the realistic
ones times `scale`. Once listening it writes READY_JSON: gpumgr's consumer
entries (`world_config_raw`), the state file the simulated nvidia-smi reads,
and the port of `GET /stats` (the card's OOM count, busy time, loads).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from twisted.internet import reactor
from twisted.web import server
from twisted.web.resource import Resource

from gpumgr.testing import Behaviour, make_world, world_config_raw

#: The trace's services: realistic durations (seconds) and memory (MiB).
SERVICES = {
    # name: (kind, resident MiB, working MiB at the job's start, extra growth MiB)
    "mvoice": ("tts", 2048, 256, 0),
    "whisper": ("stt", 1536, 512, 0),
    "ollama": ("llm", 9216, 256, 1024),
    "comfyui": ("image", 7168, 4096, 0),
}
#: What the card holds with no process: nothing on a headless server card.
HEADLESS_BASELINE_MIB = 0
TTS_S = 0.8
STT_S = 2.0
LLM_PROMPT_S = 0.4
LLM_TOKENS = 128
LLM_TOKEN_S = 0.04
IMAGE_S = 8.0


def alone_s(kind: str) -> float:
    """A job's time alone on the card (realistic seconds): the no-swap lower bound."""
    return {"tts": TTS_S, "stt": STT_S, "llm": LLM_PROMPT_S + LLM_TOKENS * LLM_TOKEN_S,
            "image": IMAGE_S}[kind]


def behaviours(scale: float, contention: float | None) -> dict[str, Behaviour]:
    def mem(name: str) -> dict:
        _, resident, working, growth = SERVICES[name]
        return {"vram_mib": resident, "working_mib": working, "working_growth_mib": growth,
                "contention": contention}

    return {
        "mvoice": Behaviour(job_s=TTS_S * scale, **mem("mvoice")),
        "whisper": Behaviour(job_s=STT_S * scale, **mem("whisper")),
        "ollama": Behaviour(prompt_eval_s=LLM_PROMPT_S * scale, stream_chunks=LLM_TOKENS + 1,
                            chunk_interval_s=LLM_TOKEN_S * scale, **mem("ollama")),
        "comfyui": Behaviour(job_s=IMAGE_S * scale, render_steps=4, **mem("comfyui")),
    }


class Stats(Resource):
    isLeaf = True

    def __init__(self, world) -> None:
        super().__init__()
        self.world = world

    def render_GET(self, request):
        w = self.world
        body = json.dumps({
            "now": reactor.seconds(),
            "oom_count": w.gpu.oom_count,
            "busy_s": w.compute.busy_seconds(),
            "jobs": w.total_jobs,
            "max_active_jobs": w.max_active_jobs,
            "overlaps": len(w.gpu.overlaps),
            "used_mib": w.gpu.used_mib,
            "loads": {n: c.loads for n, c in w.consumers.items()},
            "unloads": {n: c.unloads for n, c in w.consumers.items()},
        }).encode()
        request.setHeader(b"Content-Type", b"application/json")
        return body


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("state_dir")
    ap.add_argument("ready")
    ap.add_argument("--scale", type=float, required=True)
    ap.add_argument("--contention", type=float, default=None,
                    help="one factor for every service (1: pure time slicing); "
                         "default: each flavour's own")
    args = ap.parse_args()
    world = make_world(reactor, args.state_dir, total_mib=24576,
                       behaviours=behaviours(args.scale, args.contention))
    # A headless server card: nvidia-smi shows nothing in use but the services
    # (the simulation's default, 350 MiB, is a card that also drives a display).
    world.gpu.baseline_mib = HEADLESS_BASELINE_MIB
    world.gpu.write_state()
    world.listen(reactor)
    stats = reactor.listenTCP(0, server.Site(Stats(world)), interface="127.0.0.1")
    raw = world_config_raw(world)  # each flavour serves its kind: tts, stt, llm, image
    tmp = args.ready + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"config": raw, "stats_port": stats.getHost().port,
                   "state_path": world.gpu.state_path, "pid": os.getpid()}, f)
    os.replace(tmp, args.ready)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
