"""The pure eviction decision, without a reactor."""


from hypothesis import given, settings
from hypothesis import strategies as st

from gpumgr.eviction import ConsumerView, Residency, plan_eviction

_RESIDENCY = {True: Residency.LOADED, False: Residency.UNLOADED, None: Residency.UNKNOWN}


def view(name, loaded=True, mib=4000, coexist=None, pinned=False, last_used=None, resident=None):
    """`loaded` True, False or None (unknown), for brevity."""
    return ConsumerView(
        name=name, residency=_RESIDENCY[loaded],
        resident_mib=(mib if loaded is not False else 0) if resident is None else resident,
        vram_resident_mib=mib, can_coexist_with=coexist, pinned=pinned, last_used=last_used)


def views(*vs):
    return {v.name: v for v in vs}


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
