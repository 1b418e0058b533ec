"""Requests users can see and cancel, through the real broker and the
simulated services: ids, `GET /v1/requests/<id>` while the queue moves, and
`DELETE /v1/requests/<id>` of queued, running and rendering jobs (nothing
leaked, the GPU released on evidence only)."""

from __future__ import annotations

import re

import pytest_twisted
from twisted.internet import defer

from gpumgr.testing import world_config
from tests.helpers import Gate, HeldStream, comfy_broker, locked_broker, sleep, wait_for

ID = "X-Gpumgr-Request-Id"
TOKEN = "X-Gpumgr-Cancel-Token"


def _nothing_leaked(service):
    stats = service.scheduler.stats()
    assert (stats.queue_depth, stats.in_flight) == (0, 0)
    assert service.broker.requests.live() == []


@pytest_twisted.ensureDeferred
async def test_every_response_carries_a_request_id_its_own_or_a_new_one(
        world, start_broker, client):
    service, url = await locked_broker(world, start_broker)
    made = await client.request("POST", url + "/v1/tts", b'{"text":"x"}')
    assert made.code == 200
    assert re.fullmatch(rb"[0-9a-f]{32}", made.header(ID))
    assert made.header(TOKEN)
    own = await client.request("POST", url + "/v1/tts", b'{"text":"x"}', {ID: "job-7:a.b"})
    assert own.header(ID) == b"job-7:a.b"
    assert own.header(TOKEN) != made.header(TOKEN)
    # Refused before it reached anything (a health refusal, here) still has it.
    world["mvoice"].behaviour.healthy = False
    await service.health.probe_now("mvoice")
    refused = await client.request("POST", url + "/v1/tts", b"x", {ID: "refused-1"})
    assert refused.code == 503 and refused.header(ID) == b"refused-1"
    done = (await client.request("GET", url + "/v1/requests/job-7:a.b")).json()
    assert done["state"] == "finished" and done["code"] == 200
    assert done["consumer"] == "mvoice" and done["gpu_ms"] is not None
    assert TOKEN.lower() not in str(done).lower() and own.header(TOKEN).decode() not in str(done)
    assert (await client.request("GET", url + "/v1/requests/refused-1")).json()["code"] == 503


@pytest_twisted.ensureDeferred
async def test_bad_request_ids_are_refused(world, start_broker, client):
    service, url = await locked_broker(world, start_broker)
    for bad in ("x" * 65, "a b", "-lead", "ü", ""):
        reply = await client.request("POST", url + "/v1/tts", b"x", {ID: bad})
        assert reply.code == 400, bad
        assert reply.json()["error"]["code"] == "bad_request_id"
    assert world["mvoice"].work_requests() == []
    unknown = await client.request("GET", url + "/v1/requests/nope")
    assert unknown.code == 404 and unknown.json()["error"]["code"] == "unknown_request"


@pytest_twisted.ensureDeferred
async def test_positions_while_the_queue_moves_and_a_queued_cancel(world, start_broker, client):
    service, url = await locked_broker(world, start_broker)
    held = await HeldStream(world["ollama"]).start(client, url)
    replies = {}
    for depth, n in enumerate(("q1", "q2", "q3"), 1):  # one at a time: a known order
        replies[n] = defer.ensureDeferred(client.request(
            "POST", url + "/v1/tts", b'{"text":"x"}', {ID: n}))
        await wait_for(lambda: service.scheduler.stats().queue_depth == depth)
    q2 = (await client.request("GET", url + "/v1/requests/q2")).json()
    assert (q2["state"], q2["position"]) == ("queued", 2)
    assert [a["id"] for a in q2["waiting_for"]["ahead"]] == ["q1"]
    assert q2["waiting_for"]["holding_the_gpu"] == ["ollama"]
    listing = (await client.request("GET", url + "/v1/requests")).json()
    assert [(r["id"], r["position"]) for r in listing["queue"]] == [("q1", 1), ("q2", 2),
                                                                       ("q3", 3)]
    assert [r["consumer"] for r in listing["running"]] == ["ollama"]
    # q1 leaves the queue (an admin: a loopback client with no admin_token):
    # q2 and q3 move up, and q1's client is told.
    cancel = await client.request("DELETE", url + "/v1/requests/q1")
    assert cancel.code == 200, cancel.body
    refused = await replies["q1"]
    assert refused.code == 409 and refused.json()["error"]["code"] == "request_cancelled"
    assert (await client.request("GET", url + "/v1/requests/q3")).json()["position"] == 2
    held.release()
    assert (await replies["q2"]).code == 200 and (await replies["q3"]).code == 200
    assert (await held.reply).code == 200
    assert len(world["mvoice"].work_requests()) == 2  # q1 never reached it
    again = await client.request("DELETE", url + "/v1/requests/q2")
    assert again.code == 409 and again.json()["error"]["code"] == "request_finished"
    _nothing_leaked(service)


