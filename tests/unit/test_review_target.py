"""A hostile review of issue 14's points 1, 7 and 8: what held, and what did not.

Each test here failed on the code it was written against. The ollama body
cases follow what ollama really does: gin's `ShouldBindJSON` is Go's
encoding/json (keys matched case-insensitively by Unicode *simple* folding,
unknown fields skipped without converting their numbers, nesting up to
10,000), and `api.Duration` (api/types.go), whose rule changed in 0.11.8
(#12041): before, a number was `int(t) * int(time.Second)` (int64 wraps)
and the unload test was `int(KeepAlive.Seconds()) == 0` (any duration under
a second); since, a number is `t * float64(time.Second)` and the test is
`Duration == 0`. gpumgr must call an unload what either version unloads.
"""

from __future__ import annotations


import pytest

from gpumgr.drivers import get_driver
from gpumgr.drivers.ollama import is_unload_request

# -- ollama's unload, told by its body as Go reads it ----------------------------------------


def _generate(keep_alive: str) -> bytes:
    return b'{"model":"llama3","keep_alive":' + keep_alive.encode() + b"}"


@pytest.mark.parametrize("path,body", [
    # Go folds keys by simple folding: "meßages" is not "messages" to Go (ß
    # folds to ß), so ollama sees no messages and unloads; Python's casefold
    # made it "messages", non-empty, and so not an unload.
    ("/api/chat", '{"model":"llama3","meßages":[{"role":"user","content":"hi"}],'
                  '"keep_alive":0}'.encode()),
    ("/api/chat", '{"model":"llama3","meẞages":[{"role":"user","content":"hi"}],'
                  '"keep_alive":0}'.encode()),
    # Go skips an unknown field without converting its number; Python's int()
    # refuses over 4,300 digits (ValueError), which read as "not JSON".
    ("/api/generate", b'{"model":"llama3","keep_alive":0,"x":' + b"1" * 5000 + b"}"),
    # ollama < 0.11.8: int(KeepAlive.Seconds()) == 0 for any duration under 1 s.
    ("/api/generate", _generate('"500ms"')),
    ("/api/generate", _generate('"0.5s"')),
    ("/api/generate", _generate('"999999999ns"')),
    ("/api/chat", b'{"model":"llama3","messages":[],"keep_alive":"1ns"}'),
    # ollama < 0.11.8: int(t) * int(time.Second) wraps in int64. 2**55 s is
    # 0 ns, and on amd64 any t >= 2**63 converts to MinInt64, which is 0 too.
    ("/api/generate", _generate("36028797018963968")),
    ("/api/generate", _generate("36028797018963969")),  # the same float64 to Go
    ("/api/generate", _generate("1e300")),
    ("/api/generate", _generate("1e19")),
])
def test_ollama_unloads_gpumgr_misread(path, body):
    assert is_unload_request(path, body)


@pytest.mark.parametrize("path,body,unload", [
    # What held: Go's own folding (the Kelvin sign is a k to Go), escapes in
    # keys, the last duplicate winning, a BOM (Go refuses it: no unload).
    ("/api/generate", '{"model":"x","\u212aeep_alive":0}'.encode(), True),
    ("/api/generate", b'{"model":"x","keep\\u005falive":0}', True),
    ("/api/generate", b'{"model":"x","keep_alive":0,"KEEP_ALIVE":"5m"}', False),
    ("/api/generate", b'\xef\xbb\xbf{"model":"x","keep_alive":0}', False),
    # Not unloads in any version: a second or more, forever, a real prompt,
    # a dotless i (Go folds it to itself).
    ("/api/generate", _generate('"1s"'), False),
    ("/api/generate", _generate("1"), False),
    ("/api/generate", _generate("1e9"), False),
    ("/api/generate", _generate("-1"), False),
    ("/api/generate", _generate('"-0.5s"'), False),
    ("/api/generate", '{"model":"x","keep_al\u0131ve":0}'.encode(), False),
    ("/api/chat", b'{"model":"x","messages":[{"role":"user","content":"hi"}],"keep_alive":0}',
     False),
])
def test_ollama_bodies_that_held(path, body, unload):
    assert is_unload_request(path, body) is unload


def test_a_deeply_nested_body_is_no_crash():
    """Go decodes up to 10,000 levels; Python's json stops at about 1,000
    with RecursionError, which escaped the classification."""
    body = b'{"model":"llama3","keep_alive":0,"x":' + b"[" * 3000 + b"]" * 3000 + b"}"
    assert is_unload_request("/api/generate", body)


# -- ollama's newer GPU routes ----------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/responses", "/v1/messages", "/v1/audio/transcriptions"])
def test_ollamas_newer_inference_routes_are_gpu_work(path):
    # server/routes.go: each runs ChatHandler (0.13.3, 0.14.0, 0.20.0).
    assert get_driver("ollama").is_gpu_work("POST", path)


# -- a control route that loads is GPU work --------------------------------------------------


@pytest.mark.parametrize("path", ["/wake_up", "/collective_rpc"])
def test_waking_vllm_through_pass_through_waits_for_the_lock(path):
    """`POST /wake_up` puts vLLM's weights back on the GPU (and
    `/collective_rpc {"method": "reload_weights"}` loads them): through
    pass-through they were relayed at once, beside whatever job held the
    GPU. The admin token says who may; the lock says when. (whisper.cpp's
    `/load` already was GPU work.)"""
    assert get_driver("vllm").is_gpu_work("POST", path)
    assert not get_driver("vllm").is_gpu_work("POST", "/sleep")  # it frees; never waits
