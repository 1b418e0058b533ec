"""The Locked scheduler, driven by a Clock: order, limits, cancellation, no leaks."""

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from gpumgr.errors import QueueFull, QueueTimeout
from gpumgr.registry import Registry
from gpumgr.scheduler import Locked, Passthrough, Waiting, pick_next
from tests.helpers import outcome


class Jobs:
    """Jobs whose completion the test controls; records start order."""

    def __init__(self):
        self.started: list[str] = []
        self.pending: dict[str, defer.Deferred] = {}
        self.cancelled: list[str] = []

    def job(self, name):
        def run():
            self.started.append(name)
            d = defer.Deferred(lambda _: self.cancelled.append(name))
            self.pending[name] = d
            return d

        return run

    def finish(self, name, result="ok"):
        self.pending.pop(name).callback(result)


def make(capacity=1, **kw):
    clock = Clock()
    registry = Registry(["a", "b", "c"])
    return clock, registry, Locked(clock, registry, capacity=capacity, **kw), Jobs()


def test_fifo_within_a_priority():
    clock, _, s, jobs = make()
    for name in "wxyz":
        s.run("a", jobs.job(name), kind="llm")
    assert jobs.started == ["w"]
    for name in "wxy":
        jobs.finish(name)
    assert jobs.started == ["w", "x", "y", "z"]


def test_next_waiter_starts_in_the_same_turn_as_the_release():
    clock, _, s, jobs = make()
    s.run("a", jobs.job("first"))
    s.run("b", jobs.job("second"))
    jobs.finish("first")
    assert jobs.started == ["first", "second"]  # no clock advance needed
    assert s.stats().in_flight == 1


def test_higher_priority_goes_first():
    clock, _, s, jobs = make(priority={"tts": 10, "stt": 10, "llm": 5, "image": 0})
    s.run("a", jobs.job("running"), kind="image")
    s.run("a", jobs.job("image"), kind="image")
    s.run("b", jobs.job("llm"), kind="llm")
    s.run("c", jobs.job("tts"), kind="tts")
    s.run("c", jobs.job("stt"), kind="stt")
    for name in ("running", "tts", "stt", "llm"):
        jobs.finish(name)
    assert jobs.started == ["running", "tts", "stt", "llm", "image"]


def test_aging_bounds_starvation():
    clock, _, s, jobs = make(priority={"tts": 2}, aging_s=30)
    s.run("a", jobs.job("running"), kind="image")
    s.run("a", jobs.job("old-image"), kind="image")  # priority 0, enqueued at 0
    clock.advance(61)  # old-image has aged two levels: 0 + 2
    s.run("b", jobs.job("tts"), kind="tts")  # priority 2, enqueued at 61; FIFO breaks the tie
    jobs.finish("running")
    assert jobs.started == ["running", "old-image"]


def test_aging_not_yet_enough():
    clock, _, s, jobs = make(priority={"tts": 2}, aging_s=30)
    s.run("a", jobs.job("running"), kind="image")
    s.run("a", jobs.job("old-image"), kind="image")
    clock.advance(59)  # aged one level only
    s.run("b", jobs.job("tts"), kind="tts")
    jobs.finish("running")
    assert jobs.started == ["running", "tts"]


def test_pick_next_is_pure_and_fifo_on_ties():
    ws = [Waiting(seq=3, priority=1, enqueued_at=10), Waiting(seq=1, priority=1, enqueued_at=10),
          Waiting(seq=2, priority=0, enqueued_at=-10)]
    # At 10: seq 2 has waited 20 s < aging_s, still 0; seqs 1 and 3 tie at 1 -> FIFO.
    assert pick_next(ws, now=10, aging_s=30) == 1
    # At 20: seq 2 has aged to 1 (30 s), seqs 1 and 3 are still 1 -> three-way tie, FIFO.
    assert pick_next(ws, now=20, aging_s=30) == 1
    # Had seq 2 waited a full aging_s longer than the others, it would win.
    ws[2] = Waiting(seq=2, priority=0, enqueued_at=-50)
    assert pick_next(ws, now=10, aging_s=30) == 2


def test_queue_full_is_refused_at_once_with_retry_after():
    clock, _, s, jobs = make(max_queue=2)
    s.run("a", jobs.job("run"))
    s.run("a", jobs.job("q1"))
    s.run("a", jobs.job("q2"))
    failure = outcome(s.run("b", jobs.job("q3")))
    assert isinstance(failure.value, QueueFull)
    assert failure.value.retry_after_s >= 1 and failure.value.consumer == "b"
    assert "q3" not in jobs.started
    assert s.stats().rejected == 1 and s.stats().queue_depth == 2


