"""The phases of one spawn and `advance`: every phase with every event, and
whole random histories, without a process."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpumgr.process.phases import (
    ExistencePhase,
    RunEvent,
    RunState,
    StartPhase,
    StopPhase,
    advance,
)

S, P, E = StartPhase, StopPhase, ExistencePhase
V = RunEvent

#: Every move; any (phase, event) pair not listed leaves that phase as it is.
START_MOVES = {
    (S.PROBING, V.PROBING_STOPPED): S.UNPROBED,
    (S.PROBING, V.START_CANCELLED): S.CANCELLED,
    (S.UNPROBED, V.START_CANCELLED): S.CANCELLED,
    (S.PROBING, V.START_OVER): S.OVER,
    (S.UNPROBED, V.START_OVER): S.OVER,
    (S.CANCELLED, V.START_OVER): S.OVER,
}
STOP_MOVES = {
    (P.UNASKED, V.STOP_ASKED): P.ASKED,
    (P.LEFTOVERS_TERM_CHILD, V.STOP_ASKED): P.ASKED_TERM_CHILD,
    (P.LEFTOVERS_TERM_GROUP, V.STOP_ASKED): P.ASKED_TERM_GROUP,
    (P.UNASKED, V.TERM_TO_CHILD): P.LEFTOVERS_TERM_CHILD,
    (P.UNASKED, V.TERM_TO_GROUP): P.LEFTOVERS_TERM_GROUP,
    (P.ASKED, V.TERM_TO_CHILD): P.ASKED_TERM_CHILD,
    (P.ASKED, V.TERM_TO_GROUP): P.ASKED_TERM_GROUP,
    (P.ASKED_TERM_CHILD, V.TERM_TO_GROUP): P.ASKED_TERM_GROUP,
    (P.LEFTOVERS_TERM_CHILD, V.TERM_TO_GROUP): P.LEFTOVERS_TERM_GROUP,
}
EXISTENCE_MOVES = {
    (E.SPAWNED, V.CHILD_EXITED_GROUP_LEFT): E.GROUP_LEFT,
    (E.SPAWNED, V.CHILD_EXITED_ALL_GONE): E.DRAINING,
    (E.SPAWNED, V.PIPES_CLOSED): E.PIPES_CLOSED,
    (E.PIPES_CLOSED, V.CHILD_EXITED_GROUP_LEFT): E.GROUP_LEFT_PIPES_CLOSED,
    (E.PIPES_CLOSED, V.CHILD_EXITED_ALL_GONE): E.GONE,
    (E.GROUP_LEFT, V.GROUP_GONE): E.DRAINING,
    (E.GROUP_LEFT, V.PIPES_CLOSED): E.GROUP_LEFT_PIPES_CLOSED,
    (E.GROUP_LEFT_PIPES_CLOSED, V.GROUP_GONE): E.GONE,
    (E.DRAINING, V.PIPES_CLOSED): E.GONE,
}

ALL_STATES = [RunState(a, b, c) for a, b, c in itertools.product(S, P, E)]


@pytest.mark.parametrize("state", ALL_STATES, ids=str)
def test_every_event_in_every_state(state):
    for event in V:
        after = advance(state, event)
        assert after == RunState(
            START_MOVES.get((state.start, event), state.start),
            STOP_MOVES.get((state.stop, event), state.stop),
            EXISTENCE_MOVES.get((state.existence, event), state.existence),
        ), (state, event)


def test_each_event_moves_one_kind_of_phase_only():
    moved_by = {event: set() for event in V}
    for state, event in itertools.product(ALL_STATES, V):
        after = advance(state, event)
        for kind in ("start", "stop", "existence"):
            if getattr(after, kind) != getattr(state, kind):
                moved_by[event].add(kind)
    assert all(len(kinds) == 1 for kinds in moved_by.values()), moved_by


# The booleans the phases replaced, and what each phase means for them.
@pytest.mark.parametrize("phase,exited,group_alive,pipes_closed", [
    (E.SPAWNED, False, False, False),
    (E.PIPES_CLOSED, False, False, True),
    (E.GROUP_LEFT, True, True, False),
    (E.GROUP_LEFT_PIPES_CLOSED, True, True, True),
    (E.DRAINING, True, False, False),
    (E.GONE, True, False, True),
])
def test_existence_phases_say_what_has_ended(phase, exited, group_alive, pipes_closed):
    assert (phase.exited, phase.group_alive, phase.pipes_closed) == (
        exited, group_alive, pipes_closed)


@pytest.mark.parametrize("phase,requested,term_sent,group_termed", [
    (P.UNASKED, False, False, False),
    (P.ASKED, True, False, False),
    (P.ASKED_TERM_CHILD, True, True, False),
    (P.ASKED_TERM_GROUP, True, True, True),
    (P.LEFTOVERS_TERM_CHILD, False, True, False),
    (P.LEFTOVERS_TERM_GROUP, False, True, True),
])
def test_stop_phases_say_what_was_asked_and_sent(phase, requested, term_sent, group_termed):
    assert (phase.requested, phase.term_sent, phase.group_termed) == (
        requested, term_sent, group_termed)


@pytest.mark.parametrize("state", ALL_STATES, ids=str)
def test_sigterm_once_and_never_when_only_pipes_are_left(state):
    only_pipes_left = state.existence in (E.DRAINING, E.GONE)
    assert state.may_send_term == (not state.stop.term_sent and not only_pipes_left)


_ORDER = {
    "start": [S.PROBING, S.UNPROBED, S.CANCELLED, S.OVER],
    "existence": [E.SPAWNED, E.PIPES_CLOSED, E.GROUP_LEFT, E.GROUP_LEFT_PIPES_CLOSED,
                  E.DRAINING, E.GONE],
}


@given(st.lists(st.sampled_from(list(V)), max_size=40))
def test_no_history_undoes_what_happened(events):
    """Whatever order events come in (late timers, fakes that skip an exit),
    an exit, a closed pipe, a stop asked or a SIGTERM sent is never forgotten."""
    state = RunState()
    for event in events:
        after = advance(state, event)
        assert after.existence.exited >= state.existence.exited
        assert after.existence.pipes_closed >= state.existence.pipes_closed
        assert after.stop.requested >= state.stop.requested
        assert after.stop.term_sent >= state.stop.term_sent
        assert after.stop.group_termed >= state.stop.group_termed
        assert not (state.start is S.OVER and after.start is not S.OVER)
        state = after
    if V.STOP_ASKED in events:
        assert state.stop.requested
    if V.START_OVER in events:
        assert state.start is S.OVER


def test_a_group_that_outlives_its_child_then_ends():
    """The walk a stopped wrapper takes: SIGTERM to the group, the child exits
    first, the group later, our pipes last."""
    state = RunState()
    for event in (V.START_CANCELLED, V.STOP_ASKED, V.TERM_TO_GROUP,
                  V.CHILD_EXITED_GROUP_LEFT, V.GROUP_GONE, V.PIPES_CLOSED, V.START_OVER):
        state = advance(state, event)
    assert state == RunState(S.OVER, P.ASKED_TERM_GROUP, E.GONE)
