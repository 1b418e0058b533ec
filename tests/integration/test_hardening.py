"""The layer below the Resource tree against slow, greedy and malformed clients.

Unit tests drive a real GpumgrSite over StringTransport with a
MemoryReactorClock, so every deadline is reached by advancing the clock.
Integration tests (and the hypothesis fuzzing) use real loopback sockets
against the running broker.
"""

from __future__ import annotations

import json
import os

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.logger import LogLevel, globalLogPublisher

from gpumgr.limits import Phase
from gpumgr.testing import world_config
from gpumgr.testing.websocket import ConnectionClosed, HandshakeError, connect
from tests.helpers import Client, raw_open, url_port, wait_for


# -- a GpumgrSite in memory --------------------------------------------------------------


GET_HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: gpumgr\r\n\r\n"


# -- real sockets -------------------------------------------------------------------------------


async def _exchange(port: int, payload: bytes, timeout_s: float = 10.0) -> tuple[bytes, bool]:
    proto = await raw_open(port, payload, timeout_s)
    await proto.closed
    return proto.data, proto.timed_out


@pytest_twisted.ensureDeferred
async def test_idle_sockets_up_to_the_cap_do_not_keep_healthz_out(world, start_broker, client):
    service, url = await start_broker(world_config(world, limits={"max_connections": 8}))
    port = url_port(url)
    idle = [await raw_open(port, GET_HEALTHZ, timeout_s=30) for _ in range(8)]
    try:
        await wait_for(lambda: all(p.data.endswith(b'"ok"}') for p in idle))
        for _ in range(3):
            status = await client.request("GET", url + "/v1/status")
            assert status.code == 200
            fresh = Client()
            try:
                reply = await fresh.request("GET", url + "/healthz")
            finally:
                await fresh.close()
            assert reply.code == 200 and reply.json() == {"status": "ok"}
        assert service.site.refusals["shed"] >= 1  # room was made by shedding idle ones
        assert len(service.site.connections) <= 8
    finally:
        for p in idle:
            p.transport.abortConnection()


@pytest_twisted.ensureDeferred
async def test_busy_uploads_leave_the_reserve_to_healthz(world, start_broker, client):
    """Uploads beyond max_connections - reserved_connections get 503; /healthz still 200.

    (Before issue 14.9 this test pinned the opposite: four uploads took all four
    connections and /healthz got 503.)
    """
    limits = {"max_connections": 4, "reserved_connections": 2}
    service, url = await start_broker(world_config(world, limits=limits))
    port = url_port(url)
    uploads = [await raw_open(port, b"POST /v1/tts HTTP/1.1\r\nHost: x\r\nContent-Length: 100"
                                 b"\r\n\r\n0123456789", timeout_s=30) for _ in range(4)]
    try:
        await wait_for(lambda: sum(p.data.startswith(b"HTTP/1.1 503 ") for p in uploads) == 2)
        assert [c._phase for c in service.site.connections._open] == [Phase.BODY] * 2
        refused = next(p for p in uploads if p.data)
        assert b'"too_many_connections"' in refused.data
        assert b"Retry-After: 1" in refused.data
        for _ in range(3):
            reply = await client.request("GET", url + "/healthz")
            assert reply.code == 200
            assert (await client.request("GET", url + "/v1/status")).code == 200
    finally:
        for p in uploads:
            p.transport.abortConnection()
        await client.close()  # its kept-alive connection too
    await wait_for(lambda: len(service.site.connections) == 0)
    assert service.site.spool.used_bytes == 0
    fresh = Client()
    try:
        assert (await fresh.request("GET", url + "/healthz")).code == 200
    finally:
        await fresh.close()


PASS_COMFY = {"comfyui": {"passthrough": True}}


async def _tunnel(world, url: str):
    ws = await connect(reactor, url.replace("http://", "ws://") + "/v1/image/ws?clientId=t",
                       timeout_s=10)
    hello = await ws.next_json(timeout_s=10)
    assert hello["type"] == "status"
    return ws


