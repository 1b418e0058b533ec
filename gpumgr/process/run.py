"""One spawned process: ending it (its whole group) and knowing when it has ended.

A service's direct child may exit while processes it forked live on in its
process group, and a process outside the group may hold our pipes: the run
is over only when the child has exited, its group is empty and our pipes are
closed, in whatever order that happens (`ExistencePhase`). Stopping signals
the whole group through `TermThenKill`.
"""

from __future__ import annotations

import signal
from typing import Any, Callable

from twisted.internet import defer, error
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from gpumgr.process.launcher import ProcessGroups
from gpumgr.process.output import ServiceOutput
from gpumgr.process.phases import RunEvent, RunState, advance
from gpumgr.terminate import TermThenKill

log = Logger(namespace="gpumgr.process")

#: Once the group is gone, how long a process outside it may hold our pipes.
PIPE_DRAIN_S = 1.0
#: How often to look whether a group outlives its leader; groups have no exit event.
GROUP_POLL_S = 0.1


class ServiceRun:
    """One spawn of a service, from spawnProcess until nothing of it is left.

    `finish(run, gave_up)` is called once it is over (or given up on after
    SIGKILL); `is_current(run)` says whether the owner still cares about it.
    """

    def __init__(
        self,
        name: str,
        clock: IReactorTime,
        groups: ProcessGroups,
        *,
        stop_timeout_s: float,
        kill_grace_s: float,
        pipe_drain_s: float,
        finish: Callable[[ServiceRun, bool], None],
        is_current: Callable[[ServiceRun], bool],
    ) -> None:
        self._name = name
        self._clock = clock
        self._groups = groups
        self._stop_timeout_s = stop_timeout_s
        self._pipe_drain_s = pipe_drain_s
        self._finish = finish
        self._is_current = is_current
        self.state = RunState()
        self.transport: Any = None
        self.protocol: ServiceProtocol | None = None
        self.pid: int | None = None
        #: Its process group, when the launcher made it lead one.
        self.pgid: int | None = None
        self.exit_code: int | None = None
        self.exit_signal: int | None = None
        #: Fires when a probe passes; its deadline is the start timeout.
        self.healthy: defer.Deferred[None] | None = None
        self.probe: defer.Deferred[None] | None = None
        self.poll_timer: IDelayedCall | None = None
        self.last_probe_error: str | None = None
        #: Set when gpumgr ended the start (timeout, stop): the start's error.
        self.start_error: str | None = None
        self._ending = TermThenKill(
            clock, kill_after_s=stop_timeout_s, give_up_after_s=kill_grace_s,
            send_term=self._term, send_kill=self._kill, give_up=self._give_up)
        self._drain_timers: list[IDelayedCall] = []
        self._group_timer: IDelayedCall | None = None

    def event(self, event: RunEvent) -> None:
        self.state = advance(self.state, event)

    def cancel_timers(self) -> None:
        self._ending.cancel()
        for timer in [*self._drain_timers, self._group_timer]:
            if timer is not None and timer.active():
                timer.cancel()
        self._drain_timers = []
        self._group_timer = None

    # -- stopping --

    def terminate(self) -> None:
        """SIGTERM to the group; SIGKILL for what is left stop_timeout_s later."""
        self.event(RunEvent.STOP_ASKED)
        self._send_term()

    def _send_term(self) -> None:
        if self.state.may_send_term:
            self._ending.start()

    def _term(self) -> None:
        self.event(RunEvent.TERM_TO_GROUP if self.signal("TERM") else RunEvent.TERM_TO_CHILD)

    def signal(self, sig: str) -> bool:
        """To its whole process group; True if the group got it.

        Until the launcher has called setsid() there is no group yet, and
        only the direct child (still the launcher) can be signalled.
        """
        if self.pgid is not None:
            try:
                self._groups.signal(self.pgid, getattr(signal, "SIG" + sig))
                return True
            except ProcessLookupError:
                pass
            except PermissionError:
                log.warn("{name}: may not signal process group {pgid}",
                         name=self._name, pgid=self.pgid)
                return False
        if not self.state.existence.exited:
            try:
                self.transport.signalProcess(sig)
            except error.ProcessExitedAlready:
                pass
        return False

    def _kill(self) -> bool:
        t = self._stop_timeout_s
        if not self.state.existence.exited:
            log.warn("{name}: no exit {t:g}s after SIGTERM; sending SIGKILL", name=self._name, t=t)
        elif self.group_has_live_members():
            log.warn("{name}: its process group {pgid} outlived SIGTERM by {t:g}s; "
                     "sending SIGKILL", name=self._name, pgid=self.pgid, t=t)
        else:
            return False
        self.signal("KILL")
        return True

    def _give_up(self) -> None:
        """A process that outlives KILL (D-state): forget it rather than hang."""
        if not self._is_current(self):
            return
        exited = self.state.existence.exited
        if exited and not self.group_has_live_members():
            return  # only the pipes are left: the group watch and the drain timer end it
        if exited:
            log.error("{name}: processes in its group {pgid} did not exit after SIGKILL; "
                      "gave up on them", name=self._name, pgid=self.pgid)
        else:
            log.error("{name}: pid {pid} did not exit after SIGKILL; gave up on it",
                      name=self._name, pid=self.pid)
        if self.protocol is not None:
            self.protocol.detach()
        if not self.state.existence.pipes_closed:
            self.transport.loseConnection()
        self._finish(self, True)

    # -- exits --

    def exited(self) -> None:
        """The direct child is gone; the rest of its group may not be."""
        if not self.group_has_live_members():
            self.event(RunEvent.CHILD_EXITED_ALL_GONE)
            self._group_gone()
            return
        self.event(RunEvent.CHILD_EXITED_GROUP_LEFT)
        stop = self.state.stop
        if not stop.group_termed:
            if not stop.requested:
                log.warn("{name}: pid {pid} exited, but processes are left in its group "
                         "{pgid}; stopping them", name=self._name, pid=self.pid, pgid=self.pgid)
            if stop.term_sent:  # it reached the direct child only
                if self.signal("TERM"):
                    self.event(RunEvent.TERM_TO_GROUP)
            else:
                self._send_term()
        self._group_timer = self._clock.callLater(GROUP_POLL_S, self._watch_group)

    def _watch_group(self) -> None:
        self._group_timer = None
        if not self._is_current(self) or not self.state.existence.group_alive:
            return
        if self.group_has_live_members():
            self._group_timer = self._clock.callLater(GROUP_POLL_S, self._watch_group)
        else:
            self._group_gone()

    def group_has_live_members(self) -> bool:
        return self.pgid is not None and self._groups.has_live_members(self.pgid)

    def _group_gone(self) -> None:
        """Nothing of it runs any more, but a process outside the group may hold our pipes."""
        self.event(RunEvent.GROUP_GONE)
        if self.state.existence.pipes_closed:
            self._finish(self, False)
        else:
            self._drain_timers.append(
                self._clock.callLater(self._pipe_drain_s, self.transport.loseConnection))

    def ended(self, code: int | None, sig: int | None) -> None:
        """processEnded: the direct child is gone and our pipes are closed."""
        self.event(RunEvent.PIPES_CLOSED)
        self.exit_code, self.exit_signal = code, sig
        if not self.state.existence.exited:
            self.exited()  # Twisted always says so first; fakes need not
        elif not self.state.existence.group_alive:
            self._finish(self, False)


class ServiceProtocol(ProcessProtocol):
    """Hands a run's output and its ends to the run; nothing after `detach()`."""

    def __init__(self, output: ServiceOutput, run: ServiceRun) -> None:
        self._output = output
        self._run: ServiceRun | None = run

    def detach(self) -> None:
        """After gpumgr gave up on the process, its late events mean nothing."""
        self._run = None

    def outReceived(self, data: bytes) -> None:
        if self._run is not None:
            self._output.stdout.feed(data)

    def errReceived(self, data: bytes) -> None:
        if self._run is not None:
            self._output.stderr.feed(data)

    def processExited(self, reason: Failure) -> None:
        if self._run is not None:
            self._run.exited()

    def processEnded(self, reason: Failure) -> None:
        if self._run is not None:
            run, self._run = self._run, None
            code = getattr(reason.value, "exitCode", None)
            sig = getattr(reason.value, "signal", None)
            run.ended(code, sig)
