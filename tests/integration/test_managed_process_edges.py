"""A managed process wrapped by a shell, and a reload while it is busy.

Found in review: each test is the smallest reproduction of one defect.
"""

from __future__ import annotations

import os
import shlex
import signal

import pytest_twisted
import yaml
from twisted.internet import defer

from gpumgr.config import load_config
from gpumgr.process import ProcessState
from gpumgr.testing import managed_whisper_entry, world_config, world_config_raw
from tests.helpers import transcribe, wait_for


# -- managed processes ---------------------------------------------------------------------


def _kill_simulated_servers(world) -> None:
    for allocation in world.gpu.external_allocations():
        try:
            os.kill(allocation.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest_twisted.ensureDeferred
async def test_stopping_a_wrapped_server_stops_the_server(managed_world,  # noqa: F811
                                                          start_broker, client):
    entry = managed_whisper_entry(managed_world)
    argv = entry["process"]["command"]
    entry["process"]["command"] = ["/bin/sh", "-c", shlex.join(argv) + "; exit $?"]
    config = world_config(managed_world, managed={"whisper": entry},
                          scheduler={"mode": "locked"}, health={"interval_s": 30},
                          gpu={"unload_settle_s": 0.5})
    service, url = await start_broker(config)
    try:
        assert (await transcribe(client, url)).code == 200
        unloaded = await client.request("POST", url + "/v1/consumers/whisper/unload")
        assert unloaded.code == 200 and unloaded.json()["loaded"] is False
        assert managed_world.gpu.external_allocations() == []  # today: still 1500 MiB held
    finally:
        _kill_simulated_servers(managed_world)


@pytest_twisted.ensureDeferred
async def test_reloading_a_busy_process_block_never_runs_two_servers(managed_world,  # noqa: F811
                                                                    start_broker, client,
                                                                    tmp_path):
    entry = managed_whisper_entry(managed_world, job_s=1.0)
    path = tmp_path / "gpumgr.yaml"
    raw = world_config_raw(managed_world, managed={"whisper": entry},
                           scheduler={"mode": "locked"}, health={"interval_s": 30})
    path.write_text(yaml.safe_dump(raw))
    service, url = await start_broker(load_config(str(path)))
    try:
        first = defer.ensureDeferred(transcribe(client, url))
        await wait_for(lambda: service.broker.processes["whisper"].state
                       is ProcessState.RUNNING)
        second = defer.ensureDeferred(transcribe(client, url))
        await wait_for(lambda: service.scheduler.stats().queue_depth == 1)
        raw["consumers"]["whisper"]["process"]["env"] = {"WHISPER_THREADS": "4"}
        path.write_text(yaml.safe_dump(raw))
        assert (await client.request("POST", url + "/v1/admin/reload")).code == 200
        assert (await first).code == 200
        assert (await second).code == 200
        # The second request was served by the process of the new config, alone.
        serving = [a.pid for a in managed_world.gpu.external_allocations()]
        assert serving == [service.broker.processes["whisper"].pid]
    finally:
        _kill_simulated_servers(managed_world)
