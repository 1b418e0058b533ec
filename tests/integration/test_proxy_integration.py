"""The real broker against simulated consumers, over loopback sockets."""

from __future__ import annotations

import hashlib
import json
import os

import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol

from gpumgr.testing import world_config
from tests.helpers import free_port, raw_open, url_port, wait_for


@pytest_twisted.ensureDeferred
async def test_body_and_content_type_reach_consumer_byte_for_byte(broker, world, client):
    _, url = broker
    body = os.urandom(50 * 1024 * 1024)  # 50 MB: spooled to disk, streamed out
    reply = await client.request(
        "POST", url + "/v1/stt?language=de&response_format=json", body,
        {"Content-Type": "multipart/form-data; boundary=xyz", "X-Trace": "abc"},
    )
    assert reply.code == 200, reply.body[:300]
    seen = world["whisper"].work_requests()[-1]
    assert seen.body_len == len(body)
    assert seen.body_sha256 == hashlib.sha256(body).hexdigest()
    assert seen.content_type == "multipart/form-data; boundary=xyz"
    assert seen.query == b"language=de&response_format=json"
    assert seen.path == "/inference"
    assert seen.headers.getRawHeaders(b"x-trace") == [b"abc"]
    assert seen.headers.getRawHeaders(b"x-forwarded-for") == [b"127.0.0.1"]
    assert reply.header("X-Gpumgr-Consumer") == b"whisper"
    assert reply.header("X-Gpumgr-Wait-Ms") is not None


@pytest_twisted.ensureDeferred
async def test_hop_by_hop_headers_are_not_forwarded(broker, world, client):
    _, url = broker
    reply = await client.request(
        "POST", url + "/v1/tts", b'{"text":"hi"}',
        {"Connection": "keep-alive, X-Secret-Hop", "X-Secret-Hop": "1", "Keep-Alive": "300",
         "Proxy-Authorization": "Basic Zm9vOmJhcg==", "TE": "trailers",
         "X-Forwarded-For": "10.1.2.3", "Content-Type": "application/json"},
    )
    assert reply.code == 200
    seen = world["mvoice"].work_requests()[-1].headers
    for name in (b"x-secret-hop", b"keep-alive", b"proxy-authorization", b"te", b"expect"):
        assert not seen.hasHeader(name), name
    assert seen.getRawHeaders(b"x-forwarded-for") == [b"10.1.2.3, 127.0.0.1"]
    assert seen.getRawHeaders(b"content-type") == [b"application/json"]


@pytest_twisted.ensureDeferred
async def test_ndjson_stream_arrives_chunk_by_chunk(broker, world, client):
    """Chunk i+1 is only written after the client has received chunk i.

    The consumer holds each chunk until the test releases it; if gpumgr
    buffered, the first chunk would never reach the client and the request
    would hang (and time out) instead of completing.
    """
    _, url = broker
    gates: dict[int, defer.Deferred] = {}
    received_before_release: list[int] = []
    n = 6
    world["ollama"].behaviour.stream_chunks = n
    world["ollama"].behaviour.stream_gate = lambda i: gates.setdefault(i, defer.Deferred())

    def on_chunk(collector, data):
        lines = b"".join(c for _, c in collector.chunks).count(b"\n")
        # Release the next chunk only once this one reached the client.
        received_before_release.append(lines)
        gate = gates.setdefault(lines, defer.Deferred())
        if lines < n and not gate.called:
            reactor.callLater(0, gate.callback, None)

    reply = await client.request(
        "POST", url + "/v1/llm", json.dumps({"model": "llama3", "prompt": "hi"}).encode(),
        {"Content-Type": "application/json"}, on_chunk=on_chunk,
    )
    assert reply.code == 200 and reply.complete
    lines = [json.loads(line) for line in reply.body.splitlines()]
    assert [c["seq"] for c in lines] == list(range(n))
    assert lines[-1]["done"] is True
    # Every chunk was delivered on its own, in order, before the next existed.
    assert received_before_release == list(range(1, n + 1))
    arrivals = [t for t, _ in reply.collector.chunks]
    sent = [c["sent_at"] for c in lines]
    assert all(a >= s for a, s in zip(arrivals, sent, strict=True))
    assert reply.header("Content-Type") == b"application/x-ndjson"


