"""gpumgr.scheduler_auto: jobs side by side when their memory fits (task.Clock, no sockets).

A small card model stands in for the real one: each job carries out what its
grant says (unloads its victims, loads its consumer), and the test checks the
card's books after every step, independently of the scheduler's own.
"""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.task import Clock

from gpumgr.budget import Card, Holding, WaitReason
from gpumgr.budget_figures import Figures
from gpumgr.errors import InsufficientVram, QueueFull, QueueTimeout, ShuttingDown
from gpumgr.eviction import Residency
from gpumgr.memory import FigureSource, MemoryFigure, MemoryProfile
from gpumgr.registry import Registry
from gpumgr.scheduler_auto import Auto

TOTAL, HEADROOM = 24_000, 500


def prof(resident, peak):
    return MemoryProfile(MemoryFigure(resident, FigureSource.CONFIG),
                         MemoryFigure(peak, FigureSource.CONFIG))


class World:
    """Consumers with profiles, what is loaded, and the jobs that run."""

    def __init__(self, profiles, coexist=None, max_concurrency=None, max_bypass_s=30.0,
                 max_running=8, queue_timeout_s=600.0, max_queue=64, overlap_evict_idle_s=120.0):
        self.clock = Clock()
        self.profiles = dict(profiles)
        self.coexist = coexist or {}
        self.max_concurrency = max_concurrency or {}
        self.loaded: set[str] = set()
        self.registry = Registry(self.profiles)
        self.running = []  # (consumer, profile, deferred, grant)
        self.loads_at_once = 0
        self.max_loads_at_once = 0
        self.sched = Auto(self.clock, self.registry, self.figures, self.profile_of,
                          max_queue=max_queue, queue_timeout_s=queue_timeout_s,
                          priority={"tts": 10}, aging_s=1000.0, max_bypass_s=max_bypass_s,
                          max_running=max_running, overlap_evict_idle_s=overlap_evict_idle_s)

    def profile_of(self, name, model):
        return self.profiles.get(name)

    def figures(self):
        holdings = {}
        for name, p in self.profiles.items():
            state = self.registry[name]
            holdings[name] = Holding(
                name, Residency.LOADED if name in self.loaded else Residency.UNLOADED,
                p.resident.mib if name in self.loaded else 0, (), self.coexist.get(name),
                False, state.last_used, self.max_concurrency.get(name, 1))
        return Figures(Card(TOTAL, HEADROOM), holdings)

    def submit(self, name, kind=None, manual_control=False):
        """A job that unloads its victims and loads its consumer at once (or,
        `manual_control`, leaves the grant's control part open until told)."""
        outcomes = []

        def job(grant):
            d = defer.Deferred()
            for victim in grant.start.victims:
                self.loaded.discard(victim)
            if grant.start.control:
                self.loads_at_once += 1
                self.max_loads_at_once = max(self.max_loads_at_once, self.loads_at_once)
            entry = [name, self.profiles[name], d, grant]
            self.running.append(entry)

            def control_over():
                self.loaded.add(name)
                if grant.start.control:
                    self.loads_at_once -= 1
                grant.control_done()

            entry.append(control_over)
            if not manual_control:
                control_over()
            d.addBoth(lambda r: (self.running.remove(entry), r)[1])
            return d

        outer = self.sched.run_granted(name, job, kind=kind)
        outer.addBoth(outcomes.append)
        return outcomes

    def names_running(self):
        return sorted(e[0] for e in self.running)

    def end(self, name):
        entry = next(e for e in self.running if e[0] == name)
        if len(entry) > 4 and self.loads_at_once and entry[3].start.control \
                and name not in self.loaded:
            entry[4]()
        entry[2].callback("done")

    def used_mib(self):
        return (sum(self.profiles[n].resident.mib for n in self.loaded | {e[0] for e in self.running})
                + sum(e[1].job_peak.mib for e in self.running))


def test_two_jobs_run_side_by_side_only_when_they_fit():
    # Any idle consumer may be evicted to run beside a running job here.
    w = World({"image": prof(7000, 4000), "tts": prof(2000, 500), "llm": prof(9000, 3000)},
              overlap_evict_idle_s=0.0)
    w.submit("image")
    w.submit("tts")
    assert w.names_running() == ["image", "tts"]
    llm = w.submit("llm")  # 7000+4000 + 2000+500 + 9000+3000 + 500 > 24000
    assert w.names_running() == ["image", "tts"] and llm == []
    assert w.sched.waiting_reasons() == (("llm", None, WaitReason.MEMORY, w.sched.waiting_reasons()[0][3]),)
    w.end("tts")  # tts is idle now, and evicted for llm: still 1500 short? 7000+4000+9000+3000+500=23500
    assert w.names_running() == ["image", "llm"] and "tts" not in w.loaded
    assert w.used_mib() + HEADROOM <= TOTAL


