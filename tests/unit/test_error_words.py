"""Errors say what happened in words, never a Python repr (issue 14.10).

Before: health, status, events and 503 bodies showed
`[<twisted.python.failure.Failure twisted.internet.defer.CancelledError: >]` or
`HostnameAddress(hostname=b'127.0.0.1', port=9)`.
"""

from __future__ import annotations

import pytest
from twisted.internet import defer, error
from twisted.internet.address import HostnameAddress
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web._newclient import ResponseFailed, ResponseNeverReceived

from gpumgr.admission import Admission
from gpumgr.config import parse_config
from gpumgr.errors import ControlFailed, describe_failure
from gpumgr.health import HealthMonitor
from gpumgr.registry import Registry
from tests.helpers import NoSample

NEVER_ANSWERED = ResponseNeverReceived([Failure(defer.CancelledError())])
ABANDONED_CONNECT = error.ConnectingCancelledError(HostnameAddress(b"127.0.0.1", 9))


@pytest.mark.parametrize("what,words", [
    (NEVER_ANSWERED, "no response: gave up waiting (cancelled)"),
    (Failure(NEVER_ANSWERED), "no response: gave up waiting (cancelled)"),
    (ABANDONED_CONNECT, "gave up connecting to 127.0.0.1:9 (cancelled)"),
    (ResponseFailed([Failure(error.ConnectionLost()), Failure(error.ConnectionLost())]),
     "the response broke off: Connection to the other side was lost in a non-clean fashion."),
    (defer.FirstError(Failure(ABANDONED_CONNECT), 1),
     "gave up connecting to 127.0.0.1:9 (cancelled)"),
    (defer.TimeoutError(), "timed out"),
    (defer.TimeoutError(60, "Deferred"), "timed out after 60 s"),  # what addTimeout raises
    (error.TimeoutError(), "User timeout caused connection failure."),
    (error.ConnectionRefusedError("not ready"), "Connection was refused by other side: not ready."),
    (error.DNSLookupError("gpu-box.invalid"), "DNS lookup failed: gpu-box.invalid."),
    (ValueError("x" * 400), "x" * 297 + "..."),
    (RuntimeError(), "RuntimeError"),
])
def test_describe_failure(what, words):
    text = describe_failure(what)
    assert text == words
    assert "<" not in text and "Address(" not in text


def _world():
    clock = Clock()
    config = parse_config({
        "routes": {"llm": "ollama"},
        "consumers": {"ollama": {
            "url": "http://127.0.0.1:9", "health": "/api/version",
            "paths": {"llm": "/api/generate"}, "vram_resident_mib": 1000,
            "load": {"path": "/api/load"}}}}, "<words>")
    return clock, config, Registry(config.consumers)


def test_a_probe_that_got_no_answer_says_so_in_health():
    clock, config, registry = _world()
    monitor = HealthMonitor(clock, lambda: config.consumers, registry,
                            lambda c: defer.fail(NEVER_ANSWERED), 5, 2)
    monitor.probe_now("ollama")
    assert registry["ollama"].health == "down"
    assert registry["ollama"].last_error == "no response: gave up waiting (cancelled)"


class _FailingLoad:
    def load(self, name):
        return defer.fail(ABANDONED_CONNECT)

    def unload(self, name):
        return defer.fail(NEVER_ANSWERED)

    def load_timeout_s(self, name):
        return 60.0


def test_a_failed_load_and_unload_say_what_happened():
    clock, config, registry = _world()
    admission = Admission(clock, lambda: config, registry, NoSample(), _FailingLoad(),
                          runner=None)  # type: ignore[arg-type]
    failures: list[Failure] = []
    admission.load("ollama", "admin", evicting=False).addErrback(failures.append)
    (failure,) = failures
    assert failure.check(ControlFailed)
    assert failure.value.message == ("loading ollama failed: gave up connecting to "
                                     "127.0.0.1:9 (cancelled)")
    registry.mark_loaded("ollama", 1000)
    results: list[bool] = []
    admission.unload("ollama", "admin").addBoth(results.append)
    assert results == [False]
    (event,) = [e for e in admission.events if e.kind == "eviction_failed"]
    assert event.detail == "no response: gave up waiting (cancelled)"
