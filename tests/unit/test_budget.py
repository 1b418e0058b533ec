"""gpumgr.budget: start, wait or refuse a job on one card's memory budget (pure)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpumgr.budget import (
    Ask,
    Card,
    Holding,
    Refuse,
    Start,
    Wait,
    WaitReason,
    decide,
    fits_after,
)
from gpumgr.eviction import Residency
from gpumgr.memory import FigureSource, MemoryFigure, MemoryProfile

L, U, X = Residency.LOADED, Residency.UNLOADED, Residency.UNKNOWN
CARD = Card(total_mib=24_000, headroom_mib=500)
#: The decisions' clock, and how long a consumer must be idle to be evicted
#: only to make room beside running jobs.
NOW, OVERLAP_IDLE_S = 130.0, 120.0


def profile(resident, peak):
    return MemoryProfile(MemoryFigure(resident, FigureSource.CONFIG),
                         MemoryFigure(peak, FigureSource.CONFIG))


def h(name, residency=U, resident=0, peaks=(), **kw):
    return Holding(name, residency, resident, tuple(peaks), **kw)


def card_of(*holdings):
    return {x.name: x for x in holdings}


def ask(name, resident, peak):
    return Ask(name, profile(resident, peak))


@pytest.mark.parametrize("holdings, job, expected", [
    # Alone on an empty card: it loads.
    (card_of(h("tts")), ask("tts", 2000, 500), Start((), load=True)),
    # Loaded, nothing else: starts with no control work.
    (card_of(h("tts", L, 2000)), ask("tts", 2000, 500), Start()),
    # Side by side: image running (7000 + 4000 peak), tts fits beside it.
    (card_of(h("image", L, 7000, (4000,)), h("tts", L, 2000)), ask("tts", 2000, 500), Start()),
    # Does not fit beside the running image and llm: waits (not refused).
    (card_of(h("image", L, 7000, (4000,)), h("llm", L, 9000, (3000,)), h("tts", U)),
     ask("tts", 2000, 500), Wait(WaitReason.MEMORY)),
    # Fits once the idle llm (LRU) is evicted; the more recent stt stays.
    (card_of(h("image", L, 7000, (4000,)), h("llm", L, 9000, last_used=1.0),
             h("stt", L, 1500, last_used=5.0), h("tts", U)),
     ask("tts", 2000, 1000), Start(("llm",), load=True)),
    # The same, but the llm was used 30 s ago: evicting it only to run beside
    # the image is not worth a swap; the job waits for the image's job to end.
    (card_of(h("image", L, 7000, (4000,)), h("llm", L, 9000, last_used=100.0),
             h("stt", L, 1500, last_used=105.0), h("tts", U)),
     ask("tts", 2000, 1000), Wait(WaitReason.MEMORY)),
    # An eviction the job needs even with nothing running is made however
    # recently the victim was used (as capacity 1 makes it).
    (card_of(h("a", L, 10_000, last_used=129.0), h("b", L, 10_000, last_used=128.0), h("c")),
     ask("c", 5000, 0), Start(("b",), load=True)),
    # LRU first: two idle candidates, the older goes.
    (card_of(h("a", L, 10_000, last_used=9.0), h("b", L, 10_000, last_used=2.0), h("c")),
     ask("c", 5000, 0), Start(("b",), load=True)),
    # A pinned consumer is never a victim: the job waits for its running job's peak.
    (card_of(h("a", L, 18_000, (3000,), pinned=True), h("b", L, 1000, last_used=3.0), h("c")),
     ask("c", 2000, 1000), Wait(WaitReason.MEMORY)),
    # Could not fit on an empty card: refused.
    (card_of(h("c")), ask("c", 20_000, 4000), Refuse("")),
    # Could not fit beside a pinned consumer, ever: refused.
    (card_of(h("a", L, 15_000, pinned=True), h("c")), ask("c", 8000, 1000), Refuse("")),
    # max_concurrency 1 and one job running.
    (card_of(h("tts", L, 2000, (500,))), ask("tts", 2000, 500), Wait(WaitReason.CONCURRENCY)),
    # max_concurrency 2: the second starts.
    (card_of(h("tts", L, 2000, (500,), max_concurrency=2)), ask("tts", 2000, 500), Start()),
    # Exclusivity with a running consumer: waits.
    (card_of(h("image", L, 7000, (4000,), can_coexist_with=()), h("tts", L, 2000)),
     ask("tts", 2000, 500), Wait(WaitReason.EXCLUSIVITY)),
    # Exclusivity with an idle one: evicted even though memory is plenty.
    (card_of(h("image", L, 7000, can_coexist_with=()), h("tts", L, 2000)),
     ask("tts", 2000, 500), Start(("image",))),
    # Exclusivity with a pinned idle one: refused (it can never be unloaded).
    (card_of(h("image", L, 7000, can_coexist_with=(), pinned=True), h("tts", L, 2000)),
     ask("tts", 2000, 500), Refuse("")),
])
def test_decisions(holdings, job, expected):
    got = decide(CARD, holdings, job, now=NOW, overlap_evict_idle_s=OVERLAP_IDLE_S)
    if isinstance(expected, Refuse):
        assert isinstance(got, Refuse)
    elif isinstance(expected, Wait):
        assert isinstance(got, Wait) and got.reason is expected.reason
    else:
        assert got == expected


def test_a_load_in_progress_blocks_another_load_but_not_a_loaded_consumer():
    holdings = card_of(h("llm", U), h("tts", L, 2000), h("stt", U))
    assert decide(CARD, holdings, ask("stt", 1500, 200), control_in_progress="llm") \
        == Wait(WaitReason.LOAD_IN_PROGRESS, "a load or unload of llm is in progress")
    assert decide(CARD, holdings, ask("tts", 2000, 200), control_in_progress="llm") == Start()


def test_an_eviction_waits_for_a_load_in_progress_even_when_the_consumer_is_loaded():
    holdings = card_of(h("big", L, 20_000, last_used=1.0), h("tts", L, 2000), h("llm", U))
    got = decide(CARD, holdings, ask("tts", 2000, 3000), control_in_progress="llm")
    assert isinstance(got, Wait) and got.reason is WaitReason.LOAD_IN_PROGRESS


def test_the_consumer_being_loaded_is_never_a_victim():
    holdings = card_of(h("llm", L, 22_000), h("tts", U))
    got = decide(CARD, holdings, ask("tts", 2000, 500), control_in_progress="llm")
    assert isinstance(got, Wait) and got.reason is WaitReason.MEMORY


def test_may_coexist_is_checked_against_a_consumer_being_loaded():
    holdings = card_of(h("image", U, can_coexist_with=()), h("tts", L, 2000))
    got = decide(CARD, holdings, ask("tts", 2000, 500), control_in_progress="image")
    assert isinstance(got, Wait) and got.reason is WaitReason.EXCLUSIVITY


def test_max_running_bounds_jobs_in_all():
    holdings = card_of(h("a", L, 100, (10, 10), max_concurrency=4), h("b", L, 100))
    got = decide(CARD, holdings, ask("b", 100, 10), max_running=2)
    assert isinstance(got, Wait) and got.reason is WaitReason.MAX_RUNNING


def test_memory_held_by_strangers_counts_but_may_come_back():
    holdings = card_of(h("tts", U))
    crowded = Card(24_000, 500, other_mib=21_001)
    got = decide(crowded, holdings, ask("tts", 2000, 500))
    assert isinstance(got, Wait) and got.reason is WaitReason.MEMORY
    assert decide(Card(24_000, 500, other_mib=21_000), holdings, ask("tts", 2000, 500)) \
        == Start((), load=True)


def test_an_unknown_size_card_runs_one_job_at_a_time():
    holdings = card_of(h("a", L, 100, (10,)), h("b", L, 100))
    unknown = Card(None, 500)
    got = decide(unknown, holdings, ask("b", 100, 10))
    assert isinstance(got, Wait) and got.reason is WaitReason.MEMORY
    assert decide(unknown, card_of(h("a", L, 100), h("b", L, 100)), ask("b", 100, 10)) == Start()


def test_locked_mode_evicts_nothing():
    holdings = card_of(h("a", L, 22_000), h("b"))
    got = decide(CARD, holdings, ask("b", 2000, 0), may_evict=False)
    assert isinstance(got, Wait) and got.reason is WaitReason.MEMORY


def test_the_larger_resident_figure_counts_for_the_job():
    # The registry measured 5000 MiB, the profile says 2000: 5000 counts.
    holdings = card_of(h("x", L, 18_100, (0,)), h("tts", X, 5000))
    got = decide(CARD, holdings, ask("tts", 2000, 500))
    assert isinstance(got, Wait) and got.reason is WaitReason.MEMORY


NAMES = ["a", "b", "c", "d"]


@st.composite
def situations(draw):
    holdings = {}
    for name in NAMES:
        residency = draw(st.sampled_from([L, U, X]))
        resident = draw(st.integers(0, 12_000))
        running = draw(st.integers(0, 2)) if residency is L else 0
        peaks = tuple(draw(st.integers(0, 6000)) for _ in range(running))
        coexist = draw(st.one_of(st.none(), st.lists(st.sampled_from(NAMES), max_size=3)
                                 .map(tuple)))
        holdings[name] = Holding(
            name, residency, resident, peaks, coexist, draw(st.booleans()),
            draw(st.one_of(st.none(), st.floats(0, 100))), draw(st.integers(1, 3)))
    card = Card(draw(st.integers(4000, 48_000)), draw(st.integers(0, 1000)),
                draw(st.integers(0, 4000)))
    target = draw(st.sampled_from(NAMES))
    job = Ask(target, profile(draw(st.integers(0, 12_000)), draw(st.integers(0, 8000))))
    control = draw(st.one_of(st.none(), st.sampled_from(NAMES)))
    return card, holdings, job, control


@settings(max_examples=2000, deadline=None)
@given(situations(), st.integers(1, 8))
def test_whatever_it_starts_fits_the_card(situation, max_running):
    card, holdings, job, control = situation
    got = decide(card, holdings, job, control_in_progress=control, max_running=max_running)
    if not isinstance(got, Start):
        return
    me = holdings[job.consumer]
    # The budget holds: residents + running peaks + this job + headroom <= total.
    assert fits_after(card, holdings, job, got) <= card.total_mib
    assert me.running < me.max_concurrency
    assert sum(x.running for x in holdings.values()) < max_running
    for victim in got.victims:
        v = holdings[victim]
        assert victim != job.consumer and not v.pinned and not v.running
        assert v.residency is not U and victim != control
    if got.control:
        assert control is None
    assert got.load == (me.residency is not L)
    from gpumgr.budget import may_coexist
    for other in holdings.values():
        if other.name != me.name and (other.running or other.name == control):
            assert may_coexist(me, other)
        if other.name != me.name and other.residency is not U and not may_coexist(me, other):
            assert other.name in got.victims


@settings(max_examples=1000, deadline=None)
@given(situations())
def test_refused_only_when_it_cannot_fit_on_an_empty_card(situation):
    card, holdings, job, _ = situation
    me = holdings[job.consumer]
    empty = {n: Holding(n, U, me.resident_mib if n == me.name else 0) for n in holdings}
    alone = decide(card, empty, job)
    got = decide(card, holdings, job)
    if isinstance(alone, Refuse):
        assert isinstance(got, Refuse)
    if isinstance(got, Refuse) and not isinstance(alone, Refuse):
        # Only pinned consumers (that can never leave) explain it.
        assert any(x.pinned and x.residency is not U for x in holdings.values())


def test_memory_a_sample_saw_before_a_job_ended_is_not_counted_as_others():
    from gpumgr.budget_figures import Figures, with_running

    # Taken at t=10 while a render held its 4000 MiB peak; read after it ended.
    holdings = card_of(h("image", L, 7000), h("tts", L, 2000))
    figures = Figures(CARD, holdings, measured_used_mib=13_000, sampled_at=10.0)
    after_the_end = with_running(figures, {}, released=[(11.0, 4000)])
    assert after_the_end.card.other_mib == 0
    assert isinstance(decide(after_the_end.card, holdings, ask("tts", 2000, 500)), Start)
    # A job that ended before the sample was not in it: what the sample shows
    # beyond the figures is someone else's (a stranger, a peak above its figure).
    before = with_running(figures, {}, released=[(9.0, 4000)])
    assert before.card.other_mib == 4000
    # No sample time: nothing is taken back.
    unknown = with_running(Figures(CARD, holdings, 13_000), {}, released=[(11.0, 4000)])
    assert unknown.card.other_mib == 4000


def test_others_memory_seen_on_a_quiet_card_is_not_hidden_by_a_peak_not_yet_taken():
    from gpumgr.budget_figures import Figures, quiet_other_mib, with_running

    holdings = card_of(h("image", L, 7000), h("tts", L, 2000))
    quiet = Figures(CARD, holdings, measured_used_mib=9350, sampled_at=1.0)
    assert quiet_other_mib(quiet) == 350  # the driver's, a display's
    # Later a render runs; the sample came before it took its 4000 MiB peak.
    busy = Figures(CARD, holdings, measured_used_mib=9350, sampled_at=5.0)
    running = {"image": (profile(7000, 4000),)}
    assert with_running(busy, running).card.other_mib == 0  # hidden by the peak to come
    floored = with_running(busy, running, other_floor_mib=350)
    assert floored.card.other_mib == 350
    # 7000 + 4000 + 2000 + 10_300 + 500 = 23_800 fits the figures, but with the
    # 350 MiB that are others' it is 24_150 > 24_000: it waits. Without the floor
    # it would have started, and run out of memory on the real card.
    big = ask("tts", 2000, 10_300)
    assert isinstance(decide(with_running(busy, running).card, floored.holdings, big), Start)
    assert isinstance(decide(floored.card, floored.holdings, big), Wait)
