"""A real `twistd -n gpumgr --demo --gpus 2`: two simulated cards, the demo's
consumers placed across them, a request of each kind served."""

import json

import pytest

from tests.helpers import AUDIO, FORM, free_port, get_status, http_request, start_twistd, \
    stop_twistd, wait_until


@pytest.fixture
def demo2(tmp_path):
    port = free_port()
    proc, output = start_twistd(tmp_path, port, "--demo", "--gpus", "2",
                                "--listen", f"tcp:{port}:interface=127.0.0.1")
    yield port, output
    stop_twistd(proc, timeout_s=15)
    assert "Traceback" not in output(), output()


def test_the_two_card_demo_lists_both_cards_and_serves_every_kind(demo2):
    port, output = demo2
    wait_until(lambda: get_status(port)["gpu"]["available"])
    status = get_status(port)
    cards = status["gpu"]["gpus"]
    assert [(g["index"], g["memory_total_mib"]) for g in cards] == [(0, 16384), (1, 12288)]
    assert len({g["uuid"] for g in cards}) == 2
    placed = {name: c["gpu"] for name, c in status["consumers"].items()}
    assert placed == {"ollama": [0], "comfyui": [0], "mvoice": [1], "whisper": []}
    assert status["consumers"]["whisper"]["gpu_auto"] is True

    _, r = http_request(port, "POST", "/v1/tts", b'{"text":"Hallo Welt"}',
                        {"Content-Type": "application/json"})
    assert r.status == 200 and r.read()[:4] == b"RIFF"
    _, r = http_request(port, "POST", "/v1/llm", b'{"model":"llama3","prompt":"hi"}')
    lines = [json.loads(line) for line in r.read().splitlines() if line]
    assert r.status == 200 and lines[-1]["done"] is True
    _, r = http_request(port, "POST", "/v1/image", b'{"prompt":{}}')
    assert r.status == 200 and "prompt_id" in json.loads(r.read())
    _, r = http_request(port, "POST", "/v1/stt", AUDIO, {"Content-Type": FORM})
    assert r.status == 200, r.read()
    r.read()

    status = get_status(port)
    for name in ("ollama", "comfyui", "mvoice", "whisper"):
        assert status["consumers"][name]["total_requests"] == 1, name
    # whisper (gpu: auto, 1,500 MiB) fits on both cards without an eviction
    # (comfyui's 7,000 MiB on card 0 leave room): the lowest index wins.
    assert status["consumers"]["whisper"]["gpu"] == [0]
    # Its process was started there, and nvidia-smi shows its memory on card 0.
    pid = status["consumers"]["whisper"]["process"]["pid"]
    card0 = status["gpu"]["gpus"][0]["uuid"]
    wait_until(lambda: any(p["pid"] == pid and p["gpu_uuid"] == card0
                           for p in get_status(port)["gpu"]["processes"]))
    assert "2 simulated cards" in output()
