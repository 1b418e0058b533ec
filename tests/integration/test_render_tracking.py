"""ComfyUI render tracking through the real broker: /prompt answers at once,
and the GPU slot stays held until /history/<id> fills."""

from __future__ import annotations

import io
import json

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.web._newclient import ResponseNeverReceived
from twisted.web.client import FileBodyProducer
from twisted.web.http_headers import Headers
from twisted.web.server import NOT_DONE_YET

from gpumgr.testing import world_config
from tests.helpers import Gate, HeldStream, comfy_broker, sleep, wait_for


@pytest_twisted.ensureDeferred
async def test_a_tts_request_after_an_image_starts_only_once_the_render_is_over(
        world, start_broker, client):
    service, url = await comfy_broker(world, start_broker)
    gate = Gate(world["comfyui"])
    prompt = await client.request("POST", url + "/v1/image", b'{"prompt":{}}')
    assert prompt.code == 200  # answered at once...
    prompt_id = prompt.json()["prompt_id"]
    status = service.status()
    assert status["scheduler"]["in_flight"] == 1  # ...but the GPU is still held
    (render,) = status["consumers"]["comfyui"]["renders"]
    assert render["prompt_id"] == prompt_id
    assert status["scheduler"]["holders"][0]["render"] == prompt_id
    tts = defer.ensureDeferred(client.request("POST", url + "/v1/tts", b'{"text":"x"}'))
    await wait_for(lambda: service.scheduler.stats().queue_depth == 1)
    await wait_for(lambda: prompt_id in gate.gates)
    assert world["mvoice"].work_requests() == []
    gate.release()
    assert (await tts).code == 200
    assert world.max_active_jobs == 1  # the simulated GPU never ran two jobs at once
    assert world.work_log.index("comfyui") < world.work_log.index("mvoice")
    assert service.status()["consumers"]["comfyui"]["renders"] == []
    assert service.status()["scheduler"]["renders"]["completed"] == 1


@pytest_twisted.ensureDeferred
async def test_a_refused_prompt_holds_nothing(world, start_broker, client):
    service, url = await comfy_broker(world, start_broker)
    reply = await client.request("POST", url + "/v1/image", b'{"no prompt": 1}')
    assert reply.code == 400
    assert service.scheduler.stats().in_flight == 0
    assert service.status()["scheduler"]["renders"] == {}


@pytest_twisted.ensureDeferred
async def test_a_render_past_job_timeout_is_interrupted_and_the_gpu_released(
        world, start_broker, client):
    world["comfyui"].behaviour.render_hangs = True
    service, url = await comfy_broker(world, start_broker, job_timeout_s=0.5)
    prompt = await client.request("POST", url + "/v1/image", b'{"prompt":{}}')
    assert prompt.code == 200
    await wait_for(lambda: service.scheduler.stats().in_flight == 0)
    assert world["comfyui"].interrupts == 1
    events = service.status()["scheduler"]["recent_events"]
    assert any(e["event"] == "render_interrupted" and e["detail"] == prompt.json()["prompt_id"]
               for e in events)
    assert (await client.request("POST", url + "/v1/tts", b"x")).code == 200


@pytest_twisted.ensureDeferred
async def test_a_render_is_released_when_comfyui_goes_away(world, start_broker, client):
    service, url = await comfy_broker(world, start_broker)
    Gate(world["comfyui"])  # never released
    assert (await client.request("POST", url + "/v1/image", b'{"prompt":{}}')).code == 200
    assert service.scheduler.stats().in_flight == 1
    await world.stop_consumer("comfyui")
    await wait_for(lambda: service.scheduler.stats().in_flight == 0)
    assert service.status()["consumers"]["comfyui"]["health"] == "down"
    assert any(e["event"] == "render_lost" for e in service.status()["scheduler"]["recent_events"])
    assert (await client.request("POST", url + "/v1/tts", b"x")).code == 200


@pytest_twisted.ensureDeferred
async def test_a_failing_health_check_does_not_release_a_render(world, start_broker, client):
    """ComfyUI's health route failing (slow under a heavy render, flapping) is
    no evidence that the render stopped: its prompt is still in /queue."""
    service, url = await comfy_broker(world, start_broker)
    gate = Gate(world["comfyui"])
    prompt = await client.request("POST", url + "/v1/image", b'{"prompt":{}}')
    assert prompt.code == 200
    world["comfyui"].behaviour.healthy = False
    await service.health.probe_now("comfyui")
    assert service.status()["consumers"]["comfyui"]["health"] == "down"
    await sleep(0.5)  # several polls of the render
    assert service.scheduler.stats().in_flight == 1 and len(service.broker.renders) == 1
    world["comfyui"].behaviour.healthy = True
    await wait_for(lambda: prompt.json()["prompt_id"] in gate.gates)
    gate.release()
    await wait_for(lambda: service.scheduler.stats().in_flight == 0)
    assert service.broker.render_counts["completed"] == 1


