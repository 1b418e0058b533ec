"""Render tracking: GPU work that goes on after the answer (a ComfyUI render).

The job that submitted the work keeps its GPU slot while `track` runs: until
the driver says the work is over, until it runs past `job_timeout_s` (then it
is interrupted), or until it is lost — its service went down, forgot it (a
restart), or was removed by a reload. Each poll asks the consumer as the
current config describes it.
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
from gpumgr.registry import Health, Registry

log = Logger()

#: How often a tracked render's state is polled.
RENDER_POLL_S = 0.5
#: Deadline of one poll (and of an interrupt).
RENDER_POLL_TIMEOUT_S = 5.0


@attrs.frozen
class TrackedRender:
    consumer: str
    render_id: str
    since: float


#: event(kind, consumer, reason=None, mib=None, detail=None): the recent-events log.
EventLog = Callable[..., None]


class RenderTracker:
    def __init__(
        self,
        clock: Any,
        http: ControlHttp,
        consumers: Callable[[], Mapping[str, ConsumerConfig]],
        registry: Registry,
        probe_now: Callable[[str], object],
        event: EventLog,
    ) -> None:
        self._clock = clock
        self._http = http
        self._consumers = consumers
        self._registry = registry
        self._probe_now = probe_now
        self._event = event
        self._seq = 0
        #: What holds a GPU slot now, for status.
        self.tracked: dict[int, TrackedRender] = {}
        #: tracked / completed / interrupted / lost
        self.counts: collections.Counter[str] = collections.Counter()

    async def track(self, name: str, driver: IDriver, render_id: str,
                    job_started: float) -> None:
        """Return once the render no longer needs the GPU (see the module)."""
        self._seq += 1
        key = self._seq
        self.tracked[key] = TrackedRender(name, render_id, self._clock.seconds())
        self.counts["tracked"] += 1
        log.info("{name}: tracking render {id}", name=name, id=render_id)
        poll_error_logged = False
        try:
            while True:
                current = self._consumers().get(name)
                if current is None or name not in self._registry:
                    self._lost(name, render_id, "its consumer was removed by a reload")
                    return
                if self._registry[name].health is Health.DOWN:
                    self._lost(name, render_id, "its service went down")
                    return
                if self._clock.seconds() >= job_started + current.job_timeout_s:
                    await self._interrupt(driver, current, render_id)
                    return
                try:
                    state = await driver.render_state(self._http, current, render_id).addTimeout(
                        RENDER_POLL_TIMEOUT_S, self._clock)
                except defer.CancelledError:
                    raise
                except Exception as e:
                    state = RenderState.RUNNING
                    if not poll_error_logged:
                        poll_error_logged = True
                        log.warn("{name}: polling render {id} failed: {e}", name=name,
                                 id=render_id, e=describe_failure(e))
                        self._probe_now(name)
                if state is RenderState.DONE:
                    self.counts["completed"] += 1
                    log.info("{name}: render {id} is over", name=name, id=render_id)
                    return
                if state is RenderState.GONE:
                    self._lost(name, render_id, "the service no longer knows it "
                               "(it restarted?)")
                    return
                await task.deferLater(self._clock, RENDER_POLL_S, lambda: None)
        finally:
            del self.tracked[key]

    async def _interrupt(self, driver: IDriver, c: ConsumerConfig, render_id: str) -> None:
        self.counts["interrupted"] += 1
        self._event("render_interrupted", c.name, "job_timeout", detail=render_id)
        log.warn("{name}: render {id} ran past job_timeout_s ({s:g}s); interrupting it",
                 name=c.name, id=render_id, s=c.job_timeout_s)
        try:
            await driver.interrupt(self._http, c, render_id).addTimeout(
                RENDER_POLL_TIMEOUT_S, self._clock)
        except Exception as e:
            log.warn("{name}: interrupt failed: {e}", name=c.name, e=describe_failure(e))

    def _lost(self, name: str, render_id: str, why: str) -> None:
        self.counts["lost"] += 1
        self._event("render_lost", name, detail=f"{render_id}: {why}")
        log.warn("{name}: render {id} lost ({why}); releasing the GPU", name=name,
                 id=render_id, why=why)
