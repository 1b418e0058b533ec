"""Signals on a real `twistd -n gpumgr --demo` process: SIGHUP reloads (valid
and invalid), SIGTERM drains; nothing is left behind."""

from __future__ import annotations

import json
import os
import signal
import threading

import pytest

from tests.helpers import AUDIO, FORM, get_status, http_request, wait_until

pytestmark = pytest.mark.slow


def test_sighup_reloads_a_valid_config_and_keeps_running_on_an_invalid_one(demo_process):
    proc, port, tmp, _ = demo_process
    path = get_status(port)["broker"]["config"]
    assert path.startswith(str(tmp))
    text = open(path).read()
    with open(path, "w") as f:
        f.write(text.replace("max_queue: 256", "max_queue: 100"))
    proc.send_signal(signal.SIGHUP)
    wait_until(lambda: get_status(port)["broker"]["reloads"] == 1)
    first = get_status(port)["broker"]
    assert first["reload_failures"] == 0 and first["last_reload_error"] is None
    with open(path, "w") as f:
        f.write("consumers: [not, a, mapping\n")
    proc.send_signal(signal.SIGHUP)
    wait_until(lambda: get_status(port)["broker"]["reloads"] == 2)
    second = get_status(port)["broker"]
    assert second["reload_failures"] == 1 and path in second["last_reload_error"]
    assert second["config_hash"] == first["config_hash"]  # the running config is kept
    _, r = http_request(port, "POST", "/v1/tts", b'{"text":"still here"}')
    assert r.status == 200 and r.read()[:4] == b"RIFF"
    assert proc.poll() is None


def test_sigterm_drains_then_exits_cleanly(demo_process):
    proc, port, tmp, output = demo_process
    results: dict[str, object] = {}
    # starts the managed whisper process
    _, r = http_request(port, "POST", "/v1/stt", AUDIO, {"Content-Type": FORM})
    r.read()
    whisper_pid = get_status(port)["consumers"]["whisper"]["process"]["pid"]
    assert whisper_pid and _alive(whisper_pid)

    def stream():
        _, r = http_request(port, "POST", "/v1/llm", b'{"prompt":"long"}')
        results["llm"] = (r.status, [json.loads(line) for line in r.read().splitlines()])

    def queued():
        _, r = http_request(port, "POST", "/v1/tts", b'{"text":"x"}')
        results["tts"] = (r.status, json.loads(r.read()))

    first = threading.Thread(target=stream)
    first.start()
    wait_until(lambda: get_status(port)["scheduler"]["in_flight"] == 1)
    second = threading.Thread(target=queued)
    second.start()
    wait_until(lambda: get_status(port)["scheduler"]["queue_depth"] == 1)
    proc.send_signal(signal.SIGTERM)
    first.join(timeout=30)
    second.join(timeout=30)
    assert proc.wait(timeout=30) == 0
    code, lines = results["llm"]
    assert code == 200 and lines[-1]["done"] is True  # the running stream completed
    code, body = results["tts"]
    assert code == 503 and body["error"]["code"] == "shutting_down"
    assert os.listdir(tmp) == []  # the demo's state directory is gone
    assert not _alive(whisper_pid)  # no process gpumgr owned outlives it
    assert "Traceback" not in output(), output()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
