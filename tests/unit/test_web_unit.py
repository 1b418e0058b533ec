"""The Resource tree in memory: StubTreq drives a real Site with no sockets."""

import json

import pytest
import pytest_twisted
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet import defer
from twisted.internet.task import Clock, Cooperator
from twisted.web.http_headers import Headers

from gpumgr.broker import Broker, path_is_safe
from gpumgr.config import parse_config
from gpumgr.errors import QueueFull
from gpumgr.gpu import GpuSampler
from gpumgr.proxy import copy_response_headers, forward_request_headers
from gpumgr.registry import Health
from gpumgr.scheduler import Passthrough
from gpumgr.web import RootResource
from twisted.web.resource import Resource


class Echo(Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.seen = []

    def render(self, request):
        self.seen.append((request.method, request.uri, request.content.read()))
        request.setHeader(b"Content-Type", b"text/plain")
        return b"echo"


RAW = {
    "consumers": {
        "ollama": {"url": "http://ollama.test", "health": "/api/version",
                   "paths": {"llm": "/api/generate"}},
        "mvoice": {"url": "http://mvoice.test", "health": "/health", "paths": {"tts": "/tts"}},
    },
    "routes": {"llm": "ollama", "tts": "mvoice", "audio_proxy": "mvoice"},
}


class RefusingScheduler(Passthrough):
    def run(self, consumer, job, kind=None, control=False, request_id=None):
        return defer.fail(QueueFull("64 jobs are waiting", consumer, retry_after_s=2.5))


class NoHttp:
    """Control calls are not part of these tests."""

    def request(self, method, url, body=None, content_type=None):
        return defer.fail(AssertionError(f"unexpected control call {method} {url}"))


def make_stub(scheduler_cls=Passthrough):
    clock = Clock()
    config = parse_config(RAW, "unit.yaml")
    upstreams = {name: Echo() for name in config.consumers}
    agents = {name: RequestTraversalAgent(res) for name, res in upstreams.items()}
    cooperator = Cooperator(scheduler=lambda f: clock.callLater(0, f))
    gpu = GpuSampler(clock, "nvidia-smi", 2, 5, run=lambda *a: defer.Deferred())
    broker = Broker(clock, config, gpu, NoHttp(), lambda c: agents[c.name], cooperator)
    broker.scheduler = scheduler_cls(clock, broker.registry)
    stub = StubTreq(RootResource(broker))
    return stub, upstreams, broker.registry, clock, agents


async def call(stub, method, url, data=None, agents=(), clock=None):
    d = stub.request(method, url, data=data)
    # Drive both in-memory hops until the reply is complete.
    for _ in range(50):
        if clock is not None:
            clock.advance(0)
        for a in agents:
            a.flush()
        stub.flush()
        if d.called:
            break
    response = await d
    body = await response.content()
    return response, body


@pytest_twisted.ensureDeferred
async def test_unknown_routes_are_json_404():
    stub, *_ = make_stub()
    for path in ("/nope", "/v1/video", "/v1/llm/extra", "/v1"):
        response, body = await call(stub, "GET" if path == "/v1" else "POST", "http://gpumgr" + path)
        assert response.code == 404, path
        assert json.loads(body)["error"]["code"] == "unknown_route"
        assert response.headers.getRawHeaders("content-type") == ["application/json"]


@pytest_twisted.ensureDeferred
async def test_wrong_method_is_405_with_allow():
    stub, *_ = make_stub()
    response, body = await call(stub, "GET", "http://gpumgr/v1/llm")
    assert response.code == 405
    assert response.headers.getRawHeaders("allow") == ["POST"]
    assert json.loads(body)["error"] == {
        "code": "method_not_allowed", "message": "GET is not allowed here; use POST",
        "consumer": None}
    response, _ = await call(stub, "POST", "http://gpumgr/v1/status")
    assert response.code == 405 and response.headers.getRawHeaders("allow") == ["GET"]


@pytest_twisted.ensureDeferred
async def test_kind_without_route_is_404():
    stub, *_ = make_stub()
    response, body = await call(stub, "POST", "http://gpumgr/v1/image")
    assert response.code == 404 and b"no consumer is routed for 'image'" in body


@pytest_twisted.ensureDeferred
async def test_index_and_healthz():
    stub, *_ = make_stub()
    response, body = await call(stub, "GET", "http://gpumgr/")
    assert response.code == 200 and json.loads(body)["name"] == "gpumgr"
    response, body = await call(stub, "GET", "http://gpumgr/healthz")
    assert json.loads(body) == {"status": "ok"}


@pytest_twisted.ensureDeferred
async def test_request_routed_to_consumer_path_with_query():
    stub, upstreams, registry, clock, agents = make_stub()
    response, body = await call(stub, "POST", "http://gpumgr/v1/llm?x=1&y=2", data=b"payload",
                                agents=agents.values(), clock=clock)
    assert response.code == 200 and body == b"echo"
    assert upstreams["ollama"].seen == [(b"POST", b"/api/generate?x=1&y=2", b"payload")]
    assert upstreams["mvoice"].seen == []
    assert response.headers.getRawHeaders("x-gpumgr-consumer") == ["ollama"]
    assert registry["ollama"].total_requests == 1 and registry["ollama"].active == 0


@pytest_twisted.ensureDeferred
async def test_scheduler_refusal_is_rendered_with_retry_after():
    stub, upstreams, *_ = make_stub(RefusingScheduler)
    response, body = await call(stub, "POST", "http://gpumgr/v1/tts", data=b"x")
    assert response.code == 503
    assert json.loads(body)["error"] == {"code": "queue_full", "message": "64 jobs are waiting",
                                         "consumer": "mvoice"}
    assert response.headers.getRawHeaders("retry-after") == ["3"]
    assert upstreams["mvoice"].seen == []


@pytest_twisted.ensureDeferred
async def test_unhealthy_consumer_refused_before_scheduling():
    stub, upstreams, registry, *_ = make_stub()
    registry.record_probe("mvoice", 1.0, Health.DOWN, "connection refused")
    response, body = await call(stub, "POST", "http://gpumgr/v1/tts", data=b"x")
    assert response.code == 503
    err = json.loads(body)["error"]
    assert err["code"] == "consumer_unhealthy" and "connection refused" in err["message"]
    assert upstreams["mvoice"].seen == []


def test_request_headers_drop_hop_by_hop_and_connection_named():
    h = Headers({b"Connection": [b"close, X-Hop"], b"X-Hop": [b"1"], b"Host": [b"a"],
                 b"Transfer-Encoding": [b"chunked"], b"Upgrade": [b"h2c"], b"Expect": [b"100-continue"],
                 b"Proxy-Authorization": [b"x"], b"Trailer": [b"x"], b"Content-Length": [b"5"],
                 b"Authorization": [b"Bearer t"], b"Accept": [b"*/*"]})
    out = forward_request_headers(h, "192.0.2.7")
    names = {name.lower() for name, _ in out.getAllRawHeaders()}
    assert names == {b"authorization", b"accept", b"x-forwarded-for"}
    assert out.getRawHeaders(b"x-forwarded-for") == [b"192.0.2.7"]


def test_response_headers_keep_end_to_end_only():
    upstream = Headers({b"Content-Type": [b"audio/wav"], b"Keep-Alive": [b"timeout=5"],
                        b"Set-Cookie": [b"a=1", b"b=2"], b"Connection": [b"X-Private"],
                        b"X-Private": [b"s"], b"Content-Encoding": [b"gzip"]})
    out = Headers()
    copy_response_headers(upstream, out)
    assert out.getRawHeaders(b"set-cookie") == [b"a=1", b"b=2"]
    assert out.getRawHeaders(b"content-encoding") == [b"gzip"]
    assert not out.hasHeader(b"x-private") and not out.hasHeader(b"keep-alive")


@pytest.mark.parametrize("path,ok", [
    ("a.wav", True), ("dir/a.wav", True), ("a%20b.wav", True),
    ("..", False), ("x/../y", False), ("%2e%2e/x", False), ("%2E%2e", False), ("a%2fb", False),
    ("a%2Fb", False), ("a//b", False), ("", False), ("a%5cb", False), ("a%00", False), (".", False),
])
def test_audio_path_safety(path, ok):
    assert path_is_safe(path.encode().split(b"/")) is ok


class _FakeAddress:
    def __init__(self, host):
        self.host = host


class _FakeRequest:
    def __init__(self, host, authorization=None):
        self._host = host
        self._auth = authorization

    def getClientAddress(self):
        return _FakeAddress(self._host)

    def getHeader(self, name):
        return self._auth


@pytest.mark.parametrize("host,token,auth,code", [
    ("127.0.0.1", None, None, None),
    ("::1", None, None, None),
    ("192.0.2.10", None, None, "forbidden"),
    ("192.0.2.10", "t0k", b"Bearer t0k", None),
    ("127.0.0.1", "t0k", None, "unauthorized"),
    ("127.0.0.1", "t0k", b"Bearer nope", "unauthorized"),
    ("127.0.0.1", "t0k", b"Basic t0k", "unauthorized"),
])
def test_admin_access_rules(host, token, auth, code):
    from gpumgr.web import admin_refusal

    refusal = admin_refusal(_FakeRequest(host, auth), token)
    assert (refusal.code if refusal else None) == code
