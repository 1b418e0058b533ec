"""A real `twistd gpumgr` refuses hostile configs, a busy port and bad listen endpoints in one
line (the loader itself is tested in tests/unit/test_config_strict.py)."""

from __future__ import annotations

import socket

import pytest

from tests.config_support import MINIMAL, alias_bomb
from tests.helpers import run_twistd


# -- twistd itself ----------------------------------------------------------------------


@pytest.mark.parametrize("text,where", [
    (MINIMAL + "x: &a [*a]\n", "x[0]: an alias refers to a node that contains it"),
    (alias_bomb(30), "expands to more than"),
    (MINIMAL + "admin_token: ''\n", "admin_token: must not be empty"),
    (MINIMAL.replace("http://127.0.0.1:11434", "http://[::1"), "consumers.ollama.url"),
])
def test_twistd_refuses_hostile_config_in_one_line(tmp_path, text, where):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = run_twistd("--config", str(path))
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert f"{path}: " in output and where in output
    assert "Traceback" not in output


def test_twistd_exits_1_in_one_line_when_the_port_is_busy(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        port = busy.getsockname()[1]
        path = tmp_path / "ok.yaml"
        path.write_text(MINIMAL + f"listen: tcp:{port}:interface=127.0.0.1\n")
        result = run_twistd("--config", str(path))
    finally:
        busy.close()
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert f"gpumgr: cannot listen on tcp:{port}:interface=127.0.0.1: Address already in use" \
        in output
    assert "Traceback" not in output


def test_twistd_refuses_a_port_out_of_range_and_a_self_referencing_listen(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text(MINIMAL)
    result = run_twistd("--config", str(path), "--listen", "tcp:70000")
    assert result.returncode == 1
    assert "--listen: invalid endpoint 'tcp:70000': port must be a number from 0 to 65535" \
        in result.stdout + result.stderr
    result = run_twistd("--config", str(path), "--listen", "tcp:11434")
    assert result.returncode == 1
    assert "consumers.ollama.url points at this listen address" in result.stdout + result.stderr
