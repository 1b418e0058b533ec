"""A service's own control routes are gpumgr's admin routes (issue 14, point 7).

Through pass-through, a request that loads, unloads, frees or interrupts
changes what the GPU holds behind gpumgr's back. With `admin_token` set it
needs the token; once one passed, gpumgr no longer claims to know the
consumer's residency.
"""

from __future__ import annotations


import pytest

from gpumgr.config import parse_config
from gpumgr.drivers import get_driver
from gpumgr.drivers.ollama import is_unload_request

UNLOAD_LLAMA = b'{"model":"llama3","keep_alive":0}'


def test_drivers_declare_their_control_routes():
    raw = world_config_raw_for_drivers()
    config = parse_config(raw, "<drivers>")
    comfy, vllm, whisper, ollama, http = (config.consumers[n] for n in
                                          ("comfy", "vllm", "whisper", "ollama", "http"))
    none = lambda: None  # noqa: E731

    def control(c, method, path, body=none):
        return get_driver(c.driver).is_control(c, method, path, body)

    for path in ("/interrupt", "/free", "/queue", "/api/interrupt", "/api/free", "/api/queue",
                 "/api/jobs/abc/cancel"):
        assert control(comfy, "POST", path), path
    assert not control(comfy, "POST", "/prompt") and not control(comfy, "GET", "/queue")
    for path in ("/sleep", "/wake_up", "/collective_rpc"):
        assert control(vllm, "POST", path), path
    assert not control(vllm, "POST", "/v1/chat/completions")
    assert control(whisper, "POST", "/load") and not control(whisper, "POST", "/inference")
    assert control(http, "POST", "/unload") and control(http, "PUT", "/warm")
    assert not control(http, "GET", "/unload") and not control(http, "POST", "/tts")
    assert control(ollama, "POST", "/api/generate", lambda: UNLOAD_LLAMA)
    assert not control(ollama, "POST", "/api/generate", lambda: b'{"model":"x","prompt":"p"}')


def world_config_raw_for_drivers():
    def entry(driver, **extra):
        return {"url": "http://127.0.0.1:9", "driver": driver, "vram_resident_mib": 100,
                "paths": {}, **extra}

    return {"consumers": {
        "comfy": entry("comfyui"), "vllm": entry("vllm"), "whisper": entry("whisper.cpp"),
        "ollama": entry("ollama"),
        "http": entry("http", health="/health", unload={"method": "POST", "path": "/unload"},
                      load={"method": "PUT", "path": "/warm?x=1"}),
    }}


@pytest.mark.parametrize("body,unload", [
    (UNLOAD_LLAMA, True),
    (b'{"model":"x","keep_alive":"0"}', True),
    (b'{"model":"x","keep_alive":0.5}', True),  # whole seconds, truncated
    (b'{"model":"x","Keep_Alive":"0m"}', True),  # Go matches keys case-insensitively
    (b'{"model":"x","keep_alive":5,"keep_alive":0}', True),  # the last one wins
    (b'{"model":"x","keep_alive":"-0s"}', True),
    (b' {"model":"x","keep_alive":0} trailing', True),  # gin reads the first value only
    (b'{"model":"x","prompt":"","keep_alive":0}', True),
    (b'{"model":"x","keep_alive":"5m"}', False),
    (b'{"model":"x","keep_alive":-1}', False),
    (b'{"model":"x","prompt":"hi","keep_alive":0}', False),
    (b'{"model":"x"}', False),
    (b'not json', False),
    (None, True),  # too large to read: it could be one
])
def test_ollama_unload_is_told_by_its_body(body, unload):
    assert is_unload_request("/api/generate", body) is unload


def test_ollama_chat_unload_has_no_messages():
    assert is_unload_request("/api/chat", b'{"model":"x","messages":[],"keep_alive":0}')
    assert not is_unload_request(
        "/api/chat", b'{"model":"x","messages":[{"role":"user","content":"hi"}],"keep_alive":0}')
    assert not is_unload_request("/api/embed", UNLOAD_LLAMA)
