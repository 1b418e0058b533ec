"""A hostile review of issue 14's points 1, 7 and 8, through a real broker on
loopback: what held, and what did not.

Each test here failed on the code it was written against. How ollama reads an
unload body (Go's encoding/json, `api.Duration` before and since 0.11.8) is
told in tests/unit/test_review_target.py, which checks those rules directly.
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet import defer

from tests.helpers import HeldStream, locked_broker, raw_exchange, token_broker, wait_for

# -- ollama's unload, told by its body as Go reads it ----------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_deeply_nested_unload_needs_the_token(world, start_broker):
    """Through the broker it was a 500 (an unhandled RecursionError)."""
    service, url = await token_broker(world, start_broker)
    before = len(world["ollama"].client_requests())
    body = b'{"model":"llama3","keep_alive":0,"x":' + b"[" * 3000 + b"]" * 3000 + b"}"
    code, answer = await raw_exchange(url, b"POST", b"/v1/llm/api/generate", body)
    assert code == 401 and json.loads(answer)["error"]["code"] == "unauthorized"
    assert len(world["ollama"].client_requests()) == before


@pytest_twisted.ensureDeferred
async def test_meszages_cannot_unload_without_the_token(world, start_broker):
    service, url = await token_broker(world, start_broker)
    body = '{"model":"llama3","meßages":[{"role":"user","content":"hi"}],"keep_alive":0}'
    code, answer = await raw_exchange(url, b"POST", b"/v1/llm/api/chat", body.encode())
    assert code == 401 and json.loads(answer)["error"]["code"] == "unauthorized"


# -- ollama's newer GPU routes ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("target,body", [
    (b"/v1/llm/v1/messages",
     b'{"model":"llama3","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}'),
    (b"/v1/llm/v1/responses", b'{"model":"llama3","input":"hi"}'),
])
async def test_anthropic_and_responses_requests_wait_for_the_lock(world, start_broker, client,
                                                                  target, body):
    """They ran beside the job holding the GPU: no lock at all."""
    service, url = await locked_broker(world, start_broker)
    ollama = world["ollama"]
    held = await HeldStream(ollama).start(client, url)
    started = ollama.jobs_started
    reply = defer.ensureDeferred(raw_exchange(url, b"POST", target, body))
    await wait_for(lambda: service.scheduler.stats().queue_depth == 1
                   or ollama.jobs_started > started)
    assert ollama.jobs_started == started and service.scheduler.stats().queue_depth == 1
    held.release()
    code, _ = await reply
    assert code == 200
    assert ollama.jobs_started == started + 1


# -- a method in lower case -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("kind,target", [
    ("mvoice", b"/v1/tts/unload"), ("mvoice", b"/v1/tts/speak"),
    ("comfyui", b"/v1/image/interrupt"), ("ollama", b"/v1/llm/api/generate"),
])
async def test_a_lower_case_method_is_refused_not_relayed(world, start_broker, kind, target):
    """`post` was classified as no control route and no GPU work (those are
    `POST`), and relayed as sent, without the token. RFC 9110 makes methods
    case-sensitive, but servers differ: Werkzeug (Flask) upper-cases the
    method, so `post /unload` unloads there, and `post /speak` runs beside
    the job holding the GPU."""
    service, url = await token_broker(world, start_broker)
    before = len(world[kind].client_requests())
    code, answer = await raw_exchange(url, b"post", target, b"{}")
    assert code == 400 and json.loads(answer)["error"]["code"] == "bad_request"
    assert len(world[kind].client_requests()) == before


# -- `;` parameters, for servers that strip them -----------------------------------------------


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("target", [b"/v1/tts/unload;v=1", b"/v1/tts/unload;jsessionid=x?y=1",
                                    b"/v1/image/interrupt;x", b"/v1/image/api;x/free"])
async def test_a_control_route_with_parameters_needs_the_token(world, start_broker, target):
    """gin and aiohttp keep `;` in a segment, but Tomcat, Jetty and Undertow
    strip `;params` before routing: to a TTS service on one of them,
    `/unload;v=1` is `/unload`. It went through without the token; a
    control route is one by its name with or without its parameters."""
    service, url = await token_broker(world, start_broker)
    kind = "mvoice" if b"/tts/" in target else "comfyui"
    before = len(world[kind].client_requests())
    code, answer = await raw_exchange(url, b"POST", target, b"{}")
    assert code == 401 and json.loads(answer)["error"]["code"] == "unauthorized"
    assert len(world[kind].client_requests()) == before


@pytest_twisted.ensureDeferred
async def test_gpu_work_with_parameters_waits_for_the_lock(world, start_broker, client):
    """The same for GPU work: `/api/generate;v=1` is not a route to gin (it
    answers 404), but is one to a server that strips parameters, so it
    waits for the lock rather than run beside the job holding it."""
    service, url = await locked_broker(world, start_broker)
    ollama = world["ollama"]
    held = await HeldStream(ollama).start(client, url)
    before = len(ollama.client_requests())
    reply = defer.ensureDeferred(raw_exchange(
        url, b"POST", b"/v1/llm/api/generate;v=1",
        b'{"model":"llama3","prompt":"x","stream":false}'))
    await wait_for(lambda: service.scheduler.stats().queue_depth == 1
                   or len(ollama.client_requests()) > before)
    assert service.scheduler.stats().queue_depth == 1
    held.release()
    code, _ = await reply
    assert code == 404 and ollama.client_requests()[-1].raw_target == b"/api/generate;v=1"
