"""A hostile review of issue 14's points 1, 7 and 8: what held, and what did not.

Each test here failed on the code it was written against. The ollama body
cases follow what ollama really does: gin's `ShouldBindJSON` is Go's
encoding/json (keys matched case-insensitively by Unicode *simple* folding,
unknown fields skipped without converting their numbers, nesting up to
10,000), and `api.Duration` (api/types.go), whose rule changed in 0.11.8
(#12041): before, a number was `int(t) * int(time.Second)` (int64 wraps)
and the unload test was `int(KeepAlive.Seconds()) == 0` (any duration under
a second); since, a number is `t * float64(time.Second)` and the test is
`Duration == 0`. gpumgr must call an unload what either version unloads.
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet import defer

from gpumgr.drivers import get_driver
from gpumgr.drivers.ollama import is_unload_request
from tests.helpers import HeldStream, wait_for
from tests.test_control_routes import token_broker
from tests.test_passthrough import locked_broker
from tests.test_target import raw_exchange

# -- ollama's unload, told by its body as Go reads it ----------------------------------------


def _generate(keep_alive: str) -> bytes:
    return b'{"model":"llama3","keep_alive":' + keep_alive.encode() + b"}"


@pytest.mark.parametrize("path,body", [
    # Go folds keys by simple folding: "meßages" is not "messages" to Go (ß
    # folds to ß), so ollama sees no messages and unloads; Python's casefold
    # made it "messages", non-empty, and so not an unload.
    ("/api/chat", '{"model":"llama3","meßages":[{"role":"user","content":"hi"}],'
                  '"keep_alive":0}'.encode()),
    ("/api/chat", '{"model":"llama3","meẞages":[{"role":"user","content":"hi"}],'
                  '"keep_alive":0}'.encode()),
    # Go skips an unknown field without converting its number; Python's int()
    # refuses over 4,300 digits (ValueError), which read as "not JSON".
    ("/api/generate", b'{"model":"llama3","keep_alive":0,"x":' + b"1" * 5000 + b"}"),
    # ollama < 0.11.8: int(KeepAlive.Seconds()) == 0 for any duration under 1 s.
    ("/api/generate", _generate('"500ms"')),
    ("/api/generate", _generate('"0.5s"')),
    ("/api/generate", _generate('"999999999ns"')),
    ("/api/chat", b'{"model":"llama3","messages":[],"keep_alive":"1ns"}'),
    # ollama < 0.11.8: int(t) * int(time.Second) wraps in int64. 2**55 s is
    # 0 ns, and on amd64 any t >= 2**63 converts to MinInt64, which is 0 too.
    ("/api/generate", _generate("36028797018963968")),
    ("/api/generate", _generate("36028797018963969")),  # the same float64 to Go
    ("/api/generate", _generate("1e300")),
    ("/api/generate", _generate("1e19")),
])
def test_ollama_unloads_gpumgr_misread(path, body):
    assert is_unload_request(path, body)


@pytest.mark.parametrize("path,body,unload", [
    # What held: Go's own folding (the Kelvin sign is a k to Go), escapes in
    # keys, the last duplicate winning, a BOM (Go refuses it: no unload).
    ("/api/generate", '{"model":"x","\u212aeep_alive":0}'.encode(), True),
    ("/api/generate", b'{"model":"x","keep\\u005falive":0}', True),
    ("/api/generate", b'{"model":"x","keep_alive":0,"KEEP_ALIVE":"5m"}', False),
    ("/api/generate", b'\xef\xbb\xbf{"model":"x","keep_alive":0}', False),
    # Not unloads in any version: a second or more, forever, a real prompt,
    # a dotless i (Go folds it to itself).
    ("/api/generate", _generate('"1s"'), False),
    ("/api/generate", _generate("1"), False),
    ("/api/generate", _generate("1e9"), False),
    ("/api/generate", _generate("-1"), False),
    ("/api/generate", _generate('"-0.5s"'), False),
    ("/api/generate", '{"model":"x","keep_al\u0131ve":0}'.encode(), False),
    ("/api/chat", b'{"model":"x","messages":[{"role":"user","content":"hi"}],"keep_alive":0}',
     False),
])
def test_ollama_bodies_that_held(path, body, unload):
    assert is_unload_request(path, body) is unload


def test_a_deeply_nested_body_is_no_crash():
    """Go decodes up to 10,000 levels; Python's json stops at about 1,000
    with RecursionError, which escaped the classification."""
    body = b'{"model":"llama3","keep_alive":0,"x":' + b"[" * 3000 + b"]" * 3000 + b"}"
    assert is_unload_request("/api/generate", body)


@pytest_twisted.ensureDeferred
async def test_a_deeply_nested_unload_needs_the_token(world, start_broker):
    """Through the broker it was a 500 (an unhandled RecursionError)."""
    service, url = await token_broker(world, start_broker)
    before = len(world["ollama"].requests)
    body = b'{"model":"llama3","keep_alive":0,"x":' + b"[" * 3000 + b"]" * 3000 + b"}"
    code, answer = await raw_exchange(url, b"POST", b"/v1/llm/api/generate", body)
    assert code == 401 and json.loads(answer)["error"]["code"] == "unauthorized"
    assert len(world["ollama"].requests) == before


@pytest_twisted.ensureDeferred
async def test_meszages_cannot_unload_without_the_token(world, start_broker):
    service, url = await token_broker(world, start_broker)
    body = '{"model":"llama3","meßages":[{"role":"user","content":"hi"}],"keep_alive":0}'
    code, answer = await raw_exchange(url, b"POST", b"/v1/llm/api/chat", body.encode())
    assert code == 401 and json.loads(answer)["error"]["code"] == "unauthorized"


# -- ollama's newer GPU routes ----------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/responses", "/v1/messages", "/v1/audio/transcriptions"])
def test_ollamas_newer_inference_routes_are_gpu_work(path):
    # server/routes.go: each runs ChatHandler (0.13.3, 0.14.0, 0.20.0).
    assert get_driver("ollama").is_gpu_work("POST", path)


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
    before = len(world[kind].requests)
    code, answer = await raw_exchange(url, b"post", target, b"{}")
    assert code == 400 and json.loads(answer)["error"]["code"] == "bad_request"
    assert len(world[kind].requests) == before


# -- a control route that loads is GPU work --------------------------------------------------


@pytest.mark.parametrize("path", ["/wake_up", "/collective_rpc"])
def test_waking_vllm_through_pass_through_waits_for_the_lock(path):
    """`POST /wake_up` puts vLLM's weights back on the GPU (and
    `/collective_rpc {"method": "reload_weights"}` loads them): through
    pass-through they were relayed at once, beside whatever job held the
    GPU. The admin token says who may; the lock says when. (whisper.cpp's
    `/load` already was GPU work.)"""
    assert get_driver("vllm").is_gpu_work("POST", path)
    assert not get_driver("vllm").is_gpu_work("POST", "/sleep")  # it frees; never waits


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
    before = len(world[kind].requests)
    code, answer = await raw_exchange(url, b"POST", target, b"{}")
    assert code == 401 and json.loads(answer)["error"]["code"] == "unauthorized"
    assert len(world[kind].requests) == before


@pytest_twisted.ensureDeferred
async def test_gpu_work_with_parameters_waits_for_the_lock(world, start_broker, client):
    """The same for GPU work: `/api/generate;v=1` is not a route to gin (it
    answers 404), but is one to a server that strips parameters, so it
    waits for the lock rather than run beside the job holding it."""
    service, url = await locked_broker(world, start_broker)
    ollama = world["ollama"]
    held = await HeldStream(ollama).start(client, url)
    before = len(ollama.requests)
    reply = defer.ensureDeferred(raw_exchange(
        url, b"POST", b"/v1/llm/api/generate;v=1",
        b'{"model":"llama3","prompt":"x","stream":false}'))
    await wait_for(lambda: service.scheduler.stats().queue_depth == 1
                   or len(ollama.requests) > before)
    assert service.scheduler.stats().queue_depth == 1
    held.release()
    code, _ = await reply
    assert code == 404 and ollama.requests[-1].raw_target == b"/api/generate;v=1"
