"""TermThenKill on a Clock: the order, the delays, and what ends it early."""

from __future__ import annotations

from twisted.internet.task import Clock

from gpumgr.terminate import TermThenKill


def _escalation(clock, still_there=lambda: True):
    said: list[tuple[float, str]] = []

    def kill() -> bool:
        if not still_there():
            return False
        said.append((clock.seconds(), "KILL"))
        return True

    ending = TermThenKill(
        clock, kill_after_s=10, give_up_after_s=5,
        send_term=lambda: said.append((clock.seconds(), "TERM")), send_kill=kill,
        give_up=lambda: said.append((clock.seconds(), "give up")))
    return ending, said


def test_term_then_kill_then_give_up():
    clock = Clock()
    ending, said = _escalation(clock)
    ending.start()
    clock.advance(9.9)
    assert said == [(0, "TERM")]
    clock.advance(0.1)
    assert said == [(0, "TERM"), (10, "KILL")]
    clock.advance(5)
    assert said == [(0, "TERM"), (10, "KILL"), (15, "give up")]
    assert clock.getDelayedCalls() == []


def test_nothing_left_to_kill_ends_it():
    clock = Clock()
    ending, said = _escalation(clock, still_there=lambda: False)
    ending.start()
    clock.advance(100)
    assert said == [(0, "TERM")]
    assert clock.getDelayedCalls() == []


def test_cancel_before_kill_and_before_giving_up():
    clock = Clock()
    ending, said = _escalation(clock)
    ending.start()
    ending.cancel()
    clock.advance(100)
    assert said == [(0, "TERM")]

    clock = Clock()
    ending, said = _escalation(clock)
    ending.start()
    clock.advance(10)
    ending.cancel()
    clock.advance(100)
    assert said == [(0, "TERM"), (10, "KILL")]
    assert clock.getDelayedCalls() == []
