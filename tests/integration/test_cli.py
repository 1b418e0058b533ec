"""`gpumgr` / `python -m gpumgr` against a real broker on loopback.

`main()` is blocking (urllib), so it runs in a thread while the reactor serves.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest_twisted

from gpumgr.testing import world_config
from tests.cli_support import gpumgr, shipped_config_here
from tests.helpers import free_port


# status -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_status_prints_a_readable_table(broker, client):
    service, url = broker
    reply = await client.request("POST", url + "/v1/tts", b'{"text":"Hallo"}')
    assert reply.code == 200
    run = await gpumgr("status", "--url", url)
    assert run.code == 0, run.err
    assert run.err == ""
    lines = run.out.splitlines()
    assert lines[0].startswith("gpumgr ") and f"at {url}" in lines[0]
    assert "mode passthrough" in lines[0]
    header = next(line for line in lines if line.startswith("CONSUMER"))
    assert header.split() == ["CONSUMER", "DRIVER", "HEALTH", "LOADED", "PROCESS", "ACTIVE",
                              "TOTAL", "RESIDENT", "RENDER"]
    rows = {line.split()[0]: line.split() for line in lines[lines.index(header) + 1:]
            if line.split() and line.split()[0] in service.config.consumers}
    assert set(rows) == set(service.config.consumers)
    assert rows["mvoice"][2] == "ok" and rows["mvoice"][6] == "1"  # health, total requests
    assert any(line.startswith("scheduler: queue 0, in flight 0") for line in lines)


@pytest_twisted.ensureDeferred
async def test_status_json_prints_the_raw_document(broker):
    _, url = broker
    run = await gpumgr("status", "--json", env={"GPUMGR_URL": url + "/"})  # URL from the env
    assert run.code == 0, run.err
    doc = json.loads(run.out)
    assert set(doc) >= {"broker", "gpu", "consumers", "scheduler"}


@pytest_twisted.ensureDeferred
async def test_status_against_an_unreachable_broker_is_one_line_and_exit_1():
    url = f"http://127.0.0.1:{free_port()}"
    run = await gpumgr("status", "--url", url)
    assert run.code == 1 and run.out == ""
    assert run.err.startswith(f"gpumgr: cannot reach the broker at {url}/v1/status: ")
    assert run.err.count("\n") == 1 and "Traceback" not in run.err


@pytest_twisted.ensureDeferred
async def test_status_non_200_answer_is_reported_with_the_error_code(broker):
    _, url = broker
    run = await gpumgr("status", "--url", url + "/v1/nope")  # answers the JSON 404
    assert run.code == 1
    assert run.err.startswith(f"gpumgr: GET {url}/v1/nope/v1/status answered 404 unknown_route: ")


# load / unload --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_load_and_unload_through_the_scheduler(world, start_broker):
    service, url = await start_broker(world_config(world, scheduler={"mode": "evicting"}))
    run = await gpumgr("load", "mvoice", "--url", url)
    assert run.code == 0, run.err
    assert run.out == "mvoice: load done: loaded, 2500 MiB resident\n"
    assert service.registry["mvoice"].loaded is True
    run = await gpumgr("unload", "mvoice", "--url", url)
    assert run.code == 0, run.err
    assert run.out == "mvoice: unload done: unloaded\n"
    assert service.registry["mvoice"].loaded is False


@pytest_twisted.ensureDeferred
async def test_admin_token_from_flag_or_env_and_never_printed(world, start_broker):
    _, url = await start_broker(world_config(world, admin_token="s3cret-token"))
    run = await gpumgr("unload", "mvoice", "--url", url)
    assert run.code == 1
    assert run.err == ("gpumgr: unload mvoice: 401 unauthorized: "
                       "a valid 'Authorization: Bearer <admin_token>' is required\n")
    run = await gpumgr("unload", "mvoice", "--url", url, "--token", "wrong-token")
    assert run.code == 1 and "401 unauthorized" in run.err and "wrong-token" not in run.err
    run = await gpumgr("unload", "mvoice", "--url", url, "--token", "s3cret-token")
    assert run.code == 0, run.err
    run = await gpumgr("load", "mvoice",
                       env={"GPUMGR_URL": url, "GPUMGR_ADMIN_TOKEN": "s3cret-token"})
    assert run.code == 0, run.err
    assert "s3cret" not in run.out + run.err


@pytest_twisted.ensureDeferred
async def test_unknown_consumer_and_missing_route(broker):
    _, url = broker
    run = await gpumgr("load", "nosuch", "--url", url)
    assert run.code == 1
    assert run.err == "gpumgr: load nosuch: 404 unknown_consumer: no consumer named 'nosuch'\n"
    run = await gpumgr("unload", "whisper", "--url", url)  # whisper has no unload route
    assert run.code == 1 and "409 not_supported: whisper has no way to unload" in run.err


@pytest_twisted.ensureDeferred
async def test_consumer_names_are_quoted_into_the_path(broker):
    _, url = broker
    run = await gpumgr("load", "../status", "--url", url)
    assert run.code == 1 and "404 unknown_consumer" in run.err


@pytest_twisted.ensureDeferred
async def test_load_against_an_unreachable_broker():
    run = await gpumgr("load", "mvoice", "--url", f"http://127.0.0.1:{free_port()}")
    assert run.code == 1 and run.err.startswith("gpumgr: cannot reach the broker at ")


# check-config ---------------------------------------------------------------------


def test_python_dash_m_runs_the_cli(tmp_path):
    """The installed entry point, as an operator types it."""
    result = subprocess.run([sys.executable, "-m", "gpumgr", "check-config",
                             shipped_config_here(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("OK: ")
    result = subprocess.run([sys.executable, "-m", "gpumgr", "status", "--url",
                             f"http://127.0.0.1:{free_port()}"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stderr.startswith("gpumgr: cannot reach")
    assert "Traceback" not in result.stderr


