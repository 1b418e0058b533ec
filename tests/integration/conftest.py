"""Fixtures of the integration tests: a world with a managed whisper process, a WebSocket upstream."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import protocol, reactor

from gpumgr.testing import make_world
from tests.helpers import FakeWebSocketServer


@pytest_twisted.async_yield_fixture
async def managed_world(tmp_path):
    """ollama, comfyui and mvoice simulated here; whisper is a process gpumgr owns."""
    w = make_world(reactor, str(tmp_path), total_mib=12000, managed_whisper=True)
    w.listen(reactor)
    yield w
    await w.stop()


@pytest_twisted.async_yield_fixture
async def ws_upstream():
    FakeWebSocketServer.instances = []
    FakeWebSocketServer.refuse = False
    factory = protocol.Factory.forProtocol(FakeWebSocketServer)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    yield f"http://127.0.0.1:{port.getHost().port}"
    await port.stopListening()
