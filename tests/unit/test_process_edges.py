"""ManagedProcess edges on a fake reactor: a start cancelled while stopping, an unload's deadline.

Found in review: each test is the smallest reproduction of one defect.
"""

from __future__ import annotations

import signal

from twisted.internet import defer
from twisted.internet.error import ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from gpumgr.admission import Admission
from gpumgr.config import parse_config
from gpumgr.process import ManagedProcess, ProcessState
from gpumgr.registry import Registry
from tests.helpers import FakeProcessReactor, NoSample, ScriptedProbe, spec


# -- managed processes ---------------------------------------------------------------------


def test_a_start_cancelled_while_stopping_spawns_nothing():
    fake, probe = FakeProcessReactor(), ScriptedProbe()
    probe.healthy = True
    mp = ManagedProcess(fake, "whisper", spec(), probe)
    mp.start()
    mp.stop()
    waiting = mp.start()
    waiting.addErrback(lambda _: None)
    waiting.cancel()
    ended = Failure(ProcessTerminated(signal=signal.SIGTERM))
    fake.transports[0].proto.processExited(ended)
    fake.transports[0].proto.processEnded(ended)
    assert len(fake.spawned) == 1 and mp.state is ProcessState.STOPPED


class _SlowStop:
    """A process that needs SIGKILL: its stop ends after stop_timeout_s."""

    def __init__(self, clock: Clock, stop_s: float) -> None:
        self._clock, self._stop_s = clock, stop_s

    def unload(self, name):
        d: defer.Deferred[None] = defer.Deferred()
        self._clock.callLater(self._stop_s, lambda: d.called or d.callback(None))
        return d

    def load(self, name):
        return defer.succeed(None)

    def load_timeout_s(self, name):
        return 60.0


def test_an_unload_waits_as_long_as_the_process_may_take_to_stop():
    clock = Clock()
    config = parse_config({
        "routes": {"stt": "whisper"},
        "consumers": {"whisper": {
            "url": "http://127.0.0.1:9", "driver": "whisper.cpp", "paths": {"stt": "/inference"},
            "vram_resident_mib": 1500,
            "process": {"command": ["/bin/true"], "stop_timeout_s": 60}}}}, "<review>")
    registry = Registry(config.consumers)
    registry.mark_loaded("whisper", 1500)
    admission = Admission(clock, lambda: config, registry, NoSample(), _SlowStop(clock, 45.0),
                          runner=None)  # type: ignore[arg-type]
    results = []
    admission.unload("whisper", "admin").addBoth(results.append)
    clock.advance(45.0)
    assert results == [True] and admission.eviction_failures == 0
