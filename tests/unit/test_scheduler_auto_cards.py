"""`scheduler.capacity: auto` on two cards: one queue, a budget per card (task.Clock, no sockets).

The small card model of test_scheduler_auto, per card: each consumer lives
on the cards `homes` names; a job carries out its grant, and the test checks
every card's books after every step, independently of the scheduler's own.
"""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer

from gpumgr.auto_cards import AutoCards, combine
from gpumgr.budget import Card, Holding, Refuse, Start, Wait, WaitReason
from gpumgr.budget_figures import Figures
from gpumgr.errors import GpuMissing, InsufficientVram, QueueFull, QueueTimeout, ShuttingDown
from gpumgr.eviction import Residency
from gpumgr.scheduler_auto import Auto
from tests.unit.test_scheduler_auto import HEADROOM, World, prof, random_job


class Cards(World):
    """Two cards; `homes`: consumer -> the cards it lives on."""

    def __init__(self, profiles, homes, totals=(24_000, 12_000), missing=(), **kw):
        super().__init__(profiles, **kw)
        self.homes = homes
        self.totals = totals
        self.missing = set(missing)
        self.sched = Auto(
            self.clock, self.registry, self.figures, self.profile_of, max_queue=kw.get("max_queue", 64),
            queue_timeout_s=kw.get("queue_timeout_s", 600.0), priority={"tts": 10}, aging_s=1000.0,
            max_bypass_s=kw.get("max_bypass_s", 30.0), max_running=kw.get("max_running", 8),
            overlap_evict_idle_s=kw.get("overlap_evict_idle_s", 120.0),
            cards=AutoCards(self.cards_of, self.cards_of, self.card_figures, self.refusal))

    def figures(self):
        raise AssertionError("with several cards, only each card's figures are read")

    def cards_of(self, name):
        return self.homes[name]

    def refusal(self, name, cards):
        gone = self.missing & set(cards)
        return GpuMissing(f"GPU {sorted(gone)} is gone", consumer=name) if gone else None

    def card_figures(self, card):
        holdings = {}
        for name, p in self.profiles.items():
            if card not in self.homes[name]:
                continue
            loaded = name in self.loaded
            holdings[name] = Holding(
                name, Residency.LOADED if loaded else Residency.UNLOADED,
                p.resident.mib if loaded else 0, (), self.coexist.get(name), False,
                self.registry[name].last_used, self.max_concurrency.get(name, 1))
        return Figures(Card(self.totals[card], HEADROOM), holdings)

    def used_on(self, card):
        running = [e for e in self.running if card in self.homes[e[0]]]
        held = {n for n in self.loaded | {e[0] for e in running} if card in self.homes[n]}
        return (sum(self.profiles[n].resident.mib for n in held)
                + sum(e[1].job_peak.mib for e in running))

    def check_books(self):
        for card, total in enumerate(self.totals):
            assert self.used_on(card) + HEADROOM <= total, f"card {card} overflows"


def test_combine_refuses_on_any_card_waits_on_any_and_joins_victims():
    wait = Wait(WaitReason.MEMORY, "card 1 is full")
    assert combine([Start(("a",)), wait]) is wait
    refuse = Refuse("too big for card 1")
    assert combine([wait, refuse]) is refuse
    assert combine([Start(("a", "b"), load=False), Start(("b", "c"), load=True)]) \
        == Start(("a", "b", "c"), load=True)


def test_jobs_on_different_cards_run_at_once_even_when_one_card_is_full():
    w = Cards({"image": prof(15_000, 8000), "image2": prof(1000, 1000), "tts": prof(2000, 500)},
              {"image": (0,), "image2": (0,), "tts": (1,)}, max_bypass_s=0.0)
    w.submit("image")  # 23000 + 500 headroom of card 0's 24000
    waiting = w.submit("image2")
    assert waiting == [] and w.sched.waiting_reasons()[0][:3] == ("image2", None, WaitReason.MEMORY)
    # The oldest waiting job is on card 0, and may not be overtaken at all
    # (max_bypass_s 0): a job on card 1 overtakes nobody.
    w.clock.advance(5)
    w.submit("tts")
    assert w.names_running() == ["image", "tts"]
    w.check_books()
    w.end("image")
    assert w.names_running() == ["image2", "tts"]


def test_max_running_and_jobs_alone_are_per_card():
    w = Cards({"a": prof(2000, 100), "b": prof(2000, 100), "c": prof(2000, 100)},
              {"a": (0,), "b": (1,), "c": (0,)}, max_running=1)
    w.submit("a")
    w.submit("b")
    assert w.names_running() == ["a", "b"]
    w.end("b")
    alone = w.running[0][3].alone()  # a replays an out-of-memory answer alone on card 0
    assert alone.called
    c = w.submit("c")
    b = w.submit("b")
    assert c == [] and w.names_running() == ["a", "b"]
    assert [r[2] for r in w.sched.waiting_reasons()] == [WaitReason.ALONE]
    ran = []
    w.sched.run("b", lambda: ran.append(1) or defer.succeed(None), control=True)
    assert ran == []  # a control job waits for card 1's job only
    w.end("b")
    assert ran == [1] and b == ["done"]