@pytest_twisted.ensureDeferred
async def test_tunnels_never_take_the_reserved_connections(world, start_broker):
    """Issue 14.9: idle WebSocket tunnels filled max_connections; /healthz, /v1/status 503."""
    config = world_config(world, consumers=PASS_COMFY, health={"interval_s": 30},
                          limits={"max_connections": 8, "reserved_connections": 2})
    service, url = await start_broker(config)
    tunnels, refused = [], []
    try:
        for _ in range(8):
            try:
                tunnels.append(await _tunnel(world, url))
            except HandshakeError as e:
                refused.append(e)
        assert len(tunnels) == 6 and len(refused) == 2
        assert [e.code for e in refused] == [503, 503]
        for _ in range(2):
            for path in ("/healthz", "/v1/status", "/metrics"):
                fresh = Client()
                try:
                    reply = await fresh.request("GET", url + path)
                finally:
                    await fresh.close()
                assert reply.code == 200, path
    finally:
        for ws in tunnels:
            ws.abort()
    await wait_for(lambda: not service.broker.tunnels)


@pytest_twisted.ensureDeferred
async def test_tunnels_have_their_own_cap(world, start_broker):
    config = world_config(world, consumers=PASS_COMFY, health={"interval_s": 30},
                          limits={"max_tunnels": 2})
    service, url = await start_broker(config)
    tunnels = [await _tunnel(world, url), await _tunnel(world, url)]
    try:
        with pytest.raises(HandshakeError) as e:
            await _tunnel(world, url)
        assert e.value.code == 503 and b"limits.max_tunnels" in e.value.body
        assert world["comfyui"].open_sockets == 2
    finally:
        for ws in tunnels:
            ws.abort()


@pytest_twisted.ensureDeferred
async def test_an_idle_tunnel_is_closed(world, start_broker):
    """Issue 14.9: a tunnel with no traffic was still open after 75 s."""
    config = world_config(world, consumers=PASS_COMFY, health={"interval_s": 30},
                          limits={"tunnel_idle_timeout_s": 1.0})
    service, url = await start_broker(config)
    ws = await _tunnel(world, url)
    info = await ws.when_closed().addTimeout(10, reactor)
    assert info.code == 1006  # gpumgr closed the TCP connection under the socket
    with pytest.raises(ConnectionClosed):
        await ws.next_message(timeout_s=1)
    await wait_for(lambda: not service.broker.tunnels and world["comfyui"].open_sockets == 0)


@pytest_twisted.ensureDeferred
async def test_a_dripping_upload_gets_408_over_a_real_socket(world, start_broker):
    config = world_config(world, limits={"body_idle_timeout_s": 0.3, "min_body_rate_kib_s": 0})
    service, url = await start_broker(config)
    raw, timed_out = await _exchange(
        url_port(url), b"POST /v1/stt HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nabc")
    assert not timed_out and raw.startswith(b"HTTP/1.1 408 ")
    assert json.loads(raw.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
    assert service.site.spool.used_bytes == 0
    assert [r for r in world["whisper"].requests if r.path == "/inference"] == []


@pytest_twisted.ensureDeferred
async def test_the_spool_never_leaks(world, start_broker, client):
    config = world_config(world, limits={"max_body_mib": 1, "max_spool_mib": 2})
    service, url = await start_broker(config)
    port = url_port(url)
    body = b"w" * 600_000
    complete = [client.request("POST", url + "/v1/stt", body) for _ in range(3)]
    cut = [await raw_open(port, b"POST /v1/stt HTTP/1.1\r\nHost: x\r\nContent-Length: 900000\r\n"
                             b"\r\n" + b"c" * 1000) for _ in range(2)]
    await wait_for(lambda: service.site.spool.used_bytes >= 1_800_000)
    for p in cut:
        p.transport.abortConnection()  # the client leaves mid-upload
    replies = [await defer.ensureDeferred(r) for r in complete]
    assert {r.code for r in replies} <= {200, 507}
    assert any(r.code == 200 for r in replies)
    await wait_for(lambda: service.site.spool.used_bytes == 0)


@pytest_twisted.ensureDeferred
async def test_head_on_the_real_get_routes(broker):
    service, url = broker
    for path in (b"/healthz", b"/v1/status", b"/"):
        raw, _ = await _exchange(url_port(url), b"HEAD " + path + b" HTTP/1.1\r\nHost: x\r\n"
                                             b"Connection: close\r\n\r\n")
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), (path, head)
        assert b"Content-Length: " in head and body == b""