@pytest_twisted.ensureDeferred
async def test_audio_is_streamed_through_without_scheduling(broker, world, client):
    service, url = broker
    from gpumgr.testing import make_wav

    expected = make_wav(world["mvoice"].behaviour.audio_bytes)
    reply = await client.request("GET", url + "/audio/sample-1.wav")
    assert reply.code == 200 and reply.complete
    assert reply.body == expected
    assert len(reply.collector.chunks) > 1  # arrived as a stream
    assert reply.header("Content-Type") == b"audio/wav"
    assert service.scheduler.stats().total_jobs == 0


@pytest_twisted.ensureDeferred
async def test_audio_fetches_what_tts_produced(broker, world, client):
    _, url = broker
    tts = await client.request("POST", url + "/v1/tts", b'{"text":"hallo welt"}')
    audio_url = tts.header("X-Audio-Url").decode()
    again = await client.request("GET", url + audio_url)
    assert again.code == 200
    assert again.body == tts.body


@pytest_twisted.ensureDeferred
async def test_audio_traversal_is_refused_and_never_forwarded(broker, world, client):
    _, url = broker
    before = len(world["mvoice"].client_requests())
    for path in ("/audio/../etc/passwd", "/audio/%2e%2e/x", "/audio/a%2fb", "/audio//x",
                 "/audio/", "/audio/x/%2E%2E"):
        reply = await client.request("GET", url + path)
        assert reply.code == 400, path
        assert reply.json()["error"]["code"] == "bad_path"
    assert len(world["mvoice"].client_requests()) == before


@pytest_twisted.ensureDeferred
async def test_unhealthy_consumer_is_refused_fast_and_never_called(world, start_broker, client):
    world["ollama"].behaviour.healthy = True
    world["mvoice"].behaviour.healthy = False
    service, url = await start_broker(world_config(world, health={"interval_s": 30}))
    await service.health.probe_all_now()
    reply = await client.request("POST", url + "/v1/tts", b"text")
    assert reply.code == 503
    err = reply.json()["error"]
    assert err["code"] == "consumer_unhealthy" and err["consumer"] == "mvoice"
    assert "503" in err["message"]
    assert reply.header("Retry-After") == b"30"
    assert world["mvoice"].work_requests() == []
    # No silent fallback: the other kinds still go where they are routed.
    ok = await client.request("POST", url + "/v1/stt", b"audio")
    assert ok.code == 200 and ok.header("X-Gpumgr-Consumer") == b"whisper"


@pytest_twisted.ensureDeferred
async def test_whisper_loading_a_model_is_starting_not_down(world, start_broker, client):
    """whisper.cpp answers /health 503 {"status": "loading model"} while it
    swaps models: that is starting, and its requests are not refused."""
    world["whisper"].behaviour.healthy = False
    service, url = await start_broker(world_config(world, health={"interval_s": 30}))
    await service.health.probe_all_now()
    status = (await client.request("GET", url + "/v1/status")).json()
    assert status["consumers"]["whisper"]["health"] == "starting"
    ok = await client.request("POST", url + "/v1/stt", b"audio")
    assert ok.code == 200


def config_with(world, name: str, url: str | None = None, sections=None, **changes):
    """world_config with one consumer pointed elsewhere or otherwise changed."""
    import attrs

    config = world_config(world, **(sections or {}))
    consumers = dict(config.consumers)
    if url is not None:
        changes["url"] = url
    consumers[name] = attrs.evolve(consumers[name], **changes)
    return attrs.evolve(config, consumers=consumers)


