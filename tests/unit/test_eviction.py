"""The pure eviction decision, without a reactor."""


from hypothesis import given, settings
from hypothesis import strategies as st

from gpumgr.eviction import ConsumerView, Residency, may_coexist, plan_eviction, settled

_RESIDENCY = {True: Residency.LOADED, False: Residency.UNLOADED, None: Residency.UNKNOWN}


def view(name, loaded=True, mib=4000, coexist=None, pinned=False, last_used=None, resident=None):
    """`loaded` True, False or None (unknown), for brevity."""
    return ConsumerView(
        name=name, residency=_RESIDENCY[loaded],
        resident_mib=(mib if loaded is not False else 0) if resident is None else resident,
        vram_resident_mib=mib, can_coexist_with=coexist, pinned=pinned, last_used=last_used)


def fits(plan):
    """The plan leaves nothing in the way: no blocker, no shortfall."""
    return not plan.blocked_by and plan.shortfall_mib == 0


def views(*vs):
    return {v.name: v for v in vs}


def test_coexistence_rules_both_directions():
    a, b = view("a"), view("b")
    assert may_coexist(a, b)  # no lists: anything goes
    assert not may_coexist(view("a", coexist=["c"]), b)  # a's list excludes b
    assert not may_coexist(a, view("b", coexist=[]))  # b's list excludes a
    assert may_coexist(view("a", coexist=["b"]), b)  # listed on one side only
    assert not may_coexist(view("a", coexist=["b"]), view("b", coexist=["c"]))


def test_exclusivity_evicts_even_when_memory_would_fit():
    plan = plan_eviction("c", views(view("c", loaded=False, coexist=["a"], mib=2000),
                                    view("a", last_used=5), view("b", last_used=1)),
                         free_mib=20000, headroom_mib=512)
    assert plan.victims == (("b", "exclusivity"),)
    assert fits(plan)


def test_exclusivity_from_the_other_side():
    plan = plan_eviction("c", views(view("c", loaded=False), view("a", coexist=["b"])),
                         free_mib=20000, headroom_mib=0)
    assert plan.victim_names() == ("a",)


def test_unknown_state_is_evicted_for_exclusivity_and_not_when_unloaded():
    plan = plan_eviction("c", views(view("c", loaded=False, coexist=[]), view("a", loaded=None),
                                    view("b", loaded=False)), free_mib=20000, headroom_mib=0)
    assert plan.victim_names() == ("a",)


def test_pressure_evicts_least_recently_used_first():
    vs = views(view("t", loaded=False, mib=6000), view("old", last_used=1, mib=3000),
               view("mid", last_used=5, mib=3000), view("new", last_used=9, mib=3000))
    plan = plan_eviction("t", vs, free_mib=1000, headroom_mib=500)
    # needs 6500; 1000 + 3000 (old) + 3000 (mid) = 7000
    assert plan.victims == (("old", "pressure"), ("mid", "pressure"))
    assert plan.needed_mib == 6500 and plan.projected_free_mib == 7000 and fits(plan)


def test_unknown_state_is_evicted_after_loaded_ones_under_pressure():
    vs = views(view("t", loaded=False, mib=3000), view("unknown", loaded=None),
               view("loaded", last_used=50))
    assert plan_eviction("t", vs, free_mib=0, headroom_mib=0).victim_names() == ("loaded",)
    plan = plan_eviction("t", vs, free_mib=0, headroom_mib=5000)
    assert plan.victim_names() == ("loaded", "unknown")


def test_never_used_counts_as_least_recent():
    vs = views(view("t", loaded=False, mib=3000), view("used", last_used=1), view("never"))
    assert plan_eviction("t", vs, free_mib=0, headroom_mib=0).victim_names() == ("never",)


def test_pinned_is_never_evicted_and_can_leave_a_shortfall():
    vs = views(view("t", loaded=False, mib=8000), view("whisper", pinned=True, mib=5000),
               view("a", last_used=1, mib=2000))
    plan = plan_eviction("t", vs, free_mib=3000, headroom_mib=500)
    assert plan.victim_names() == ("a",)
    assert plan.shortfall_mib == 8500 - 5000 and not fits(plan)


def test_loaded_pinned_consumer_that_may_not_coexist_blocks():
    vs = views(view("t", loaded=False, coexist=["a"]), view("whisper", pinned=True))
    plan = plan_eviction("t", vs, free_mib=50000, headroom_mib=0)
    assert plan.blocked_by == ("whisper",) and not fits(plan)


def test_loaded_target_needs_no_memory_and_is_never_a_victim():
    vs = views(view("t", loaded=True), view("a", loaded=True))
    plan = plan_eviction("t", vs, free_mib=0, headroom_mib=512)
    assert plan.victims == () and fits(plan)


def test_no_sample_skips_pressure_but_keeps_exclusivity():
    vs = views(view("t", loaded=False, mib=90000, coexist=[]), view("a"))
    plan = plan_eviction("t", vs, free_mib=None, headroom_mib=512)
    assert plan.victims == (("a", "exclusivity"),)
    assert plan.needed_mib is None and fits(plan)


def test_insufficient_total():
    vs = views(view("t", loaded=False, mib=30000), view("a", mib=5000))
    plan = plan_eviction("t", vs, free_mib=10000, headroom_mib=512)
    assert plan.victim_names() == ("a",)
    assert plan.shortfall_mib == 30512 - 15000


def test_exclude_skips_consumers_already_tried():
    vs = views(view("t", loaded=False, mib=6000), view("a", last_used=1), view("b", last_used=2))
    plan = plan_eviction("t", vs, free_mib=1000, headroom_mib=0, exclude=["a"])
    assert plan.victim_names() == ("b",)


