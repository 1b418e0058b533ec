"""What a load balancer in front of several gpumgr boxes needs from this one.

Readiness per kind (`GET /v1/ready/<kind>`): can this box take a job of that
kind soon? It is decided purely (`decide`) from a `KindState` read from the
live state (no I/O), so a balancer may probe it every second. And the box's
name on its answers (`box_headers`), so that the balancer sends the /audio/
fetch back to the box that made the file. See docs/fleet.md.
"""

from __future__ import annotations

import enum
from typing import Any, Callable, Mapping

import attrs

from gpumgr.config import KINDS, BalancerConfig, Config
from gpumgr.errors import UnknownRoute
from gpumgr.process import ManagedProcess, ProcessState
from gpumgr.registry import Registry
from gpumgr.scheduler import Locked, Scheduler
from gpumgr.states import Health

#: The cookie that names the box that made an /audio/ file (docs/fleet.md).
BOX_COOKIE = "gpumgr_box"
#: The kind whose answers hand out /audio/ URLs.
_AUDIO_MAKER = "tts"


class Phase(enum.StrEnum):
    """Where the box is in its life, as the balancer must see it."""

    SERVING = "serving"
    #: SIGTERM came: requests are still served, but the box reports not ready
    #: for balancer.not_ready_s, so that the balancer stops sending.
    LEAVING = "leaving"
    #: Shutting down: queued and new jobs are refused.
    DRAINING = "draining"


class NotReady(enum.StrEnum):
    """Why /v1/ready/<kind> answers 503: the `reason.code` of its body."""

    DRAINING = "draining"
    NOT_READY = "not_ready"
    CONSUMER_DOWN = "consumer_down"
    CONSUMER_UNKNOWN = "consumer_unknown"
    QUEUE_FULL = "queue_full"


@attrs.frozen
class KindState:
    """What readiness for one kind depends on, read at one moment."""

    kind: str
    consumer: str
    health: Health
    #: The state of the consumer's process when gpumgr owns one, else None.
    process: ProcessState | None
    #: Why its owned process cannot start now (the back-off), else None.
    start_refused: str | None
    #: Jobs of this kind waiting, and jobs waiting in all.
    queued: int
    queued_total: int
    #: The scheduler's own queue bound (None: it has no queue).
    scheduler_max_queue: int | None


@attrs.frozen
class Readiness:
    kind: str
    consumer: str
    reason: NotReady | None
    message: str
    queued: int

    @property
    def ready(self) -> bool:
        return self.reason is None

    def as_json(self) -> dict[str, Any]:
        reason = None if self.reason is None else {"code": self.reason.value,
                                                    "message": self.message}
        return {"kind": self.kind, "consumer": self.consumer, "ready": self.ready,
                "reason": reason, "queued": self.queued}


def decide(state: KindState, phase: Phase, balancer: BalancerConfig) -> Readiness:
    """Can this box take a job of `state.kind` soon (pure)?"""
    def no(reason: NotReady, message: str) -> Readiness:
        return Readiness(state.kind, state.consumer, reason, message, state.queued)

    name = state.consumer
    if phase is Phase.DRAINING:
        return no(NotReady.DRAINING, "gpumgr is shutting down")
    if phase is Phase.LEAVING:
        return no(NotReady.NOT_READY,
                  "gpumgr is stopping: it serves requests for balancer.not_ready_s, then drains")
    if state.process is not None and state.process is not ProcessState.RUNNING:
        # An owned process that is not running starts on demand, unless it
        # failed to start too often lately.
        if state.start_refused is not None:
            return no(NotReady.CONSUMER_DOWN, f"{name} cannot start now: {state.start_refused}")
    elif state.health is Health.DOWN:
        return no(NotReady.CONSUMER_DOWN, f"{name} failed its last health check")
    elif state.health is Health.UNKNOWN:
        return no(NotReady.CONSUMER_UNKNOWN, f"{name} has not been probed yet")
    if state.queued >= balancer.max_queue:
        return no(NotReady.QUEUE_FULL, f"{state.queued} {state.kind} job(s) wait "
                  f"(balancer.max_queue is {balancer.max_queue})")
    if state.scheduler_max_queue is not None and state.queued_total >= state.scheduler_max_queue:
        return no(NotReady.QUEUE_FULL, f"{state.queued_total} jobs wait "
                  f"(scheduler.max_queue is {state.scheduler_max_queue})")
    return Readiness(state.kind, name, None, "ready", state.queued)


class ReadinessCheck:
    """Reads the live state into a `KindState` and decides; holds the phase."""

    def __init__(self, config: Callable[[], Config], registry: Registry,
                 scheduler: Callable[[], Scheduler],
                 processes: Callable[[], Mapping[str, ManagedProcess]]) -> None:
        self._config = config
        self._registry = registry
        self._scheduler = scheduler
        self._processes = processes
        self.phase = Phase.SERVING

    def state(self, kind: str) -> KindState:
        """Raises UnknownRoute for a kind that is not one, or has no consumer."""
        if kind not in KINDS:
            raise UnknownRoute(f"no such kind {kind!r} (known: {', '.join(KINDS)})")
        config = self._config()
        c = config.consumer_for(kind)
        if c is None or c.name not in self._registry:
            raise UnknownRoute(f"no consumer is routed for {kind!r}")
        scheduler = self._scheduler()
        stats = scheduler.stats()
        process = self._processes().get(c.name)
        refused = process.start_refusal() if process is not None else None
        return KindState(
            kind=kind, consumer=c.name, health=self._registry[c.name].health,
            process=None if process is None else process.state,
            start_refused=None if refused is None else refused.message,
            queued=stats.queued_by_kind.get(kind, 0), queued_total=stats.queue_depth,
            scheduler_max_queue=(config.scheduler.max_queue if isinstance(scheduler, Locked)
                                 else None))

    def check(self, kind: str) -> Readiness:
        return decide(self.state(kind), self.phase, self._config().balancer)

    def check_routed(self) -> tuple[Readiness, ...]:
        """Readiness of every routed kind (for /v1/status; no I/O either)."""
        answers = []
        for kind in KINDS:
            try:
                answers.append(self.check(kind))
            except UnknownRoute:
                continue
        return tuple(answers)


def box_headers(balancer: BalancerConfig, kind: str | None) -> list[tuple[bytes, bytes]]:
    """The box's name on a proxied answer; on a /v1/tts answer also a cookie
    for /audio/ only, which the balancer routes on (none without a name)."""
    if balancer.box is None:
        return []
    box = balancer.box.encode("ascii")
    headers = [(b"X-Gpumgr-Box", box)]
    if kind == _AUDIO_MAKER:
        headers.append((b"Set-Cookie",
                        BOX_COOKIE.encode("ascii") + b"=" + box + b"; Path=/audio/; HttpOnly"))
    return headers