@pytest_twisted.ensureDeferred
async def test_refused_connection_gives_502_and_marks_down(world, start_broker, client):
    config = config_with(world, "ollama", f"http://127.0.0.1:{free_port()}",
                         sections={"health": {"interval_s": 30}})
    service, url = await start_broker(config)
    await service.health.probe_all_now()
    # The probe already failed; force "unknown" to test the data-path failure.
    service.registry["ollama"].health = "unknown"
    reply = await client.request("POST", url + "/v1/llm", b'{"prompt":"x"}')
    assert reply.code == 502
    assert reply.json()["error"]["code"] == "upstream_unreachable"
    assert reply.json()["error"]["consumer"] == "ollama"
    assert service.registry["ollama"].health == "down"
    assert service.registry["ollama"].errors == 1
    again = await client.request("POST", url + "/v1/llm", b'{"prompt":"x"}')
    assert again.code == 503


@pytest_twisted.ensureDeferred
async def test_client_disconnect_mid_stream_cancels_upstream(broker, world, client):
    service, url = broker
    ollama = world["ollama"]
    ollama.behaviour.stream_chunks = 1000
    ollama.behaviour.chunk_interval_s = 0.01
    got_first = defer.Deferred()

    def on_chunk(collector, data):
        if not got_first.called:
            collector.transport.stopProducing()  # the client walks away
            got_first.callback(None)

    await client.request("POST", url + "/v1/llm", b'{"prompt":"long"}', on_chunk=on_chunk)
    await wait_for(lambda: ollama.jobs_cancelled == 1)
    assert world.active_jobs == 0
    await wait_for(lambda: service.scheduler.stats().in_flight == 0)
    assert service.registry["ollama"].active == 0


@pytest_twisted.ensureDeferred
async def test_status_shape(broker, world, client):
    service, url = broker
    await client.request("POST", url + "/v1/tts", b'{"text":"x"}')
    await service.gpu.sample_now()
    reply = await client.request("GET", url + "/v1/status")
    assert reply.code == 200
    assert reply.header("Content-Type") == b"application/json"
    status = reply.json()
    assert set(status) == {"broker", "gpu", "consumers", "scheduler"}
    assert status["broker"]["mode"] == "passthrough"
    assert isinstance(status["broker"]["uptime_s"], float)
    gpu = status["gpu"]
    assert gpu["available"] is True and gpu["error"] is None
    assert gpu["gpus"][0]["memory_total_mib"] == 24576
    assert gpu["gpus"][0]["memory_free_mib"] == world.gpu.free_mib
    assert {"pid", "name", "used_mib"} <= set(gpu["processes"][0])
    assert set(status["consumers"]) == {"ollama", "comfyui", "whisper", "mvoice"}
    mv = status["consumers"]["mvoice"]
    assert set(mv) == {"url", "health", "last_probe", "last_error", "loaded", "residency",
                       "gpu_resident_mib", "active", "total_requests", "errors", "last_used",
                       "driver", "process", "renders", "pin", "memory", "gpu", "gpu_auto"}
    assert (mv["gpu"], mv["gpu_auto"]) == ([0], False)  # one card: everyone lives on card 0
    assert mv["health"] == "ok" and mv["total_requests"] == 1 and mv["last_used"].endswith("Z")
    assert {"queue_depth", "in_flight", "total_jobs", "last_wait_ms", "last_run_ms",
            "evictions", "oldest_queued"} <= set(status["scheduler"])
    assert status["scheduler"]["total_jobs"] == 1


