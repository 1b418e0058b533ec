"""A reload that removes a consumer: its queued jobs and tracked renders end cleanly.

Found in review: each test is the smallest reproduction of one defect.
"""

from __future__ import annotations

import pytest_twisted
import yaml
from twisted.internet import defer
from twisted.logger import globalLogPublisher

from gpumgr.testing import world_config_raw
from tests.helpers import Gate, HeldStream, file_broker, wait_for


# -- reload --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_queued_job_whose_consumer_a_reload_removed_is_not_a_500(world, start_broker,
                                                                        client, tmp_path):
    path = tmp_path / "gpumgr.yaml"
    service, url = await file_broker(world, start_broker, path, scheduler={"mode": "evicting"})
    held = await HeldStream(world["ollama"]).start(client, url)
    queued = defer.ensureDeferred(client.request("POST", url + "/v1/image", b'{"prompt":{}}'))
    await wait_for(lambda: service.scheduler.stats().queue_depth == 1)
    raw = world_config_raw(world, health={"interval_s": 30}, scheduler={"mode": "evicting"})
    del raw["consumers"]["comfyui"], raw["routes"]["image"]
    path.write_text(yaml.safe_dump(raw))
    assert (await client.request("POST", url + "/v1/admin/reload")).code == 200
    held.release()
    await held.reply
    reply = await queued
    assert reply.code != 500, reply.body


@pytest_twisted.ensureDeferred
async def test_removing_a_consumer_with_a_tracked_render_logs_no_traceback(world, start_broker,
                                                                          client, tmp_path):
    failures = []

    def observe(event):
        if event.get("log_failure") is not None:
            failures.append(event["log_failure"])

    path = tmp_path / "gpumgr.yaml"
    service, url = await file_broker(world, start_broker, path, scheduler={"mode": "locked"})
    Gate(world["comfyui"])
    assert (await client.request("POST", url + "/v1/image", b'{"prompt":{}}')).code == 200
    raw = world_config_raw(world, health={"interval_s": 30}, scheduler={"mode": "locked"})
    del raw["consumers"]["comfyui"], raw["routes"]["image"]
    path.write_text(yaml.safe_dump(raw))
    globalLogPublisher.addObserver(observe)
    try:
        assert (await client.request("POST", url + "/v1/admin/reload")).code == 200
        await wait_for(lambda: service.scheduler.stats().in_flight == 0)
    finally:
        globalLogPublisher.removeObserver(observe)
    assert [f.getErrorMessage() for f in failures] == []
