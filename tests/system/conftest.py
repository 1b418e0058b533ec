"""Fixtures of the system tests: a real `twistd gpumgr --demo`."""

from __future__ import annotations

import os

import pytest

from tests.helpers import free_port, start_twistd


@pytest.fixture
def demo_process(tmp_path):
    port = free_port()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}  # the demo's state directory lands here
    proc, output = start_twistd(tmp_path, port, "--demo",
                                "--listen", f"tcp:{port}:interface=127.0.0.1", env=env)
    yield proc, port, tmp, output
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)
