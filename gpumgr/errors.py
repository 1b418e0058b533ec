"""One error type per failure, mapped to the JSON error contract in one place.

Every error gpumgr itself makes has the body
``{"error": {"code": ..., "message": ..., "consumer": <name or null>}}``.
"""

from __future__ import annotations

import json
import math
from typing import ClassVar, Sequence

from twisted.internet import defer
from twisted.web.iweb import IRequest


class GpumgrError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(
        self,
        message: str,
        consumer: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.consumer = consumer
        self.retry_after_s = retry_after_s

    def headers(self) -> list[tuple[bytes, bytes]]:
        if self.retry_after_s is None:
            return []
        seconds = max(1, math.ceil(self.retry_after_s))
        return [(b"Retry-After", str(seconds).encode("ascii"))]

    def body(self) -> bytes:
        return json.dumps(
            {"error": {"code": self.code, "message": self.message, "consumer": self.consumer}}
        ).encode("utf-8")


class UnknownRoute(GpumgrError):
    status = 404
    code = "unknown_route"


class MethodNotAllowed(GpumgrError):
    status = 405
    code = "method_not_allowed"

    def __init__(self, method: str, allowed: Sequence[str]) -> None:
        super().__init__(f"{method} is not allowed here; use {', '.join(allowed)}")
        self.allowed = tuple(allowed)

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"Allow", ", ".join(self.allowed).encode("ascii"))]


class ConsumerUnhealthy(GpumgrError):
    status = 503
    code = "consumer_unhealthy"


class UpstreamUnreachable(GpumgrError):
    status = 502
    code = "upstream_unreachable"


class UpstreamTimeout(GpumgrError):
    status = 504
    code = "upstream_timeout"


class BodyTooLarge(GpumgrError):
    status = 413
    code = "body_too_large"


class BadPath(GpumgrError):
    status = 400
    code = "bad_path"


class BadRequestId(GpumgrError):
    status = 400
    code = "bad_request_id"


class RequestIdInUse(GpumgrError):
    """A client's X-Gpumgr-Request-Id names a request that is not over yet."""

    status = 409
    code = "request_id_in_use"


class UnknownRequest(GpumgrError):
    status = 404
    code = "unknown_request"


class RequestCancelled(GpumgrError):
    """Its queued job was cancelled by `DELETE /v1/requests/<id>`."""

    status = 409
    code = "request_cancelled"


class RequestFinished(GpumgrError):
    """`DELETE /v1/requests/<id>` for a request that is already over."""

    status = 409
    code = "request_finished"


class QueueFull(GpumgrError):
    status = 503
    code = "queue_full"


class QueueTimeout(GpumgrError):
    status = 503
    code = "queue_timeout"


class InsufficientVram(GpumgrError):
    status = 503
    code = "insufficient_vram"


class GpuMissing(GpumgrError):
    """The card a consumer lives on has no row in nvidia-smi's answer any more."""

    status = 503
    code = "gpu_missing"


class ControlFailed(GpumgrError):
    status = 502
    code = "control_failed"


class UnknownConsumer(GpumgrError):
    status = 404
    code = "unknown_consumer"


class NotSupported(GpumgrError):
    status = 409
    code = "not_supported"


class ProcessStartFailed(GpumgrError):
    """A managed process did not come up (or is in its start back-off)."""

    status = 503
    code = "process_start_failed"


class ConfigRejected(GpumgrError):
    """A reload found the config file invalid, or needing a restart."""

    status = 422
    code = "config_rejected"


class UpgradeNotSupported(GpumgrError):
    status = 501
    code = "upgrade_not_supported"


class ConsumerStopped(GpumgrError):
    """A process gpumgr owns is not running, and this request does not start it."""

    status = 503
    code = "consumer_stopped"


class ConsumerRemoved(GpumgrError):
    """A reload removed the consumer this queued request was for."""

    status = 503
    code = "consumer_removed"


class JobTimeout(GpumgrError):
    status = 504
    code = "job_timeout"


class ShuttingDown(GpumgrError):
    status = 503
    code = "shutting_down"


class ProcessStopFailed(GpumgrError):
    """A managed process outlived SIGKILL (a D-state process); gpumgr gave up on it."""

    status = 502
    code = "process_stop_failed"


class Unauthorized(GpumgrError):
    status = 401
    code = "unauthorized"

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"WWW-Authenticate", b'Bearer realm="gpumgr"')]


class Forbidden(GpumgrError):
    status = 403
    code = "forbidden"


