"""`scheduler.capacity: auto` on several cards (issues 16 and 17), through the real
broker on the simulated box of test_multi_gpu (a 12 GiB and a 16 GiB card,
350 MiB baseline on each, 512 MiB headroom): a memory budget per card, jobs
on different cards that never wait for each other, eviction per card, and a
consumer on both cards."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import defer

from gpumgr.testing import Behaviour
from tests.helpers import HeldStream, metric_value, parse_metrics, wait_for
from tests.integration.test_multi_gpu import broker as _broker
from tests.integration.test_multi_gpu import on_card, two_card_world


def auto(**extra):
    return {"capacity": "auto", "queue_timeout_s": 10, **extra}


async def broker(world, start_broker, **kw):
    """With no sample yet a card's size is unknown (one job at a time, no
    memory check): sample first, as the daemon does when it starts."""
    service, url = await _broker(world, start_broker, **kw)
    await service.broker.gpu.sample_now()
    return service, url


@pytest_twisted.ensureDeferred
async def test_a_full_card_holds_back_its_own_jobs_only(tmp_path, start_broker, client):
    """L's running job fills card 0: F (card 0) waits for memory, T (card 1) runs at once."""
    world = two_card_world(tmp_path, L=("ollama", Behaviour(vram_mib=5000, working_mib=5000), (0,)),
                           F=("mvoice", Behaviour(vram_mib=2000, working_mib=500), (0,)),
                           T=("mvoice", Behaviour(vram_mib=2500, working_mib=500), (1,)))
    try:
        service, url = await broker(
            world, start_broker, kinds={"F": "stt", "T": "tts"}, **auto(),
            consumers={"L": {"vram_job_mib": 5000}, "F": {"vram_job_mib": 500},
                       "T": {"vram_job_mib": 500, **on_card(1)}})
        held = await HeldStream(world["L"]).start(client, url)
        # Card 0: 350 + 5000 + 5000 + 2000 + 500 + 512 > 12288.
        waiting = defer.ensureDeferred(client.request("POST", url + "/v1/stt", b"f"))
        await wait_for(lambda: service.broker.scheduler.stats().queue_depth == 1)
        reply = await client.request("POST", url + "/v1/tts", b"t")
        assert reply.code == 200, reply.body
        assert not waiting.called and not held.reply.called
        budget = service.status()["scheduler"]["budget"]
        (why,) = budget["waiting"]
        assert (why["consumer"], why["reason"]) == ("F", "memory")
        # Each card's budget: card 0 at the top level (as on one card), both under `cards`.
        by_card = {c["card"]: c for c in budget["cards"]}
        assert sorted(by_card) == [0, 1] and budget["total_mib"] == by_card[0]["total_mib"]
        assert (by_card[0]["total_mib"], by_card[1]["total_mib"]) == (12288, 16384)
        assert by_card[0]["consumers"]["L"] == {"resident_mib": 5000, "job_mib": 5000,
                                                "running": 1}
        assert set(by_card[1]["consumers"]) == {"T"}
        assert by_card[1]["consumers"]["T"]["running"] == 0
        metrics = parse_metrics((await client.request("GET", url + "/metrics")).body.decode())
        assert metric_value(metrics["gpumgr_budget_bytes"], card="0", consumer="L",
                            part="job") == 5000 * 2**20
        assert metric_value(metrics["gpumgr_budget_card_bytes"], card="1",
                            part="free") == by_card[1]["free_mib"] * 2**20
        held.release()
        assert (await held.reply).code == 200
        assert (await waiting).code == 200
        assert world.gpu.oom_count == 0 and world["L"].unloads == 0
        assert service.broker.scheduler.max_running_seen == 2
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
        service, url = await broker(world, start_broker, **auto(),
                                    kinds={"A": "tts", "B": "stt", "C": "llm"},
                                    consumers={"B": on_card(1), "C": on_card(1)})
        for kind in ("tts", "stt", "llm"):  # A is the least recently used of all
            assert (await client.request("POST", url + f"/v1/{kind}", b"x")).code == 200
        assert world["A"].unloads == 0 and world["B"].unloads == 1 and world.gpu.oom_count == 0
        assert service.registry["A"].loaded and service.registry["C"].loaded
        # C, unknown at first, may have held its memory: it may be unloaded for B too.
        evicted = {e["consumer"] for e in service.status()["scheduler"]["recent_events"]
                   if e["event"] == "eviction"}
        assert "B" in evicted and "A" not in evicted
    finally:
        await world.stop()


@pytest_twisted.ensureDeferred
async def test_a_consumer_on_both_cards_needs_and_frees_memory_on_both(
        tmp_path, start_broker, client):
    world = two_card_world(tmp_path, D=("mvoice", Behaviour(vram_mib=8000), (0, 1)),
                           E=("mvoice", Behaviour(vram_mib=10000), (1,)),
                           F=("mvoice", Behaviour(vram_mib=9000), (0,)))
    try:
        service, url = await broker(world, start_broker, **auto(),
                                    kinds={"D": "tts", "E": "stt", "F": "llm"},
                                    consumers={"D": on_card([0, 1]), "E": on_card(1),
                                               "F": on_card(0)})
        assert (await client.request("POST", url + "/v1/stt", b"e")).code == 200
        # D needs 8000 MiB on card 1 too, where E holds 10000 of 16384: E goes.
        assert (await client.request("POST", url + "/v1/tts", b"d")).code == 200
        assert world["E"].unloads == 1 and world.gpu.oom_count == 0
        assert [world.gpu.used_mib_on(c) for c in (0, 1)] == [350 + 8000, 350 + 8000]
        # (D, unknown at first, may have held its memory: unloaded for E too.)
        unloads = world["D"].unloads
        # F on card 0 needs D's memory there; D's unload frees it on both cards.
        assert (await client.request("POST", url + "/v1/llm", b"f")).code == 200
        assert world["D"].unloads == unloads + 1 and world.gpu.oom_count == 0
        assert [world.gpu.used_mib_on(c) for c in (0, 1)] == [350 + 9000, 350]
    finally:
        await world.stop()


@pytest_twisted.ensureDeferred
async def test_a_vanished_card_refuses_its_consumers_while_the_other_goes_on(
        tmp_path, start_broker, client):
    world = two_card_world(tmp_path, A=("mvoice", Behaviour(vram_mib=3000), (0,)),
                           B=("mvoice", Behaviour(vram_mib=3000), (1,)))
    try:
        service, url = await broker(world, start_broker, **auto(),
                                    kinds={"A": "tts", "B": "stt"}, consumers={"B": on_card(1)})
        world.gpu.hide_card(1)
        await service.broker.gpu.sample_now()
        refused = await client.request("POST", url + "/v1/stt", b"b")
        assert refused.code == 503 and refused.json()["error"]["code"] == "gpu_missing"
        assert (await client.request("POST", url + "/v1/tts", b"a")).code == 200
        assert world["B"].jobs_started == 0 and world["A"].jobs_started == 1
    finally:
        await world.stop()