@pytest_twisted.ensureDeferred
async def test_renders_are_tracked_in_passthrough_mode_too(world, start_broker, client):
    """Even with no lock, the slot counts in in_flight until the render ends."""
    service, url = await comfy_broker(world, start_broker, mode="passthrough")
    gate = Gate(world["comfyui"])
    assert (await client.request("POST", url + "/v1/image", b'{"prompt":{}}')).code == 200
    assert service.scheduler.stats().in_flight == 1
    await wait_for(lambda: gate.gates)
    gate.release()
    await wait_for(lambda: service.scheduler.stats().in_flight == 0)


@pytest_twisted.ensureDeferred
async def test_job_timeout_counts_from_when_the_render_got_the_gpu(world, start_broker, client):
    """Found by the fault suite: job_timeout_s, the longest a job may hold the
    GPU, was counted from the request's arrival, so a prompt that had waited
    in the queue that long was interrupted as soon as it started rendering."""
    service, url = await comfy_broker(world, start_broker, job_timeout_s=1.0)
    world["comfyui"].behaviour.job_s = 0.2  # outlasts the first poll
    held = await HeldStream(world["ollama"]).start(client, url)
    image = defer.ensureDeferred(client.request("POST", url + "/v1/image", b'{"prompt":{}}'))
    await wait_for(lambda: service.scheduler.stats().queue_depth == 1)
    await sleep(1.2)  # queued for longer than job_timeout_s
    held.release()
    assert (await image).code == 200
    await wait_for(lambda: service.scheduler.stats().in_flight == 0)
    assert world["comfyui"].interrupts == 0
    assert service.status()["scheduler"]["renders"] == {"tracked": 1, "completed": 1}


@pytest_twisted.ensureDeferred
async def test_a_client_that_leaves_once_comfyui_took_its_prompt_still_holds_the_gpu_for_it(
        world, start_broker, client):
    service, url = await comfy_broker(world, start_broker)
    comfy = world["comfyui"]
    gate = Gate(comfy)
    pending = client.agent.request(b"POST", (url + "/v1/image").encode(), Headers(),
                                   FileBodyProducer(io.BytesIO(b'{"prompt":{}}')))
    pending.addErrback(lambda _: None)
    take_prompt = comfy.prompt

    def prompt(request):
        body = take_prompt(request)  # queued: the render starts now
        pending.cancel()  # the client leaves before the answer reaches it

        def answer():
            if not request._disconnected:
                request.write(body)
                request.finish()

        reactor.callLater(0.05, answer)
        return NOT_DONE_YET

    comfy.prompt = prompt
    await wait_for(lambda: comfy.running_item is not None)
    tts = defer.ensureDeferred(client.request("POST", url + "/v1/tts", b"x"))
    await sleep(0.3)
    assert world["mvoice"].work_requests() == []  # the render still holds the GPU
    gate.release()
    assert (await tts).code == 200
    assert world.max_active_jobs == 1


# -- issue 14: a render is released on evidence that it stopped, never on an interrupt's 200 --


def _ended_at(comfy, prompt_id):
    """When the simulated ComfyUI really ended that render (its own timeline)."""
    return next(t for t, p, how in comfy.timeline if p == prompt_id and how != "started")


async def _submit_directly(client, comfy, client_id="web-ui"):
    """A prompt from another client (ComfyUI's web UI, a script): gpumgr never sees it."""
    reply = await client.request("POST", comfy.url + "/prompt", json.dumps(
        {"prompt": {}, "client_id": client_id}).encode(), {"Content-Type": "application/json"})
    assert reply.code == 200
    return reply.json()["prompt_id"]


@pytest_twisted.ensureDeferred
async def test_a_timed_out_render_holds_the_gpu_until_comfyui_really_ended_it(
        world, start_broker, client):
    """The real ComfyUI sees an interrupt only between nodes: the next GPU job
    started 0.9-1.2 s before ComfyUI's own execution_interrupted."""
    comfy = world["comfyui"]
    comfy.behaviour.render_hangs = True
    # The interrupt is seen at the next node boundary, 3 s in: after the job's
    # own hard deadline (job_timeout_s + 2 s), which must not release it either.
    comfy.behaviour.render_node_s = 3.0
    service, url = await comfy_broker(world, start_broker, job_timeout_s=0.3)
    prompt = await client.request("POST", url + "/v1/image", b'{"prompt":{}}')
    assert prompt.code == 200
    prompt_id = prompt.json()["prompt_id"]
    tts = defer.ensureDeferred(client.request("POST", url + "/v1/tts", b'{"text":"x"}'))
    await wait_for(lambda: comfy.interrupt_flag, timeout_s=5)  # gpumgr interrupted it...
    assert service.status()["consumers"]["comfyui"]["renders"][0]["state"] == "interrupting"
    assert (await tts).code == 200
    # ...and the TTS job started only once ComfyUI had really ended the render.
    assert world.max_active_jobs == 1
    (tts_request,) = world["mvoice"].work_requests()
    assert _ended_at(comfy, prompt_id) <= tts_request.at
    assert comfy.history[prompt_id]["status"]["messages"][-1][0] == "execution_interrupted"
    events = [e["event"] for e in service.status()["scheduler"]["recent_events"]]
    assert "render_interrupted" in events and "render_stuck" not in events
    assert service.status()["scheduler"]["renders"]["interrupted"] == 1


