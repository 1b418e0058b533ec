"""What has happened to one spawned process, as phases, and the pure rule that moves them.

A spawn goes through three things at once, each with its own few phases: its
start (probed until healthy, or ended by a timeout, an exit or a stop), the
signals gpumgr sent to end it, and its existence (the direct child, the rest
of its process group, and our pipes, which end in any order). `RunState`
holds one phase of each; `advance` is the only way it changes, so every
phase with every event, and any order of events, is tested without a process.
"""

from __future__ import annotations

import enum

import attrs


class ProcessState(enum.Enum):
    """A managed service as the rest of gpumgr sees it."""

    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    FAILED = "failed"


class StartPhase(enum.Enum):
    #: Health probes run until one passes or the start timeout.
    PROBING = "probing"
    #: Still a start, but probes stopped: timed out, or the process is ending.
    UNPROBED = "unprobed"
    #: A stop, or every caller withdrawing, ended the start: not a failed start.
    CANCELLED = "cancelled"
    #: No start pending any more: it became healthy, or the run is finished.
    OVER = "over"

    @property
    def pending(self) -> bool:
        return self is not StartPhase.OVER


class StopPhase(enum.Enum):
    #: Nobody asked it to stop, and no signal was sent.
    UNASKED = "unasked"
    #: A stop was asked for, but only our pipes were left to close: no signal.
    ASKED = "asked"
    #: SIGTERM reached only the direct child (no process group yet, or no permission).
    ASKED_TERM_CHILD = "asked, SIGTERM to the child"
    ASKED_TERM_GROUP = "asked, SIGTERM to the group"
    #: The child exited on its own and left processes in its group: gpumgr ends them.
    LEFTOVERS_TERM_CHILD = "leftovers, SIGTERM to the child"
    LEFTOVERS_TERM_GROUP = "leftovers, SIGTERM to the group"

    @property
    def requested(self) -> bool:
        return self not in (StopPhase.UNASKED, StopPhase.LEFTOVERS_TERM_CHILD,
                            StopPhase.LEFTOVERS_TERM_GROUP)

    @property
    def term_sent(self) -> bool:
        return self not in (StopPhase.UNASKED, StopPhase.ASKED)

    @property
    def group_termed(self) -> bool:
        return self in (StopPhase.ASKED_TERM_GROUP, StopPhase.LEFTOVERS_TERM_GROUP)


class ExistencePhase(enum.Enum):
    #: The direct child runs (as far as we know).
    SPAWNED = "spawned"
    #: Our pipes closed before we heard of the exit (fakes; Twisted says exit first).
    PIPES_CLOSED = "pipes closed"
    #: The child exited; live processes are left in its group; pipes open.
    GROUP_LEFT = "group left"
    GROUP_LEFT_PIPES_CLOSED = "group left, pipes closed"
    #: Nothing of it runs; a process outside the group may still hold our pipes.
    DRAINING = "draining"
    #: Nothing runs and the pipes are closed: the run is over.
    GONE = "gone"

    @property
    def exited(self) -> bool:
        return self not in (ExistencePhase.SPAWNED, ExistencePhase.PIPES_CLOSED)

    @property
    def group_alive(self) -> bool:
        return self in (ExistencePhase.GROUP_LEFT, ExistencePhase.GROUP_LEFT_PIPES_CLOSED)

    @property
    def pipes_closed(self) -> bool:
        return self in (ExistencePhase.PIPES_CLOSED, ExistencePhase.GROUP_LEFT_PIPES_CLOSED,
                        ExistencePhase.GONE)


class RunEvent(enum.Enum):
    #: Health probing stopped (a probe passed, the start timed out, or the start ended).
    PROBING_STOPPED = "probing stopped"
    #: A stop or every caller's withdrawal ended a start.
    START_CANCELLED = "start cancelled"
    #: The start is no longer pending (healthy, or the run finished).
    START_OVER = "start over"
    STOP_ASKED = "stop asked"
    TERM_TO_CHILD = "SIGTERM reached the child only"
    TERM_TO_GROUP = "SIGTERM reached the group"
    CHILD_EXITED_GROUP_LEFT = "child exited, group left"
    CHILD_EXITED_ALL_GONE = "child exited, nothing left"
    GROUP_GONE = "group gone"
    PIPES_CLOSED = "pipes closed"


