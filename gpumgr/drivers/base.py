"""The driver interface, and the behaviour most drivers share."""

from __future__ import annotations

import enum
from typing import Callable, Protocol

import attrs
from twisted.internet import defer
from zope.interface import Attribute, Interface, implementer

from gpumgr.config import ConsumerConfig, HttpCall
from gpumgr.states import Health
from gpumgr.target import parse_target


@attrs.frozen
class HttpReply:
    code: int
    body: bytes  # bounded: control replies are small

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    def snippet(self) -> str:
        return self.body[:200].decode("utf-8", "replace").strip()


class RenderState(enum.Enum):
    """Where GPU work that went on after its answer stands."""

    RUNNING = "running"  # still queued or rendering
    DONE = "done"  # finished (succeeded or failed): its result is recorded
    GONE = "gone"  # the service knows nothing of it (it restarted, or moved)


class ControlCallFailed(Exception):
    """A control call (probe, load, unload, render poll) did not succeed."""


class ControlHttp(Protocol):
    """Small HTTP calls to a service; every reply body is read bounded."""

    def request(self, method: str, url: str, body: bytes | None = None,
                content_type: str | None = None) -> defer.Deferred[HttpReply]: ...


class IDriver(Interface):
    name = Attribute("The value of `consumers.<name>.driver` that selects it; its config "
                     "defaults are gpumgr.config.DRIVER_DEFAULTS[name].")
    tracks_renders = Attribute("True if answers may start GPU work that goes on (render_id).")

    def probe(http: ControlHttp, consumer: ConsumerConfig) -> defer.Deferred[Health]:
        """OK or STARTING; fails (ControlCallFailed or a connection error) when down."""

    def load(http: ControlHttp, consumer: ConsumerConfig) -> defer.Deferred[None]:
        """Warm the service; only called when `consumer.can_load`."""

    def unload(http: ControlHttp, consumer: ConsumerConfig) -> defer.Deferred[None]:
        """Ask the service to free its GPU memory. Its answer proves nothing:
        gpumgr then waits for nvidia-smi to show the memory back."""

    def is_gpu_work(method: str, path: str) -> bool:
        """Does this request of the native API use the GPU (and so get scheduled)?"""

    def is_control(consumer: ConsumerConfig, method: str, path: str,
                   body: Callable[[], bytes | None]) -> bool:
        """Is this request (decoded `path`) one of the service's own
        state-changing routes (load, unload, free, interrupt)? Through
        pass-through those are gpumgr's admin routes. `body()` is the request
        body, or None when it is too large to read."""

    def model_of(method: str, path: str, body: Callable[[], bytes | None]) -> str | None:
        """The model a GPU request runs, for a service profiled per model
        (scheduler.capacity: auto picks its memory profile); None: not told."""

    def render_id(method: str, path: str, status: int, body_head: bytes) -> str | None:
        """For an answered request whose GPU work goes on afterwards, its id."""

    def render_state(http: ControlHttp, consumer: ConsumerConfig,
                     render_id: str) -> defer.Deferred[RenderState]:
        """Is that work still running, over, or unknown to the service?"""

    def interrupt(http: ControlHttp, consumer: ConsumerConfig,
                  render_id: str) -> defer.Deferred[None]:
        """Ask the service to stop that work, queued or running (it ran past its
        job_timeout_s). Its answer is not evidence: gpumgr keeps polling
        `render_state` until the work is over."""

    def work_stopped(http: ControlHttp, consumer: ConsumerConfig) -> defer.Deferred[bool | None]:
        """After a client left: does the service itself say that nothing runs
        (True), that work runs (False), or can it not tell (None)?"""

    def work_barrier(http: ControlHttp, consumer: ConsumerConfig) -> defer.Deferred[bool | None]:
        """After a client left, for a service that runs its work one at a time:
        fires True once everything the service took before this call has ended
        (the call waits its turn behind it), None where it cannot tell. It may
        take as long as that work: the caller bounds it, and cancels it."""


async def call(http: ControlHttp, consumer: ConsumerConfig, call: HttpCall) -> HttpReply:
    """Make a configured control call; fails unless the service answers 2xx."""
    reply = await http.request(call.method, consumer.url_for(call.path), call.body or None,
                               call.content_type)
    if not reply.ok:
        raise ControlCallFailed(
            f"{call.method} {call.path} answered HTTP {reply.code}: {reply.snippet()}")
    return reply


@implementer(IDriver)
class BaseDriver:
    """A service with a health route and, optionally, load and unload routes."""

    name = "base"
    tracks_renders = False
    #: Methods of the native API that are GPU work (the `http` driver's rule).
    gpu_methods = frozenset({"POST", "PUT", "PATCH", "DELETE"})

    def probe(self, http: ControlHttp, consumer: ConsumerConfig) -> defer.Deferred[Health]:
        return defer.ensureDeferred(self._probe(http, consumer))

    async def _probe(self, http: ControlHttp, consumer: ConsumerConfig) -> Health:
        reply = await http.request("GET", consumer.url_for(consumer.health_path))
        if reply.ok:
            return Health.OK
        return self.health_of_failed_probe(reply)

    def health_of_failed_probe(self, reply: HttpReply) -> Health:
        raise ControlCallFailed(f"health check answered HTTP {reply.code}: {reply.snippet()}")

    def load(self, http: ControlHttp, consumer: ConsumerConfig) -> defer.Deferred[None]:
        assert consumer.load is not None
        return defer.ensureDeferred(call(http, consumer, consumer.load)).addCallback(
            lambda _: None)

    def unload(self, http: ControlHttp, consumer: ConsumerConfig) -> defer.Deferred[None]:
        if consumer.unload is None:
            return defer.fail(ControlCallFailed(f"{consumer.name} has no unload route"))
        return defer.ensureDeferred(call(http, consumer, consumer.unload)).addCallback(
            lambda _: None)

    def is_gpu_work(self, method: str, path: str) -> bool:
        return method in self.gpu_methods

    #: (method, path) routes that change the service's state, beyond the
    #: consumer's configured load and unload calls.
    control_routes: frozenset[tuple[str, str]] = frozenset()

    def is_control(self, consumer: ConsumerConfig, method: str, path: str,
                   body: Callable[[], bytes | None]) -> bool:
        if (method, path) in self.control_routes:
            return True
        # The configured path decoded as a request's is (config checked it parses).
        return any(c is not None and c.method == method
                   and parse_target(c.path.encode("utf-8")).path == path
                   for c in (consumer.load, consumer.unload))

    def model_of(self, method: str, path: str, body: Callable[[], bytes | None]) -> str | None:
        return None

    def render_id(self, method: str, path: str, status: int, body_head: bytes) -> str | None:
        return None

    def render_state(self, http: ControlHttp, consumer: ConsumerConfig,
                     render_id: str) -> defer.Deferred[RenderState]:
        return defer.succeed(RenderState.DONE)

    def interrupt(self, http: ControlHttp, consumer: ConsumerConfig,
                  render_id: str) -> defer.Deferred[None]:
        return defer.succeed(None)

    def work_stopped(self, http: ControlHttp,
                     consumer: ConsumerConfig) -> defer.Deferred[bool | None]:
        return defer.succeed(None)

    def work_barrier(self, http: ControlHttp,
                     consumer: ConsumerConfig) -> defer.Deferred[bool | None]:
        return defer.succeed(None)
