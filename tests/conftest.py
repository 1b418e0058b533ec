from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor

from gpumgr.service import GpumgrService
from gpumgr.testing import make_world, world_config
from tests.helpers import Client


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


def pytest_collection_modifyitems(items):
    for item in items:
        if "world" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)