def test_a_consumer_used_recently_is_not_swapped_out_only_to_run_beside_others():
    w = World({"image": prof(7000, 4000), "tts": prof(2000, 500), "llm": prof(9000, 3000)})
    w.submit("image")
    w.submit("tts")
    llm = w.submit("llm")
    w.end("tts")  # idle now, but used this second: llm waits for the image instead
    assert w.names_running() == ["image"] and "tts" in w.loaded and llm == []
    assert w.sched.waiting_reasons()[0][:3] == ("llm", None, WaitReason.MEMORY)
    w.clock.advance(120)  # idle long enough: now worth a swap to run beside the image
    w.sched.poke()
    assert w.names_running() == ["image", "llm"] and "tts" not in w.loaded
    assert w.used_mib() + HEADROOM <= TOTAL


def test_a_job_that_does_not_fit_waits_and_starts_when_memory_comes_back():
    w = World({"a": prof(10_000, 4000), "b": prof(8000, 2000)})
    w.submit("a")
    b = w.submit("b")
    assert w.names_running() == ["a"] and b == []
    w.end("a")
    assert w.names_running() == ["b"]


def test_a_job_too_big_for_an_empty_card_is_refused_at_once():
    w = World({"huge": prof(20_000, 4000)})
    out = w.submit("huge")
    assert len(out) == 1 and out[0].check(InsufficientVram)
    assert w.registry["huge"].active == 0


def test_exclusivity_and_max_concurrency_hold_while_jobs_run():
    w = World({"image": prof(7000, 1000), "tts": prof(2000, 500)},
              coexist={"image": ()}, max_concurrency={"tts": 2})
    w.submit("tts")
    w.submit("tts")
    third = w.submit("tts")
    assert w.names_running() == ["tts", "tts"] and third == []
    assert w.sched.waiting_reasons()[0][2] is WaitReason.CONCURRENCY
    image = w.submit("image")
    assert image == [] and w.names_running() == ["tts", "tts"]
    w.end("tts")
    assert w.names_running() == ["tts", "tts"]  # the third tts went first (image can't)
    w.end("tts")
    w.end("tts")
    assert w.names_running() == ["image"] and "tts" not in w.loaded


def test_two_loads_never_overlap():
    w = World({"a": prof(2000, 100), "b": prof(2000, 100), "c": prof(2000, 100)})
    w.submit("a", manual_control=True)
    w.submit("b", manual_control=True)
    assert w.names_running() == ["a"]
    assert w.sched.waiting_reasons()[0][2] is WaitReason.LOAD_IN_PROGRESS
    w.running[0][4]()  # a's load is over
    assert w.names_running() == ["a", "b"]
    assert w.max_loads_at_once == 1


def test_the_bypass_bound_holds():
    # big waits for memory while small jobs keep fitting beside a long job; a
    # small job's peak would also keep big out once long ends.
    w = World({"long": prof(10_000, 2000), "big": prof(9000, 3000), "small": prof(1000, 1500)},
              max_concurrency={"small": 4}, max_bypass_s=30.0)
    w.submit("long")
    w.submit("big")
    w.submit("small")
    assert w.names_running() == ["long", "small"]  # backfill
    w.clock.advance(31)
    w.end("small")
    later = w.submit("small")  # fits, but big has waited past the bound
    assert later == [] and w.names_running() == ["long"]
    assert [r[2] for r in w.sched.waiting_reasons()] == [WaitReason.MEMORY, WaitReason.BYPASS]
    w.end("long")  # 10000 + 9000+3000 + 1000+1500 + headroom > total: big alone
    assert w.names_running() == ["big"]


def test_past_the_bypass_bound_a_job_that_cannot_delay_the_oldest_still_starts():
    # The same, but small is small enough to run beside big once long ends:
    # starting it now delays nobody (EASY backfill, on memory).
    w = World({"long": prof(10_000, 2000), "big": prof(9000, 3000), "small": prof(1000, 500)},
              max_concurrency={"small": 4}, max_bypass_s=30.0)
    w.submit("long")
    w.submit("big")
    w.submit("small")
    w.clock.advance(31)
    w.end("small")
    later = w.submit("small")
    assert later == [] and w.names_running() == ["long", "small"]
    w.end("long")
    assert w.names_running() == ["big", "small"]  # big started the moment it fit
    assert w.used_mib() + HEADROOM <= TOTAL


def test_a_job_replays_alone():
    w = World({"a": prof(2000, 100), "b": prof(2000, 100), "c": prof(2000, 100)})
    w.submit("a")
    w.submit("b")
    grant = w.running[0][3]
    alone = grant.alone()
    assert not alone.called
    c = w.submit("c")
    assert c == [] and w.sched.waiting_reasons()[0][2] is WaitReason.ALONE
    w.end("b")
    assert alone.called and w.names_running() == ["a"]
    w.end("a")
    assert w.names_running() == ["c"]


def test_a_cancelled_job_waiting_to_be_alone_releases_everything():
    w = World({"a": prof(2000, 100), "b": prof(2000, 100)})
    w.submit("a")
    w.submit("b")
    w.running[0][3].alone().addErrback(lambda f: f.trap(defer.CancelledError))
    w.running[0][2].cancel()
    b = w.submit("b")
    w.end("b")
    assert w.names_running() == ["b"] and b == []


