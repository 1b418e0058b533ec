"""What one proxied request cost: its timing, its status, its access log line
and the request counters that /metrics and /v1/status show."""

from __future__ import annotations

from typing import Any, Callable

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from gpumgr.errors import GpumgrError
from gpumgr.proxy import Outcome, Result
from gpumgr.request_ids import RequestId
from gpumgr.snapshot import RequestStats

#: One line per proxied request.
access_log = Logger(namespace="gpumgr.access")

#: nginx's code for "the client closed the connection before the answer was complete".
CLIENT_CLOSED_REQUEST = 499


@attrs.define
class Timing:
    """When a request arrived, got the GPU, and gave it back."""

    received: float
    bytes_in: int = 0
    started: float | None = None
    ended: float | None = None
    #: The request's path for the access log, from its parsed target.
    path: str = ""
    #: The job's hard deadline (`gpumgr.jobs`); a tracked render disarms it.
    deadline: IDelayedCall | None = None
    #: The client left while its job held the GPU.
    client_gone: bool = False
    #: Set while the job is at a stage that a client leaving cancels (a process start).
    on_client_gone: Callable[[], None] | None = None
    #: Past admission and the process start: the exchange with the consumer
    #: (a job aborted before would cancel an eviction half-way).
    exchanging: bool = False
    #: The request's id (gpumgr.request_ids), for logs, status and headers.
    request_id: RequestId | None = None
    #: The render its answer started, while it is tracked (gpumgr.renders).
    render_id: str | None = None
    #: `DELETE /v1/requests/<id>` asked to stop it (a render is interrupted).
    cancel_requested: bool = False

    def client_left(self) -> None:
        self.client_gone = True
        if self.on_client_gone is not None:
            self.on_client_gone()

    def disarm_deadline(self) -> None:
        if self.deadline is not None and self.deadline.active():
            self.deadline.cancel()


def body_size(request: Any) -> int:
    """The spooled request body's size, without moving its read position."""
    content = request.content
    if content is None:
        return 0
    try:
        position = content.tell()
        size = content.seek(0, 2)
        content.seek(position)
        return int(size)
    except (OSError, ValueError):
        return 0


def access_status(result: object, client_left: bool) -> int:
    """The status a proxied request is counted and logged with (pure).

    A client that left before its answer was complete is 499, whatever the
    upstream had begun to send (a stream cut mid-way was logged as 200, one
    cut before the headers was counted as code 0).
    """
    if isinstance(result, Result):
        if result.outcome is Outcome.CLIENT_GONE:
            return CLIENT_CLOSED_REQUEST
        if result.status is not None:
            return result.status
        return 502 if result.outcome is Outcome.UPSTREAM_BROKE else 500
    if client_left or (isinstance(result, Failure) and isinstance(result.value, defer.CancelledError)):
        return CLIENT_CLOSED_REQUEST
    if isinstance(result, Failure) and isinstance(result.value, GpumgrError):
        return result.value.status
    return 500


def client_left(request: Any) -> bool:
    """The client's connection closed before its response was finished."""
    return bool(getattr(request, "_disconnected", False)) and not request.finished


class Accounting:
    """Counts and logs every proxied request once it is over."""

    def __init__(self, clock: Any) -> None:
        self._clock = clock
        self.request_stats = RequestStats()

    def account(self, result: object, request: Any, kind: str, consumer: str,
                timing: Timing) -> object:
        """Metrics and the access log line of one proxied request; passes `result` on."""
        now = self._clock.seconds()
        code = access_status(result, client_left(request))
        bytes_out = result.bytes_out if isinstance(result, Result) else 0
        bytes_in = timing.bytes_in
        wait_s = None if timing.started is None else timing.started - timing.received
        hold_s = None if timing.started is None else (timing.ended or now) - timing.started
        self.request_stats.record(kind, consumer, code, bytes_in, bytes_out, wait_s, hold_s)
        access_log.info(
            "{method} {path} {kind} {consumer} {status} in={bytes_in} out={bytes_out} "
            "wait_ms={wait_ms} gpu_ms={gpu_ms} id={request_id}",
            request_id=timing.request_id,
            method=request.method.decode("ascii", "replace"),
            path=timing.path, kind=kind,
            consumer=consumer, status=code, bytes_in=bytes_in, bytes_out=bytes_out,
            wait_ms=None if wait_s is None else int(wait_s * 1000),
            gpu_ms=None if hold_s is None else int(hold_s * 1000))
        return result
