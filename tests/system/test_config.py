"""A real `twistd gpumgr` refuses a bad config or command line in one line, without a traceback."""

from __future__ import annotations

import pytest

from tests.config_support import MINIMAL
from tests.helpers import run_twistd

@pytest.mark.parametrize("snippet,key_path", [
    ("scheduler: {mode: yolo}\n", "scheduler.mode"),
    ("bogus: 1\n", "bogus"),
])
def test_twistd_refuses_bad_config_without_traceback(tmp_path, snippet, key_path):
    path = tmp_path / "bad.yaml"
    path.write_text(MINIMAL + snippet)
    result = run_twistd("--config", str(path))
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert f"{path}: {key_path}" in output
    assert "Traceback" not in output


def test_twistd_mode_override_is_validated(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text(MINIMAL)
    result = run_twistd("--config", str(path), "--mode", "chaotic")
    assert result.returncode != 0
    assert "--mode: must be one of passthrough, locked, evicting" in result.stdout + result.stderr


def test_twistd_requires_a_config_or_demo():
    result = run_twistd()
    assert result.returncode != 0
    assert "--config PATH is required" in result.stdout + result.stderr


def test_twistd_rejects_a_bad_listen_endpoint(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text(MINIMAL)
    result = run_twistd("--config", str(path), "--listen", "carrier-pigeon:7")
    assert result.returncode != 0
    assert "--listen: invalid endpoint" in result.stdout + result.stderr