def test_queue_timeout_rejects_and_never_runs():
    clock, _, s, jobs = make(queue_timeout_s=10)
    s.run("a", jobs.job("run"))
    late = s.run("b", jobs.job("late"), kind="llm")
    clock.advance(9.9)
    assert not late.called
    clock.advance(0.1)
    failure = outcome(late)
    assert isinstance(failure.value, QueueTimeout) and failure.value.consumer == "b"
    jobs.finish("run")
    assert jobs.started == ["run"]
    st = s.stats()
    assert (st.queue_depth, st.in_flight, st.rejected) == (0, 0, 1)


def test_cancel_while_queued_leaves_the_waiting_list_at_once():
    clock, _, s, jobs = make(queue_timeout_s=10)
    s.run("a", jobs.job("run"))
    d = s.run("b", jobs.job("leaver"), kind="tts")
    s.run("c", jobs.job("stayer"), kind="tts")
    assert s.stats().queue_depth == 2
    d.cancel()
    assert isinstance(outcome(d).value, defer.CancelledError)
    assert s.stats().queue_depth == 1 and s.stats().queued_by_kind == {"tts": 1}
    assert clock.getDelayedCalls().__len__() == 1  # its queue timer is gone too
    jobs.finish("run")
    assert jobs.started == ["run", "stayer"]


def test_cancel_while_running_cancels_the_job_and_frees_the_slot():
    clock, registry, s, jobs = make()
    d = s.run("a", jobs.job("run"))
    s.run("b", jobs.job("next"))
    d.cancel()
    assert jobs.cancelled == ["run"]
    assert jobs.started == ["run", "next"]
    assert registry["a"].active == 0 and registry["b"].active == 1


def test_job_failure_and_synchronous_exception_release_the_slot():
    clock, registry, s, jobs = make()

    def boom():
        raise RuntimeError("broken job")

    failed = outcome(s.run("a", boom))
    assert isinstance(failed.value, RuntimeError)
    d = s.run("a", jobs.job("errs"))
    s.run("b", jobs.job("after"))
    jobs.pending.pop("errs").errback(ValueError("upstream"))
    assert isinstance(outcome(d).value, ValueError)
    assert jobs.started == ["errs", "after"]
    assert registry["a"].active == 0


def test_job_ignoring_cancel_still_releases_when_it_ends():
    clock, _, s, jobs = make()
    stubborn = defer.Deferred()  # no canceller that fires it
    stubborn_fired = []
    stubborn.addBoth(lambda r: stubborn_fired.append(r))

    def run():
        d = defer.Deferred()
        stubborn.addCallback(lambda _: d.callback("late"))
        return d

    d = s.run("a", run)
    d.cancel()  # the job's Deferred has no canceller: it errbacks CancelledError
    assert isinstance(outcome(d).value, defer.CancelledError)
    assert s.stats().in_flight == 0


def test_stats_report_queue_shape():
    clock, _, s, jobs = make(capacity=2)
    s.run("a", jobs.job("r1"), kind="llm")
    clock.advance(1)
    s.run("a", jobs.job("r2"), kind="llm")
    clock.advance(1)
    s.run("b", jobs.job("q1"), kind="llm")
    clock.advance(1)
    s.run("c", jobs.job("q2"), kind="image")
    st = s.stats()
    assert (st.mode, st.capacity, st.in_flight, st.queue_depth) == ("locked", 2, 2, 2)
    assert st.oldest_queued == 2 and st.queued_by_kind == {"llm": 1, "image": 1}
    clock.advance(2)
    jobs.finish("r1")
    st = s.stats()
    assert st.last_wait_ms == 3000 and st.last_run_ms == 5000 and st.total_jobs == 3


def test_thousand_synchronous_jobs_do_not_recurse():
    clock, _, s, jobs = make(max_queue=5000)
    gate = defer.Deferred()
    s.run("a", lambda: gate)
    done = []
    for i in range(2000):
        s.run("a", lambda i=i: defer.succeed(i)).addCallback(done.append)
    gate.callback(None)
    assert len(done) == 2000 and s.stats().in_flight == 0


@pytest.mark.parametrize("cls", [Passthrough])
def test_passthrough_runs_everything_at_once(cls):
    clock = Clock()
    registry = Registry(["a"])
    s = cls(clock, registry)
    jobs = Jobs()
    s.run("a", jobs.job("1"))
    s.run("a", jobs.job("2"))
    assert jobs.started == ["1", "2"] and s.stats().in_flight == 2
    jobs.finish("1")
    jobs.finish("2")
    assert s.stats().in_flight == 0 and registry["a"].active == 0


