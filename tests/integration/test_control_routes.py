"""A service's own control routes are gpumgr's admin routes (issue 14, point 7).

Through pass-through, a request that loads, unloads, frees or interrupts
changes what the GPU holds behind gpumgr's back. With `admin_token` set it
needs the token; once one passed, gpumgr no longer claims to know the
consumer's residency.
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted

from tests.helpers import Gate, TOKEN, token_broker, wait_for

AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"Content-Type": "application/json"}
UNLOAD_LLAMA = b'{"model":"llama3","keep_alive":0}'


def residency(service, name):
    return service.status()["consumers"][name]["residency"]


async def _load(client, url, kind):
    body = {"llm": b'{"model":"llama3","prompt":"x","stream":false}',
            "tts": b'{"text":"hello"}',
            "image": json.dumps({"prompt": {"1": {"class_type": "KSampler"}}}).encode()}[kind]
    reply = await client.request("POST", url + f"/v1/{kind}", body, JSON)
    assert reply.code == 200, reply.body


CASES = [
    # (consumer, kind, path, body, what the service did if it was reached)
    ("mvoice", "tts", "/v1/tts/unload", b"", lambda w: w["mvoice"].unloads),
    ("comfyui", "image", "/v1/image/free", b'{"unload_models":true,"free_memory":true}',
     lambda w: len([r for r in w["comfyui"].requests if r.path.endswith("/free")])),
    ("comfyui", "image", "/v1/image/api/free", b'{"unload_models":true}',
     lambda w: len([r for r in w["comfyui"].requests if r.path.endswith("/free")])),
    ("comfyui", "image", "/v1/image/interrupt", b"{}",
     lambda w: len([r for r in w["comfyui"].requests if r.path.endswith("/interrupt")])),
    ("ollama", "llm", "/v1/llm/api/generate", UNLOAD_LLAMA, lambda w: w["ollama"].unloads),
    ("ollama", "llm", "/v1/llm/api/chat", b'{"model":"llama3","messages":[],"keep_alive":"0s"}',
     lambda w: w["ollama"].unloads),
    ("ollama", "llm", "/v1/llm", UNLOAD_LLAMA, lambda w: w["ollama"].unloads),
]


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("name,kind,path,body,effect", CASES)
async def test_control_routes_need_the_admin_token(world, start_broker, client, name, kind,
                                                   path, body, effect):
    service, url = await token_broker(world, start_broker)
    await _load(client, url, kind)
    assert residency(service, name) == "loaded"
    before = effect(world)
    refused = await client.request("POST", url + path, body, JSON)
    assert refused.code == 401 and refused.json()["error"]["code"] == "unauthorized"
    assert effect(world) == before  # never reached the service
    assert residency(service, name) == "loaded"


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("name,kind,path,body,effect", CASES)
async def test_a_control_route_with_the_token_leaves_residency_unknown(
        world, start_broker, client, name, kind, path, body, effect):
    service, url = await token_broker(world, start_broker)
    await _load(client, url, kind)
    before = effect(world)
    reply = await client.request("POST", url + path, body, {**JSON, **AUTH})
    assert reply.code == 200, reply.body
    assert effect(world) == before + 1
    # gpumgr did not do it, and the service's answer proves nothing: unknown,
    # until measured or loaded again (today /v1/image/free left it 'loaded').
    assert residency(service, name) == "unknown"


@pytest_twisted.ensureDeferred
async def test_ordinary_requests_need_no_token(world, start_broker, client):
    service, url = await token_broker(world, start_broker)
    for path, body in [("/v1/llm/api/generate", b'{"model":"llama3","prompt":"hi",'
                        b'"keep_alive":0,"stream":false}'),
                       ("/v1/llm/api/generate", b'{"model":"llama3","keep_alive":"5m"}'),
                       ("/v1/llm/api/tags", None)]:
        reply = await client.request("POST" if body else "GET", url + path, body, JSON)
        assert reply.code == 200, (path, reply.body)


@pytest_twisted.ensureDeferred
async def test_without_a_token_loopback_may_use_them_and_a_render_stays_followed(
        world, start_broker, client):
    """The default (no admin_token, loopback): a user interrupts their own
    render through gpumgr. The interrupt's answer releases nothing: the
    render is followed to its end by ComfyUI's queue, like any other."""
    service, url = await token_broker(world, start_broker, token=None)
    comfy = world["comfyui"]
    gate = Gate(comfy)
    reply = await client.request(
        "POST", url + "/v1/image",
        json.dumps({"prompt": {"1": {"class_type": "KSampler"}}}).encode(), JSON)
    assert reply.code == 200
    await wait_for(lambda: len(service.broker.renders) == 1)
    interrupt = await client.request("POST", url + "/v1/image/interrupt", b"{}", JSON)
    assert interrupt.code == 200
    assert residency(service, "comfyui") == "unknown"
    # The answer released nothing: the node that runs now has not ended, so
    # ComfyUI has not looked at the flag yet.
    assert len(service.broker.renders) == 1 and service.scheduler.stats().in_flight == 1
    await wait_for(lambda: gate.gates)  # its last node ended: the render ends at the gate
    assert len(service.broker.renders) == 1
    gate.release()
    # Its end comes from ComfyUI's queue, polled, once the render really stopped.
    await wait_for(lambda: not service.broker.renders)
    assert service.scheduler.stats().in_flight == 0


