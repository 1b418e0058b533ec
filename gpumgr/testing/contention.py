"""Simulated jobs that share the card run slower: per-service contention factors.

Real GPU jobs are not wholly GPU-bound (tokenising, Python between kernels,
host-device copies, a decoder on the CPU), so two of them at once do not each
take twice as long. The simulation models that with one number per service,
its contention factor ``s`` in [0, 1]: while ``k`` jobs compute on the card at
once, each progresses at

    rate(s, k) = 1 / (1 + s * (k - 1))

of its speed alone. ``s = 0``: the job never notices the others (it is bound
elsewhere); ``s = 1``: pure time slicing, k jobs each get 1/k of the card.

Defaults (`DEFAULT_CONTENTION`), chosen from how GPU-bound each kind of work is:

- ``comfyui`` 0.9: a diffusion render is dense convolutions and attention at
  full occupancy for its whole sampler; almost all of it competes.
- ``ollama`` 0.6: token generation is memory-bandwidth bound and a reply's
  prompt evaluation is compute-bound; both compete, but a good share of a
  small-batch decode step is kernel-launch and host overhead.
- ``whisper`` 0.5: encoder on the GPU, beam search and the audio front end
  largely on the CPU.
- ``mvoice`` (TTS) 0.3: a small model; most of a short reply is the
  vocoder's host side and Python between kernels.

Rates adapt while a job runs: every simulated working period is a
`ContendedTimer` holding the work (seconds alone) it has left; when ``k``
changes, each open timer is charged for the time spent at the old rate and
rescheduled at the new one. With ``k <= 1`` the rate is 1 and a timer is
exactly ``clock.callLater(seconds)``, so a job alone takes what it always took.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime

#: Per-flavour contention factors (the world's flavour names; see the module docstring).
DEFAULT_CONTENTION: dict[str, float] = {
    "comfyui": 0.9,
    "ollama": 0.6,
    "whisper": 0.5,
    "mvoice": 0.3,
}


def progress_rate(s: float, k: int) -> float:
    """The fraction of its alone speed a job with factor `s` makes while `k` jobs compute."""
    if not 0.0 <= s <= 1.0:
        raise ValueError(f"a contention factor is between 0 and 1, not {s}")
    return 1.0 / (1.0 + s * (max(k, 1) - 1))


def work_done(elapsed_s: float, s: float, k: int) -> float:
    """The work (seconds alone) a job with factor `s` does in `elapsed_s` at `k` jobs."""
    return elapsed_s * progress_rate(s, k)


class ContendedTimer:
    """`seconds` of work alone, done at the rate the card's load allows."""

    def __init__(self, shared: SharedCompute, seconds: float, s: float,
                 f: Callable[[], Any]) -> None:
        self._shared = shared
        self.remaining_s = max(0.0, seconds)
        self.s = s
        self._f = f
        self._since = shared.clock.seconds()
        self._rate = progress_rate(s, shared.jobs)
        self._call: IDelayedCall | None = shared.clock.callLater(
            self.remaining_s / self._rate, self._fire)

    def active(self) -> bool:
        """As `IDelayedCall.active`: not yet fired nor cancelled."""
        return self._call is not None

    def rerate(self) -> None:
        """Charge the time spent at the old rate, then go on at the current one."""
        if self._call is None:
            return
        now = self._shared.clock.seconds()
        self.remaining_s = max(0.0, self.remaining_s - (now - self._since) * self._rate)
        self._since = now
        self._rate = progress_rate(self.s, self._shared.jobs)
        self._call.cancel()
        self._call = self._shared.clock.callLater(self.remaining_s / self._rate, self._fire)

    def cancel(self) -> None:
        if self._call is not None:
            self._call.cancel()
            self._call = None
            self._shared.timers.discard(self)

    def _fire(self) -> None:
        self._call = None
        self.remaining_s = 0.0
        self._shared.timers.discard(self)
        self._f()


class SharedCompute:
    """The card's compute, shared by the jobs that run on it.

    The world sets `jobs` (k) as jobs start and end; each change re-rates
    every open timer. It also adds up the time at least one job computed
    (`busy_s`) and the job-seconds (`job_s`), for the benchmark's busy share.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.jobs = 0
        self.timers: set[ContendedTimer] = set()
        self.busy_s = 0.0
        self._changed_at = clock.seconds()

    def set_jobs(self, k: int) -> None:
        now = self.clock.seconds()
        if self.jobs > 0:
            self.busy_s += now - self._changed_at
        self._changed_at = now
        if k == self.jobs:
            return
        self.jobs = k
        for timer in list(self.timers):
            timer.rerate()

    def busy_seconds(self) -> float:
        """Time at least one job computed, up to now."""
        extra = self.clock.seconds() - self._changed_at if self.jobs > 0 else 0.0
        return self.busy_s + extra

    def later(self, seconds: float, s: float, f: Callable[[], Any]) -> ContendedTimer:
        timer = ContendedTimer(self, seconds, s, f)
        self.timers.add(timer)
        return timer

    def work(self, seconds: float, s: float) -> defer.Deferred[None]:
        """A Deferred that fires once `seconds` of work alone is done (cancellable)."""
        timer: list[ContendedTimer] = []
        d: defer.Deferred[None] = defer.Deferred(lambda _: timer[0].cancel())
        timer.append(self.later(seconds, s, lambda: d.callback(None)))
        return d