def test_swaps_avoided_within_the_overtake_bound():
    from gpumgr.scheduler import pick_next_avoiding_swaps

    # A loaded (cheap), queue B1 A2 B2 A3 in arrival order.
    q = [Waiting(1, 0, 0), Waiting(2, 0, 0, cheap=True), Waiting(3, 0, 0),
         Waiting(4, 0, 0, cheap=True)]
    index, passed = pick_next_avoiding_swaps(q, 0, 30, max_overtakes=4)
    assert index == 1 and passed == (0,)  # A2 goes before B1
    q[0] = Waiting(1, 0, 0, overtaken=4)
    assert pick_next_avoiding_swaps(q, 0, 30, max_overtakes=4) == (0, ())  # bound reached


def test_cheap_job_never_overtakes_higher_priority():
    from gpumgr.scheduler import pick_next_avoiding_swaps

    q = [Waiting(1, 10, 0), Waiting(2, 5, 0, cheap=True)]
    assert pick_next_avoiding_swaps(q, 0, 30, max_overtakes=4) == (0, ())


def test_locked_runs_abab_as_aabb_when_a_is_loaded():
    clock = Clock()
    registry = Registry(["A", "B"])
    loaded = {"A"}
    s = Locked(clock, registry, is_loaded=lambda c: c in loaded, max_overtakes=4)
    jobs = Jobs()
    s.run("A", jobs.job("A1"))
    for name in ("B1", "A2", "B2"):
        s.run(name[0], jobs.job(name))
    jobs.finish("A1")
    jobs.finish("A2")
    loaded.clear()
    loaded.add("B")
    jobs.finish("B1")
    assert jobs.started == ["A1", "A2", "B1", "B2"]


def test_overtakes_are_bounded_so_nobody_starves():
    clock = Clock()
    registry = Registry(["A", "B"])
    s = Locked(clock, registry, is_loaded=lambda c: c == "A", max_overtakes=2, max_queue=100)
    jobs = Jobs()
    s.run("A", jobs.job("A0"))
    s.run("B", jobs.job("B"))
    for i in range(1, 6):
        s.run("A", jobs.job(f"A{i}"))
    for name in ["A0", "A1", "A2"]:
        jobs.finish(name)
    assert jobs.started == ["A0", "A1", "A2", "B"]  # B overtaken twice, then runs


def test_close_refuses_queued_and_new_jobs_and_when_idle_waits_for_the_running_one():
    from gpumgr.errors import ShuttingDown

    clock, registry, sched, jobs = make()
    running = sched.run("a", jobs.job("a1"))
    queued = sched.run("b", jobs.job("b1"))
    sched.close(ShuttingDown("draining"))
    assert isinstance(outcome(queued).value, ShuttingDown)
    assert isinstance(outcome(sched.run("c", jobs.job("c1"))).value, ShuttingDown)
    assert jobs.started == ["a1"]
    idle = sched.when_idle()
    assert not idle.called
    jobs.finish("a1")
    assert idle.called and outcome(running) == "ok"
    assert sched.stats().queue_depth == 0 and sched.stats().in_flight == 0
    assert clock.getDelayedCalls() == []  # the queue timer went with the queued job


def test_cancel_running_frees_every_slot():
    clock, registry, sched, jobs = make(capacity=2)
    a, b = sched.run("a", jobs.job("a1")), sched.run("b", jobs.job("b1"))
    sched.cancel_running()
    assert sorted(jobs.cancelled) == ["a1", "b1"]
    assert sched.stats().in_flight == 0 and sched.when_idle().called
    for d in (a, b):
        d.addErrback(lambda f: f.trap(defer.CancelledError))


def test_passthrough_close_and_when_idle():
    from gpumgr.errors import ShuttingDown

    clock = Clock()
    sched = Passthrough(clock, Registry(["a"]))
    jobs = Jobs()
    d = sched.run("a", jobs.job("a1"))
    idle = sched.when_idle()
    sched.close(ShuttingDown("draining"))
    assert isinstance(outcome(sched.run("a", jobs.job("a2"))).value, ShuttingDown)
    assert not idle.called
    jobs.finish("a1")
    assert idle.called and outcome(d) == "ok"


def test_configure_applies_new_limits_and_starts_waiting_jobs():
    clock, registry, sched, jobs = make(capacity=1, max_queue=1)
    sched.run("a", jobs.job("a1"))
    sched.run("b", jobs.job("b1"))
    sched.configure(capacity=2, max_queue=5, queue_timeout_s=60, priority={"tts": 3},
                    aging_s=10, max_overtakes=0)
    assert jobs.started == ["a1", "b1"]  # the larger capacity started the waiter at once
    assert sched.capacity == 2
