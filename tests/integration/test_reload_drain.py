"""Live reload (POST /v1/admin/reload; SIGHUP calls the same) and the
graceful drain of stopService, on the real broker."""

from __future__ import annotations

import hashlib

import pytest_twisted
import yaml
from twisted.internet import defer

from gpumgr.testing import world_config_raw
from tests.helpers import HeldStream, file_broker, wait_for


def rewrite(world, path, **sections):
    sections.setdefault("health", {"interval_s": 30})
    raw = world_config_raw(world, **sections)
    path.write_text(yaml.safe_dump(raw))
    return raw


@pytest_twisted.ensureDeferred
async def test_a_valid_reload_swaps_config_and_keeps_consumer_state(world, start_broker,
                                                                   client, tmp_path):
    path = tmp_path / "gpumgr.yaml"
    service, url = await file_broker(world, start_broker, path, scheduler={"mode": "locked"})
    assert (await client.request("POST", url + "/v1/tts", b"x")).code == 200
    before = service.status()["broker"]
    # The hash is known from the start, not only after the first reload.
    assert before["config_hash"] == hashlib.sha256(path.read_bytes()).hexdigest()
    rewrite(world, path, scheduler={"mode": "locked", "priority": {"tts": 7}},
            consumers={"ollama": {"passthrough": True}})
    reply = await client.request("POST", url + "/v1/admin/reload")
    assert reply.code == 200 and reply.json()["reloaded"] is True
    status = service.status()
    assert status["broker"]["reloads"] == 1 and status["broker"]["reload_failures"] == 0
    assert status["broker"]["config_hash"] != before["config_hash"]
    assert status["consumers"]["mvoice"]["total_requests"] == 1  # state kept
    assert service.config.scheduler.priority == {"tts": 7}
    # The new route is live: pass-through was off before the reload.
    assert (await client.request("GET", url + "/v1/llm/api/version")).code == 200


@pytest_twisted.ensureDeferred
async def test_an_invalid_reload_keeps_the_running_config(world, start_broker, client, tmp_path):
    path = tmp_path / "gpumgr.yaml"
    service, url = await file_broker(world, start_broker, path)
    running = service.config
    path.write_text(path.read_text().replace("interval_s: 30", "interval_s: -1"))
    reply = await client.request("POST", url + "/v1/admin/reload")
    assert reply.code == 422
    error = reply.json()["error"]
    assert error["code"] == "config_rejected" and "health.interval_s" in error["message"]
    assert service.config is running
    broker = service.status()["broker"]
    assert broker["reload_failures"] == 1 and "health.interval_s" in broker["last_reload_error"]
    path.write_text("{unbalanced")
    assert (await client.request("POST", url + "/v1/admin/reload")).code == 422
    assert (await client.request("POST", url + "/v1/tts", b"x")).code == 200  # still serving


@pytest_twisted.ensureDeferred
async def test_a_listen_change_needs_a_restart(world, start_broker, client, tmp_path):
    path = tmp_path / "gpumgr.yaml"
    service, url = await file_broker(world, start_broker, path)
    rewrite(world, path, listen="tcp:9999:interface=127.0.0.1")
    reply = await client.request("POST", url + "/v1/admin/reload")
    assert reply.code == 422 and "restart" in reply.json()["error"]["message"]


@pytest_twisted.ensureDeferred
async def test_reload_does_not_disturb_running_or_queued_jobs_and_drops_removed_routes(
        world, start_broker, client, tmp_path):
    path = tmp_path / "gpumgr.yaml"
    service, url = await file_broker(world, start_broker, path, scheduler={"mode": "locked"})
    held = await HeldStream(world["ollama"]).start(client, url)
    queued = defer.ensureDeferred(client.request("POST", url + "/v1/tts", b"q"))
    await wait_for(lambda: service.scheduler.stats().queue_depth == 1)
    raw = world_config_raw(world, health={"interval_s": 30}, scheduler={"mode": "locked"})
    del raw["consumers"]["comfyui"], raw["routes"]["image"]
    path.write_text(yaml.safe_dump(raw))
    assert (await client.request("POST", url + "/v1/admin/reload")).code == 200
    assert "comfyui" not in service.status()["consumers"]
    gone = await client.request("POST", url + "/v1/image", b"{}")
    assert gone.code == 404 and gone.json()["error"]["code"] == "unknown_route"
    held.release()
    stream = await held.reply
    assert stream.code == 200 and stream.complete and stream.body.count(b"\n") == 2
    assert (await queued).code == 200


@pytest_twisted.ensureDeferred
async def test_reload_needs_admin_rights(world, start_broker, client, tmp_path):
    path = tmp_path / "gpumgr.yaml"
    _, url = await file_broker(world, start_broker, path, admin_token="s3cret")
    assert (await client.request("POST", url + "/v1/admin/reload")).code == 401
    ok = await client.request("POST", url + "/v1/admin/reload",
                              headers={b"Authorization": b"Bearer s3cret"})
    assert ok.code == 200


@pytest_twisted.ensureDeferred
async def test_stop_drains_running_jobs_and_refuses_queued_ones(world, start_broker, client):
    from gpumgr.testing import world_config

    service, url = await start_broker(world_config(world, scheduler={"mode": "locked"},
                                                   health={"interval_s": 30}))
    held = await HeldStream(world["ollama"]).start(client, url)
    queued = defer.ensureDeferred(client.request("POST", url + "/v1/tts", b"q"))
    await wait_for(lambda: service.scheduler.stats().queue_depth == 1)
    stopping = defer.ensureDeferred(_stop(service))
    refused = await queued
    assert refused.code == 503 and refused.json()["error"]["code"] == "shutting_down"
    assert not stopping.called  # the running stream is still being served
    held.release()
    stream = await held.reply
    assert stream.code == 200 and stream.complete
    await stopping
    assert world["mvoice"].work_requests() == []


@pytest_twisted.ensureDeferred
async def test_stop_aborts_jobs_still_running_after_the_grace(world, start_broker, client):
    from gpumgr.testing import world_config

    service, url = await start_broker(world_config(world, scheduler={"mode": "locked"},
                                                   health={"interval_s": 30},
                                                   shutdown_grace_s=0.2))
    held = await HeldStream(world["ollama"]).start(client, url)
    await _stop(service)
    stream = await held.reply
    assert not stream.complete  # aborted, never made to look complete
    assert service.scheduler.stats().in_flight == 0
    held.release()


async def _stop(service):
    await service.stopService()
    service.stopService = lambda: defer.succeed(None)  # the fixture stops it again
