"""ManagedProcess and the real world (issue 14): a stranger on the service's port,
a probe answered by someone else, a blank last stderr line, and a caller that
gives up on a start. Clock-driven fakes, no sleeps."""

from __future__ import annotations

import pytest_twisted

from gpumgr.process import ManagedProcess, ProcessState
from tests.helpers import FakeProcessReactor, PortCheck, ScriptedProbe, outcome, spec


def test_a_free_port_lets_the_spawn_go_on():
    fake, check, probe = FakeProcessReactor(), PortCheck(), ScriptedProbe()
    mp = ManagedProcess(fake, "whisper", spec(), probe, port_check=check)
    d = mp.start()
    assert fake.spawned == [] and probe.calls == 0  # no probe before our process exists
    check.pending[0].callback(None)
    assert len(fake.spawned) == 1 and probe.calls == 1
    probe.healthy = True
    fake.advance(0.25)
    assert outcome(d) is None and mp.state is ProcessState.RUNNING


# -- port_answers, on loopback -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_port_answers_names_a_listening_port_and_none_for_a_closed_one():
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory, Protocol

    from gpumgr.process import port_answers
    from tests.helpers import free_port

    closed = free_port()
    assert await port_answers(reactor, f"http://127.0.0.1:{closed}", 2.0) is None
    listening = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    try:
        port = listening.getHost().port
        found = await port_answers(reactor, f"http://127.0.0.1:{port}/base", 2.0)
        assert found == f"something already answers on 127.0.0.1:{port} (its url's port)"
    finally:
        await listening.stopListening()
