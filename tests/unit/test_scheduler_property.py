"""Property: whatever happens, the Locked scheduler never leaks its lock.

Random interleavings of arrivals, completions, upstream failures, synchronous
exceptions, client cancels, queue timeouts and a shutdown drain (close, then
cancel what still runs), at capacity 1 and 2. Some jobs are a drain after a
client left (`AbandonedWork.settle`): they end on a quiet card, on their
grace, or cancelled. After every sequence the lock is free, no drain is left
and the books balance.
"""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.task import Clock

from gpumgr.abandoned import AbandonedWork, Evidence
from gpumgr.errors import QueueFull, QueueTimeout, ShuttingDown
from gpumgr.gpu import GpuInfo, GpuSample
from gpumgr.registry import Registry
from gpumgr.scheduler import Locked

CONSUMERS = ["a", "b", "c"]
KINDS = ["tts", "stt", "llm", "image"]

op = st.one_of(
    st.tuples(st.just("arrive"), st.integers(0, 2), st.integers(0, 3),
              st.sampled_from(["async", "async", "async", "raise", "sync", "drain"])),
    st.tuples(st.just("complete"), st.integers(0, 50)),
    st.tuples(st.just("fail"), st.integers(0, 50)),
    st.tuples(st.just("cancel"), st.integers(0, 50)),
    st.tuples(st.just("advance"), st.floats(0, 20)),
    st.tuples(st.just("close")),
    st.tuples(st.just("abort")),
    st.tuples(st.just("card"), st.sampled_from(["busy", "idle", "unavailable"])),
)


class Job:
    def __init__(self, n, how):
        self.n = n
        self.how = how
        self.starts = 0
        self.inner = None
        self.outer = None
        self.outcomes = []


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    capacity=st.sampled_from([1, 2]),
    max_queue=st.integers(1, 6),
    queue_timeout_s=st.sampled_from([5.0, 15.0]),
    ops=st.lists(op, max_size=60),
)
def test_no_leak_under_any_interleaving(capacity, max_queue, queue_timeout_s, ops):
    clock = Clock()
    registry = Registry(CONSUMERS)
    sched = Locked(clock, registry, capacity=capacity, max_queue=max_queue,
                   queue_timeout_s=queue_timeout_s, priority={"tts": 2, "llm": 1}, aging_s=7)
    jobs: list[Job] = []
    running: list[Job] = []  # as the jobs themselves see it
    max_running = 0
    closed = False
    card = {"state": "busy"}

    def sample():
        if card["state"] == "unavailable":
            return defer.succeed(GpuSample(sampled_at=clock.seconds(), error="driver"))
        util = 97 if card["state"] == "busy" else 0
        return defer.succeed(GpuSample(sampled_at=clock.seconds(), gpus=(
            GpuInfo(0, "sim", 24576, 9000, 15576, util, 40),)))

    abandoned = AbandonedWork(clock, sample, lambda *a, **k: None)

    def make_run(job):
        def run():
            nonlocal max_running
            job.starts += 1
            if job.how == "raise":
                raise RuntimeError("job blew up")
            if job.how == "sync":
                return defer.succeed("done-sync")
            if job.how == "drain":
                job.inner = defer.ensureDeferred(abandoned.settle("a", 3.0))
            else:
                job.inner = defer.Deferred()
            job.inner.addBoth(lambda r: (running.remove(job), r)[1])
            running.append(job)
            max_running = max(max_running, len(running))
            return job.inner
        return run

    for step in ops:
        kind = step[0]
        if kind == "arrive":
            job = Job(len(jobs), step[3])
            jobs.append(job)
            job.outer = sched.run(CONSUMERS[step[1]], make_run(job), kind=KINDS[step[2]])
            job.outer.addBoth(job.outcomes.append)
        elif kind in ("complete", "fail") and [j for j in running if j.how != "drain"]:
            relayed = [j for j in running if j.how != "drain"]
            job = relayed[step[1] % len(relayed)]
            if kind == "complete":
                job.inner.callback("done")
            else:
                job.inner.errback(ConnectionError("upstream broke"))
        elif kind == "cancel" and jobs:
            jobs[step[1] % len(jobs)].outer.cancel()
        elif kind == "advance":
            clock.advance(step[1])
        elif kind == "close":
            closed = True
            sched.close(ShuttingDown("draining"))
        elif kind == "abort":
            sched.cancel_running()
        elif kind == "card":
            card["state"] = step[1]
        assert len(running) <= capacity
        assert sched.stats().in_flight <= capacity

    # Drain: finish whatever runs, let every queue timer fire.
    for _ in range(len(jobs) + 2):
        while [j for j in running if j.how != "drain"]:
            [j for j in running if j.how != "drain"][0].inner.callback("done")
        clock.advance(queue_timeout_s + 1)  # past every drain's grace too

    stats = sched.stats()
    assert stats.in_flight == 0 and stats.queue_depth == 0
    assert max_running <= capacity and sched.max_running_seen <= capacity
    assert all(registry[c].active == 0 for c in CONSUMERS)
    assert clock.getDelayedCalls() == []
    assert abandoned.draining == {}
    drains_run = sum(j.starts for j in jobs if j.how == "drain")
    assert sum(abandoned.outcomes.values()) == drains_run
    assert set(abandoned.outcomes) <= {Evidence.GPU_IDLE.value, Evidence.GRACE_EXPIRED.value,
                                       "cancelled"}

    rejected = 0
    for job in jobs:
        assert len(job.outcomes) == 1, job.n  # answered exactly once
        result = job.outcomes[0]
        refused = isinstance(result, defer.Failure) and result.check(
            QueueFull, QueueTimeout, ShuttingDown)
        cancelled = isinstance(result, defer.Failure) and result.check(defer.CancelledError)
        assert job.starts in (0, 1)
        if refused:
            rejected += 1
            assert job.starts == 0  # never both rejected and run
        if job.starts == 0:
            assert refused or cancelled
        if isinstance(result, defer.Failure):
            result.trap(QueueFull, QueueTimeout, ShuttingDown, defer.CancelledError,
                        RuntimeError, ConnectionError)
    shut_out = sum(1 for j in jobs if isinstance(j.outcomes[0], defer.Failure)
                   and j.outcomes[0].check(ShuttingDown))
    assert stats.rejected == rejected - shut_out
    assert stats.total_jobs == sum(j.starts for j in jobs)

    assert sched.when_idle().called
    # The lock is free: a new job starts at once (or, once closed, is refused at once).
    probe = Job(-1, "async")
    d = sched.run("a", make_run(probe))
    if closed:
        assert probe.starts == 0 and d.called
        d.addErrback(lambda f: f.trap(ShuttingDown))
    else:
        assert probe.starts == 1