@pytest_twisted.ensureDeferred
async def test_declared_oversized_body_gets_413_before_upload(world, start_broker):
    config = world_config(world, limits={"max_body_mib": 1})
    service, url = await start_broker(config)
    upload = await raw_open(url_port(url), b"POST /v1/tts HTTP/1.1\r\nHost: x\r\n"
                            b"Content-Length: 5000000\r\nExpect: 100-continue\r\n\r\n",
                            timeout_s=None)
    raw = await upload.closed
    assert raw.startswith(b"HTTP/1.1 413 ")
    assert b"100 Continue" not in raw
    assert json.loads(raw.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "body_too_large"
    assert world["mvoice"].requests == [r for r in world["mvoice"].requests if r.path != "/tts"]


@pytest_twisted.ensureDeferred
async def test_chunked_oversized_body_gets_413(world, start_broker, client):
    config = world_config(world, limits={"max_body_mib": 1})
    service, url = await start_broker(config)
    # No Content-Length (producer of unknown length) forces chunked encoding.
    from twisted.web.client import Agent, HTTPConnectionPool
    from twisted.web.iweb import UNKNOWN_LENGTH
    from zope.interface import implementer
    from twisted.web.iweb import IBodyProducer

    @implementer(IBodyProducer)
    class Endless:
        length = UNKNOWN_LENGTH

        def startProducing(self, consumer):
            self._stopped = False
            for _ in range(40):  # 2.5 MiB in 64 KiB chunks
                consumer.write(b"x" * 65536)
            return defer.succeed(None)

        def stopProducing(self):
            pass

        def pauseProducing(self):
            pass

        def resumeProducing(self):
            pass

    pool = HTTPConnectionPool(reactor, persistent=False)
    try:
        response = await Agent(reactor, pool=pool).request(b"POST", (url + "/v1/tts").encode(),
                                                           None, Endless())
        from treq import content

        body = await content(response)
        assert response.code == 413
        assert json.loads(body)["error"]["code"] == "body_too_large"
    except Exception as e:  # the connection may be cut while still sending
        from twisted.web._newclient import ResponseNeverReceived, RequestTransmissionFailed

        assert isinstance(e, (ResponseNeverReceived, RequestTransmissionFailed)), e
    finally:
        await pool.closeCachedConnections()
    assert [r for r in world["mvoice"].requests if r.path == "/tts"] == []


@pytest_twisted.ensureDeferred
async def test_upstream_timeout_gives_504(world, start_broker, client):
    world["whisper"].behaviour.job_s = 5.0
    service, url = await start_broker(config_with(world, "whisper", request_timeout_s=0.2))
    reply = await client.request("POST", url + "/v1/stt", b"audio")
    assert reply.code == 504
    assert reply.json()["error"]["code"] == "upstream_timeout"
    assert service.registry["whisper"].errors == 1
    assert service.scheduler.stats().in_flight == 0


@pytest_twisted.ensureDeferred
async def test_upstream_breaking_mid_body_aborts_the_client(world, start_broker, client):
    """A truncated body must never look complete to the client."""

    class HalfThenDie(Protocol):
        def dataReceived(self, data):
            if b"\r\n\r\n" in data:
                self.transport.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                    b"Content-Length: 1000\r\n\r\n" + b'{"response":"partial"}\n'
                )
                reactor.callLater(0.05, self.transport.abortConnection)

    port = reactor.listenTCP(0, Factory.forProtocol(HalfThenDie), interface="127.0.0.1")
    try:
        service, url = await start_broker(
            config_with(world, "ollama", f"http://127.0.0.1:{port.getHost().port}"))
        reply = await client.request("POST", url + "/v1/llm", b'{"prompt":"x"}')
        assert reply.code == 200
        assert reply.body.startswith(b'{"response":"partial"}')
        assert not reply.complete  # connection aborted, not finished
        assert service.registry["ollama"].errors == 1
        assert service.scheduler.stats().in_flight == 0
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_content_encoding_passes_through_untouched(world, start_broker, client):
    import gzip

    payload = gzip.compress(b"hello " * 1000)

    class Gzipper(Protocol):
        def connectionMade(self):
            self.buf = b""

        def dataReceived(self, data):
            self.buf += data
            if b"\r\n\r\n" in self.buf:
                self.factory.seen.append(self.buf)
                self.transport.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Encoding: gzip\r\n"
                    b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
                self.transport.loseConnection()

    factory = Factory.forProtocol(Gzipper)
    factory.seen = []
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        service, url = await start_broker(
            config_with(world, "ollama", f"http://127.0.0.1:{port.getHost().port}"))
        reply = await client.request("POST", url + "/v1/llm", b"{}")
        assert reply.code == 200
        assert reply.header("Content-Encoding") == b"gzip"
        assert reply.body == payload
        posted = [raw for raw in factory.seen if raw.startswith(b"POST")]
        assert len(posted) == 1
        assert b"accept-encoding" not in posted[0].lower()
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_consumer_errors_pass_through_unchanged(broker, world, client):
    _, url = broker
    world.gpu.allocate("someone-else", 1, "/usr/bin/hog", world.gpu.free_mib)
    reply = await client.request("POST", url + "/v1/llm", b'{"prompt":"x"}')
    assert reply.code == 500
    assert "CUDA out of memory" in reply.json()["error"]
    assert reply.header("X-Gpumgr-Consumer") == b"ollama"
    assert world.gpu.oom_count == 1


