"""Requests users can see and cancel: `GET` and `DELETE /v1/requests/<id>`.

The book knows every proxied request from its arrival until it is over, and
a finished one for a bounded while afterwards (`requests.keep_finished`,
`requests.keep_finished_s`). Where a request stands is read from the parts
that decide it, taken at once (`Scene`): the scheduler's queue in the order
it would start jobs, what admission loads or evicts now, the renders being
tracked. `describe` is the pure rendering.

A cancel acts as the parts already do for a client that leaves: a queued job
leaves the queue (its client gets 409 `request_cancelled`); a running one
has its client's connection closed, so the exchange stops and the GPU stays
held until the evidence that the service stopped (gpumgr.abandoned); a
tracked render is interrupted and held until the evidence that it ended
(gpumgr.renders). Never is the GPU given back on the cancel itself.
"""

from __future__ import annotations

import collections
import enum
import hmac
from typing import Any, Callable, Mapping

import attrs
from twisted.internet import defer
from twisted.python.failure import Failure

from gpumgr.accounting import Timing, access_status, client_left
from gpumgr.config import RequestsConfig
from gpumgr.errors import RequestCancelled, RequestFinished, RequestIdInUse, UnknownRequest
from gpumgr.queue_policy import QueuedJob
from gpumgr.request_ids import (
    CANCEL_TOKEN_HEADER,
    REQUEST_ID_HEADER,
    RequestId,
    new_cancel_token,
    new_request_id,
)
from gpumgr.status import iso


class Phase(enum.StrEnum):
    QUEUED = "queued"
    #: It holds the GPU; admission loads or evicts consumers for it.
    ADMITTING = "admitting"
    RUNNING = "running"
    #: Its client left (or it was cancelled): held until the service stopped.
    DRAINING = "draining"
    #: Its answer started a render that holds the GPU until it ends.
    RENDERING = "rendering"
    FINISHED = "finished"


@attrs.frozen
class Finished:
    code: int
    at: float


@attrs.define(eq=False)
class Entry:
    """One request the book knows."""

    id: RequestId
    token: str
    kind: str
    consumer: str
    timing: Timing
    #: Waits for the GPU before it runs (a `/v1/<kind>` job, a scheduled route).
    scheduled: bool
    request: Any
    job: defer.Deferred[Any] | None = None
    cancelled: bool = False
    finished: Finished | None = None

    def token_matches(self, given: bytes) -> bool:
        return hmac.compare_digest(given.strip(), self.token.encode("ascii"))


@attrs.frozen
class Scene:
    """What the rest of gpumgr shows about requests, taken at once."""

    now: float
    queue: tuple[QueuedJob, ...] = ()
    #: The consumers whose jobs hold the GPU now.
    holders: tuple[str, ...] = ()
    #: consumer -> "load" or "unload", while admission does it.
    acting: Mapping[str, str] = attrs.field(factory=dict)
    #: render id -> its phase (gpumgr.renders), while tracked.
    renders: Mapping[str, str] = attrs.field(factory=dict)


def _ms(start: float | None, end: float | None) -> int | None:
    return None if start is None or end is None else int((end - start) * 1000)


def phase_of(entry: Entry) -> Phase:
    t = entry.timing
    if entry.finished is not None:
        return Phase.FINISHED
    if t.started is None and entry.scheduled:
        return Phase.QUEUED
    if t.render_id is not None:
        return Phase.RENDERING
    if t.client_gone:
        return Phase.DRAINING
    if entry.scheduled and not t.exchanging:
        return Phase.ADMITTING
    return Phase.RUNNING


def describe(entry: Entry, scene: Scene) -> dict[str, Any]:
    """Where a request stands, for `GET /v1/requests/<id>` and the page (pure)."""
    t = entry.timing
    phase = phase_of(entry)
    doc: dict[str, Any] = {
        "id": entry.id.text, "state": phase.value, "kind": entry.kind,
        "consumer": entry.consumer, "received": iso(t.received),
        "cancel_requested": entry.cancelled,
    }
    if phase is Phase.QUEUED:
        ids = [q.request_id for q in scene.queue]
        position = ids.index(entry.id.text) + 1 if entry.id.text in ids else None
        doc["position"] = position
        doc["waiting_for"] = {
            "ahead": None if position is None else [
                {"id": q.request_id, "consumer": q.consumer, "control": q.control}
                for q in scene.queue[:position - 1]],
            "holding_the_gpu": list(scene.holders),
        }
        doc["waited_ms"] = _ms(t.received, scene.now)
        return doc
    if phase is Phase.FINISHED:
        assert entry.finished is not None
        doc.update(code=entry.finished.code, ended=iso(entry.finished.at),
                   wait_ms=_ms(t.received, t.started), gpu_ms=_ms(t.started, t.ended),
                   render=t.render_id)
        return doc
    doc["since"] = iso(t.started if t.started is not None else t.received)
    doc["wait_ms"] = _ms(t.received, t.started)
    if phase is Phase.ADMITTING:
        doc["loading"] = sorted(n for n, what in scene.acting.items() if what == "load")
        doc["evicting"] = sorted(n for n, what in scene.acting.items() if what == "unload")
    if phase is Phase.RENDERING:
        doc["render"] = {"prompt_id": t.render_id, "state": scene.renders.get(t.render_id or "")}
    return doc


