"""One request target, parsed once (issue 14, point 1).

The unit tests pin the parser and prove, for any target it accepts, that
what twisted's Agent sends is the target that was classified. The
integration tests send raw request lines (an HTTP client library would
rewrite them) through the real broker to the simulated services on
loopback, and look at what reached them.
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet import defer

from gpumgr.target import parse_target
from tests.helpers import HeldStream, locked_broker, raw_exchange, wait_for

# -- the parser (pure) ---------------------------------------------------------------------


def test_segments_are_decoded_for_decisions_and_kept_as_sent():
    target = parse_target(b"/v1/llm/%61pi/gen%65rate;v=1?x=%20&y")
    rest = target.after(2)
    assert rest is not None
    assert rest.path == "/api/generate;v=1"
    assert [s.raw for s in rest.segments] == [b"%61pi", b"gen%65rate;v=1"]
    assert rest.segments[-1].name == "generate" and rest.segments[-1].params == "v=1"
    assert rest.origin_form() == b"/%61pi/gen%65rate;v=1?x=%20&y"
    assert target.raw_path == b"/v1/llm/%61pi/gen%65rate;v=1"


# -- through the real broker, raw request lines ------------------------------------------


GENERATE = b'{"model":"llama3","prompt":"x","stream":false}'
PROMPT = json.dumps({"prompt": {"1": {"class_type": "KSampler", "inputs": {}}}}).encode()


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("kind,target", [
    ("ollama", b"/v1/llm/api/generate;"),
    ("ollama", b"/v1/llm/api/generate#"),
    ("ollama", b"/v1/llm/api/generate#frag"),
    ("ollama", b"/v1/llm/api/generate;#x"),
    ("ollama", b"/v1/llm/api/generate;?a=1"),
    ("ollama", b"/v1/llm/api/chat;"),
    ("ollama", b"/v1/llm/v1/chat/completions;"),
    ("comfyui", b"/v1/image/prompt;"),
    ("comfyui", b"/v1/image/api/prompt;"),
])
async def test_gpu_work_variants_are_refused_never_sent_unscheduled(world, start_broker, kind,
                                                                     target):
    _, url = await locked_broker(world, start_broker)
    consumer = world[kind]
    before = len(consumer.client_requests())
    code, body = await raw_exchange(url, b"POST", target,
                                    PROMPT if kind == "comfyui" else GENERATE)
    assert code == 400 and json.loads(body)["error"]["code"] == "bad_path"
    assert len(consumer.client_requests()) == before  # today the service ran it, unscheduled


@pytest_twisted.ensureDeferred
async def test_a_semicolon_cannot_skip_the_lock_while_a_job_holds_it(world, start_broker,
                                                                     client):
    service, url = await locked_broker(world, start_broker)
    ollama = world["ollama"]
    held = await HeldStream(ollama).start(client, url)
    started = ollama.jobs_started
    code, _ = await raw_exchange(url, b"POST", b"/v1/llm/api/generate;", GENERATE)
    assert code == 400
    assert ollama.jobs_started == started  # no second GPU job beside the held one
    held.release()
    assert (await held.reply).code == 200


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("target", [
    b"/v1/llm/x/..;", b"/v1/llm/x/%2e%2e#", b"/audio/..#", b"/v1/llm/x/..;a",
    b"/v1/llm/x/%2e%2e;a/y", b"/audio/..;/x",
])
async def test_dot_segments_cannot_pass_with_a_parameter_or_a_fragment(world, start_broker,
                                                                       target):
    _, url = await locked_broker(world, start_broker)
    before = {name: len(world[name].client_requests()) for name in ("ollama", "mvoice")}
    code, body = await raw_exchange(url, b"GET", target)
    assert code == 400 and json.loads(body)["error"]["code"] == "bad_path"
    assert {name: len(world[name].client_requests()) for name in before} == before


@pytest_twisted.ensureDeferred
async def test_the_service_receives_exactly_the_classified_target(world, start_broker):
    service, url = await locked_broker(world, start_broker)
    ollama = world["ollama"]
    before = len(ollama.client_requests())
    code, _ = await raw_exchange(url, b"GET", b"/v1/llm/api/tags;v=1?x=%20&y")
    seen = ollama.client_requests()[before]
    # ';' is part of the segment: the service sees it, and so did the classification.
    assert seen.raw_target == b"/api/tags;v=1?x=%20&y"
    assert code == 404  # the simulated ollama, like gin, has no route /api/tags;v=1


@pytest_twisted.ensureDeferred
async def test_a_percent_encoded_route_is_scheduled_and_forwarded_as_sent(world, start_broker,
                                                                          client):
    service, url = await locked_broker(world, start_broker)
    ollama = world["ollama"]
    held = await HeldStream(ollama).start(client, url)
    reply = defer.ensureDeferred(raw_exchange(url, b"POST", b"/v1/llm/%61pi/generate", GENERATE))
    await wait_for(lambda: service.scheduler.stats().queue_depth == 1)  # it waits for the lock
    held.release()
    code, _ = await reply
    assert code == 200
    assert ollama.client_requests()[-1].raw_target == b"/%61pi/generate"
    assert ollama.client_requests()[-1].path == "/api/generate"


@pytest_twisted.ensureDeferred
async def test_the_access_log_names_the_parsed_target(world, start_broker):
    from twisted.logger import globalLogPublisher

    _, url = await locked_broker(world, start_broker)
    lines = []

    def observe(event):
        if event.get("log_namespace") == "gpumgr.access":
            lines.append(event["path"])

    globalLogPublisher.addObserver(observe)
    try:
        await raw_exchange(url, b"GET", b"/v1/llm/api/%74ags?x=1")
    finally:
        globalLogPublisher.removeObserver(observe)
    assert lines == ["/v1/llm/api/%74ags"]


@pytest_twisted.ensureDeferred
async def test_a_mixed_case_route_is_what_the_service_sees_too(world, start_broker, client):
    """gin routes case-sensitively: /API/generate is no generation there, so
    it is relayed at once, unscheduled, exactly as sent, and answered 404."""
    service, url = await locked_broker(world, start_broker)
    ollama = world["ollama"]
    held = await HeldStream(ollama).start(client, url)
    started = ollama.jobs_started
    code, _ = await raw_exchange(url, b"POST", b"/v1/llm/API/generate", GENERATE)
    assert code == 404 and ollama.jobs_started == started
    assert ollama.client_requests()[-1].raw_target == b"/API/generate"
    held.release()
    assert (await held.reply).code == 200