def test_settled():
    assert settled(freed_mib=4500, victim_resident_mib=6000, free_mib=5000, needed_mib=9000)
    assert not settled(freed_mib=4000, victim_resident_mib=6000, free_mib=5000, needed_mib=9000)
    assert settled(freed_mib=0, victim_resident_mib=6000, free_mib=9000, needed_mib=9000)


names = st.sampled_from(["a", "b", "c", "d", "e"])


@st.composite
def worlds(draw):
    vs = {}
    for name in ["a", "b", "c", "d", "e"]:
        vs[name] = view(
            name,
            loaded=draw(st.sampled_from([True, False, None])),
            mib=draw(st.integers(0, 12000)),
            coexist=draw(st.none() | st.lists(names, unique=True)),
            pinned=draw(st.booleans()),
            last_used=draw(st.none() | st.floats(0, 100)),
        )
    return vs


@settings(max_examples=300, deadline=None)
@given(vs=worlds(), target=names, free=st.none() | st.integers(0, 24000),
       headroom=st.integers(0, 1024))
def test_plan_invariants(vs, target, free, headroom):
    plan = plan_eviction(target, vs, free, headroom)
    victims = plan.victim_names()
    me = vs[target]
    if target in victims:
        # Only to learn where it stands: it was unknown, evictable, and short otherwise.
        assert plan.victims[-1] == (target, "unknown_state")
        assert me.residency is Residency.UNKNOWN and not me.pinned
        assert plan.projected_free_mib - me.resident_mib < plan.needed_mib
    assert len(set(victims)) == len(victims)
    for name in victims:
        assert not vs[name].pinned and vs[name].residency is not Residency.UNLOADED
    # Whatever stays loaded (or unknown) may coexist with the target, or blocks it.
    for name, v in vs.items():
        if name == target or name in victims or v.residency is Residency.UNLOADED:
            continue
        if not may_coexist(me, v):
            assert v.pinned and (v.residency is Residency.UNKNOWN or name in plan.blocked_by)
    # Pressure victims: loaded ones in LRU order, then unknown ones in LRU order,
    # taken only while short.
    pressure = [vs[n] for n, why in plan.victims if why == "pressure"]
    keys = [(v.residency is Residency.UNKNOWN,
             v.last_used if v.last_used is not None else float("-inf"), v.name)
            for v in pressure]
    assert keys == sorted(keys)
    if pressure:
        assert plan.needed_mib is not None
        projected = plan.projected_free_mib
        if target in victims:
            projected -= me.resident_mib
        before_last = projected - pressure[-1].resident_mib
        assert before_last < plan.needed_mib


def test_an_unknown_target_that_does_not_fit_is_unloaded_to_learn_where_it_stands():
    """After a restart the target may hold its memory all along: measured free
    memory does not count it, so it would never fit. Unloading it first makes
    the next measurement true (regression: a consumer that could be neither
    admitted nor evicted)."""
    vs = views(view("t", loaded=None, mib=9000), view("p", loaded=True, mib=6000, pinned=True))
    plan = plan_eviction("t", vs, free_mib=1000, headroom_mib=512)
    assert plan.victims == (("t", "unknown_state"),)
    assert fits(plan)


def test_an_unknown_target_that_fits_is_left_alone():
    plan = plan_eviction("t", views(view("t", loaded=None, mib=2000)), free_mib=9000,
                         headroom_mib=512)
    assert plan.victims == () and fits(plan)


def test_an_unknown_pinned_target_is_assumed_to_hold_its_share():
    plan = plan_eviction("t", views(view("t", loaded=None, mib=2000, pinned=True)),
                         free_mib=100, headroom_mib=512)
    assert plan.victims == () and plan.projected_free_mib == 2100


@st.composite
def truths(draw):
    """What each consumer really holds, and what gpumgr may believe of it:
    it may not know (unknown), but it never believes a holder unloaded."""
    out = {}
    for name in ["a", "b", "c", "d"]:
        mib = draw(st.integers(1, 8000))
        holds = draw(st.booleans())
        known = draw(st.booleans())
        belief = (True if holds else False) if known else None
        out[name] = (mib, holds, belief, draw(st.booleans()))
    return out


@settings(max_examples=300, deadline=None)
@given(world=truths(), target=st.sampled_from(["a", "b", "c", "d"]),
       total=st.integers(4000, 30000), headroom=st.integers(0, 1024))
def test_no_beliefs_leave_a_consumer_neither_admissible_nor_evictable(world, target, total,
                                                                     headroom):
    """Carry out plans as admission does (unload, measure again, plan again):
    whenever the target could fit once everything evictable is gone, it is
    admitted. No mix of known and unknown residencies wedges a consumer."""
    holds = {n: h for n, (_, h, _, _) in world.items()}
    belief = {n: b for n, (_, _, b, _) in world.items()}
    pinned = {n: p for n, (_, _, _, p) in world.items()}
    mib = {n: m for n, (m, _, _, _) in world.items()}
    tried: set[str] = set()
    for _ in range(10):
        vs = views(*(view(n, loaded=belief[n], mib=mib[n], pinned=pinned[n]) for n in world))
        free = total - sum(mib[n] for n in world if holds[n])
        plan = plan_eviction(target, vs, free, headroom, exclude=tried)
        if not plan.victims:
            break
        for victim, _ in plan.victims:
            tried.add(victim)
            holds[victim], belief[victim] = False, False
    stuck_by = sum(mib[n] for n in world if n != target and pinned[n] and holds[n])
    own = mib[target] if pinned[target] and holds[target] else 0
    could_fit = total - stuck_by - own >= mib[target] + headroom
    if could_fit and not (pinned[target] and holds[target] and belief[target] is None):
        assert plan.shortfall_mib == 0, (plan, holds, belief)
