"""Fixtures shared by tests/integration and tests/system: the simulated world and a broker."""

from __future__ import annotations

import pathlib

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.logger import globalLogPublisher

from gpumgr.service import GpumgrService
from gpumgr.testing import make_world, world_config
from tests.helpers import Client

_TESTS = pathlib.Path(__file__).parent


@pytest_twisted.async_yield_fixture
async def world(tmp_path):
    """The four simulated consumers on loopback, with a simulated GPU."""
    w = make_world(reactor, str(tmp_path))
    w.listen(reactor)
    yield w
    await w.stop()


@pytest_twisted.async_yield_fixture
async def client():
    c = Client()
    yield c
    await c.close()


@pytest_twisted.async_yield_fixture
async def start_broker():
    """start_broker(config) -> (service, base_url); stopped at teardown."""
    started = []

    async def start(config):
        service = GpumgrService(reactor, config)
        service.startService()
        started.append(service)
        port = await service.http.listening
        return service, f"http://127.0.0.1:{port.getHost().port}"

    yield start
    for service in started:
        await service.stopService()


@pytest_twisted.async_fixture
async def broker(world, start_broker):
    """A broker in front of `world`, fast probes, health already known."""
    service, url = await start_broker(world_config(world, health={"interval_s": 0.2}))
    await service.health.probe_all_now()
    return service, url


# Tests live by speed: tests/unit (no sockets, no processes, no sleeps; guarded in
# tests/unit/conftest.py), tests/integration (the real broker and the simulated services on
# loopback), tests/system (real twistd processes, the fault suite, the browser, packaging,
# the bench smoke). The directory sets the markers, so `-m "not integration and not slow"`
# selects exactly tests/unit.
_MARKS = {"integration": ("integration",), "system": ("system", "slow")}


def pytest_collection_modifyitems(items):
    for item in items:
        kind = item.path.relative_to(_TESTS).parts[0] if item.path.is_relative_to(_TESTS) else ""
        for mark in _MARKS.get(kind, ()):
            item.add_marker(getattr(pytest.mark, mark))


@pytest.fixture
def log_events():
    """The events logged under gpumgr.process while the test runs (test_process's two halves)."""
    events: list[dict] = []

    def observe(event: dict) -> None:
        if event.get("log_namespace") == "gpumgr.process":
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)
