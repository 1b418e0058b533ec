"""Pass-through edges: percent-encoded GPU routes are still scheduled, HEAD stays HEAD, /metrics refuses wrong methods in JSON.

Found in review: each test is the smallest reproduction of one defect.
"""

from __future__ import annotations

import pytest_twisted

from gpumgr.target import parse_target
from tests.helpers import locked_broker


# -- pass-through -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_percent_encoded_gpu_routes_are_still_scheduled(world, start_broker):
    service, _ = await locked_broker(world, start_broker)
    assert service.broker.route("image", "POST", parse_target(b"/%70rompt")).scheduled is True
    assert service.broker.route("llm", "POST", parse_target(b"/api/%67enerate")).scheduled


@pytest_twisted.ensureDeferred
async def test_head_reaches_the_consumer_as_head(world, start_broker, client):
    _, url = await locked_broker(world, start_broker)
    before = len(world["mvoice"].client_requests())
    reply = await client.request("HEAD", url + "/v1/tts/health")
    assert reply.code == 200
    assert [r.method for r in world["mvoice"].client_requests()[before:]] == ["HEAD"]


@pytest_twisted.ensureDeferred
async def test_metrics_refuses_wrong_methods_in_json(broker, client):
    _, url = broker
    for method in ("POST", "DELETE"):
        reply = await client.request(method, url + "/metrics")
        assert reply.code == 405 and reply.header("Content-Type") == b"application/json"