@pytest_twisted.ensureDeferred
async def test_slow_client_pauses_the_upstream(world, start_broker):
    """Backpressure: a client that stops reading stops the upstream too.

    The upstream writes as long as its transport lets it. If gpumgr read on
    without a reader behind it, the upstream would never be paused and would
    push its whole 512 MiB into gpumgr's memory.
    """
    from zope.interface import implementer
    from twisted.internet.interfaces import IPushProducer

    total = 512 * 1024 * 1024
    block = b"z" * 65536

    @implementer(IPushProducer)
    class Firehose(Protocol):
        def connectionMade(self):
            self.factory.instances.append(self)
            self.sent = 0
            self.paused = False
            self.started = False
            self.buf = b""

        def dataReceived(self, data):
            self.buf += data
            if not self.started and b"\r\n\r\n" in self.buf and self.buf.startswith(b"POST"):
                self.started = True
                self.transport.registerProducer(self, True)
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                                     b"Content-Length: " + str(total).encode() + b"\r\n\r\n")
                self.resumeProducing()
            elif not self.started and b"\r\n\r\n" in self.buf:
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                self.buf = b""

        def pauseProducing(self):
            self.paused = True

        def resumeProducing(self):
            self.paused = False
            while not self.paused and self.sent < total:
                self.transport.write(block)
                self.sent += len(block)

        def stopProducing(self):
            self.paused = True

    factory = Factory.forProtocol(Firehose)
    factory.instances = []
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        service, url = await start_broker(
            config_with(world, "comfyui", f"http://127.0.0.1:{port.getHost().port}"))
        broker_port = int(url.rsplit(":", 1)[1])
        got_headers = defer.Deferred()

        class Sluggish(Protocol):
            def connectionMade(self):
                self.received = 0
                self.transport.write(b"POST /v1/image HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")

            def dataReceived(self, data):
                self.received += len(data)
                if not got_headers.called:
                    self.transport.pauseProducing()  # stop reading entirely
                    got_headers.callback(self)

        from twisted.internet.endpoints import TCP4ClientEndpoint

        await TCP4ClientEndpoint(reactor, "127.0.0.1", broker_port).connect(
            Factory.forProtocol(Sluggish))
        sluggish = await got_headers
        posts = lambda: [p for p in factory.instances if p.started]  # noqa: E731
        await wait_for(lambda: posts() and posts()[0].paused, timeout_s=20)
        from tests.helpers import sleep

        await sleep(0.5)
        upstream = posts()[0]
        assert upstream.paused
        # Only socket buffers' worth has left the upstream, not the body.
        assert upstream.sent < 64 * 1024 * 1024, upstream.sent
        sluggish.transport.abortConnection()
        await wait_for(lambda: service.scheduler.stats().in_flight == 0)
    finally:
        await port.stopListening()


class _SilentAfterHeaders(Protocol):
    """Answers a POST with headers and a little body, then says nothing more."""

    def dataReceived(self, data):
        if data.startswith(b"POST"):
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                                 b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        elif b"\r\n\r\n" in data:
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


