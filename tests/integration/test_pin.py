"""`consumers.<name>.pin: true` through the real broker (evicting mode, a
simulated 10,000 MiB GPU): a pinned consumer is never evicted for pressure,
exclusivity or idleness; a job that could only run by evicting it is refused
with a reason that names the pin; an admin unload still works."""

from __future__ import annotations

import pytest_twisted

from gpumgr.testing import Behaviour
from tests.helpers import sleep
from tests.integration.test_evicting_integration import ABC_KINDS, evicting, small_world



@pytest_twisted.async_yield_fixture
async def abc(tmp_path):
    world = small_world(tmp_path, A=("mvoice", Behaviour(vram_mib=6000)),
                        B=("mvoice", Behaviour(vram_mib=6000)),
                        C=("mvoice", Behaviour(vram_mib=2000)))
    yield world
    await world.stop()


@pytest_twisted.ensureDeferred
async def test_a_pinned_consumer_is_not_evicted_for_pressure_and_the_refusal_names_the_pin(
        abc, start_broker, client):
    service, url = await evicting(abc, start_broker, kinds=ABC_KINDS,
                                  consumers={"A": {"pin": True}})
    assert (await client.request("POST", url + "/v1/tts", b"a")).code == 200
    reply = await client.request("POST", url + "/v1/stt", b"b")
    assert reply.code == 503, reply.body
    error = reply.json()["error"]
    assert error["code"] == "insufficient_vram"
    assert "A is pinned (consumers.A.pin)" in error["message"]
    assert abc["A"].unloads == 0 and service.registry["A"].loaded is True
    assert abc["B"].work_requests() == []
    status = (await client.request("GET", url + "/v1/status")).json()
    assert status["consumers"]["A"]["pin"] is True
    assert status["consumers"]["B"]["pin"] is False


@pytest_twisted.ensureDeferred
async def test_a_pinned_consumer_is_not_evicted_for_exclusivity(abc, start_broker, client):
    service, url = await evicting(abc, start_broker, kinds=ABC_KINDS,
                                  consumers={"A": {"pin": True},
                                             "C": {"can_coexist_with": []}})
    assert (await client.request("POST", url + "/v1/tts", b"a")).code == 200
    reply = await client.request("POST", url + "/v1/llm", b"c")
    assert reply.code == 503, reply.body
    assert "A, which is pinned (consumers.A.pin)" in reply.json()["error"]["message"]
    assert abc["A"].unloads == 0 and abc["C"].work_requests() == []


@pytest_twisted.ensureDeferred
async def test_without_the_pin_the_same_job_evicts_it(abc, start_broker, client):
    """The control for the two tests above: the same world, no pin."""
    service, url = await evicting(abc, start_broker, kinds=ABC_KINDS,
                                  consumers={"C": {"can_coexist_with": []}})
    assert (await client.request("POST", url + "/v1/tts", b"a")).code == 200
    assert (await client.request("POST", url + "/v1/llm", b"c")).code == 200
    assert abc["A"].unloads == 1


@pytest_twisted.ensureDeferred
async def test_a_pinned_consumer_is_not_unloaded_when_idle_but_an_admin_unload_works(
        abc, start_broker, client):
    service, url = await evicting(abc, start_broker, kinds=ABC_KINDS,
                                  consumers={"A": {"pin": True, "idle_unload_s": 0.1},
                                             "C": {"idle_unload_s": 0.1}})
    assert (await client.request("POST", url + "/v1/tts", b"a")).code == 200
    assert (await client.request("POST", url + "/v1/llm", b"c")).code == 200
    await sleep(0.5)  # several idle periods: C (the control) goes, A stays
    assert abc["C"].unloads == 1
    assert abc["A"].unloads == 0 and service.registry["A"].loaded is True
    unload = await client.request("POST", url + "/v1/consumers/A/unload")
    assert unload.code == 200, unload.body
    assert abc["A"].unloads == 1 and service.registry["A"].loaded is False
