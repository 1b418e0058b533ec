"""Render tracking: GPU work that goes on after the answer (a ComfyUI render).

The job that submitted the work keeps its GPU slot while `track` runs, and
gives it back only on evidence that the work no longer uses the GPU:

- the driver says it is over (ComfyUI: the prompt left `/queue`, running and
  pending, and `/history` has it), or that the service no longer knows it;
- its service is gone (its port refuses connections), or a reload removed
  the consumer;
- gpumgr stopped the process it owns (the process exited).

Past `job_timeout_s` the work is stopped (`driver.interrupt`: ComfyUI deletes
it from its queue if still pending, and interrupts it if running) and still
held: an interrupt's 200 is not evidence, the real ComfyUI ends a render only
at its next node boundary and skips an interrupt for a prompt still pending.
If no evidence comes within `render_stop_grace_s`, gpumgr stops the process
when it owns one; otherwise the render is STUCK: still held, said so (event,
status, metric, an error in the log) until evidence comes or an admin unload
of the consumer gives the GPU back (`request_release`).

Each poll asks the consumer as the current config describes it.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Mapping

import attrs
from twisted.internet import defer, task
from twisted.logger import Logger

from gpumgr.config import ConsumerConfig
from gpumgr.drivers import ControlHttp, IDriver, RenderState
from gpumgr.errors import describe_failure
from gpumgr.events import EventKind, EventLog
from gpumgr.registry import Registry
from gpumgr.snapshot import RenderPhase, RenderSnapshot
from gpumgr.states import Health

log = Logger()

#: Deadline of one poll (and of an interrupt).
RENDER_POLL_TIMEOUT_S = 5.0


@attrs.define
class TrackedRender:
    """One render holding a GPU slot; its phase changes as gpumgr acts on it."""

    consumer: str
    render_id: str
    since: float
    phase: RenderPhase = RenderPhase.RUNNING
    phase_since: float | None = None

    def snapshot(self) -> RenderSnapshot:
        return RenderSnapshot(self.consumer, self.render_id, self.since, self.phase,
                              self.phase_since)


#: stop_process(name): stops the process gpumgr owns for `name` (fires once it
#: exited), or None when gpumgr owns none.
StopProcess = Callable[[str], "defer.Deferred[Any] | None"]


class RenderTracker:
    def __init__(
        self,
        clock: Any,
        http: ControlHttp,
        consumers: Callable[[], Mapping[str, ConsumerConfig]],
        registry: Registry,
        probe_now: Callable[[str], object],
        event: EventLog,
        stop_process: StopProcess = lambda name: None,
    ) -> None:
        self._clock = clock
        self._http = http
        self._consumers = consumers
        self._registry = registry
        self._probe_now = probe_now
        self._event = event
        self._stop_process = stop_process
        self._seq = 0
        #: What holds a GPU slot now, for status.
        self.tracked: dict[int, TrackedRender] = {}
        #: See snapshot.RENDER_OUTCOMES.
        self.counts: collections.Counter[str] = collections.Counter()
        #: consumer -> admin unloads waiting: while one waits, a STUCK render
        #: of that consumer gives its slot back (the operator's decision).
        self._release_requested: collections.Counter[str] = collections.Counter()

    # -- the admin's way out ----------------------------------------------------

    def request_release(self, name: str) -> None:
        """An admin unload of `name` waits: its stuck renders give the GPU back."""
        self._release_requested[name] += 1

    def release_done(self, name: str) -> None:
        self._release_requested[name] -= 1
        if self._release_requested[name] <= 0:
            del self._release_requested[name]

    # -- tracking -----------------------------------------------------------------

    async def track(self, name: str, driver: IDriver, render_id: str,
                    job_started: float,
                    stop_requested: Callable[[], bool] = lambda: False) -> None:
        """Return once there is evidence the render no longer uses the GPU (see
        the module). `stop_requested()` true (a cancel by `DELETE
        /v1/requests/<id>`) stops it as job_timeout_s would: interrupted, and
        held until the evidence."""
        self._seq += 1
        key = self._seq
        now = self._clock.seconds()
        render = self.tracked[key] = TrackedRender(name, render_id, now, phase_since=now)
        self.counts["tracked"] += 1
        log.info("{name}: tracking render {id}", name=name, id=render_id)
        poll_error_logged = stop_error_logged = False
        stop_by = 0.0
        try:
            while True:
                current = self._consumers().get(name)
                if current is None or name not in self._registry:
                    self._lost(render, "its consumer was removed by a reload")
                    return
                state_now = self._registry[name]
                health = state_now.health
                # Gone, not merely unhealthy: a health route that fails or is
                # slow says nothing of a render (its prompt may be in /queue);
                # and gone since it took the prompt (a refusal from before a
                # restart says nothing of a prompt the new process took).
                if state_now.gone_since(render.since):
                    self._lost(render, "its service is gone (connection refused)")
                    return
                if health is Health.STOPPED:
                    self._lost(render, "the process gpumgr owns for it exited")
                    return
                if render.phase is RenderPhase.STUCK and self._release_requested[name] > 0:
                    self._released(render)
                    return
                try:
                    state = await driver.render_state(self._http, current, render_id).addTimeout(
                        RENDER_POLL_TIMEOUT_S, self._clock)
                except defer.CancelledError:
                    raise
                except Exception as e:
                    state = RenderState.RUNNING  # no evidence either way
                    if not poll_error_logged:
                        poll_error_logged = True
                        log.warn("{name}: polling render {id} failed: {e}", name=name,
                                 id=render_id, e=describe_failure(e))
                        self._probe_now(name)
                if state is not RenderState.RUNNING:
                    self._ended(render, state)
                    return
                now = self._clock.seconds()
                timed_out = now >= job_started + current.job_timeout_s
                if render.phase is RenderPhase.RUNNING and (timed_out or stop_requested()):
                    stop_by = now + current.render_stop_grace_s
                    self._enter(render, RenderPhase.INTERRUPTING)
                    self.counts["interrupted"] += 1
                    why = "job_timeout" if timed_out else "cancelled"
                    self._event(EventKind.RENDER_INTERRUPTED, name, why, detail=render_id)
                    log.warn("{name}: render {id} {what}; stopping it, and holding the GPU "
                             "until {name} shows it ended", name=name, id=render_id,
                             what=f"ran past job_timeout_s ({current.job_timeout_s:g}s)"
                             if timed_out else "was cancelled (DELETE /v1/requests)")
                if render.phase is not RenderPhase.RUNNING:
                    # Again at every poll until the evidence comes: it may have
                    # gone from pending to running since, and a call may have failed.
                    error = await self._interrupt(driver, current, render_id)
                    if error is not None and not stop_error_logged:
                        stop_error_logged = True
                        log.warn("{name}: stopping render {id} failed: {e}", name=name,
                                 id=render_id, e=describe_failure(error))
                if render.phase is RenderPhase.INTERRUPTING and now >= stop_by:
                    if await self._grace_over(render, current):
                        return
                await task.deferLater(self._clock, current.render_poll_s, lambda: None)
        finally:
            del self.tracked[key]

    async def _interrupt(self, driver: IDriver, c: ConsumerConfig,
                         render_id: str) -> Exception | None:
        """Ask the service to stop the render; the error, if the call failed."""
        try:
            await driver.interrupt(self._http, c, render_id).addTimeout(
                RENDER_POLL_TIMEOUT_S, self._clock)
        except defer.CancelledError:
            raise
        except Exception as e:
            return e
        return None

    async def _grace_over(self, render: TrackedRender, c: ConsumerConfig) -> bool:
        """No evidence within render_stop_grace_s: stop the owned process (True
        once it exited), or hold on as STUCK (False)."""
        name, render_id = render.consumer, render.render_id
        waited = f"no evidence that render {render_id} stopped {c.render_stop_grace_s:g}s " \
                 "after it was interrupted"
        stopping = self._stop_process(name)
        if stopping is not None:
            self._enter(render, RenderPhase.STOPPING)
            self._event(EventKind.RENDER_STUCK, name, "job_timeout",
                        detail=f"{waited}; stopping the process")
            log.error("{name}: {waited}; stopping its process", name=name, waited=waited)
            try:
                await stopping
            except defer.CancelledError:
                raise
            except Exception as e:
                log.error("{name}: stopping its process failed: {e}", name=name, e=describe_failure(e))
            else:
                self.counts["stopped"] += 1
                log.warn("{name}: its process exited; render {id} is over, releasing the GPU",
                         name=name, id=render_id)
                return True
        self._enter(render, RenderPhase.STUCK)
        self.counts["stuck"] += 1
        self._event(EventKind.RENDER_STUCK, name, "job_timeout",
                    detail=f"{waited}; holding the GPU until it leaves the queue "
                           "or an admin unload")
        log.error("{name}: {waited}; the GPU stays held until {name} shows it ended, or "
                  "until POST /v1/consumers/{name}/unload", name=name, waited=waited)
        return False

    def _enter(self, render: TrackedRender, phase: RenderPhase) -> None:
        render.phase = phase
        render.phase_since = self._clock.seconds()

    def _ended(self, render: TrackedRender, state: RenderState) -> None:
        name, render_id = render.consumer, render.render_id
        if render.phase is RenderPhase.RUNNING:
            if state is RenderState.DONE:
                self.counts["completed"] += 1
                log.info("{name}: render {id} is over", name=name, id=render_id)
            else:
                self._lost(render, "the service no longer knows it (it restarted?)")
            return
        how = "it ended" if state is RenderState.DONE else "it left the queue"
        log.info("{name}: render {id} stopped ({how}) after its interrupt; releasing the GPU",
                 name=name, id=render_id, how=how)

    def _released(self, render: TrackedRender) -> None:
        self.counts["released"] += 1
        self._event(EventKind.RENDER_RELEASED, render.consumer, "admin",
                    detail=f"{render.render_id}: released by an admin unload with no "
                           "evidence that it stopped")
        log.error("{name}: render {id} released by an admin unload, with no evidence that "
                  "it stopped", name=render.consumer, id=render.render_id)

    def _lost(self, render: TrackedRender, why: str) -> None:
        self.counts["lost"] += 1
        self._event(EventKind.RENDER_LOST, render.consumer, detail=f"{render.render_id}: {why}")
        log.warn("{name}: render {id} lost ({why}); releasing the GPU", name=render.consumer,
                 id=render.render_id, why=why)
