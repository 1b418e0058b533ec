"""One request target, parsed once (issue 14, point 1).

The unit tests pin the parser and prove, for any target it accepts, that
what twisted's Agent sends is the target that was classified. The
integration tests send raw request lines (an HTTP client library would
rewrite them) through the real broker to the simulated services on
loopback, and look at what reached them.
"""

from __future__ import annotations

import json
from urllib.parse import unquote_to_bytes

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.web.client import URI

from gpumgr.errors import BadPath
from gpumgr.target import Segment, Target, forward_url, parse_target, routed_target
from tests.helpers import HeldStream, raw_exchange, wait_for
from tests.test_passthrough import locked_broker

# -- the parser (pure) ---------------------------------------------------------------------


@pytest.mark.parametrize("raw", [
    b"/v1/llm/api/generate#", b"/v1/llm/api/generate#frag", b"/v1/llm/api/generate;#x",
    b"/v1/llm/x/%2e%2e#", b"/audio/..#", b"/v1/status?x=1#y",
])
def test_a_fragment_anywhere_is_refused(raw):
    with pytest.raises(BadPath, match="fragment"):
        parse_target(raw)


@pytest.mark.parametrize("raw", [
    b"/v1/llm/api/generate;", b"/v1/llm/api/generate;?a=1", b"/v1/llm/api/chat;",
    b"/v1/llm/v1/chat/completions;", b"/v1/image/prompt;", b"/v1/image/api/prompt;",
    b"/v1/llm/x/..;",
])
def test_a_last_segment_ending_in_an_empty_parameter_is_refused(raw):
    # Agent would send it without its ';': not the path that was classified.
    with pytest.raises(BadPath, match="';'"):
        parse_target(raw)


@pytest.mark.parametrize("raw", [
    b"", b"*", b"http://evil.example/v1/llm", b"/a b", b"/caf\xc3\xa9", b"/a\x00",
    b"/a%zz", b"/a%2", b"/a%",
])
def test_targets_that_are_not_plain_origin_form_are_refused(raw):
    with pytest.raises(BadPath):
        parse_target(raw)


def test_segments_are_decoded_for_decisions_and_kept_as_sent():
    target = parse_target(b"/v1/llm/%61pi/gen%65rate;v=1?x=%20&y")
    rest = target.after(2)
    assert rest is not None
    assert rest.path == "/api/generate;v=1"
    assert [s.raw for s in rest.segments] == [b"%61pi", b"gen%65rate;v=1"]
    assert rest.segments[-1].name == "generate" and rest.segments[-1].params == "v=1"
    assert rest.origin_form() == b"/%61pi/gen%65rate;v=1?x=%20&y"
    assert target.raw_path == b"/v1/llm/%61pi/gen%65rate;v=1"


def test_case_is_kept():
    # gin and aiohttp route case-sensitively: /API/generate is not /api/generate.
    assert parse_target(b"/API/Generate").path == "/API/Generate"


@pytest.mark.parametrize("raw,problem", [
    (b"/x/..", "'..'"), (b"/x/%2e%2e", "'..'"), (b"/x/%2E.", "'..'"), (b"/x/..;a/y", "'..'"),
    (b"/x/.;a", "'..'"), (b"/x/%2e%2e%3bb", "'..'"), (b"/a//b", "empty"),
    (b"/a%2fb", "separators"), (b"/a%5cb", "separators"), (b"/a%00", "NUL"),
])
def test_unsafe_segments_have_a_problem(raw, problem):
    found = parse_target(raw).problem()
    assert found is not None and problem in found


def test_after_a_prefix():
    assert parse_target(b"/v1/llm").after(2) is None
    assert parse_target(b"/v1/llm/").after(2) is None
    assert parse_target(b"/v1/llm?x=1").query == b"x=1"
    assert parse_target(b"/v1/llm/a?").after(2) == Target(parse_target(b"/a").segments, b"")
    assert parse_target(b"/v1/llm/a?").after(2).origin_form() == b"/a"


def test_a_routed_path_keeps_its_own_query_then_the_requests():
    assert routed_target("/sleep?level=1", b"x=2").origin_form() == b"/sleep?level=1&x=2"
    assert routed_target("/api/generate", None).origin_form() == b"/api/generate"


def test_forward_url_is_what_agent_sends():
    target = parse_target(b"/api/tags;v=1?q")
    url = forward_url("http://127.0.0.1:11434", target)
    assert URI.fromBytes(url).originForm == b"/api/tags;v=1?q"
    # A value the parser never makes: Agent would drop its ';', so it is not sent.
    unsendable = Target((Segment.of(b"a"), Segment.of(b"b;")), None)
    with pytest.raises(BadPath, match="forwarded"):
        forward_url("http://127.0.0.1:1", unsendable)


_TARGET_CHARS = st.sampled_from(
    ["a", "b", "A", "/", ";", "?", "#", "%", "2", "e", "f", ".", "=", "&", "%2e", "%2f", "%3b",
     "%41", "..", "~", "+", ":", "@", "!", "$", "'", "(", "*", ",", "%zz", " "])


@settings(max_examples=400, deadline=None)
@given(st.lists(_TARGET_CHARS, max_size=14).map(lambda parts: "/" + "".join(parts)),
       st.sampled_from(["http://127.0.0.1:11434", "http://[::1]:8188", "http://h:1/base"]))
def test_agent_sends_exactly_the_classified_target(text, base):
    """For any target the parser accepts, Agent's request line is its origin
    form, and decoding that line as a service does gives the classified
    segments."""
    try:
        target = parse_target(text.encode("ascii"))
    except BadPath:
        return  # refused: nothing is forwarded
    url = forward_url(base, target)
    sent = URI.fromBytes(url).originForm
    base_path = URI.fromBytes(base.encode()).path
    assert sent == base_path + target.origin_form()
    sent_path = sent[len(base_path):].partition(b"?")[0]
    decoded = [unquote_to_bytes(s).decode("utf-8", "replace")
               for s in sent_path[1:].split(b"/")]
    assert decoded == [s.text for s in target.segments]
    assert parse_target(target.origin_form()).segments == target.segments


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
    before = len(consumer.requests)
    code, body = await raw_exchange(url, b"POST", target,
                                    PROMPT if kind == "comfyui" else GENERATE)
    assert code == 400 and json.loads(body)["error"]["code"] == "bad_path"
    assert len(consumer.requests) == before  # today the service ran it, unscheduled


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
    before = {name: len(world[name].requests) for name in ("ollama", "mvoice")}
    code, body = await raw_exchange(url, b"GET", target)
    assert code == 400 and json.loads(body)["error"]["code"] == "bad_path"
    assert {name: len(world[name].requests) for name in before} == before


@pytest_twisted.ensureDeferred
async def test_the_service_receives_exactly_the_classified_target(world, start_broker):
    service, url = await locked_broker(world, start_broker)
    ollama = world["ollama"]
    before = len(ollama.requests)
    code, _ = await raw_exchange(url, b"GET", b"/v1/llm/api/tags;v=1?x=%20&y")
    seen = ollama.requests[before]
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
    assert ollama.requests[-1].raw_target == b"/%61pi/generate"
    assert ollama.requests[-1].path == "/api/generate"


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
    assert ollama.requests[-1].raw_target == b"/API/generate"
    held.release()
    assert (await held.reply).code == 200