@pytest_twisted.ensureDeferred
async def test_a_timed_out_prompt_pending_behind_another_clients_is_deleted_and_never_runs(
        world, start_broker, client):
    """ComfyUI skips an interrupt for a prompt that is not running; the prompt
    then ran 5-6 s after the next GPU job had started."""
    comfy = world["comfyui"]
    comfy.behaviour.render_node_s = 0.4  # theirs renders for 1.6 s
    service, url = await comfy_broker(world, start_broker, job_timeout_s=0.3)
    theirs = await _submit_directly(client, comfy)
    prompt = await client.request("POST", url + "/v1/image", b'{"prompt":{}}')
    assert prompt.code == 200
    ours = prompt.json()["prompt_id"]
    assert [i.prompt_id for i in comfy.pending] == [ours]  # waits behind theirs
    tts = await client.request("POST", url + "/v1/tts", b'{"text":"x"}')
    assert tts.code == 200
    # gpumgr deleted it from ComfyUI's queue and saw /queue without it before releasing.
    (tts_request,) = world["mvoice"].work_requests()
    deletes = [r for r in comfy.requests if r.method == "POST" and r.path == "/queue"
               and ours.encode() in r.body_head]
    assert deletes and deletes[0].at <= tts_request.at
    assert any(r.method == "GET" and r.path == "/queue" and deletes[0].at <= r.at
               <= tts_request.at for r in comfy.requests)
    # Theirs ends; ours never runs afterwards.
    await wait_for(lambda: theirs in comfy.history and comfy.queue_remaining == 0, timeout_s=10)
    assert [p for _, p, how in comfy.timeline if how == "started"] == [theirs]
    assert ours not in comfy.history
    assert service.scheduler.stats().in_flight == 0


@pytest_twisted.ensureDeferred
async def test_a_render_that_never_stops_keeps_the_gpu_says_so_and_an_admin_unload_frees_it(
        world, start_broker, client):
    """No evidence within render_stop_grace_s and no process of its own to stop:
    gpumgr keeps holding the GPU (status, event, metric, log); an admin unload
    is the way out."""
    comfy = world["comfyui"]
    comfy.behaviour.render_stuck = True  # a node that never ends nor sees the flag
    service, url = await comfy_broker(world, start_broker, job_timeout_s=0.2,
                                      render_stop_grace_s=0.5)
    prompt = await client.request("POST", url + "/v1/image", b'{"prompt":{}}')
    prompt_id = prompt.json()["prompt_id"]
    tts = defer.ensureDeferred(client.request("POST", url + "/v1/tts", b'{"text":"x"}'))

    def stuck():
        renders = service.status()["consumers"]["comfyui"]["renders"]
        return renders and renders[0]["state"] == "stuck"

    await wait_for(stuck, timeout_s=10)
    status = service.status()
    assert status["scheduler"]["in_flight"] == 1 and not tts.called
    assert world["mvoice"].work_requests() == []
    (event,) = [e for e in status["scheduler"]["recent_events"] if e["event"] == "render_stuck"]
    assert event["consumer"] == "comfyui" and prompt_id in event["detail"]
    metrics = (await client.request("GET", url + "/metrics")).body.decode()
    assert "gpumgr_renders_stuck 1.0" in metrics

    unload = await client.request("POST", url + "/v1/consumers/comfyui/unload")
    assert unload.code == 200, unload.body
    assert (await tts).code == 200
    assert service.scheduler.stats().in_flight == 0
    events = [e["event"] for e in service.status()["scheduler"]["recent_events"]]
    assert "render_released" in events
    assert service.status()["consumers"]["comfyui"]["renders"] == []


@pytest_twisted.ensureDeferred
async def test_the_hard_deadline_still_bounds_a_job_that_is_not_a_render(
        world, start_broker, client):
    """Only a tracked render leaves the job's bound (job_timeout_s + 2 s)."""
    world["mvoice"].behaviour.job_s = 10.0
    config = world_config(world, health={"interval_s": 0.2},
                          consumers={"mvoice": {"job_timeout_s": 0.1}})
    service, url = await start_broker(config)
    await service.health.probe_all_now()
    with pytest.raises(ResponseNeverReceived):  # mvoice took it: the exchange is aborted
        await client.request("POST", url + "/v1/tts", b'{"text":"x"}')
    assert service.scheduler.stats().in_flight == 0
    assert world.active_jobs == 1  # released by the bound, not by the job's end
    events = [e["event"] for e in service.status()["scheduler"]["recent_events"]]
    assert "job_timeout" in events
