"""`gpumgr` / `python -m gpumgr`: argument handling and output, without a broker (the runs
against a real broker on loopback are in tests/integration/test_cli.py).
"""

from __future__ import annotations

import os

import pytest
import pytest_twisted

from gpumgr.cli import format_status
from tests.cli_support import ROOT, gpumgr, shipped_config_here


# status -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_status_with_a_bad_url_is_one_line_and_exit_1():
    for url in ("not a url", "ftp://host", "http://"):
        run = await gpumgr("status", "--url", url)
        assert run.code == 1 and run.err == (
            f"gpumgr: the broker URL must be http:// or https:// with a host, got {url!r}\n")


def test_format_status_tolerates_an_older_or_empty_document():
    text = format_status({})
    assert text.startswith("gpumgr ?") and "GPU: unavailable" in text and "no consumers" in text
    old = {"broker": {"version": "0.0.1", "uptime_s": 4000},
           "consumers": {"a": {"health": "down", "last_error": "refused", "loaded": None}},
           "scheduler": {"queue_depth": 2, "queued_by_kind": {"llm": 2}},
           "gpu": {"available": True, "gpus": [{"index": 0, "memory_total_mib": 100}]}}
    text = format_status(old)
    assert "up 1h 06m" in text and "queue 2 (llm 2)" in text and "a: refused" in text


def test_format_status_shows_the_fields_the_broker_is_gaining():
    doc = {
        "broker": {"version": "0.2.0", "mode": "evicting", "uptime_s": 5,
                   "last_reload_error": "x.yaml: consumers.a.url: bad"},
        "gpu": {"available": True, "headroom_mib": 512,
                "gpus": [{"index": 0, "name": "RTX", "memory_total_mib": 1000,
                          "memory_used_mib": 600}]},
        "consumers": {"comfy": {"driver": "comfyui", "health": "starting", "loaded": True,
                                "gpu_resident_mib": 400, "active": 1, "total_requests": 3,
                                "process": {"state": "running", "pid": 42, "restarts": 2},
                                "renders": [{"prompt_id": "p1", "held_s": 3.0},
                                            {"prompt_id": "p2", "held_s": 1.0}]}},
        "scheduler": {"holders": [{"consumer": "comfy", "kind": "image", "held_ms": 2500,
                                   "render": "p1"}],
                      "recent_events": [{"at": "2026-11-23T07:19:02.950Z", "event": "process_crash",
                                         "consumer": "comfy", "reason": None, "mib": None,
                                         "detail": "exit 137"}]},
    }
    text = format_status(doc)
    assert "LAST CONFIG RELOAD FAILED: x.yaml: consumers.a.url: bad" in text
    assert "consumers 400 MiB, other 200 MiB  headroom kept 512 MiB" in text
    row = next(line for line in text.splitlines() if line.startswith("comfy "))
    assert row.split() == ["comfy", "comfyui", "starting", "yes", "running", "pid", "42", "2",
                           "restarts", "1", "3", "400", "MiB", "p1", "3.0s", "+1"]
    assert "holding the GPU: comfy (image) for 2.5s, render p1" in text
    assert "07:19:02  process_crash  comfy" in text and "exit 137" in text


# check-config ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_check_config_accepts_the_shipped_config(tmp_path):
    path = shipped_config_here(tmp_path)
    run = await gpumgr("check-config", path)
    assert run.code == 0, run.err
    assert run.out == f"OK: {path} (4 consumers, mode evicting)\n"


@pytest.mark.skipif(os.path.exists("/opt/whisper.cpp"), reason="a real whisper.cpp box")
@pytest_twisted.ensureDeferred
async def test_check_config_fails_for_a_process_command_or_cwd_that_does_not_exist():
    path = os.path.join(ROOT, "etc", "consumers.yaml")
    run = await gpumgr("check-config", path)
    assert run.code == 1 and run.out == ""
    # The command is relative to nothing: it is an absolute path that is not there either.
    assert run.err == (
        f"config error: {path}: consumers.whisper.process.cwd: '/opt/whisper.cpp' does not "
        "exist or is not a directory\n"
        f"config error: {path}: consumers.whisper.process.command[0]: "
        "'/opt/whisper.cpp/build/bin/whisper-server' not found or not executable\n")


@pytest_twisted.ensureDeferred
async def test_check_config_looks_a_bare_command_up_on_the_path_the_process_gets(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "consumers:\n  w:\n    url: http://127.0.0.1:8178\n    health: /health\n"
        "    paths: {stt: /inference}\n"
        "    process:\n      command: [no-such-whisper-server, -m, x]\n"
        "routes: {stt: w}\n")
    run = await gpumgr("check-config", str(path))
    assert run.code == 1
    assert run.err == (f"config error: {path}: consumers.w.process.command[0]: "
                       "'no-such-whisper-server' not found on PATH or not executable\n")
    tool = tmp_path / "bin" / "no-such-whisper-server"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    path.write_text(path.read_text().replace(
        "command: [no-such-whisper-server, -m, x]\n",
        f"command: [no-such-whisper-server, -m, x]\n      env: {{PATH: '{tool.parent}'}}\n"
        f"      cwd: {tmp_path}\n"))
    run = await gpumgr("check-config", str(path))
    assert run.code == 0, run.err


@pytest_twisted.ensureDeferred
async def test_check_config_reports_the_key_path_like_startup(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("consumers:\n  ollama:\n    url: ftp://x\n    health: /\n")
    run = await gpumgr("check-config", str(path))
    assert run.code == 1 and run.out == ""
    assert run.err == (f"config error: {path}: consumers.ollama.url: must be an http:// or "
                       "https:// URL with a host, got 'ftp://x'\n")


@pytest_twisted.ensureDeferred
async def test_check_config_missing_file_and_bad_yaml(tmp_path):
    run = await gpumgr("check-config", str(tmp_path / "missing.yaml"))
    assert run.code == 1
    assert run.err.startswith(f"config error: {tmp_path}/missing.yaml: cannot read")
    path = tmp_path / "broken.yaml"
    path.write_text("consumers: [\n")
    run = await gpumgr("check-config", str(path))
    assert run.code == 1 and "not valid YAML" in run.err and "Traceback" not in run.err


@pytest_twisted.ensureDeferred
async def test_usage_errors_exit_2_with_usage():
    run = await gpumgr()
    assert run.code == 2 and run.err.startswith("usage: gpumgr") and "required" in run.err
    run = await gpumgr("frobnicate")
    assert run.code == 2 and "invalid choice: 'frobnicate'" in run.err
    run = await gpumgr("load")
    assert run.code == 2 and "name" in run.err
    run = await gpumgr("--help")
    assert run.code == 0 and "check-config" in run.out


def test_format_status_shows_a_job_draining_after_its_client_left():
    doc = {"broker": {"version": "0.2.0", "mode": "locked", "uptime_s": 5},
           "gpu": {"available": False}, "consumers": {},
           "scheduler": {"holders": [{"consumer": "ollama", "kind": "llm", "held_ms": 1200,
                                      "render": None,
                                      "state": "draining after the client left"}]}}
    assert "holding the GPU: ollama (llm) for 1.2s, draining after the client left" \
        in format_status(doc)
