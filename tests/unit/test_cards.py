"""gpumgr.cards: the pure `auto` placement and the lock per card (issue 17)."""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.task import Clock

from gpumgr.cards import CardChoice, PerCardLocked, place_auto
from gpumgr.registry import Registry
from gpumgr.scheduler import Locked


def test_auto_prefers_a_card_where_it_fits_then_fewest_then_least_recent_evictions():
    fits_after_two = CardChoice(0, ("a", "b"), 0, 5.0)
    fits_after_one_recent = CardChoice(1, ("c",), 0, 90.0)
    fits_after_one_old = CardChoice(2, ("d",), 0, 10.0)
    short = CardChoice(3, (), 100, None)
    assert place_auto([fits_after_two, fits_after_one_recent, fits_after_one_old, short]) == 2
    assert place_auto([fits_after_two, CardChoice(4, (), 0, None)]) == 4
    assert place_auto([CardChoice(0, (), 500, None), CardChoice(1, ("x",), 200, 1.0)]) == 1
    assert place_auto([]) is None


def _per_card(cards: dict[str, tuple[int, ...]]) -> tuple[Clock, PerCardLocked]:
    clock = Clock()
    registry = Registry(cards)
    return clock, PerCardLocked(lambda: Locked(clock, registry, capacity=1),
                                lambda name: cards[name])


def test_jobs_on_different_cards_hold_different_locks():
    _, sched = _per_card({"a": (0,), "b": (1,)})
    a, b = defer.Deferred(), defer.Deferred()
    sched.run("a", lambda: a)
    started = []
    sched.run("b", lambda: started.append("b") or b)
    assert started == ["b"] and sched.stats().in_flight == 2
    a.callback(None)
    b.callback(None)
    assert sched.stats().in_flight == 0


def test_a_job_on_both_cards_waits_for_each_and_two_such_jobs_never_deadlock():
    _, sched = _per_card({"both": (1, 0), "also": (0, 1), "one": (1,)})
    one = defer.Deferred()
    sched.run("one", lambda: one)  # holds card 1
    ran = []
    jobs = {n: defer.Deferred() for n in ("both", "also")}
    done = [sched.run(n, lambda n=n: ran.append(n) or jobs[n]) for n in ("both", "also")]
    assert ran == [] and sched.queued_for("both") == 1  # holds card 0, waits for card 1
    one.callback(None)
    assert ran == ["both"]
    jobs["both"].callback(None)
    assert ran == ["both", "also"]
    jobs["also"].callback(None)
    assert all(d.called for d in done) and sched.stats().in_flight == 0
    assert sched.max_running_seen == 1


def test_cancelling_a_waiting_multi_card_job_gives_back_the_card_it_held():
    _, sched = _per_card({"both": (0, 1), "one": (1,), "zero": (0,)})
    one = defer.Deferred()
    sched.run("one", lambda: one)
    waiting = sched.run("both", lambda: defer.succeed(None))
    waiting.addErrback(lambda f: f.trap(defer.CancelledError))
    waiting.cancel()
    ran = []
    sched.run("zero", lambda: ran.append("zero") or defer.succeed(None))
    assert ran == ["zero"]