class UnsupportedMediaType(GpumgrError):
    """An admin request with a body that is not JSON (a web form, text/plain)."""

    status = 415
    code = "unsupported_media_type"


class BadRequest(GpumgrError):
    """A request twisted.web cannot or should not route (bad request line, no Host)."""

    status = 400
    code = "bad_request"


class RequestTimeout(GpumgrError):
    """The request head or body did not arrive in time; the connection is closed."""

    status = 408
    code = "request_timeout"


class UriTooLong(GpumgrError):
    status = 414
    code = "uri_too_long"


class HeadersTooLarge(GpumgrError):
    """Too many header lines, or too many bytes of them (RFC 6585's 431)."""

    status = 431
    code = "headers_too_large"


class TooManyConnections(GpumgrError):
    """limits.max_connections busy connections are open; this one is refused."""

    status = 503
    code = "too_many_connections"


class SpoolFull(GpumgrError):
    """Spooling this body would pass limits.max_spool_mib across all uploads."""

    status = 507
    code = "spool_full"


def write_error(request: IRequest, error: GpumgrError) -> None:
    """Send `error` as the complete response to a twisted.web request."""
    body = error.body()
    request.setResponseCode(error.status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Content-Length", str(len(body)).encode("ascii"))
    for name, value in error.headers():
        request.setHeader(name, value)
    request.write(body)
    request.finish()


def raw_error_response(error: GpumgrError) -> bytes:
    """A whole HTTP/1.1 response, for replies sent before twisted.web has a Request ready."""
    body = error.body()
    head = [
        f"HTTP/1.1 {error.status} {_REASONS.get(error.status, 'Error')}".encode("ascii"),
        b"Content-Type: application/json",
        b"Content-Length: " + str(len(body)).encode("ascii"),
        b"Connection: close",
    ]
    head += [name + b": " + value for name, value in error.headers()]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


_REASONS = {
    400: "Bad Request",
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    415: "Unsupported Media Type",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
    507: "Insufficient Storage",
}


# -- what went wrong, in words ----------------------------------------------------------

#: Words for exceptions whose str() is empty (others speak for themselves).
_WORDS_FOR = {
    "CancelledError": "gave up waiting (cancelled)",
    "TimeoutError": "timed out",
    "ResponseDone": "the response ended",
}
#: Wrappers holding a list of Failures in `reasons`, and what each means.
_WRAPPER_WORDS = {
    "ResponseNeverReceived": "no response",
    "ResponseFailed": "the response broke off",
    "RequestTransmissionFailed": "the request could not be sent",
    "RequestGenerationFailed": "the request could not be sent",
}
_MAX_DESCRIPTION = 300


def describe_failure(what: object) -> str:
    """What a Failure or exception means, in words, for logs, status and error bodies.

    str() of Twisted's exceptions is often a Python repr (`[<Failure ...
    CancelledError: >]`, `HostnameAddress(hostname=b'h', port=1)`) or empty;
    this never returns one.
    """
    value = getattr(what, "value", what)  # a Failure, or the exception itself
    name = type(value).__name__
    sub = getattr(value, "subFailure", None)  # defer.FirstError
    if sub is not None:
        return describe_failure(sub)
    reasons = getattr(value, "reasons", None)
    if isinstance(reasons, list) and reasons:
        parts = list(dict.fromkeys(describe_failure(r) for r in reasons))
        text = "; ".join(parts)
        prefix = _WRAPPER_WORDS.get(name)
        return _short(f"{prefix}: {text}" if prefix else text)
    if isinstance(value, defer.TimeoutError):
        # addTimeout's is TimeoutError(seconds, "Deferred"): str() is a tuple
        seconds = value.args[0] if value.args else None
        return f"timed out after {seconds:g} s" if isinstance(seconds, (int, float)) \
            else "timed out"
    if name == "ConnectingCancelledError":
        address = getattr(value, "address", None)
        host = getattr(address, "hostname", getattr(address, "host", None))
        if isinstance(host, bytes):
            host = host.decode("ascii", "replace")
        port = getattr(address, "port", None)
        where = f" to {host}:{port}" if host is not None else ""
        return f"gave up connecting{where} (cancelled)"
    text = str(value).strip()
    if not text or "<twisted.python.failure.Failure" in text or "Failure instance" in text:
        return _WORDS_FOR.get(name, name)
    return _short(text)


def _short(text: str) -> str:
    return text if len(text) <= _MAX_DESCRIPTION else text[:_MAX_DESCRIPTION - 3] + "..."