def test_a_consumer_on_both_cards_needs_room_on_both():
    w = Cards({"vllm": prof(5000, 2000), "big1": prof(6000, 3000), "idle0": prof(1000, 0)},
              {"vllm": (0, 1), "big1": (1,), "idle0": (0,)})
    w.loaded.add("idle0")
    w.submit("big1")
    vllm = w.submit("vllm")  # card 0 is nearly empty; card 1: 9000 + 7000 + 500 > 12000
    assert vllm == [] and w.names_running() == ["big1"]
    assert w.sched.waiting_reasons()[0][2] is WaitReason.MEMORY
    w.end("big1")  # idle now: 6000 + 7000 + 500 > 12000 even alone, so it goes
    assert w.names_running() == ["vllm"]
    assert "big1" not in w.loaded and "idle0" in w.loaded
    w.check_books()


def test_an_eviction_for_card_1_never_picks_a_consumer_only_on_card_0():
    w = Cards({"image": prof(7000, 0), "tts": prof(2000, 0), "llm": prof(9000, 2000)},
              {"image": (0,), "tts": (1,), "llm": (1,)})
    w.loaded.update({"image", "tts"})
    w.submit("tts")
    w.end("tts")  # tts used just now; image never: image would go first on one card
    w.submit("llm")  # card 1: 2000 + 11000 + 500 > 12000
    assert w.names_running() == ["llm"]
    assert w.running[0][3].start.victims == ("tts",)
    assert "image" in w.loaded and "tts" not in w.loaded


def test_a_load_on_card_0_does_not_block_a_job_on_card_1():
    w = Cards({"image": prof(7000, 1000), "flux": prof(5000, 1000), "tts": prof(2000, 500)},
              {"image": (0,), "flux": (0,), "tts": (1,)})
    w.submit("image", manual_control=True)  # loading image on card 0, not over yet
    flux = w.submit("flux")
    w.submit("tts")  # a load on card 1
    assert w.names_running() == ["image", "tts"] and flux == []
    assert w.sched.waiting_reasons()[0][:3] == ("flux", None, WaitReason.LOAD_IN_PROGRESS)
    assert w.max_loads_at_once == 2  # one per card
    w.running[0][4]()  # image's load is over
    assert w.names_running() == ["flux", "image", "tts"]


def test_a_job_whose_card_is_gone_is_refused_at_once_while_the_other_card_goes_on():
    w = Cards({"image": prof(7000, 1000), "tts": prof(2000, 500)},
              {"image": (0,), "tts": (1,)}, missing={0})
    image = w.submit("image")
    w.submit("tts")
    assert len(image) == 1 and image[0].check(GpuMissing)
    assert w.names_running() == ["tts"]


def test_a_job_too_big_for_one_of_its_cards_is_refused():
    w = Cards({"vllm": prof(10_000, 2000)}, {"vllm": (0, 1)})  # fits card 0, not card 1
    out = w.submit("vllm")
    assert len(out) == 1 and out[0].check(InsufficientVram)


NAMES = ["a", "b", "c", "d"]
HOMES = [(0,), (1,), (0, 1)]

op = st.one_of(
    st.tuples(st.just("arrive"), st.integers(0, 3), st.sampled_from(["async", "raise", "sync"])),
    st.tuples(st.just("end"), st.integers(0, 50), st.booleans()),
    st.tuples(st.just("cancel"), st.integers(0, 50)),
    st.tuples(st.just("control_done"), st.integers(0, 50)),
    st.tuples(st.just("alone"), st.integers(0, 50)),
    st.tuples(st.just("advance"), st.floats(0, 40)),
    st.tuples(st.just("close")),
    st.tuples(st.just("abort")),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.tuples(st.integers(0, 14_000), st.integers(0, 9000)), min_size=4,
                   max_size=4),
    homes=st.lists(st.sampled_from(HOMES), min_size=4, max_size=4),
    concurrency=st.lists(st.integers(1, 3), min_size=4, max_size=4),
    max_running=st.integers(1, 5),
    ops=st.lists(op, max_size=60),
)
def test_no_card_ever_overflows_and_no_slot_leaks(sizes, homes, concurrency, max_running, ops):
    w = Cards({n: prof(*s) for n, s in zip(NAMES, sizes)}, dict(zip(NAMES, homes)),
              max_concurrency=dict(zip(NAMES, concurrency)), max_running=max_running,
              queue_timeout_s=50.0, max_queue=8)
    submitted, outers, open_control = [], [], []

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
        elif step[0] == "alone" and w.running:
            w.running[step[1] % len(w.running)][3].alone().addErrback(
                lambda f: f.trap(defer.CancelledError))
        elif step[0] == "advance":
            w.clock.advance(step[1])
        elif step[0] == "close":
            w.sched.close(ShuttingDown("draining"))
        elif step[0] == "abort":
            w.sched.cancel_running()
        w.check_books()
        for card in (0, 1):
            here = [e for e in w.running if card in w.homes[e[0]]]
            assert len(here) <= max_running
        for n, c in zip(NAMES, concurrency):
            assert sum(1 for e in w.running if e[0] == n) <= c

    for _ in range(len(submitted) + 2):
        while w.running:
            w.running[0][2].callback("done")
        w.clock.advance(51)
    stats = w.sched.stats()
    assert stats.in_flight == 0 and stats.queue_depth == 0
    assert all(w.registry[n].active == 0 for n in NAMES)
    assert w.sched._claims.control == {} and w.sched._claims.alone == {}
    assert w.clock.getDelayedCalls() == []
    for out in submitted:
        assert len(out) == 1
        if isinstance(out[0], defer.Failure):
            out[0].trap(QueueFull, QueueTimeout, ShuttingDown, InsufficientVram,
                        defer.CancelledError, RuntimeError, ConnectionError)
