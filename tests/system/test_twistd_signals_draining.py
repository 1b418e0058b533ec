"""A second SIGTERM or a SIGHUP while a real twistd drains.

Found in review: each test is the smallest reproduction of one defect.
"""

from __future__ import annotations

import json
import signal
import threading

import pytest

from tests.helpers import get_status, http_request, wait_until


# -- signals on a real twistd ------------------------------------------------------------


def _drain_with_second_signal(demo_process, second):  # noqa: F811
    proc, port, _, output = demo_process
    result = {}

    def stream():
        _, r = http_request(port, "POST", "/v1/llm", b'{"prompt":"long"}')
        result["lines"] = [json.loads(line) for line in r.read().splitlines()]

    t = threading.Thread(target=stream)
    t.start()
    wait_until(lambda: get_status(port)["scheduler"]["in_flight"] == 1)
    proc.send_signal(signal.SIGTERM)

    def refused():
        try:
            http_request(port, "GET", "/healthz")
        except OSError:
            return True
        return False

    wait_until(refused)  # draining: the port is closed, the stream still runs
    proc.send_signal(second)
    t.join(timeout=30)
    code = proc.wait(timeout=30)
    return code, result.get("lines"), output()


@pytest.mark.slow
def test_a_second_sigterm_while_draining_still_exits_0(demo_process):  # noqa: F811
    code, lines, output = _drain_with_second_signal(demo_process, signal.SIGTERM)
    assert code == 0 and "Traceback" not in output


@pytest.mark.slow
def test_a_sighup_while_draining_does_not_kill_gpumgr(demo_process):  # noqa: F811
    code, lines, _ = _drain_with_second_signal(demo_process, signal.SIGHUP)
    assert code == 0 and lines and lines[-1]["done"] is True
