"""Render tracking edges: reused prompt ids, quick ComfyUI restarts, URL changes, a job timeout on a stream.

Found in review: each test is the smallest reproduction of one defect.
"""

from __future__ import annotations

import pytest_twisted
import yaml

from gpumgr.testing import world_config, world_config_raw
from tests.helpers import Gate, HeldStream, comfy_broker, file_broker, wait_for


# -- render tracking -----------------------------------------------------------------------


def _polls(world):
    return [r for r in world["comfyui"].requests
            if r.method == "GET" and (r.path.startswith("/history/") or r.path == "/queue")]


@pytest_twisted.ensureDeferred
async def test_a_reused_prompt_id_still_holds_the_gpu_while_it_renders(world, start_broker,
                                                                      client):
    service, url = await comfy_broker(world, start_broker)
    body = b'{"prompt":{},"prompt_id":"my-fixed-id"}'
    assert (await client.request("POST", url + "/v1/image", body)).code == 200
    await wait_for(lambda: service.scheduler.stats().in_flight == 0)  # first render over
    gate = Gate(world["comfyui"])
    polls_before = len(_polls(world))
    assert (await client.request("POST", url + "/v1/image", body)).code == 200
    try:
        await wait_for(lambda: "my-fixed-id" in gate.gates)  # ComfyUI is rendering it now
        await wait_for(lambda: len(_polls(world)) >= polls_before + 2, timeout_s=5)
        assert service.scheduler.stats().in_flight == 1
    finally:
        gate.release()


@pytest_twisted.ensureDeferred
async def test_a_render_lost_to_a_quick_comfyui_restart_releases_the_gpu(world, start_broker,
                                                                        client):
    service, url = await comfy_broker(world, start_broker)
    Gate(world["comfyui"])
    assert (await client.request("POST", url + "/v1/image", b'{"prompt":{}}')).code == 200
    assert service.scheduler.stats().in_flight == 1
    await world.stop_consumer("comfyui")
    world.restart_consumer("comfyui")  # back before the next poll: queue and history empty
    await wait_for(lambda: service.scheduler.stats().in_flight == 0, timeout_s=6)


@pytest_twisted.ensureDeferred
async def test_a_render_tracked_across_a_url_change_releases_the_gpu(world, start_broker,
                                                                    client, tmp_path,
                                                                    ws_upstream):
    path = tmp_path / "gpumgr.yaml"
    service, url = await file_broker(world, start_broker, path, scheduler={"mode": "locked"},
                                     health={"interval_s": 0.2})
    Gate(world["comfyui"])
    assert (await client.request("POST", url + "/v1/image", b'{"prompt":{}}')).code == 200
    raw = world_config_raw(world, health={"interval_s": 0.2}, scheduler={"mode": "locked"})
    raw["consumers"]["comfyui"]["url"] = ws_upstream  # answers 200 to the health probe
    path.write_text(yaml.safe_dump(raw))
    assert (await client.request("POST", url + "/v1/admin/reload")).code == 200
    await world.stop_consumer("comfyui")  # the old instance, and its render, are gone
    await wait_for(lambda: service.scheduler.stats().in_flight == 0, timeout_s=6)


@pytest_twisted.ensureDeferred
async def test_job_timeout_bounds_a_stream_too(world, start_broker, client):
    service, url = await start_broker(world_config(
        world, scheduler={"mode": "locked"}, health={"interval_s": 30},
        consumers={"ollama": {"job_timeout_s": 0.5}}))
    held = await HeldStream(world["ollama"]).start(client, url)
    try:
        await wait_for(lambda: service.scheduler.stats().in_flight == 0, timeout_s=5)
    finally:
        held.release()
