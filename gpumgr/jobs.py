"""The GPU job pipeline: one routed request that needs the GPU, whatever the mode.

  admit (evicting: make room) -> start the consumer's process if it is not
  running -> relay the exchange (evicting: hold an out-of-memory answer and
  replay once) -> note that the consumer may now hold its memory -> keep the
  slot while a render the answer started is still running, or, when the
  client left, until the service stopped the work it left (gpumgr.abandoned).

Every job is bounded (job_timeout_s plus a margin) and findable while it
runs, so that a consumer that stays down ends its jobs (`Jobs.abort`).
"""

from __future__ import annotations

from typing import Any, Callable

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.iweb import IAgent

from gpumgr.events import EventKind
from gpumgr.abandoned import AbandonedWork
from gpumgr.accounting import Timing
from gpumgr.admission import Admission
from gpumgr.balancer import box_headers
from gpumgr.cards import PerCardSetup
from gpumgr.config import Config, ConsumerConfig, SchedulerConfig
from gpumgr.drivers import ControlHttp, IDriver, get_driver
from gpumgr.errors import ConsumerRemoved, JobTimeout, ShuttingDown
from gpumgr.eviction import Residency
from gpumgr.fleet import Fleet
from gpumgr.process import ManagedProcess, ProcessState
from gpumgr.proxy import Outcome, Result, StreamingProxy, Timeouts
from gpumgr.registry import Registry
from gpumgr.renders import RenderTracker
from gpumgr.routing import Route
from gpumgr.auto_cards import AutoCards
from gpumgr.budget_figures import Figures, ProfileOf
from gpumgr.memory import MemoryProfiles
from gpumgr.scheduler import Locked, Passthrough, Scheduler
from gpumgr.scheduler_auto import Auto, Grant

log = Logger()

#: A job's hard deadline comes this long after job_timeout_s. A tracked render
#: is not bound by it: the render tracker interrupts it at job_timeout_s and
#: holds the GPU until the evidence that it stopped (see `Jobs.track_render`).
JOB_TIMEOUT_MARGIN_S = 2.0
#: The first bytes of a response kept for a driver that tracks renders.
CAPTURE_BYTES = 64 * 1024


@attrs.frozen
class GpuJob:
    """One request that needs the GPU, as routed: what its pipeline runs on."""

    request: Any
    kind: str
    route: Route
    #: The request's method, as sent (for the driver's render detection).
    method: str
    timing: Timing

    @property
    def name(self) -> str:
        return self.route.consumer.name


def make_scheduler(reactor: Any, registry: Registry, sched: SchedulerConfig, evicting: bool,
                   passthrough: bool, per_card: PerCardSetup | None = None,
                   figures: Callable[[], Figures] | None = None,
                   profile_of: ProfileOf | None = None,
                   card_figures: Callable[[int], Figures] | None = None) -> Scheduler:
    """The scheduler the mode asks for: none to wait on (passthrough), the
    memory budget (capacity auto, given its figures), or the lock with its
    queue (when evicting, it lets a loaded consumer's job go first); with
    `per_card` (consumers on several cards), one such lock per card, or, with
    capacity auto, one budget per card (each card's `card_figures`)."""
    if passthrough:
        return Passthrough(reactor, registry)
    if sched.auto and figures is not None and profile_of is not None:
        cards = None
        if per_card is not None and card_figures is not None:
            cards = AutoCards(per_card.placements.cards_for_job, per_card.placements.cards_of,
                              card_figures, per_card.refusal)
        return Auto(reactor, registry, figures, profile_of, may_evict=evicting,
                    max_queue=sched.max_queue, queue_timeout_s=sched.queue_timeout_s,
                    priority=sched.priority, aging_s=sched.aging_s,
                    max_bypass_s=sched.max_bypass_s, max_running=sched.max_running,
                    overlap_evict_idle_s=sched.overlap_evict_idle_s, cards=cards)
    if per_card is not None:
        return per_card.scheduler(lambda: _locked(reactor, registry, sched, evicting))
    return _locked(reactor, registry, sched, evicting)


def _locked(reactor: Any, registry: Registry, sched: SchedulerConfig, evicting: bool) -> Locked:
    return Locked(
        reactor, registry, capacity=sched.capacity if isinstance(sched.capacity, int) else 1,
        max_queue=sched.max_queue,
        queue_timeout_s=sched.queue_timeout_s, priority=sched.priority,
        aging_s=sched.aging_s,
        is_loaded=(lambda n: n in registry
                   and registry[n].residency is Residency.LOADED) if evicting else None,
        max_overtakes=sched.max_overtakes if evicting else 0,
    )


