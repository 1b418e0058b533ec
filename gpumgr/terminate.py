"""Terminate, then kill, then give up: how gpumgr ends every child it runs.

nvidia-smi (`gpumgr.gpu`) and owned services (`gpumgr.process`) are ended the
same way: SIGTERM; SIGKILL for whatever is left a while later; and, a grace
period after SIGKILL, giving up rather than waiting forever, since a process
in uninterruptible sleep (D state) outlives SIGKILL. What "send", "left" and
"give up" mean is the caller's; the order and the timers are here, once.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

#: After SIGKILL, how long an owned process may take to exit before it is given up on.
PROCESS_KILL_GRACE_S = 5.0


class TermThenKill:
    """One escalation: `start()` sends TERM; `kill_after_s` later `send_kill`
    runs (it returns False when nothing was left to kill, which ends the
    escalation); `give_up_after_s` after that, `give_up` runs.

    `cancel()` stops the timers (the child ended, or the caller forgot it).
    """

    def __init__(
        self,
        clock: IReactorTime,
        *,
        kill_after_s: float,
        give_up_after_s: float,
        send_term: Callable[[], object],
        send_kill: Callable[[], bool],
        give_up: Callable[[], object],
    ) -> None:
        self._clock = clock
        self._kill_after_s = kill_after_s
        self._give_up_after_s = give_up_after_s
        self._send_term = send_term
        self._send_kill = send_kill
        self._give_up = give_up
        self._timer: IDelayedCall | None = None

    def start(self) -> None:
        self._send_term()
        self._timer = self._clock.callLater(self._kill_after_s, self._kill)

    def cancel(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _kill(self) -> None:
        self._timer = None
        if self._send_kill():
            self._timer = self._clock.callLater(self._give_up_after_s, self._giving_up)

    def _giving_up(self) -> None:
        self._timer = None
        self._give_up()