_START: dict[tuple[StartPhase, RunEvent], StartPhase] = {
    (StartPhase.PROBING, RunEvent.PROBING_STOPPED): StartPhase.UNPROBED,
    (StartPhase.PROBING, RunEvent.START_CANCELLED): StartPhase.CANCELLED,
    (StartPhase.UNPROBED, RunEvent.START_CANCELLED): StartPhase.CANCELLED,
    (StartPhase.PROBING, RunEvent.START_OVER): StartPhase.OVER,
    (StartPhase.UNPROBED, RunEvent.START_OVER): StartPhase.OVER,
    (StartPhase.CANCELLED, RunEvent.START_OVER): StartPhase.OVER,
}

_STOP: dict[tuple[StopPhase, RunEvent], StopPhase] = {
    (StopPhase.UNASKED, RunEvent.STOP_ASKED): StopPhase.ASKED,
    (StopPhase.LEFTOVERS_TERM_CHILD, RunEvent.STOP_ASKED): StopPhase.ASKED_TERM_CHILD,
    (StopPhase.LEFTOVERS_TERM_GROUP, RunEvent.STOP_ASKED): StopPhase.ASKED_TERM_GROUP,
    (StopPhase.UNASKED, RunEvent.TERM_TO_CHILD): StopPhase.LEFTOVERS_TERM_CHILD,
    (StopPhase.UNASKED, RunEvent.TERM_TO_GROUP): StopPhase.LEFTOVERS_TERM_GROUP,
    (StopPhase.ASKED, RunEvent.TERM_TO_CHILD): StopPhase.ASKED_TERM_CHILD,
    (StopPhase.ASKED, RunEvent.TERM_TO_GROUP): StopPhase.ASKED_TERM_GROUP,
    # A second SIGTERM, once the child is gone, can reach the group it left.
    (StopPhase.ASKED_TERM_CHILD, RunEvent.TERM_TO_GROUP): StopPhase.ASKED_TERM_GROUP,
    (StopPhase.LEFTOVERS_TERM_CHILD, RunEvent.TERM_TO_GROUP): StopPhase.LEFTOVERS_TERM_GROUP,
}

_EXISTENCE: dict[tuple[ExistencePhase, RunEvent], ExistencePhase] = {
    (ExistencePhase.SPAWNED, RunEvent.CHILD_EXITED_GROUP_LEFT): ExistencePhase.GROUP_LEFT,
    (ExistencePhase.SPAWNED, RunEvent.CHILD_EXITED_ALL_GONE): ExistencePhase.DRAINING,
    (ExistencePhase.SPAWNED, RunEvent.PIPES_CLOSED): ExistencePhase.PIPES_CLOSED,
    (ExistencePhase.PIPES_CLOSED, RunEvent.CHILD_EXITED_GROUP_LEFT):
        ExistencePhase.GROUP_LEFT_PIPES_CLOSED,
    (ExistencePhase.PIPES_CLOSED, RunEvent.CHILD_EXITED_ALL_GONE): ExistencePhase.GONE,
    (ExistencePhase.GROUP_LEFT, RunEvent.GROUP_GONE): ExistencePhase.DRAINING,
    (ExistencePhase.GROUP_LEFT, RunEvent.PIPES_CLOSED): ExistencePhase.GROUP_LEFT_PIPES_CLOSED,
    (ExistencePhase.GROUP_LEFT_PIPES_CLOSED, RunEvent.GROUP_GONE): ExistencePhase.GONE,
    (ExistencePhase.DRAINING, RunEvent.PIPES_CLOSED): ExistencePhase.GONE,
}


@attrs.frozen
class RunState:
    start: StartPhase = StartPhase.PROBING
    stop: StopPhase = StopPhase.UNASKED
    existence: ExistencePhase = ExistencePhase.SPAWNED

    @property
    def may_send_term(self) -> bool:
        """SIGTERM once; and not when only our pipes are left (the drain timer closes them)."""
        if self.stop.term_sent:
            return False
        return not (self.existence.exited and not self.existence.group_alive)


def advance(state: RunState, event: RunEvent) -> RunState:
    """The state after `event`. An event that does not apply to the phase it
    would move leaves the state as it is: events repeat (a second stop) and
    arrive late (a timeout after an exit), and neither should undo anything.
    """
    return RunState(
        start=_START.get((state.start, event), state.start),
        stop=_STOP.get((state.stop, event), state.stop),
        existence=_EXISTENCE.get((state.existence, event), state.existence),
    )
