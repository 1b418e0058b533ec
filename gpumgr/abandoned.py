"""Work a client abandoned: the GPU stays held until the service stopped it.

A client that leaves a running job closes gpumgr's connection to the
service at once, but the service does not stop at once: ollama notices a
closed connection only when it next writes a token, and a runner still
evaluating a long prompt goes on with it (ollama#11889); a whisper.cpp
inference or a TTS synthesis may outlive its connection too. Giving the GPU
to the next job then would put two jobs on the card.

So the job keeps its slot ("draining after the client left") until there is
evidence the service stopped, whichever comes first:

- the service is gone (its port refuses connections, or its owned process exited);
- the driver asked the service, and it said it ran the request and now runs
  nothing (`IDriver.work_stopped`);
- a service that runs its work one at a time answered a call that waits its
  turn behind all it took before (`IDriver.work_barrier`, whisper.cpp), made
  one sample period after the client left, so that the request the client
  left is ahead of it;
- the consumer's own nvidia-smi memory (`gpu_process`) rose above its
  resident figure and came back to it;
- the card's utilisation stayed below `IDLE_UTILIZATION_PCT` for
  `IDLE_SAMPLES` consecutive samples.

Without evidence, the grace (`consumers.<name>.abandoned_grace_s`, else the
driver's default) bounds the wait; gpumgr then gives the GPU back with a
warning event. `judge` is the pure decision over one reading; `AbandonedWork`
samples and waits.
"""

from __future__ import annotations

import collections
import enum
from typing import Any, Awaitable, Callable

import attrs
from twisted.internet import defer, task
from twisted.logger import Logger

from gpumgr.config import ProcessNameMatcher
from gpumgr.events import EventKind, EventLog
from gpumgr.gpu import GpuSample
from gpumgr.snapshot import Histogram

log = Logger()

#: Below this (percent, on the busiest GPU) the card is not computing.
IDLE_UTILIZATION_PCT = 10
#: Consecutive quiet samples that count as evidence. nvidia-smi averages
#: utilization.gpu over its own sample period (1/6 s to 1 s), so one quiet
#: reading may still cover the end of the work.
IDLE_SAMPLES = 2
#: How often nvidia-smi is read while a job drains (the regular interval if shorter).
DRAIN_SAMPLE_S = 0.5
#: A process's memory this close to its resident figure is "back".
MEMORY_SLACK_MIB = 64


class Evidence(enum.Enum):
    """Why a drain ended."""

    SERVICE_DOWN = "service_down"
    SERVICE_SAYS_DONE = "service_says_done"
    SERVICE_DRAINED = "service_drained"
    MEMORY_BACK = "memory_back"
    GPU_IDLE = "gpu_idle"
    #: Not evidence: the grace ran out.
    GRACE_EXPIRED = "grace_expired"


@attrs.frozen
class Reading:
    """One look at the service and the card (built from one GpuSample)."""

    service_down: bool = False
    #: The nvidia-smi sample succeeded.
    sample_ok: bool = True
    #: The busiest GPU's utilization.gpu; None when nvidia-smi does not know it (MIG).
    utilization_pct: int | None = None
    #: The consumer's processes' memory; None when it has no `gpu_process`.
    process_mib: int | None = None
    #: What the consumer holds when idle (`vram_resident_mib`).
    resident_mib: int = 0
    #: The driver asked the service: True nothing runs, False ours runs, None can't tell.
    service_says_stopped: bool | None = None
    #: The service answered a call that waited behind all it took before (work_barrier).
    service_drained: bool = False


@attrs.frozen
class Progress:
    """What earlier readings of this drain established."""

    quiet_samples: int = 0
    #: Its memory was seen above the resident figure (working memory).
    memory_was_up: bool = False
    #: The service said it was running the request.
    service_said_running: bool = False


@attrs.frozen
class Policy:
    idle_utilization_pct: int = IDLE_UTILIZATION_PCT
    idle_samples: int = IDLE_SAMPLES
    memory_slack_mib: int = MEMORY_SLACK_MIB


