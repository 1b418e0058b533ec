"""Carrying out eviction decisions: unloads, the settle wait, loads, OOM replay.

`eviction.plan_eviction` decides; this module does the I/O. It runs inside
scheduler jobs: in locked and evicting modes those hold the GPU lock, so an
unload or a load never races a request. In pass-through mode there is no
lock: a load or an unload (an operator's, a preload, an idle unload) may run
beside requests. How a consumer is really loaded or unloaded (a driver's
route, or starting and stopping its process) is the `Control` given to it.

With several cards every decision is per card (`cards_of`): a job needs its
memory on each card its consumer lives on, only consumers on that card are
victims, and only that card's free memory counts, never the sum of all.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Protocol

import attrs

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from gpumgr.cards import view_on_card as _on_card
from gpumgr.config import Config
from gpumgr.deadlines import CONTROL_TIMEOUT_S as CONTROL_TIMEOUT_S  # its old home
from gpumgr.deadlines import unload_deadline_s
from gpumgr.errors import ControlFailed, InsufficientVram, describe_failure
from gpumgr.events import Event, EventKind
from gpumgr.eviction import ConsumerView, Residency, plan_eviction, settled
from gpumgr.gpu import GpuSample, GpuSampler
from gpumgr.proxy import Result
from gpumgr.registry import Registry
from gpumgr.states import Health

log = Logger()

#: How often nvidia-smi is re-read while waiting for memory to come back.
SETTLE_POLL_S = 0.25
RECENT_EVENTS = 50


class Control(Protocol):
    """Loads and unloads one consumer, whatever that takes."""

    def load(self, name: str) -> defer.Deferred[None]: ...

    def unload(self, name: str) -> defer.Deferred[None]: ...

    def load_timeout_s(self, name: str) -> float: ...


class JobRunner(Protocol):
    """The scheduler, as admission sees it: control jobs and queue lengths."""

    def run(self, consumer: str, job: Callable[[], defer.Deferred[Any]], kind: str | None = None,
            control: bool = False) -> defer.Deferred[Any]: ...

    def queued_for(self, consumer: str) -> int: ...


def _blockers(names: tuple[str, ...], views: dict[str, ConsumerView]) -> str:
    """Why each of `names` cannot be unloaded now, in words: a pin by config
    is named as such (the operator's choice, not a limit of the service)."""
    return ", ".join(
        f"{n}, which is pinned (consumers.{n}.pin)" if n in views and views[n].pin
        else f"{n}, which cannot be unloaded now (no way to unload, or running a job)"
        for n in names)


class Admission:
    def __init__(
        self,
        clock: IReactorTime,
        config: Callable[[], Config],
        registry: Registry,
        gpu: GpuSampler,
        control: Control,
        runner: JobRunner,
    ) -> None:
        self._clock = clock
        self._current_config = config
        self._registry = registry
        self._gpu = gpu
        self._control = control
        self._runner = runner
        self.evictions = 0
        self.eviction_failures = 0
        self.oom_retries = 0
        self.events: collections.deque[Event] = collections.deque(maxlen=RECENT_EVENTS)
        self.evictions_by_reason: collections.Counter[str] = collections.Counter()
        self._no_sample_logged = False
        self._idle_timers: dict[str, Any] = {}
        self._loaded_at: dict[str, float] = {}
        self._unsettled = False
        #: consumer -> "load" or "unload" while its control call runs (what an
        #: admitting request waits for, in GET /v1/requests/<id>).
        self.acting: dict[str, str] = {}
        #: The cards a consumer lives on now (gpumgr.cards); one card: all on card 0.
        self.cards_of: Callable[[str], tuple[int, ...]] = lambda name: (0,)

    @property
    def _config(self) -> Config:
        return self._current_config()

    # -- bookkeeping ---------------------------------------------------------

    def event(self, kind: EventKind, consumer: str, reason: str | None = None,
              mib: int | None = None, detail: str | None = None) -> None:
        """Record an event now (the last RECENT_EVENTS are kept)."""
        self.events.append(Event(kind, consumer, reason, mib, detail, self._clock.seconds()))

    def views(self, target: str | None = None, card: int | None = None) -> dict[str, ConsumerView]:
        """What the planner sees (on `card`: the consumers that live there, and
        what they hold there). A consumer with a job running (capacity > 1)
        is loaded for certain, and pinned: never unloaded under a running job."""
        views = {}
        latest = self._gpu.latest
        for name, c in self._config.consumers.items():
            if card is not None and name != target and card not in self.cards_of(name):
                continue
            view = self._registry.view(c)
            if card is not None:
                view = _on_card(view, c, latest, card)
            if name != target and self._registry[name].active > 0 and not view.pinned:
                view = attrs.evolve(view, pinned=True, residency=Residency.LOADED,
                                    resident_mib=max(view.resident_mib, c.vram_resident_mib))
            views[name] = view
        return views

    def free_mib(self, target: str, card: int = 0) -> int | None:
        """Free memory on `card`: measured, else accounted from config, else unknown."""
        free = self._gpu.latest.free_mib_on(card)
        if free is not None:
            return free
        total = self._config.gpu.total_mib
        if total is not None:
            # Unknown consumers may hold their size; the target's own share is
            # what it needs, so it is not counted as held.
            held = sum(v.resident_mib for n, v in self.views(target, card).items()
                       if v.residency is not Residency.UNLOADED and n != target)
            return total - held
        if not self._no_sample_logged:
            log.warn("no GPU sample and no gpu.total_mib: VRAM pressure is not checked "
                     "(exclusivity still is)")
            self._no_sample_logged = True
        return None

    # -- admission -------------------------------------------------------------

    @defer.inlineCallbacks
    def admit(self, target: str) -> Any:
        """Make room for a job of `target`; fails with InsufficientVram."""
        if self._registry[target].residency is not Residency.LOADED:
            yield self._gpu.sample_now()  # decide on memory as it is now
        tried: set[str] = set()
        failed: list[str] = []
        self._unsettled = False  # an unknown-state victim was unloaded, unwatched
        settled_once = False
        cards = self.cards_of(target) or (0,)
        while True:
            plans = [(card, plan_eviction(target, self.views(target, card),
                                          self.free_mib(target, card),
                                          self._config.gpu.headroom_mib, exclude=tried))
                     for card in cards]
            short = [(card, plan) for card, plan in plans if plan.shortfall_mib > 0]
            if short and self._unsettled and not settled_once:
                # Memory of victims whose residency was unknown may still be
                # on its way back: wait for it once before refusing.
                settled_once = True
                card, plan = short[0]
                yield self._settle(target, plan.shortfall_mib,
                                   self._gpu.latest.free_mib_on(card), plan.needed_mib, card)
                continue
            for card, plan in plans:
                if plan.blocked_by:
                    self._refuse(target, f"{target} may not coexist{_on(card, cards)} with "
                                 f"{_blockers(plan.blocked_by, self.views(target, card))}", failed)
            for card, plan in short:
                pins = "".join(f"; {name} is pinned (consumers.{name}.pin)"
                               for name in plan.held_by_pin)
                self._refuse(target, f"{target} needs {plan.needed_mib} MiB (with headroom)"
                             f"{_on(card, cards)}; {plan.projected_free_mib} MiB would be free "
                             "after evicting everything evictable: short by "
                             f"{plan.shortfall_mib} MiB{pins}", failed)
            victims = [(card, v, plan.needed_mib) for card, plan in plans for v in plan.victims]
            if not victims:
                return
            for card, (victim, reason), needed_mib in victims:
                if victim in tried:  # a victim on several of the target's cards: once
                    continue
                tried.add(victim)
                ok = yield self.unload(victim, reason, needed_mib=needed_mib, card=card)
                if not ok:
                    failed.append(victim)

    @defer.inlineCallbacks
    def evict(self, target: str, victims: tuple[str, ...]) -> Any:
        """Unload what the memory budget chose for a job of `target`
        (scheduler.capacity: auto); fails with InsufficientVram if one failed."""
        failed = []
        mine = self.cards_of(target)
        for victim in victims:
            # The settle wait watches a card the job needs the memory on.
            card = next((c for c in self.cards_of(victim) if c in mine), None)
            ok = yield self.unload(victim, "pressure", card=card)
            if not ok:
                failed.append(victim)
        if failed:
            self._refuse(target, f"{target} needed {', '.join(victims)} unloaded", failed)

    def _refuse(self, target: str, message: str, failed: list[str]) -> None:
        if failed:
            message += f"; unload failed for {', '.join(failed)}"
        self.event(EventKind.REFUSAL, target, "insufficient_vram", detail=message)
        log.warn("refusing a job for {target}: {message}", target=target, message=message)
        raise InsufficientVram(message, consumer=target, retry_after_s=5)

    @defer.inlineCallbacks
    def evict_for_oom(self, consumer: str) -> Any:
        """The consumer answered out of memory: evict every other evictable one."""
        self.oom_retries += 1
        self.event(EventKind.OOM_RETRY, consumer, "oom")
        mine = set(self.cards_of(consumer))
        for name, view in self.views().items():
            if name == consumer or not mine & set(self.cards_of(name)):
                continue  # on no card of the consumer's: unloading it frees nothing there
            if not view.pinned and view.residency is not Residency.UNLOADED:
                yield self.unload(name, "oom")

    def job_ended(self, consumer: str, result: Any) -> None:
        """A job reached `consumer`: whatever its outcome, it may now hold its
        memory, so it is marked loaded (its next job skips the pressure
        check; an OOM answer is still replayed). Only a refusal before
        anything was sent leaves it as it was, and a job that found it down
        (a reset, a refused connection) leaves it unknown: it may have
        restarted and lost its memory (`Registry.went_down`), and one whose
        process exited meanwhile (crashed, or stopped frozen) stays unloaded."""
        if consumer not in self._registry:
            return
        if isinstance(result, Result) and not result.reached_consumer:
            return
        if self._registry[consumer].health in (Health.DOWN, Health.STOPPED):
            return  # down; or a process gpumgr owns that exited meanwhile: memory gone
        self._became_loaded(consumer)
        self.schedule_idle_unload(consumer)

    # -- control calls -----------------------------------------------------------

    def _call(self, name: str, which: str) -> defer.Deferred[None]:
        self.acting[name] = which
        if which == "load":
            d = self._control.load(name).addTimeout(self._control.load_timeout_s(name),
                                                    self._clock)
        else:
            d = self._control.unload(name).addTimeout(self._unload_timeout_s(name), self._clock)

        def done(result: Any) -> Any:
            if self.acting.get(name) == which:
                del self.acting[name]
            return result

        return d.addBoth(done)

    def _unload_timeout_s(self, name: str) -> float:
        c = self._config.consumers.get(name)
        return unload_deadline_s(None if c is None else c.process)

    @defer.inlineCallbacks
    def unload(self, name: str, reason: str, needed_mib: int | None = None,
               card: int | None = None) -> Any:
        """Unload `name` and wait for its memory to come back on `card` (default:
        its first). Never fails: False if it did."""
        c = self._config.consumers[name]
        if card is None:
            card = (self.cards_of(name) or (0,))[0]
        view = _on_card(self._registry.view(c), c, self._gpu.latest, card)
        known = view.residency is Residency.LOADED
        latest = self._gpu.latest
        if known and latest.available and (latest.sampled_at or 0) <= self._loaded_at.get(name, 0):
            latest = yield self._gpu.sample_now()  # a baseline that shows the victim loaded
        before = latest.free_mib_on(card)
        try:
            yield self._call(name, "unload")
        except Exception as e:
            why = describe_failure(e)
            self.eviction_failures += 1
            self._registry.mark_unknown(name)
            self.event(EventKind.EVICTION_FAILED, name, reason, view.resident_mib, why)
            log.warn("unloading {name} ({reason}) failed: {why}", name=name, reason=reason, why=why)
            return False
        self.evictions += 1
        self.evictions_by_reason[reason] += 1
        self._registry.mark_unloaded(name)
        self.event(EventKind.EVICTION if reason != "admin" else EventKind.UNLOAD, name, reason, view.resident_mib)
        log.info("evicted {name} ({reason}, {mib} MiB)", name=name, reason=reason,
                 mib=view.resident_mib)
        if known:
            yield self._settle(name, view.resident_mib, before, needed_mib, card)
        else:
            self._unsettled = True
        return True

    @defer.inlineCallbacks
    def _settle(self, name: str, resident_mib: int, before: int | None,
                needed_mib: int | None, card: int = 0) -> Any:
        """Wait until nvidia-smi shows the memory back on `card`, or unload_settle_s passes.
        Read from the nvidia-smi stream while it runs: a swap is seen within a loop period."""
        if before is None or resident_mib <= 0:
            return
        deadline = self._clock.seconds() + self._config.gpu.unload_settle_s
        while True:
            sample = yield self._gpu.fresh_sample()
            free = sample.free_mib_on(card)
            if free is None:
                return
            if settled(free - before, resident_mib, free, needed_mib):
                return
            if self._clock.seconds() >= deadline:
                log.warn("{name}: only {freed} of {mib} MiB came back within {s:g}s",
                         name=name, freed=free - before, mib=resident_mib,
                         s=self._config.gpu.unload_settle_s)
                return
            if self._gpu.stream is None or not self._gpu.stream.running:
                yield task.deferLater(self._clock, SETTLE_POLL_S, lambda: None)

    @defer.inlineCallbacks
    def load(self, name: str, reason: str, evicting: bool = True) -> Any:
        """Make room (when evicting), then load the consumer."""
        if evicting:
            yield self.admit(name)
        try:
            yield self._call(name, "load")
        except defer.CancelledError:
            # Everyone who wanted it gone; a process start is stopped (ManagedProcess).
            self.event(EventKind.LOAD_CANCELLED, name, reason, detail="nobody waits for it any more")
            log.info("loading {name} ({reason}) cancelled: nobody waits for it any more",
                     name=name, reason=reason)
            raise
        except Exception as e:
            why = describe_failure(e)
            self.event(EventKind.LOAD_FAILED, name, reason, detail=why)
            log.warn("loading {name} ({reason}) failed: {why}", name=name, reason=reason, why=why)
            if isinstance(e, ControlFailed) or hasattr(e, "status"):
                raise
            raise ControlFailed(f"loading {name} failed: {why}", consumer=name) from None
        self._became_loaded(name)
        mib = self._config.consumers[name].vram_resident_mib
        self.event(EventKind.LOAD, name, reason, mib)
        log.info("loaded {name} ({reason}, {mib} MiB)", name=name, reason=reason, mib=mib)
        self.schedule_idle_unload(name)
        return True

    @defer.inlineCallbacks
    def admin_unload(self, name: str) -> Any:
        ok = yield self.unload(name, "admin")
        if not ok:
            raise ControlFailed(f"unloading {name} failed; see recent_events", consumer=name)
        return True

    def _became_loaded(self, name: str) -> None:
        c = self._config.consumers[name]
        if c.gpu_process is None or self._registry[name].residency is not Residency.LOADED:
            self._registry.mark_loaded(name, self._registry[name].gpu_resident_mib
                                       if c.gpu_process is not None else c.vram_resident_mib)
        self._registry[name].last_used = self._clock.seconds()
        self._loaded_at[name] = self._clock.seconds()

    # -- idle unload -------------------------------------------------------------

    def schedule_idle_unload(self, name: str) -> None:
        c = self._config.consumers.get(name)
        idle_s = None if c is None or c.pin else c.idle_unload_s
        if idle_s is None:
            return
        timer = self._idle_timers.get(name)
        if timer is not None and timer.active():
            timer.reset(idle_s)
        else:
            self._idle_timers[name] = self._clock.callLater(idle_s, self._idle_due, name)

    def _idle_due(self, name: str) -> None:
        if name not in self._registry:
            return
        if self._runner.queued_for(name) or self._registry[name].active:
            return  # work is coming; its end schedules the next check
        d = self._runner.run(name, lambda: self._idle_unload(name), control=True)
        d.addErrback(lambda f: log.failure("idle unload of {name} failed", f, name=name))

    @defer.inlineCallbacks
    def _idle_unload(self, name: str) -> Any:
        # Re-checked once the job runs (under the lock, unless pass-through): a
        # request may have run since the timer fired, or a reload may have
        # changed or removed the consumer.
        c = self._config.consumers.get(name)
        if c is None or c.idle_unload_s is None or c.pin or name not in self._registry:
            return False
        state = self._registry[name]
        last = state.last_used if state.last_used is not None else float("-inf")
        if (state.residency is Residency.UNLOADED or self._clock.seconds() - last < c.idle_unload_s
                or self._runner.queued_for(name)):
            return False
        ok = yield self.unload(name, "idle")
        return ok

    def stop(self) -> None:
        for timer in self._idle_timers.values():
            if timer.active():
                timer.cancel()
        self._idle_timers.clear()


def _on(card: int, cards: tuple[int, ...]) -> str:
    """" on GPU n" in a refusal, where a consumer lives off card 0 alone."""
    return "" if cards == (0,) else f" on GPU {card}"