@pytest_twisted.ensureDeferred
async def test_upstream_silent_mid_body_is_aborted_and_frees_the_lock(world, start_broker, client):
    port = reactor.listenTCP(0, Factory.forProtocol(_SilentAfterHeaders), interface="127.0.0.1")
    try:
        config = config_with(world, "ollama", f"http://127.0.0.1:{port.getHost().port}",
                             sections={"scheduler": {"mode": "locked"}}, body_idle_timeout_s=0.3)
        service, url = await start_broker(config)
        reply = await client.request("POST", url + "/v1/llm", b'{"prompt":"x"}')
        assert reply.code == 200 and reply.body == b"hello"
        assert not reply.complete  # aborted: the cut-off body does not look complete
        assert service.registry["ollama"].errors == 1
        assert "no body data for 0.3s" in service.registry["ollama"].last_error
        assert service.scheduler.stats().in_flight == 0
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_client_that_stops_reading_is_dropped_and_frees_the_lock(world, start_broker):
    ollama = world["ollama"]
    ollama.behaviour.stream_chunks = 100000
    ollama.behaviour.chunk_interval_s = 0
    config = world_config(world, scheduler={"mode": "locked"},
                          limits={"client_stall_timeout_s": 0.5})
    service, url = await start_broker(config)
    await service.health.probe_all_now()
    got_headers = defer.Deferred()

    class Stopper(Protocol):
        def connectionMade(self):
            body = b'{"prompt":"endless"}'
            self.transport.write(b"POST /v1/llm HTTP/1.1\r\nHost: x\r\nContent-Length: "
                                 + str(len(body)).encode() + b"\r\n\r\n" + body)

        def dataReceived(self, data):
            self.factory.received.append(data)
            if not got_headers.called:
                self.transport.pauseProducing()  # stop reading
                got_headers.callback(self)

        def connectionLost(self, reason):
            self.factory.lost.append(reason)

    from twisted.internet.endpoints import TCP4ClientEndpoint

    factory = Factory.forProtocol(Stopper)
    factory.lost = []
    factory.received = []
    await TCP4ClientEndpoint(reactor, "127.0.0.1", int(url.rsplit(":", 1)[1])).connect(factory)
    stopper = await got_headers
    assert service.scheduler.stats().in_flight == 1
    await wait_for(lambda: service.scheduler.stats().in_flight == 0, timeout_s=20)
    await wait_for(lambda: ollama.jobs_cancelled == 1)
    # A paused transport cannot notice the close; read again to see it.
    stopper.transport.resumeProducing()
    await wait_for(lambda: factory.lost)
    assert not b"".join(factory.received).endswith(b"0\r\n\r\n")  # never finished
    assert world.active_jobs == 0


@pytest_twisted.ensureDeferred
async def test_consumer_answering_before_reading_the_body(world, start_broker, client):
    """Like nginx's `return`: the answer comes while gpumgr is still sending.

    The client gets the answer; gpumgr stops sending the (now closed) spooled
    body instead of Agent logging "read of closed file".
    """
    from twisted.logger import globalLogPublisher

    class EarlyAnswer(Protocol):
        def dataReceived(self, data):
            if data.startswith(b"POST") and not getattr(self, "answered", False):
                self.answered = True
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nearly")
            elif data.startswith(b"GET"):
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    errors = []

    def observer(event):
        if event.get("log_failure") is not None or event.get("log_level").name in ("error", "critical"):
            errors.append(event)

    globalLogPublisher.addObserver(observer)
    port = reactor.listenTCP(0, Factory.forProtocol(EarlyAnswer), interface="127.0.0.1")
    try:
        service, url = await start_broker(
            config_with(world, "whisper", f"http://127.0.0.1:{port.getHost().port}",
                        sections={"scheduler": {"mode": "locked"}}))
        reply = await client.request("POST", url + "/v1/stt", os.urandom(20 * 1024 * 1024))
        assert reply.code == 200 and reply.body == b"early"
        await wait_for(lambda: service.scheduler.stats().in_flight == 0)
        from tests.helpers import sleep

        await sleep(0.3)  # let any stray producer iteration run
        assert errors == [], [e.get("log_format") for e in errors]
    finally:
        globalLogPublisher.removeObserver(observer)
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_head_reaches_the_consumer_as_head(broker, world, client):
    _, url = broker
    reply = await client.request("HEAD", url + "/audio/sample-1.wav")
    assert reply.code == 200 and reply.body == b""
    assert world["mvoice"].client_requests()[-1].method == "HEAD"
