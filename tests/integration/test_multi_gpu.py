"""Several cards in one box (issue 17), through the real broker on a simulated
box of a 12 GiB and a 16 GiB card: a lock, a memory budget and eviction per
card, a consumer on both cards, `gpu: auto` for a process gpumgr owns, and a
card whose nvidia-smi row disappears."""

from __future__ import annotations

import io
import os

import pytest_twisted
from twisted.internet import defer, reactor
from twisted.web.client import Agent, FileBodyProducer, ResponseNeverReceived

from gpumgr.gpu_sample import GpuSample
from gpumgr.testing import Behaviour, SimulatedGpu, SimulatedWorld, managed_whisper_entry, world_config
from tests.helpers import HeldStream, transcribe, wait_for

CARDS_MIB = (12288, 16384)


def two_card_world(tmp_path, **consumers) -> SimulatedWorld:
    """consumers: name=(flavour, Behaviour, cards)."""
    gpu = SimulatedGpu(os.path.join(str(tmp_path), "gpu.json"), cards_mib=CARDS_MIB,
                       baseline_mib=350)
    world = SimulatedWorld(reactor, gpu)
    for name, (flavour, behaviour, cards) in consumers.items():
        world.add(flavour, name, behaviour, cards)
    world.listen(reactor)
    return world


async def broker(world, start_broker, mode="evicting", kinds=None, consumers=None,
                 managed=None, **scheduler):
    config = world_config(world, kinds=kinds, consumers=consumers, managed=managed,
                          scheduler={"mode": mode, **scheduler}, health={"interval_s": 30})
    service, url = await start_broker(config)
    await service.health.probe_all_now()
    return service, url


def on_card(card):
    return {"gpu": card}


@pytest_twisted.ensureDeferred
async def test_free_memory_of_two_cards_is_never_added_together(tmp_path, start_broker, client):
    """The issue's bug: no `gpu` keys, so both live on card 0 (12 GiB); with
    the 16 GiB card's free memory added in, B was admitted without evicting A
    and ran out of memory."""
    world = two_card_world(tmp_path, A=("mvoice", Behaviour(vram_mib=7000), None),
                           B=("mvoice", Behaviour(vram_mib=7000), None))
    try:
        service, url = await broker(world, start_broker, kinds={"A": "tts", "B": "stt"})
        assert (await client.request("POST", url + "/v1/tts", b"a")).code == 200
        assert (await client.request("POST", url + "/v1/stt", b"b")).code == 200
        assert world["A"].unloads == 1 and world.gpu.oom_count == 0
        assert service.registry["B"].loaded and not service.registry["A"].loaded
    finally:
        await world.stop()


@pytest_twisted.ensureDeferred
async def test_jobs_on_different_cards_run_at_once_with_capacity_1(tmp_path, start_broker, client):
    world = two_card_world(tmp_path, ollama=("ollama", Behaviour(vram_mib=5000), (0,)),
                           mvoice=("mvoice", Behaviour(vram_mib=2500), (1,)))
    try:
        service, url = await broker(world, start_broker, mode="locked", capacity=1,
                                    queue_timeout_s=3, consumers={"mvoice": on_card(1)})
        held = await HeldStream(world["ollama"]).start(client, url)
        # The LLM holds card 0's lock; the TTS lives on card 1 and does not wait for it.
        reply = await client.request("POST", url + "/v1/tts", b"hello")
        assert reply.code == 200, reply.body
        assert world["mvoice"].jobs_started == 1 and not held.reply.called
        held.release()
        assert (await held.reply).code == 200
        assert world.gpu.overlaps == []  # no card ever ran two jobs at once
        assert service.scheduler.stats().in_flight == 0
    finally:
        await world.stop()


@pytest_twisted.ensureDeferred
async def test_an_eviction_for_card_1_never_unloads_a_consumer_only_on_card_0(
        tmp_path, start_broker, client):
    world = two_card_world(tmp_path, A=("mvoice", Behaviour(vram_mib=6000), (0,)),
                           B=("mvoice", Behaviour(vram_mib=9000), (1,)),
                           C=("mvoice", Behaviour(vram_mib=9000), (1,)))
    try:
        service, url = await broker(world, start_broker, kinds={"A": "tts", "B": "stt", "C": "llm"},
                                    consumers={"B": on_card(1), "C": on_card(1)})
        for kind in ("tts", "stt", "llm"):  # A is the least recently used of all
            assert (await client.request("POST", url + f"/v1/{kind}", b"x")).code == 200
        assert world["A"].unloads == 0 and world["B"].unloads == 1 and world.gpu.oom_count == 0
        assert service.registry["A"].loaded and service.registry["C"].loaded
        (event,) = [e for e in service.status()["scheduler"]["recent_events"]
                    if e["event"] == "eviction"]
        assert event["consumer"] == "B"
    finally:
        await world.stop()