@pytest_twisted.ensureDeferred
async def test_only_the_admin_or_the_same_client_may_cancel(world, start_broker, client):
    service, url = await locked_broker(world, start_broker, admin_token="s3cret")
    held = await HeldStream(world["ollama"]).start(client, url)
    queued = defer.ensureDeferred(client.request("POST", url + "/v1/tts", b"x", {ID: "mine"}))
    await wait_for(lambda: service.scheduler.stats().queue_depth == 1)
    nobody = await client.request("DELETE", url + "/v1/requests/mine")
    assert nobody.code == 401
    wrong = await client.request("DELETE", url + "/v1/requests/mine", None, {TOKEN: "guess"})
    assert wrong.code == 403 and wrong.json()["error"]["code"] == "forbidden"
    assert service.scheduler.stats().queue_depth == 1
    admin = await client.request("DELETE", url + "/v1/requests/mine", None,
                                 {"Authorization": "Bearer s3cret"})
    assert admin.code == 200
    assert (await queued).json()["error"]["code"] == "request_cancelled"
    held.release()
    await held.reply
    _nothing_leaked(service)


@pytest_twisted.ensureDeferred
async def test_the_same_client_cancels_a_running_stream_and_the_gpu_waits_for_evidence(
        world, start_broker, client):
    """Like a client that leaves: the exchange stops, and the GPU stays held
    until the service stopped (gpumgr.abandoned), never on the cancel."""
    service, url = await locked_broker(world, start_broker)
    ollama = world["ollama"]
    held = HeldStream(ollama, chunks=3)
    stream = defer.ensureDeferred(client.request("POST", url + "/v1/llm", b'{"prompt":"x"}'))
    await wait_for(lambda: 1 in held.gates)
    (entry,) = service.broker.requests.live()
    running = (await client.request("GET", url + f"/v1/requests/{entry.id.text}")).json()
    assert running["state"] == "running" and running["consumer"] == "ollama"
    tts = defer.ensureDeferred(client.request("POST", url + "/v1/tts", b"x"))
    await wait_for(lambda: service.scheduler.stats().queue_depth == 1)
    cancel = await client.request("DELETE", url + f"/v1/requests/{entry.id.text}", None,
                                  {TOKEN: entry.token})
    assert cancel.code == 200, cancel.body
    reply = await stream
    assert not reply.complete  # cut, never made to look whole
    await wait_for(lambda: service.broker.abandoned.draining)
    state = (await client.request("GET", url + f"/v1/requests/{entry.id.text}")).json()
    assert state["state"] == "draining" and state["cancel_requested"] is True
    await sleep(0.3)
    assert world["mvoice"].work_requests() == []  # ollama still computes: the GPU is held
    held.release()  # the simulated work ends
    assert (await tts).code == 200
    assert world.max_active_jobs == 1
    finished = (await client.request("GET", url + f"/v1/requests/{entry.id.text}")).json()
    assert finished["state"] == "finished" and finished["code"] == 499
    _nothing_leaked(service)


@pytest_twisted.ensureDeferred
async def test_a_cancelled_render_is_interrupted_and_held_until_comfyui_ended_it(
        world, start_broker, client):
    """The simulated ComfyUI sees the interrupt only at its next node boundary."""
    comfy = world["comfyui"]
    comfy.behaviour.render_hangs = True
    comfy.behaviour.render_node_s = 1.0
    service, url = await comfy_broker(world, start_broker)
    prompt = await client.request("POST", url + "/v1/image", b'{"prompt":{}}')
    assert prompt.code == 200
    rid, token = prompt.header(ID).decode(), prompt.header(TOKEN).decode()
    prompt_id = prompt.json()["prompt_id"]
    rendering = (await client.request("GET", url + f"/v1/requests/{rid}")).json()
    assert rendering["state"] == "rendering"
    assert rendering["render"] == {"prompt_id": prompt_id, "state": "running"}
    tts = defer.ensureDeferred(client.request("POST", url + "/v1/tts", b'{"text":"x"}'))
    cancel = await client.request("DELETE", url + f"/v1/requests/{rid}", None, {TOKEN: token})
    assert cancel.code == 200, cancel.body
    await wait_for(lambda: comfy.interrupt_flag, timeout_s=5)
    assert service.scheduler.stats().in_flight == 1  # held: the interrupt's 200 is no evidence
    assert (await tts).code == 200
    (tts_request,) = world["mvoice"].work_requests()
    ended = next(t for t, p, how in comfy.timeline if p == prompt_id and how != "started")
    assert ended <= tts_request.at
    assert comfy.history[prompt_id]["status"]["messages"][-1][0] == "execution_interrupted"
    assert any(e["event"] == "render_interrupted" and e["reason"] == "cancelled"
               for e in service.status()["scheduler"]["recent_events"])
    assert world.max_active_jobs == 1
    _nothing_leaked(service)


@pytest_twisted.ensureDeferred
async def test_finished_requests_are_forgotten_past_keep_finished(world, start_broker, client):
    config = world_config(world, scheduler={"mode": "locked"}, requests={"keep_finished": 2})
    service, url = await start_broker(config)
    await service.health.probe_all_now()
    for n in ("f1", "f2", "f3"):
        assert (await client.request("POST", url + "/v1/tts", b"x", {ID: n})).code == 200
    assert (await client.request("GET", url + "/v1/requests/f1")).code == 404
    assert (await client.request("GET", url + "/v1/requests/f3")).code == 200