def timeouts_for(config: Config, c: ConsumerConfig) -> Timeouts:
    return Timeouts(request_s=c.request_timeout_s, body_idle_s=c.body_idle_timeout_s,
                    client_stall_s=config.limits.client_stall_timeout_s)


class Jobs:
    """Runs GPU jobs under the scheduler, and ends them when told to."""

    def __init__(
        self,
        reactor: Any,
        config: Callable[[], Config],
        registry: Registry,
        http: ControlHttp,
        scheduler: Callable[[], Scheduler],
        admission: Admission,
        fleet: Fleet,
        proxy: StreamingProxy,
        agent_for: Callable[[ConsumerConfig], IAgent],
        render_tracker: RenderTracker,
        abandoned: AbandonedWork,
        evicting: bool,
        passthrough: bool,
        profiles: Callable[[], MemoryProfiles] | None = None,
    ) -> None:
        """`scheduler`: the one in use; `evicting`, `passthrough`: the scheduler
        mode (it changes only on a restart); `profiles`: the memory figures an
        out-of-memory answer raises (capacity auto)."""
        self._reactor = reactor
        self._config = config
        self._registry = registry
        self._http = http
        self._scheduler = scheduler
        self._admission = admission
        self._fleet = fleet
        self._proxy = proxy
        self._agent_for = agent_for
        self._render_tracker = render_tracker
        self._abandoned = abandoned
        self._evicting = evicting
        self._passthrough = passthrough
        self._profiles = profiles
        #: Where each consumer lives, on a box with a lock or budget per card
        #: (gpumgr.cards); None: one lock for the box, any card may be its.
        self.cards_of: Callable[[str], tuple[int, ...]] | None = None
        #: The jobs holding the GPU for each consumer (aborted when it stays down).
        self._running: dict[str, dict[defer.Deferred[Any], Timing]] = {}

    def run(self, job: GpuJob) -> defer.Deferred[Any]:
        """Queue `job`; fires with its proxy `Result` once it gave the GPU back."""
        name = job.name

        def start(grant: Grant | None = None) -> defer.Deferred[Any]:
            current = self._config().consumers.get(name)
            if current is None:
                return defer.fail(ConsumerRemoved(
                    f"{name} was removed by a config reload while this request waited",
                    consumer=name))
            d = defer.ensureDeferred(self._held(job, current, grant))
            return self._watch(name, self._bound(d, current, job.timing), job.timing)

        request_id = None if job.timing.request_id is None else job.timing.request_id.text
        scheduler = self._scheduler()
        if isinstance(scheduler, Auto):
            # Admitted on its model's memory profile; it carries out what its grant says.
            d = scheduler.run_granted(name, start, kind=job.kind, model=job.route.model,
                                      request_id=request_id)
        else:
            d = scheduler.run(name, start, kind=job.kind, request_id=request_id)
        # A client that leaves while queued leaves the queue at once. Once its
        # job runs, a process start nobody waits for is abandoned (`_start_for`);
        # then the exchange decides: it cancels the upstream, or, for GPU work
        # that goes on after the answer, reads the answer to follow it.
        timing = job.timing
        job.request.notifyFinish().addErrback(
            lambda _: d.cancel() if timing.started is None else timing.client_left())
        return d

    async def _held(self, job: GpuJob, c: ConsumerConfig, grant: Grant | None) -> Result:
        """The pipeline, timed from when the job got the GPU to when it gave it back."""
        timing = job.timing
        timing.started = self._reactor.seconds()
        try:
            # The driver that classified the request is the one that follows it.
            return await self._pipeline(job, c, get_driver(job.route.consumer.driver), grant)
        finally:
            timing.ended = self._reactor.seconds()

    async def _pipeline(self, job: GpuJob, c: ConsumerConfig, driver: IDriver,
                        grant: Grant | None) -> Result:
        name, timing = c.name, job.timing
        if grant is not None:
            await self._admission.evict(name, grant.start.victims)
        elif self._evicting:
            await self._admission.admit(name)
        await self._fleet.stop_retiring(name)
        process = self._fleet.processes.get(name)
        if process is not None and process.state is not ProcessState.RUNNING:
            await self._start_for(name, process, timing)
        timing.exchanging = True
        result = await self._exchange(job, c, driver, grant)
        self._admission.job_ended(name, result)
        if grant is not None:
            grant.control_done()  # loaded now, if it loads at all: other loads may start
        # A client that left after the consumer took its prompt still leaves a
        # render running: its answer was read all the same (finish_upstream).
        if result.outcome in (Outcome.COMPLETED, Outcome.CLIENT_GONE) \
                and result.status is not None and result.body_head:
            render_id = driver.render_id(job.method, job.route.target.path, result.status,
                                         result.body_head)
            if render_id is not None:
                # job_timeout_s bounds the hold of the GPU, not the wait for it.
                started = timing.started if timing.started is not None else timing.received
                await self.track_render(c, driver, render_id, started, timing)
                return result
        if result.abandoned:
            await self._settle_abandoned(c, driver)
        return result

    async def _exchange(self, job: GpuJob, c: ConsumerConfig, driver: IDriver,
                        grant: Grant | None) -> Result:
        """Relay the request; when evicting, an out-of-memory answer is held,
        every other consumer evicted, and the request sent once more. With
        capacity auto the consumer's job peak is raised to what it showed
        first, and the replay waits until the job runs alone."""
        timing, name = job.timing, c.name
        # Two figures, so that neither hides the other: the wait for the GPU
        # (the queue), then what admission took once it had it (evictions,
        # loads, a process start).
        started = timing.received if timing.started is None else timing.started
        wait_ms = int((started - timing.received) * 1000)
        admit_ms = int((self._reactor.seconds() - started) * 1000)
        headers = [(b"X-Gpumgr-Consumer", name.encode("utf-8")),
                   (b"X-Gpumgr-Wait-Ms", str(wait_ms).encode("ascii")),
                   (b"X-Gpumgr-Admit-Ms", str(admit_ms).encode("ascii")),
                   *box_headers(self._config().balancer, job.kind)]
        capture = CAPTURE_BYTES if driver.tracks_renders else 0

        def loaded(status: int) -> None:
            # An answer that is not an error: the service has its model loaded
            # (it answers after loading), so other loads may start.
            if grant is not None and status < 500:
                grant.control_done()

        def forward(hold_oom: bool) -> defer.Deferred[Result]:
            return self._proxy.forward(
                job.request, name, self._agent_for(c), job.route.url,
                timeouts_for(self._config(), c), headers, hold_oom=hold_oom,
                capture_bytes=capture, finish_upstream=driver.tracks_renders,
                on_head=loaded)

        result = await forward(self._evicting or grant is not None)
        if result.outcome is Outcome.OOM:
            if grant is not None:
                self._raise_peak(name, job.route.model)
                await grant.alone()
            if self._evicting:
                await self._admission.evict_for_oom(name)
            result = await forward(False)
        return result

    def _raise_peak(self, name: str, model: str | None) -> None:
        """Its job peak is at least the room it had (gpumgr.budget_figures.oom_peak_mib)."""
        scheduler = self._scheduler()
        if self._profiles is None or not isinstance(scheduler, Auto):
            return
        seen = scheduler.oom_peak_mib(name)
        if seen is not None:
            log.warn("{name}: out of memory beside other jobs; its job peak is now at least "
                     "{mib} MiB, and the request is replayed alone", name=name, mib=seen)
            self._profiles().raise_peak(name, model, seen)

    async def _start_for(self, name: str, process: ManagedProcess, timing: Timing) -> None:
        """Start the consumer's process for a job.

        A client that leaves (before or during the start) abandons it: an
        eviction before it has completed, the start is given up and the
        process stopped once no other job waits for it, and the job (and the
        GPU) ends once that stop has, not when the start would have.
        """
        if not timing.client_gone:
            load = self._admission.load(name, "demand", evicting=False)
            timing.on_client_gone = load.cancel
            try:
                await load
                return
            except defer.CancelledError:
                pass
            finally:
                timing.on_client_gone = None
        log.info("{name}: its process start was given up (the client left, or the job ended)",
                 name=name)
        await process.when_stopped()
        raise defer.CancelledError()

    async def track_render(self, c: ConsumerConfig, driver: IDriver, render_id: str,
                           job_started: float, timing: Timing | None = None) -> None:
        """Hold the job's GPU slot until the render is over (see renders.py).
        The job's hard deadline is disarmed: the tracker interrupts the render
        at job_timeout_s and releases on evidence only, which may come later."""
        if timing is None:
            await self._render_tracker.track(c.name, driver, render_id, job_started)
            return
        timing.disarm_deadline()
        timing.render_id = render_id
        await self._render_tracker.track(c.name, driver, render_id, job_started,
                                         lambda: timing.cancel_requested)

    async def _settle_abandoned(self, c: ConsumerConfig, driver: IDriver) -> None:
        """The client left while the service had its request: keep the slot
        until the service stopped that work (see gpumgr.abandoned)."""
        if self._passthrough or c.abandoned_grace_s <= 0:
            return
        name = c.name
        left_at = self._reactor.seconds()

        def is_down() -> bool:
            # Gone, not merely unhealthy: a service that answers its health
            # route 503 (busy, flapping) may still compute; and gone since it
            # ran the work (a refusal seen before then is stale).
            if self._fleet.is_stopped(name):
                return True
            state = self._registry[name] if name in self._registry else None
            return state is not None and state.gone_since(left_at)

        def ask_service() -> defer.Deferred[bool | None]:
            return driver.work_stopped(self._http, c).addTimeout(
                self._config().health.timeout_s, self._reactor)

        cards = None if self.cards_of is None else self.cards_of(name)
        # A service's lock is not a queue (std::mutex is not fair): its turn
        # says the left work is over only if that work was its only one.
        alone = len(self._running.get(name, {})) <= 1
        await self._abandoned.settle(
            name, c.abandoned_grace_s, c.gpu_process, c.vram_resident_mib, is_down,
            ask_service, cards,
            (lambda: driver.work_barrier(self._http, c)) if alone else None)

    # -- the bound, and the jobs a consumer that stays down ends -----------------------

    def _bound(self, d: defer.Deferred[Result], c: ConsumerConfig,
               timing: Timing) -> defer.Deferred[Result]:
        """Every job is bounded: job_timeout_s plus a margin. A tracked render
        leaves this bound when its tracking starts (`track_render`): from
        there the tracker bounds it, and gives the GPU back only on evidence
        that the render stopped; a timeout here would release it on none."""
        limit_s = c.job_timeout_s + JOB_TIMEOUT_MARGIN_S
        timed_out = []

        def expire() -> None:
            timed_out.append(True)
            d.cancel()

        timing.deadline = self._reactor.callLater(limit_s, expire)

        def settle(result: Any) -> Any:
            timing.disarm_deadline()
            if timed_out:
                raise self._timed_out(c.name)
            return result

        return d.addBoth(settle)

    def _timed_out(self, name: str) -> JobTimeout:
        self._admission.event(EventKind.JOB_TIMEOUT, name, "job_timeout")
        log.warn("{name}: a job held the GPU past job_timeout_s; it was aborted", name=name)
        return JobTimeout(f"{name}: the job ran past job_timeout_s and was aborted",
                          consumer=name)

    def _watch(self, name: str, d: defer.Deferred[Any], timing: Timing) -> defer.Deferred[Any]:
        """Keep a running job findable, so that `abort` can end it."""
        jobs = self._running.setdefault(name, {})
        jobs[d] = timing

        def done(result: Any) -> Any:
            jobs.pop(d, None)
            if not jobs and self._running.get(name) is jobs:
                del self._running[name]
            return result

        return d.addBoth(done)

    def abort(self, name: str, why: str) -> None:
        """Cancel its jobs that are talking to it; one still evicting for it
        finishes that first (it is looked at again after the next grace)."""
        jobs = [d for d, timing in self._running.get(name, {}).items() if timing.exchanging]
        if not jobs:
            return
        log.warn("{why}; aborting {n} job(s) that hold the GPU for it", why=why, n=len(jobs))
        self._admission.event(EventKind.JOB_ABORTED, name, "consumer_down", detail=why)
        for d in jobs:
            d.cancel()


async def drain(reactor: Any, scheduler: Scheduler, grace_s: float) -> None:
    """Shutdown: refuse queued and new GPU jobs with 503 shutting_down, let
    running ones (tracked renders too) finish for up to `grace_s`, then
    cancel them."""
    scheduler.close(ShuttingDown("gpumgr is shutting down", retry_after_s=5))
    running = len(scheduler.stats().holders)
    log.info("draining: queued jobs refused, waiting up to {s:g}s for {n} running job(s)",
             s=grace_s, n=running)
    try:
        await scheduler.when_idle().addTimeout(grace_s, reactor)
    except defer.TimeoutError:
        running = len(scheduler.stats().holders)
        log.warn("{n} job(s) still running after {s:g}s (shutdown_grace_s): aborting them",
                 n=running, s=grace_s)
        scheduler.cancel_running()
