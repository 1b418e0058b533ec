"""A real `twistd -n gpumgr --demo` process, used as a newcomer would."""

import json
import time

import pytest

from tests.helpers import AUDIO, FORM, free_port, http_request, start_twistd, stop_twistd


@pytest.fixture
def demo(tmp_path):
    port = free_port()
    proc, output = start_twistd(tmp_path, port, "--demo",
                                "--listen", f"tcp:{port}:interface=127.0.0.1")
    yield port
    stop_twistd(proc, timeout_s=15)
    assert "Traceback" not in output(), output()


def test_demo_serves_tts_llm_status_and_audio(demo):
    port = demo
    _, r = http_request(port, "GET", "/healthz")
    assert r.status == 200 and json.loads(r.read()) == {"status": "ok"}

    _, r = http_request(port, "POST", "/v1/tts", b'{"text":"Hallo Welt"}',
                    {"Content-Type": "application/json"})
    wav = r.read()
    assert r.status == 200 and wav[:4] == b"RIFF"
    assert r.getheader("X-Gpumgr-Consumer") == "mvoice"
    audio_url = r.getheader("X-Audio-Url")

    _, r = http_request(port, "GET", audio_url)
    assert r.status == 200 and r.read() == wav

    # The LLM reply is a token stream: read it line by line as it arrives.
    _, r = http_request(port, "POST", "/v1/llm", b'{"model":"llama3","prompt":"hi"}',
                    {"Content-Type": "application/json"})
    assert r.status == 200 and r.getheader("Transfer-Encoding") == "chunked"
    lines = []
    while True:
        line = r.readline()
        if not line:
            break
        lines.append(json.loads(line))
    assert len(lines) == 24 and lines[-1]["done"] is True

    status = None
    for _ in range(50):  # the first nvidia-smi sample may still be on its way
        _, r = http_request(port, "GET", "/v1/status")
        status = json.loads(r.read())
        if status["gpu"]["available"]:
            break
        time.sleep(0.1)
    assert status["gpu"]["available"], status["gpu"]
    assert status["gpu"]["gpus"][0]["memory_total_mib"] == 16384
    assert status["consumers"]["mvoice"]["total_requests"] == 1
    assert status["consumers"]["ollama"]["health"] == "ok"
    assert status["scheduler"]["total_jobs"] == 2


def test_demo_serialises_concurrent_requests_in_priority_order(demo):
    """Like a newcomer with curl: one LLM stream holds the GPU, others queue."""
    import threading

    port = demo
    finished: list[tuple[float, str]] = []
    lock = threading.Lock()

    codes: list[tuple[str, int]] = []

    def post(path, body):
        headers = {"Content-Type": FORM} if path == "/v1/stt" else None
        _, r = http_request(port, "POST", path, body, headers)
        r.read()
        with lock:
            finished.append((time.monotonic(), path))
            codes.append((path, r.status))  # asserted below: a thread's assert fails nothing

    first = threading.Thread(target=post, args=("/v1/llm", b'{"prompt":"long"}'))
    first.start()
    deadline = time.monotonic() + 10
    while True:  # wait until the stream holds the GPU
        _, r = http_request(port, "GET", "/v1/status")
        if json.loads(r.read())["scheduler"]["in_flight"] == 1:
            break
        assert time.monotonic() < deadline
        time.sleep(0.02)
    others = []
    for path, body in (("/v1/llm", b'{"prompt":"2"}'), ("/v1/tts", b'{"text":"x"}'),
                       ("/v1/stt", AUDIO)):
        t = threading.Thread(target=post, args=(path, body))
        t.start()
        others.append(t)
        while True:  # arrival order is llm, tts, stt: each is queued before the next
            _, r = http_request(port, "GET", "/v1/status")
            if json.loads(r.read())["scheduler"]["queue_depth"] == len(others):
                break
            assert time.monotonic() < deadline + 10
            time.sleep(0.01)
    depths = []
    while first.is_alive() or any(t.is_alive() for t in others):
        _, r = http_request(port, "GET", "/v1/status")
        depths.append(json.loads(r.read())["scheduler"]["queue_depth"])
        time.sleep(0.02)
    for t in [first, *others]:
        t.join()
    assert max(depths) == 3 and depths[-1] == 0  # the queue was visible, then drained
    order = [path for _, path in sorted(finished)]
    assert order == ["/v1/llm", "/v1/tts", "/v1/stt", "/v1/llm"]
    assert sorted(codes) == sorted((path, 200) for path in order), codes
    _, r = http_request(port, "GET", "/v1/status")
    sched = json.loads(r.read())["scheduler"]
    assert sched["mode"] == "evicting" and sched["total_jobs"] == 4 and sched["queue_depth"] == 0


def test_demo_evicts_to_make_room(demo):
    """ollama (9000) and comfyui (7000) do not fit together on the 16 GiB demo GPU."""
    port = demo
    _, r = http_request(port, "POST", "/v1/llm", b'{"model":"llama3","prompt":"hi"}')
    r.read()
    _, r = http_request(port, "POST", "/v1/image", b'{"prompt":{}}')
    assert r.status == 200 and "prompt_id" in json.loads(r.read())
    _, r = http_request(port, "GET", "/v1/status")
    status = json.loads(r.read())
    evictions = [e for e in status["scheduler"]["recent_events"] if e["event"] == "eviction"]
    assert any(e["consumer"] == "ollama" and e["reason"] == "pressure" for e in evictions)
    assert status["consumers"]["ollama"]["loaded"] is False
    assert status["consumers"]["comfyui"]["loaded"] is True