# -- fuzzing over real sockets ---------------------------------------------------------------------

_EXAMPLES = int(os.environ.get("GPUMGR_FUZZ_EXAMPLES", "150"))
_SOCKET_FUZZ = settings(
    max_examples=_EXAMPLES, deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

_LINE_BYTES = st.binary(max_size=24).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
# Mostly well-formed, sometimes junk: junk alone is refused by the parser at once
# and never reaches the code behind it.
_METHODS = st.one_of(
    st.sampled_from([b"GET", b"GET", b"HEAD", b"POST", b"POST"]),
    st.sampled_from([b"PUT", b"DELETE", b"OPTIONS", b"TRACE", b"CONNECT", b"PATCH", b"PRI",
                     b"get", b""]),
    _LINE_BYTES)
_PATH_STARTS = st.sampled_from([
    b"/", b"/healthz", b"/v1/status", b"/v1/llm", b"/v1/tts", b"/v1/stt", b"/v1/image", b"/v1",
    b"/audio/", b"/audio/", b"/audio/tts-00001.wav", b"/v1/consumers/mvoice/unload",
    b"/v1/consumers/", b"*", b"http://gpumgr/healthz", b"//", b"/..", b"/%2e%2e/", b"/v1/%00", b"",
])
_PATH_TAILS = st.lists(st.sampled_from([
    b"", b"/", b"x", b"..", b"%2f", b"%", b"%zz", b"?", b"?a=1&b", b"#f", b";p", b"\xff", b"\x7f",
    b"\x80", b"\xb0", b"\x01", b" ", b"\t", b"%00", b"\\", b"~", b"a" * 64,
]), max_size=6).map(b"".join)
_TARGETS = st.one_of(st.tuples(_PATH_STARTS, _PATH_TAILS).map(b"".join),
                     st.tuples(_PATH_STARTS, _PATH_TAILS).map(b"".join), _LINE_BYTES)
_VERSIONS = st.one_of(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]), st.sampled_from([
    b"HTTP/2.0", b"HTTP/1.1 ", b"", b"http/1.1", b"HTTP/1.10", b"HTTP/0.9"]))
_SEPARATORS = st.sampled_from([b" "] * 6 + [b"  ", b"\t"])
#: Bytes for a request target: mostly printable ASCII, a third anything but space,
#: CR and LF (which would change the framing rather than the path).
_PATH_BYTES = st.lists(st.one_of(st.integers(0x21, 0x7e), st.integers(0x21, 0x7e),
                                 st.integers(0, 255).filter(lambda b: b not in b" \r\n")),
                       max_size=40).map(bytes)

_HEADER_NAMES = st.one_of(
    st.sampled_from([b"Accept", b"Authorization", b"Content-Type", b"X-Forwarded-For", b"Cookie",
                     b"Upgrade", b"TE", b"Trailer", b"Keep-Alive", b"Proxy-Authorization",
                     b"X-Gpumgr-Consumer", b"Accept-Encoding", b"Range", b"If-None-Match"]),
    st.binary(min_size=0, max_size=12)).map(
        lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b":", b""))
_RESERVED = {b"host", b"connection", b"content-length", b"transfer-encoding", b"expect"}
_HEADER_VALUES = st.one_of(_LINE_BYTES, st.sampled_from([
    b"", b" ", b"Bearer ", b"Bearer x", b"websocket", b"gzip, deflate", b"bytes=0-1",
    b"\x00", b"\xff\xfe", b"a" * 2000, b"=?utf-8?q?x?=",
]))
_HEADERS = st.lists(st.tuples(_HEADER_NAMES, _HEADER_VALUES), max_size=12).map(
    lambda hs: [(n, v) for n, v in hs if n.strip().lower() not in _RESERVED])


