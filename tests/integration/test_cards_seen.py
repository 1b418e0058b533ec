"""What operators see of several cards and of the balancer (issues 17, 18):
the cards each consumer lives on in /v1/status, where a `gpu: auto` one was
placed, `gpumgr_consumer_card_info`, `gpumgr status` grouped by card, and the
box's phase."""

from __future__ import annotations

import pytest_twisted

from gpumgr.balancer import Phase
from gpumgr.cli import format_status
from gpumgr.testing import Behaviour, managed_whisper_entry, world_config
from tests.helpers import metric_value, parse_metrics, transcribe, wait_for
from tests.integration.test_multi_gpu import broker, on_card, two_card_world


def card_info(families) -> set[tuple[str, str]]:
    return {(s.labels["consumer"], s.labels["gpu"])
            for s in families["gpumgr_consumer_card_info"].samples if s.value == 1}


@pytest_twisted.ensureDeferred
async def test_status_metrics_and_cli_show_where_each_consumer_lives(
        tmp_path, start_broker, client):
    world = two_card_world(tmp_path, A=("mvoice", Behaviour(vram_mib=3000), (0,)),
                           B=("mvoice", Behaviour(vram_mib=3000), (1,)))
    entry = {**managed_whisper_entry(world, vram_mib=2000), "gpu": "auto"}
    try:
        service, url = await broker(world, start_broker, kinds={"A": "tts", "B": "llm"},
                                    consumers={"B": on_card(1)}, managed={"whisper": entry})
        await wait_for(lambda: service.broker.gpu.latest.available)
        consumers = (await client.request("GET", url + "/v1/status")).json()["consumers"]
        assert (consumers["A"]["gpu"], consumers["A"]["gpu_auto"]) == ([0], False)
        assert (consumers["B"]["gpu"], consumers["B"]["gpu_auto"]) == ([1], False)
        # Not started yet: an auto consumer lives nowhere until its process starts.
        assert (consumers["whisper"]["gpu"], consumers["whisper"]["gpu_auto"]) == ([], True)
        families = parse_metrics((await client.request("GET", url + "/metrics")).body.decode())
        assert card_info(families) == {("A", "0"), ("B", "1")}

        # Both cards have room for it: no eviction either way, the lowest index wins.
        assert (await client.request("POST", url + "/v1/llm", b"x")).code == 200
        reply = await transcribe(client, url)
        assert reply.code == 200, reply.body
        assert service.broker.placements.assigned == {"whisper": 0}
        status = (await client.request("GET", url + "/v1/status")).json()
        assert status["consumers"]["whisper"]["gpu"] == [0]
        families = parse_metrics((await client.request("GET", url + "/metrics")).body.decode())
        assert card_info(families) == {("A", "0"), ("B", "1"), ("whisper", "0")}
        assert metric_value(families["gpumgr_consumer_card_info"], consumer="B", gpu="1") == 1

        lines = format_status(status).splitlines()
        card0 = lines.index(next(x for x in lines if x.startswith("card 0 ")))
        card1 = lines.index(next(x for x in lines if x.startswith("card 1 ")))
        row = {x.split()[0]: i for i, x in enumerate(lines) if x.split()[:1] in
               (["A"], ["B"], ["whisper"])}
        assert card0 < row["A"] < card1 and card0 < row["whisper"] < card1
        assert card1 < row["B"]
    finally:
        await world.stop()


@pytest_twisted.ensureDeferred
async def test_one_card_status_names_card_0_and_the_box_phase(world, start_broker, client):
    service, url = await start_broker(world_config(
        world, scheduler={"mode": "evicting"}, health={"interval_s": 30},
        balancer={"box": "box1", "max_queue": 4}))
    await service.health.probe_all_now()
    status = (await client.request("GET", url + "/v1/status")).json()
    assert set(status) == {"broker", "gpu", "consumers", "scheduler"}  # as before
    assert {name: (c["gpu"], c["gpu_auto"]) for name, c in status["consumers"].items()} == \
        {name: ([0], False) for name in ("ollama", "comfyui", "whisper", "mvoice")}
    balancer = status["broker"]["balancer"]
    assert balancer["phase"] == "serving" and balancer["box"] == "box1"
    assert balancer["kinds"] == {k: {"ready": True, "reason": None}
                                 for k in ("tts", "stt", "llm", "image")}

    service.broker.readiness.phase = Phase.LEAVING  # what SIGTERM does first
    balancer = (await client.request("GET", url + "/v1/status")).json()["broker"]["balancer"]
    assert balancer["phase"] == "leaving"
    assert {k["reason"] for k in balancer["kinds"].values()} == {"not_ready"}
    # The readiness in status is the one /v1/ready answers.
    ready = await client.request("GET", url + "/v1/ready/tts")
    assert ready.code == 503 and ready.json()["reason"]["code"] == "not_ready"
    assert "box box1, leaving" in format_status(
        (await client.request("GET", url + "/v1/status")).json())
    service.broker.readiness.phase = Phase.SERVING