class RequestBook:
    """Every proxied request while it runs, and the finished ones for a while."""

    def __init__(self, clock: Any, config: Callable[[], RequestsConfig],
                 new_id: Callable[[], str] = new_request_id,
                 new_token: Callable[[], str] = new_cancel_token) -> None:
        self._clock = clock
        self._config = config
        self._new_id = new_id
        self._new_token = new_token
        self._live: dict[str, Entry] = {}
        self._finished: collections.OrderedDict[str, Entry] = collections.OrderedDict()

    def parse(self, request: Any) -> RequestId:
        """The request's id (its client's, or a new one); refused when bad or in use."""
        rid = RequestId.from_header(request.requestHeaders.getRawHeaders(REQUEST_ID_HEADER),
                                    self._new_id)
        if rid.text in self._live:
            raise RequestIdInUse(f"request {rid.text} is still running; send another "
                                 f"{REQUEST_ID_HEADER.decode()}")
        return rid

    def open(self, request: Any, kind: str, consumer: str, timing: Timing,
             job: defer.Deferred[Any], scheduled: bool) -> defer.Deferred[Any]:
        """Keep `job` (of `timing.request_id`) until it is over; its response
        carries the id, and the cancel token that only this client gets."""
        assert timing.request_id is not None
        rid = timing.request_id
        entry = Entry(rid, self._new_token(), kind, consumer, timing, scheduled, request, job)
        self._finished.pop(rid.text, None)
        self._live[rid.text] = entry
        request.setHeader(REQUEST_ID_HEADER, rid.text.encode("ascii"))
        request.setHeader(CANCEL_TOKEN_HEADER, entry.token.encode("ascii"))

        def cancelled(failure: Failure) -> Failure:
            if entry.cancelled and failure.check(defer.CancelledError) \
                    and not client_left(request):
                raise RequestCancelled(f"request {rid.text} was cancelled while it waited "
                                       "for the GPU", consumer=consumer)
            return failure

        return job.addErrback(cancelled)

    def close(self, result: object, entry_id: RequestId, request: Any) -> object:
        """The request is over (after accounting): keep it as finished a while."""
        entry = self._live.get(entry_id.text)
        if entry is not None and entry.request is request:
            del self._live[entry_id.text]
            entry.finished = Finished(access_status(result, client_left(request)),
                                      self._clock.seconds())
            self._finished[entry_id.text] = entry
            self._prune()
        return result

    def _prune(self) -> None:
        config = self._config()
        horizon = self._clock.seconds() - config.keep_finished_s
        while self._finished:
            oldest = next(iter(self._finished.values()))
            assert oldest.finished is not None
            if len(self._finished) <= config.keep_finished and oldest.finished.at >= horizon:
                break
            self._finished.popitem(last=False)

    def find(self, text: str) -> Entry:
        self._prune()
        entry = self._live.get(text) or self._finished.get(text)
        if entry is None:
            raise UnknownRequest(f"no request {text!r} is running, queued or recently finished")
        return entry

    def live(self) -> list[Entry]:
        return list(self._live.values())

    def cancel(self, entry: Entry) -> None:
        """Stop it as a client that leaves would (see the module)."""
        if entry.finished is not None:
            raise RequestFinished(f"request {entry.id.text} is already over "
                                  f"({entry.finished.code})", consumer=entry.consumer)
        entry.cancelled = True
        entry.timing.cancel_requested = True
        if phase_of(entry) is Phase.QUEUED and entry.job is not None:
            entry.job.cancel()
            return
        request = entry.request
        if not request.finished and not request._disconnected:
            transport = getattr(request.channel, "transport", None) or request.transport
            transport.abortConnection()