def _in_simulator(event: dict) -> bool:
    """A failure raised inside gpumgr.testing's simulated consumers, not in gpumgr.

    (They choke on some junk that gpumgr rightly passes through, e.g. a
    non-UTF-8 Content-Type; their 500 reaches the client as the consumer's.)
    """
    failure = event.get("log_failure")
    frames = failure.frames if failure is not None else []
    return any(os.sep + os.path.join("gpumgr", "testing") + os.sep in f[1] for f in frames)


@pytest.fixture
def logged_errors():
    """Error-level events and failures gpumgr logged while the test runs."""
    seen: list[dict] = []

    def observe(event):
        if (event.get("log_failure") is not None or event.get("log_level") in (
                LogLevel.error, LogLevel.critical)) and not _in_simulator(event):
            seen.append(event)

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


def _check_reply(raw: bytes, timed_out: bool, sent: bytes, head_request: bool) -> None:
    assert not timed_out, f"no answer to {sent!r}"
    assert raw.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")), (sent, raw[:200])
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    names = {line.split(b":", 1)[0].lower() for line in head.split(b"\r\n")[1:]}
    from_consumer = b"x-gpumgr-consumer" in names
    assert status != 500 or from_consumer, (sent, raw[:300])
    if status >= 400 and not from_consumer and not head_request and b"chunked" not in head:
        error = json.loads(body)["error"]
        assert set(error) == {"code", "message", "consumer"}, (sent, raw[:300])


async def _healthz_ok(port: int) -> None:
    raw, timed_out = await _exchange(
        port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert not timed_out and raw.startswith(b"HTTP/1.1 200 ")


# pytest-twisted runs each hypothesis example of an async test inside the reactor.
@_SOCKET_FUZZ
@given(method=_METHODS, sep1=_SEPARATORS, target=_TARGETS, sep2=_SEPARATORS, version=_VERSIONS)
@pytest_twisted.ensureDeferred
async def test_fuzzed_request_lines_never_break_the_broker(broker, logged_errors, method, sep1,
                                                          target, sep2, version):
    port = url_port(broker[1])
    line = method + sep1 + target + sep2 + version
    sent = line + b"\r\nHost: fuzz\r\nConnection: close\r\n\r\n"
    raw, timed_out = await _exchange(port, sent)
    _check_reply(raw, timed_out, sent, head_request=method == b"HEAD")
    await _healthz_ok(port)
    assert logged_errors == []


@_SOCKET_FUZZ
@given(method=st.sampled_from([b"GET", b"HEAD", b"POST"]),
       prefix=st.sampled_from([b"/audio/", b"/audio/", b"/audio/", b"/v1/", b"/v1/consumers/",
                               b"/", b""]),
       path=_PATH_BYTES)
@pytest_twisted.ensureDeferred
async def test_fuzzed_paths_never_break_the_broker(broker, logged_errors, method, prefix, path):
    port = url_port(broker[1])
    sent = (method + b" " + prefix + path + b" HTTP/1.1\r\nHost: fuzz\r\n"
            b"Connection: close\r\n\r\n")
    raw, timed_out = await _exchange(port, sent)
    _check_reply(raw, timed_out, sent, head_request=method == b"HEAD")
    await _healthz_ok(port)
    assert logged_errors == []


@_SOCKET_FUZZ
@given(target=st.sampled_from([b"/healthz", b"/v1/status", b"/v1/tts", b"/audio/x.wav",
                               b"/v1/consumers/mvoice/load"]), headers=_HEADERS)
@pytest_twisted.ensureDeferred
async def test_fuzzed_headers_never_break_the_broker(broker, logged_errors, target, headers):
    port = url_port(broker[1])
    method = b"GET" if target in (b"/healthz", b"/v1/status", b"/audio/x.wav") else b"POST"
    sent = (method + b" " + target + b" HTTP/1.1\r\nHost: fuzz\r\nConnection: close\r\n"
            + b"".join(n + b": " + v + b"\r\n" for n, v in headers) + b"\r\n")
    raw, timed_out = await _exchange(port, sent)
    _check_reply(raw, timed_out, sent, head_request=False)
    await _healthz_ok(port)
    assert logged_errors == []
