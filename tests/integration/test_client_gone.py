"""A client that left is 499 in /metrics and in the access log (issue 14.10).

Before: one that left before the response headers was counted with code 0,
and one that hung up mid-stream was logged (and counted) as 200.
"""

from __future__ import annotations

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogPublisher

from gpumgr.testing import world_config
from tests.helpers import HeldStream, metric_value, parse_metrics, raw_open, url_port, wait_for


@pytest.fixture
def access_lines():
    lines: list[dict] = []

    def observe(event):
        if event.get("log_namespace") == "gpumgr.access":
            lines.append(event)

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


LLM = (b"POST /v1/llm HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
       b"Content-Length: 17\r\n\r\n{\"prompt\":\"hold\"}")


@pytest_twisted.ensureDeferred
async def test_a_client_that_hangs_up_mid_stream_is_499(world, start_broker, client,
                                                       access_lines):
    service, url = await start_broker(world_config(world, scheduler={"mode": "locked"}))
    held = HeldStream(world["ollama"], chunks=3)
    proto = await raw_open(url_port(url), LLM, timeout_s=30)
    await wait_for(lambda: 1 in held.gates and b"200 OK" in proto.data)
    proto.transport.abortConnection()  # gone after the headers and the first chunk
    # The job's line is written when it gives the GPU back: once the service
    # stopped working on it (issue 19), so let the simulated work end once
    # gpumgr has seen the client go.
    await wait_for(lambda: service.broker.abandoned.draining)
    held.release()
    await wait_for(lambda: access_lines)
    (line,) = access_lines
    assert (line["status"], line["kind"], line["consumer"]) == (499, "llm", "ollama")
    families = parse_metrics((await client.request("GET", url + "/metrics")).body.decode())
    assert metric_value(families["gpumgr_requests"], kind="llm", code="499") == 1
    assert not [s for s in families["gpumgr_requests"].samples
                if s.labels.get("code") in ("0", "200")]


class _Silent(Protocol):
    """An upstream that takes the request and never answers."""


@pytest_twisted.ensureDeferred
async def test_a_client_that_leaves_before_the_headers_is_499_not_0(world, start_broker,
                                                                   client, access_lines):
    port = reactor.listenTCP(0, Factory.forProtocol(_Silent), interface="127.0.0.1")
    try:
        config = world_config(world, health={"interval_s": 30})
        consumers = dict(config.consumers)
        consumers["ollama"] = attrs.evolve(consumers["ollama"],
                                           url=f"http://127.0.0.1:{port.getHost().port}")
        service, url = await start_broker(attrs.evolve(config, consumers=consumers))
        proto = await raw_open(url_port(url), LLM, timeout_s=30)
        await wait_for(lambda: service.scheduler.stats().in_flight == 1)
        proto.transport.abortConnection()
        await wait_for(lambda: access_lines)
        (line,) = access_lines
        assert line["status"] == 499
        families = parse_metrics((await client.request("GET", url + "/metrics")).body.decode())
        assert metric_value(families["gpumgr_requests"], kind="llm", code="499") == 1
        assert not [s for s in families["gpumgr_requests"].samples if s.labels.get("code") == "0"]
    finally:
        await port.stopListening()