@pytest_twisted.ensureDeferred
async def test_a_consumer_on_both_cards_needs_and_frees_memory_on_both(
        tmp_path, start_broker, client):
    world = two_card_world(tmp_path, D=("mvoice", Behaviour(vram_mib=8000), (0, 1)),
                           E=("mvoice", Behaviour(vram_mib=10000), (1,)),
                           F=("mvoice", Behaviour(vram_mib=9000), (0,)))
    try:
        service, url = await broker(world, start_broker, kinds={"D": "tts", "E": "stt", "F": "llm"},
                                    consumers={"D": on_card([0, 1]), "E": on_card(1),
                                               "F": on_card(0)})
        assert (await client.request("POST", url + "/v1/stt", b"e")).code == 200
        # D needs 8000 MiB on card 1 too, where E holds 10000 of 16384: E goes.
        assert (await client.request("POST", url + "/v1/tts", b"d")).code == 200
        assert world["E"].unloads == 1 and world.gpu.oom_count == 0
        assert [world.gpu.used_mib_on(c) for c in (0, 1)] == [350 + 8000, 350 + 8000]
        # F on card 0 needs D's memory there; D's unload frees it on both cards.
        assert (await client.request("POST", url + "/v1/llm", b"f")).code == 200
        assert world["D"].unloads == 1 and world.gpu.oom_count == 0
        assert [world.gpu.used_mib_on(c) for c in (0, 1)] == [350 + 9000, 350]
    finally:
        await world.stop()


@pytest_twisted.ensureDeferred
async def test_an_auto_process_starts_on_the_card_where_it_fits(tmp_path, start_broker, client):
    """Card 1 is the bigger card, but the TTS on it is in use; card 0 has room."""
    world = two_card_world(tmp_path, A=("mvoice", Behaviour(vram_mib=3000), (0,)),
                           B=("mvoice", Behaviour(vram_mib=15000), (1,)))
    entry = {**managed_whisper_entry(world, vram_mib=4000), "gpu": "auto"}
    try:
        service, url = await broker(world, start_broker, kinds={"A": "tts", "B": "llm"},
                                    consumers={"B": on_card(1)}, managed={"whisper": entry})
        for kind in ("tts", "llm"):
            assert (await client.request("POST", url + f"/v1/{kind}", b"x")).code == 200
        reply = await transcribe(client, url)
        assert reply.code == 200, reply.body
        assert service.broker.placements.assigned == {"whisper": 0}
        assert world["A"].unloads == world["B"].unloads == 0 and world.gpu.oom_count == 0
        (whisper,) = world.gpu.external_allocations()
        assert whisper.cards == (0,)
        sample: GpuSample = await service.broker.gpu.sample_now()
        assert whisper.pid in [p.pid for p in sample.processes_on(0)]
        assert whisper.pid not in [p.pid for p in sample.processes_on(1)]
        env = service.broker.fleet.gpu_env("whisper")
        assert env["CUDA_VISIBLE_DEVICES"] == "0"
    finally:
        await world.stop()


@pytest_twisted.ensureDeferred
async def test_a_vanished_card_refuses_its_consumers_while_the_other_goes_on(
        tmp_path, start_broker, client):
    world = two_card_world(tmp_path, A=("mvoice", Behaviour(vram_mib=3000), (0,)),
                           B=("mvoice", Behaviour(vram_mib=3000), (1,)))
    try:
        service, url = await broker(world, start_broker, mode="locked",
                                    kinds={"A": "tts", "B": "stt"}, consumers={"B": on_card(1)})
        world.gpu.hide_card(1)
        await service.broker.gpu.sample_now()
        refused = await client.request("POST", url + "/v1/stt", b"b")
        assert refused.code == 503 and refused.json()["error"]["code"] == "gpu_missing"
        assert "GPU 1" in refused.json()["error"]["message"]
        assert (await client.request("POST", url + "/v1/tts", b"a")).code == 200
        assert world["B"].jobs_started == 0 and world["A"].jobs_started == 1
        world.gpu.hide_card(1, hidden=False)
        await service.broker.gpu.sample_now()
        assert (await client.request("POST", url + "/v1/stt", b"b")).code == 200
    finally:
        await world.stop()


@pytest_twisted.ensureDeferred
async def test_work_a_client_left_on_one_card_ends_on_that_cards_evidence(
        tmp_path, start_broker, client):
    """A TTS whose client left, on card 1, while an LLM stream keeps card 0
    busy throughout: card 1 going quiet is the evidence, not the grace (card
    0's work says nothing of card 1's). The TTS service has no other evidence
    to give (the http driver), and computes on after its client left."""
    world = two_card_world(tmp_path, ollama=("ollama", Behaviour(vram_mib=5000), (0,)),
                           mvoice=("mvoice", Behaviour(vram_mib=1500, job_s=1.0), (1,)))
    try:
        service, url = await broker(
            world, start_broker, mode="locked", capacity=1,
            consumers={"mvoice": {**on_card(1), "abandoned_grace_s": 60}})
        held = await HeldStream(world["ollama"]).start(client, url)
        pending = Agent(reactor).request(b"POST", (url + "/v1/tts").encode(), None,
                                         FileBodyProducer(io.BytesIO(b"hello")))
        pending.addErrback(lambda f: f.trap(defer.CancelledError, ResponseNeverReceived))
        await wait_for(lambda: world["mvoice"].jobs_started == 1)
        pending.cancel()
        await wait_for(lambda: service.broker.abandoned.outcomes, timeout_s=30.0)
        assert dict(service.broker.abandoned.outcomes) == {"gpu_idle": 1}
        assert world["mvoice"].jobs_cancelled == 1  # its work was over first
        assert world.gpu.busy_on(0) and not held.reply.called
        held.release()
        assert (await held.reply).code == 200
        assert world.gpu.overlaps == []
    finally:
        await world.stop()
