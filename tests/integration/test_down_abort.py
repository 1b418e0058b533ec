"""A consumer gpumgr does not own that goes down while a job holds the GPU for it
(issue 14, point 4): the job is aborted after health.down_grace_s, not left to
request_timeout_s."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import defer

from gpumgr.testing import world_config
from tests.helpers import wait_for


def aborted(service):
    return [e for e in service.status()["scheduler"]["recent_events"]
            if e["event"] == "job_aborted"]


async def long_speech(world, start_broker, client, down_grace_s):
    """mvoice busy with a 30 s job; its health route still answers."""
    service, url = await start_broker(world_config(
        world, scheduler={"mode": "locked"},
        health={"interval_s": 0.2, "timeout_s": 0.5, "down_grace_s": down_grace_s}))
    await service.health.probe_all_now()
    world.consumers["mvoice"].behaviour.job_s = 30
    reply = defer.ensureDeferred(client.request("POST", url + "/v1/tts", b'{"text":"hi"}'))
    await wait_for(lambda: world.consumers["mvoice"].jobs_started == 1)
    return service, reply


async def ended(reply):
    try:
        return await reply
    except Exception as e:  # noqa: BLE001 - an aborted job may drop the connection
        return e


@pytest_twisted.ensureDeferred
async def test_a_job_whose_consumer_stays_down_is_aborted_after_the_grace(world, start_broker,
                                                                          client):
    service, reply = await long_speech(world, start_broker, client, down_grace_s=0.6)
    assert service.scheduler.stats().in_flight == 1
    world.consumers["mvoice"].behaviour.healthy = False  # its health route fails now
    await wait_for(lambda: service.scheduler.stats().in_flight == 0, timeout_s=15)
    [event] = aborted(service)
    assert event["consumer"] == "mvoice" and event["reason"] == "consumer_down"
    assert "health.down_grace_s" in event["detail"]
    got = await ended(reply)
    assert getattr(got, "code", None) != 200


@pytest_twisted.ensureDeferred
async def test_a_consumer_that_comes_back_within_the_grace_keeps_its_job(world, start_broker,
                                                                        client):
    service, reply = await long_speech(world, start_broker, client, down_grace_s=30)
    world.consumers["mvoice"].behaviour.healthy = False
    await wait_for(lambda: service.status()["consumers"]["mvoice"]["health"] == "down")
    world.consumers["mvoice"].behaviour.healthy = True
    await wait_for(lambda: service.status()["consumers"]["mvoice"]["health"] == "ok")
    assert service.scheduler.stats().in_flight == 1 and aborted(service) == []
    reply.cancel()
    await ended(reply)