def test_a_control_job_runs_alone():
    w = World({"a": prof(2000, 100), "b": prof(2000, 100)})
    w.submit("a")
    ran = []
    control = w.sched.run("b", lambda: ran.append(1) or defer.succeed(None), control=True)
    assert ran == [] and not control.called
    w.end("a")
    assert ran == [1] and control.called


NAMES = ["a", "b", "c", "d"]

op = st.one_of(
    st.tuples(st.just("arrive"), st.integers(0, 3), st.sampled_from(["async", "raise", "sync"])),
    st.tuples(st.just("end"), st.integers(0, 50), st.booleans()),
    st.tuples(st.just("cancel"), st.integers(0, 50)),
    st.tuples(st.just("control_done"), st.integers(0, 50)),
    st.tuples(st.just("advance"), st.floats(0, 40)),
    st.tuples(st.just("close")),
    st.tuples(st.just("abort")),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.tuples(st.integers(0, 14_000), st.integers(0, 9000)), min_size=4,
                   max_size=4),
    concurrency=st.lists(st.integers(1, 3), min_size=4, max_size=4),
    max_running=st.integers(1, 5),
    ops=st.lists(op, max_size=60),
)
def test_the_card_never_overflows_and_no_slot_leaks(sizes, concurrency, max_running, ops):
    w = World({n: prof(*s) for n, s in zip(NAMES, sizes)},
              max_concurrency=dict(zip(NAMES, concurrency)), max_running=max_running,
              queue_timeout_s=50.0, max_queue=8)
    submitted = []
    outers = []
    open_control = []

    def job_for(name, how):
        return random_job(w, name, how, open_control)

    for step in ops:
        if step[0] == "arrive":
            out = []
            outer = w.sched.run_granted(NAMES[step[1]], job_for(NAMES[step[1]], step[2]))
            outer.addBoth(out.append)
            submitted.append(out)
            outers.append(outer)
        elif step[0] == "end" and w.running:
            entry = w.running[step[1] % len(w.running)]
            if step[2]:
                entry[2].callback("done")
            else:
                entry[2].errback(ConnectionError("upstream broke"))
        elif step[0] == "cancel" and outers:
            outers[step[1] % len(outers)].cancel()
        elif step[0] == "control_done" and open_control:
            open_control.pop(step[1] % len(open_control)).control_done()
        elif step[0] == "advance":
            w.clock.advance(step[1])
        elif step[0] == "close":
            w.sched.close(ShuttingDown("draining"))
        elif step[0] == "abort":
            w.sched.cancel_running()
        # The books, as the jobs themselves see them.
        assert w.used_mib() + HEADROOM <= TOTAL
        assert len(w.running) <= max_running
        for n, c in zip(NAMES, concurrency):
            assert sum(1 for e in w.running if e[0] == n) <= c

    for _ in range(len(submitted) + 2):
        while w.running:
            w.running[0][2].callback("done")
        w.clock.advance(51)
    stats = w.sched.stats()
    assert stats.in_flight == 0 and stats.queue_depth == 0
    assert all(w.registry[n].active == 0 for n in NAMES)
    assert w.clock.getDelayedCalls() == []
    for out in submitted:
        assert len(out) == 1
        if isinstance(out[0], defer.Failure):
            out[0].trap(QueueFull, QueueTimeout, ShuttingDown, InsufficientVram,
                        defer.CancelledError, RuntimeError, ConnectionError)


def test_a_job_without_a_grant_runs_alone_and_counts_as_a_job():
    w = World({"a": prof(2000, 100), "b": prof(2000, 100)})
    w.submit("a")
    ran = []
    plain = w.sched.run("b", lambda: ran.append(1) or defer.Deferred(), kind="tts")
    assert ran == [] and w.sched.waiting_reasons()[0][2] is WaitReason.ALONE
    w.end("a")
    assert ran == [1] and w.registry["b"].active == 1
    later = w.submit("a")
    assert later == [] and w.names_running() == []  # a waits for the plain job to end
    plain.cancel()
    plain.addErrback(lambda f: f.trap(defer.CancelledError))
    assert w.names_running() == ["a"] and w.registry["b"].active == 0


def random_job(w, name, how, open_control):
    """A granted job for the property tests: it carries out its evictions,
    then raises, ends at once, or runs until the test ends it."""
    def job(grant):
        for victim in grant.start.victims:
            w.loaded.discard(victim)
        if how == "raise":
            raise RuntimeError("job blew up")
        w.loaded.add(name)
        if how == "sync":
            grant.control_done()
            return defer.succeed("sync")
        d = defer.Deferred()
        entry = [name, w.profiles[name], d, grant]
        w.running.append(entry)
        if grant.start.control:
            open_control.append(grant)
        d.addBoth(lambda r: (w.running.remove(entry), r)[1])
        return d
    return job