def judge(reading: Reading, progress: Progress,
          policy: Policy = Policy()) -> tuple[Progress, Evidence | None]:
    """Is this reading evidence that the abandoned work stopped? (pure)

    A quiet moment before the work showed itself proves nothing (the
    service may still be loading), so memory and the service's own word
    count only as a change: up then back, running then done. A failed
    sample breaks a run of quiet ones.
    """
    if reading.service_down:
        return progress, Evidence.SERVICE_DOWN
    if reading.service_drained:
        return progress, Evidence.SERVICE_DRAINED
    if reading.service_says_stopped is False:
        progress = attrs.evolve(progress, service_said_running=True)
    elif reading.service_says_stopped and progress.service_said_running:
        return progress, Evidence.SERVICE_SAYS_DONE
    if not reading.sample_ok:
        return attrs.evolve(progress, quiet_samples=0), None
    if reading.process_mib is not None:
        if reading.process_mib > reading.resident_mib + policy.memory_slack_mib:
            progress = attrs.evolve(progress, memory_was_up=True)
        elif progress.memory_was_up:
            return progress, Evidence.MEMORY_BACK
    util = reading.utilization_pct
    if util is not None and util < policy.idle_utilization_pct:
        progress = attrs.evolve(progress, quiet_samples=progress.quiet_samples + 1)
        if progress.quiet_samples >= policy.idle_samples:
            return progress, Evidence.GPU_IDLE
    else:
        progress = attrs.evolve(progress, quiet_samples=0)
    return progress, None


def reading_of(sample: GpuSample, process_pattern: ProcessNameMatcher | None,
               resident_mib: int,
               service_down: bool = False,
               service_says_stopped: bool | None = None,
               cards: tuple[int, ...] | None = None,
               service_drained: bool = False) -> Reading:
    """A Reading from one nvidia-smi sample (pure). `process_pattern` is
    the consumer's `gpu_process` pattern, or None. `cards`: the cards the
    consumer lives on (a box of several, gpumgr.cards), whose utilisation and
    processes alone say whether its work stopped (another card's work, even
    by a process of the same name, says nothing); None: every card (one lock
    for the box; its processes may use any)."""
    if not sample.available:
        return Reading(service_down=service_down, sample_ok=False, resident_mib=resident_mib,
                       service_says_stopped=service_says_stopped,
                       service_drained=service_drained)
    gpus = sample.gpus if cards is None else [g for g in sample.gpus if g.index in cards]
    known = [g.utilization_pct for g in gpus if g.utilization_pct is not None]
    util = max(known) if gpus and len(known) == len(gpus) else None
    process_mib = None
    if process_pattern is not None:
        processes = sample.processes if cards is None else [
            p for card in cards for p in sample.processes_on(card)]
        process_mib = sum(p.used_mib or 0 for p in processes
                          if process_pattern.search(p.name))
    return Reading(service_down=service_down, sample_ok=True, utilization_pct=util,
                   process_mib=process_mib, resident_mib=resident_mib,
                   service_says_stopped=service_says_stopped, service_drained=service_drained)


@attrs.frozen
class Draining:
    """A job that holds the GPU after its client left, for status."""

    consumer: str
    since: float
    grace_s: float


def _detached(d: defer.Deferred[Any]) -> defer.Deferred[Any]:
    """`d`'s result, in a Deferred whose cancellation leaves `d` alone (a
    sample shared with the regular sampler is never cancelled under it)."""
    out: defer.Deferred[Any] = defer.Deferred()

    def relay(result: Any) -> None:
        if not out.called:
            out.callback(result)

    d.addBoth(relay)
    return out


def _take_turn(barrier: Callable[[], defer.Deferred[bool | None]],
               passed: list[bool]) -> defer.Deferred[None]:
    """Call the barrier once; `passed` gets True when it answered that all
    work before it ended. A failure is no evidence (logged at debug)."""
    def answered(result: bool | None) -> None:
        if result is True:
            passed.append(True)

    def failed(f: Any) -> None:
        if not f.check(defer.CancelledError):
            log.debug("waiting for the service's turn failed: {e}", e=f.value)

    return barrier().addCallbacks(answered, failed)


