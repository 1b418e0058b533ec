"""`twistd gpumgr --demo`: the broker in front of a simulated box."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.logger import Logger

from gpumgr.config import DEFAULT_LISTEN
from gpumgr.service import GpumgrService
from gpumgr.testing import Behaviour, make_world, managed_whisper_entry, write_world_config

log = Logger()

DEMO_GPU_MIB = 16384
#: `--gpus 2`: a 16 GiB and a 12 GiB card. ollama and comfyui share card 0
#: (they still do not fit together, so eviction shows there), mvoice lives on
#: card 1, and whisper (`gpu: auto`) is started where it fits.
DEMO_CARDS_MIB = (16384, 12288)
DEMO_MAX_GPUS = 2
#: Where each simulated consumer lives on a box of two cards.
DEMO_CARDS = {"ollama": 0, "comfyui": 0, "mvoice": 1}
DEMO_BEHAVIOURS = {
    "ollama": Behaviour(vram_mib=9000, stream_chunks=24, chunk_interval_s=0.08),
    "comfyui": Behaviour(vram_mib=7000, job_s=3.0),
    "mvoice": Behaviour(vram_mib=2500, job_s=0.3),
}


class DemoService(MultiService):
    def __init__(self, reactor, listen: str | None, mode: str | None = None,
                 gpus: int = 1) -> None:
        super().__init__()
        if not 1 <= gpus <= DEMO_MAX_GPUS:
            raise ValueError(f"the demo simulates 1 to {DEMO_MAX_GPUS} cards, not {gpus}")
        self.gpus = gpus
        self._state_dir = tempfile.mkdtemp(prefix="gpumgr-demo-")
        # 16 GiB: the four consumers (20,000 MiB) do not all fit, so the demo
        # shows eviction at work.
        # whisper.cpp runs as its own process, which gpumgr starts on demand
        # and stops to evict it, as the real server must be.
        self.world = make_world(reactor, self._state_dir, total_mib=DEMO_GPU_MIB,
                                behaviours=DEMO_BEHAVIOURS, managed_whisper=True,
                                cards_mib=DEMO_CARDS_MIB[:gpus] if gpus > 1 else None)
        self.world.listen(reactor)
        whisper = managed_whisper_entry(self.world, vram_mib=1500, load_s=1.0, job_s=0.4)
        consumers: dict[str, dict[str, Any]] = {
            "ollama": {"passthrough": True}, "comfyui": {"passthrough": True}}
        if gpus > 1:
            for name, card in DEMO_CARDS.items():
                self.world.gpu.place(name, (card,))
                consumers.setdefault(name, {})["gpu"] = card
            consumers["whisper"] = {"gpu": "auto"}
        # Written to a file so that SIGHUP (or POST /v1/admin/reload) can
        # re-read it: edit it and try.
        self.config_path = os.path.join(self._state_dir, "gpumgr.yaml")
        config = write_world_config(
            self.world, self.config_path,
            managed={"whisper": whisper},
            consumers=consumers,
            listen=listen or DEFAULT_LISTEN,
            gpu={"interval_s": 2},
            scheduler={"mode": mode or "evicting", "max_queue": 256,
                       "priority": {"tts": 10, "stt": 10, "llm": 5, "image": 0}},
        )
        #: The gpumgr service itself (its broker is `self.gpumgr.broker`).
        self.gpumgr = GpumgrService(reactor, config, install_signals=True)
        self.gpumgr.setServiceParent(self)

    def startService(self) -> None:
        super().startService()
        for name, consumer in self.world.consumers.items():
            log.info("demo: simulated {name} at {url}", name=name, url=consumer.url)
        log.info("demo: config in {path} (edit it, then kill -HUP this process to reload)",
                 path=self.config_path)
        if self.gpus > 1:
            log.info("demo: {gpus} simulated cards; ollama and comfyui on card 0, mvoice on "
                     "card 1, whisper (gpu: auto) where it fits", gpus=self.gpus)
        log.info("demo: whisper is a process gpumgr starts on the first /v1/stt")
        log.info("demo: try  curl -sN -X POST localhost:8770/v1/llm -d '{{\"prompt\":\"hi\"}}'")
        log.info("demo: the status page is at http://localhost:8770/ui/")

    def stopService(self) -> defer.Deferred[None]:
        d: defer.Deferred[Any] = defer.maybeDeferred(super().stopService)
        d.addBoth(lambda _: self.world.stop())
        d.addBoth(lambda _: shutil.rmtree(self._state_dir, ignore_errors=True))
        return d


def make_demo_service(reactor, listen: str | None, mode: str | None = None,
                      gpus: int = 1) -> DemoService:
    return DemoService(reactor, listen, mode, gpus)
