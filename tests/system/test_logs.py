"""A real `twistd gpumgr`: JSON log lines only with --log-format json, the token redacted in text."""

from __future__ import annotations

import http.client
import json
import re
import time

import pytest

from tests.helpers import free_port, running_twistd
from tests.logs_support import TOKEN, write_config
from gpumgr.logs import REDACTED


# A real twistd ---------------------------------------------------------------------


def _request(port: int, method: str, path: str, body: bytes | None = None,
             headers: dict | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    return response.status, response.read()


def _wait_for_output(output, needle: str) -> str:
    deadline = time.monotonic() + 30
    while needle not in output():
        assert time.monotonic() < deadline, f"{needle!r} never logged:\n{output()}"
        time.sleep(0.1)
    return output()


@pytest.mark.slow
def test_twistd_demo_logs_json_lines_only(tmp_path):
    port = free_port()
    with running_twistd(tmp_path, port, "--demo", "--listen", f"tcp:{port}:interface=127.0.0.1",
                 "--log-format", "json") as output:
        assert _request(port, "POST", "/v1/tts", b'{"text":"Hallo"}')[0] == 200
        assert _request(port, "POST", "/v1/llm", b'{"prompt":"hi"}')[0] == 200
        assert _request(port, "GET", "/nope")[0] == 404
        code, _ = _request(port, "POST", "/v1/consumers/mvoice/unload",
                           headers={"Authorization": "Bearer not-needed-on-loopback"})
        assert code == 200
        _wait_for_output(output, "evicted mvoice")
    text = output()
    records = [json.loads(line) for line in text.splitlines()]  # every line, or it fails
    assert len(records) > 10
    for record in records:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"]), record
        assert record["level"] in ("debug", "info", "warn", "error", "critical"), record
        assert isinstance(record["namespace"], str) and isinstance(record["message"], str)
    listening = next(r for r in records if r["message"].startswith("gpumgr 0."))
    assert listening["namespace"] == "gpumgr.service" and listening["port"] == port
    evicted = next(r for r in records if r["message"].startswith("evicted mvoice"))
    assert evicted["name"] == "mvoice" and evicted["reason"] == "admin"
    assert records[-1]["message"] == "Server Shut Down."
    assert "not-needed-on-loopback" not in text


@pytest.mark.slow
def test_twistd_text_log_redacts_the_configured_token(tmp_path):
    """The token doubles as a consumer's name, so gpumgr itself logs it: health changes.

    That makes the redaction visible in a real process, with the token taken
    from the config file, in twistd's default text format.
    """
    port = free_port()
    config = write_config(tmp_path, port, token=TOKEN, name=TOKEN)
    with running_twistd(tmp_path, port, "--config", config) as output:
        for token in (TOKEN, "wrong"):
            _request(port, "POST", f"/v1/consumers/{TOKEN}/unload",
                     headers={"Authorization": f"Bearer {token}"})
        text = _wait_for_output(output, f"consumer {REDACTED} health unknown -> down")
    text = output()
    assert TOKEN not in text
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[", text), text[:200]
    assert "Server Shut Down." in text
    assert not any(line.startswith("{") for line in text.splitlines())
