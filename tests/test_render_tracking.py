"""ComfyUI render tracking through the real broker: /prompt answers at once,
and the GPU slot stays held until /history/<id> fills."""

from __future__ import annotations

import io

import pytest_twisted
from twisted.internet import defer, reactor
from twisted.web.client import FileBodyProducer
from twisted.web.http_headers import Headers
from twisted.web.server import NOT_DONE_YET

from gpumgr.testing import world_config
from tests.helpers import HeldStream, sleep, wait_for


async def comfy_broker(world, start_broker, mode="locked", **comfy):
    config = world_config(world, scheduler={"mode": mode}, health={"interval_s": 0.2},
                          consumers={"comfyui": comfy} if comfy else None)
    service, url = await start_broker(config)
    await service.health.probe_all_now()
    return service, url


class Gate:
    """Holds every render until `release()`."""

    def __init__(self, consumer):
        self.gates: dict[str, defer.Deferred] = {}
        consumer.behaviour.render_gate = lambda pid: self.gates.setdefault(pid, defer.Deferred())

    def release(self):
        for d in self.gates.values():
            if not d.called:
                d.callback(None)


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