class AbandonedWork:
    """Holds a job's slot after its client left until the service stopped.

    `sample()` takes an nvidia-smi reading now (it never fails);
    `event` records the outcome of each drain.
    """

    def __init__(self, clock: Any, sample: Callable[[], defer.Deferred[GpuSample]],
                 event: EventLog, sample_period_s: Callable[[], float] = lambda: DRAIN_SAMPLE_S,
                 policy: Policy = Policy()) -> None:
        self._clock = clock
        self._sample = sample
        self._event = event
        self._period_s = sample_period_s
        self._policy = policy
        self._seq = 0
        #: Jobs draining now, for status.
        self.draining: dict[int, Draining] = {}
        #: How long drains lasted, by consumer.
        self.durations_s: dict[str, Histogram] = {}
        #: How drains ended, by Evidence value (and "cancelled").
        self.outcomes: collections.Counter[str] = collections.Counter()

    async def settle(
        self,
        name: str,
        grace_s: float,
        process_pattern: ProcessNameMatcher | None = None,
        resident_mib: int = 0,
        is_down: Callable[[], bool] = lambda: False,
        ask_service: Callable[[], Awaitable[bool | None]] | None = None,
        cards: tuple[int, ...] | None = None,
        barrier: Callable[[], defer.Deferred[bool | None]] | None = None,
    ) -> Evidence:
        """Return once the abandoned work of `name` stopped, or `grace_s` passed.
        `cards`: where it lives, on a box of several (see `reading_of`);
        `barrier`: the driver's `work_barrier`, called once, a sample period in
        (by the clock: the request the client left must reach the service's
        lock first), or None (the caller knows it proves nothing here)."""
        started = self._clock.seconds()
        deadline = started + grace_s
        self._seq += 1
        key = self._seq
        self.draining[key] = Draining(name, started, grace_s)
        log.info("{name}: the client left a running job; holding the GPU until the service "
                 "stops (at most {grace:g}s)", name=name, grace=grace_s)
        progress = Progress()
        outcome = "cancelled"
        passed: list[bool] = []
        waiting_turn: defer.Deferred[None] | None = None
        try:
            while True:
                says = None if ask_service is None else await self._ask(ask_service)
                sample = await _detached(self._sample())
                reading = reading_of(sample, process_pattern, resident_mib, is_down(), says,
                                     cards, bool(passed))
                progress, evidence = judge(reading, progress, self._policy)
                now = self._clock.seconds()
                if evidence is None and now >= deadline:
                    evidence = Evidence.GRACE_EXPIRED
                if evidence is not None:
                    outcome = evidence.value
                    self._ended(name, evidence, now - started, grace_s)
                    return evidence
                if barrier is not None and waiting_turn is None \
                        and now - started >= self._period_s():
                    waiting_turn = _take_turn(barrier, passed)
                await task.deferLater(self._clock, min(self._period_s(), deadline - now),
                                      lambda: None)
        finally:
            if waiting_turn is not None and not waiting_turn.called:
                waiting_turn.cancel()  # its connection closes; the service answers no one
            del self.draining[key]
            self.outcomes[outcome] += 1
            self.durations_s.setdefault(name, Histogram()).observe(
                self._clock.seconds() - started)

    async def _ask(self, ask_service: Callable[[], Awaitable[bool | None]]) -> bool | None:
        try:
            return await ask_service()
        except defer.CancelledError:
            raise
        except Exception as e:
            log.debug("asking the service whether its work runs failed: {e}", e=e)
            return None

    def _ended(self, name: str, evidence: Evidence, held_s: float, grace_s: float) -> None:
        detail = f"{evidence.value} after {held_s:.2f}s"
        if evidence is Evidence.GRACE_EXPIRED:
            self._event(EventKind.ABANDONED_GRACE_EXPIRED, name, "client_gone", detail=detail)
            log.warn("{name}: no evidence that the service stopped the work its client left "
                     "within {grace:g}s (abandoned_grace_s); giving the GPU back anyway",
                     name=name, grace=grace_s)
        else:
            self._event(EventKind.ABANDONED_SETTLED, name, "client_gone", detail=detail)
            log.info("{name}: the work its client left is over ({detail}); the GPU is free",
                     name=name, detail=detail)
