"""The twisted.web Resource tree: parse, call the broker, render its answer.

Routes:
  POST /v1/{tts,stt,llm,image}     proxied to the routed consumer, scheduled
  ANY  /v1/<kind>/<subpath>        pass-through to the consumer's native API
  GET  /audio/<rest>               proxied to routes.audio_proxy, not scheduled
  GET  /v1/status                  live state (never waits for the scheduler)
  POST /v1/consumers/<name>/<load|unload>   admin, through the scheduler
  GET  /healthz                    liveness of the broker itself
  GET  /                           a small JSON index

Errors are rendered in one place (`_respond`): a Resource raises a
GpumgrError, or returns a Deferred that fails with one.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource

from gpumgr import __version__
from gpumgr.broker import Broker
from gpumgr.config import KINDS
from gpumgr.metrics import MetricsResource
from gpumgr.errors import (
    ConfigRejected,
    Forbidden,
    GpumgrError,
    MethodNotAllowed,
    Unauthorized,
    UnknownRoute,
    write_error,
)
from gpumgr.ui import UiResource

log = Logger()


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def write_json(request: Any, value: Any, code: int = 200) -> bytes:
    body = _json_bytes(value)
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Content-Length", str(len(body)).encode("ascii"))
    return body


def _no_route(request: Any) -> UnknownRoute:
    return UnknownRoute(f"no route for {request.path.decode('latin-1')}")


class JsonResource(Resource):
    """A Resource whose every gpumgr-made error is JSON, 405 included.

    `respond` returns the body (bytes), a dict to send as JSON, or a
    Deferred for a response written elsewhere (the proxy); or raises a
    GpumgrError. A Deferred that fires with a dict is sent as JSON.
    """

    allowed_methods: tuple[str, ...] = ("GET",)

    def getChild(self, path: bytes, request: Any) -> Resource:
        return ErrorResource(_no_route(request))

    def render(self, request: Any) -> Any:
        method = request.method.decode("ascii", "replace")
        allowed = self.allowed_methods
        if allowed and method not in allowed and not (method == "HEAD" and "GET" in allowed):
            write_error(request, MethodNotAllowed(method, allowed))
            return server.NOT_DONE_YET
        return _respond(request, lambda: self.respond(request))

    def respond(self, request: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


def _respond(request: Any, produce: Any) -> Any:
    try:
        result = produce()
    except GpumgrError as e:
        write_error(request, e)
        return server.NOT_DONE_YET
    if isinstance(result, dict):
        return write_json(request, result)
    if isinstance(result, defer.Deferred):
        result.addCallback(_finish_json, request)
        result.addErrback(_render_failure, request)
        return server.NOT_DONE_YET
    return result


def _finish_json(value: Any, request: Any) -> None:
    if isinstance(value, dict) and not request._disconnected and not request.finished:
        request.write(write_json(request, value))
        request.finish()


def _render_failure(failure: Failure, request: Any) -> None:
    if failure.check(defer.CancelledError):
        return
    if not failure.check(GpumgrError):
        log.failure("handling {path} failed", failure, path=request.path)
    if not request._disconnected and not request.finished and not request.startedWriting:
        err = failure.value if isinstance(failure.value, GpumgrError) else GpumgrError(
            "internal error; see the gpumgr log")
        write_error(request, err)


class ErrorResource(Resource):
    isLeaf = True

    def __init__(self, error: GpumgrError) -> None:
        super().__init__()
        self._error = error

    def render(self, request: Any) -> Any:
        write_error(request, self._error)
        return server.NOT_DONE_YET


class KindResource(JsonResource):
    """/v1/<kind>: POST to the routed path; /v1/<kind>/<subpath>: pass-through."""

    isLeaf = True
    allowed_methods = ()  # the broker decides: POST only without a subpath

    def __init__(self, broker: Broker, kind: str) -> None:
        super().__init__()
        self._broker = broker
        self._kind = kind

    def respond(self, request: Any) -> Any:
        subpath = _raw_subpath(request, 3)  # "", "v1", kind
        return self._broker.handle(request, self._kind, subpath)


def _raw_subpath(request: Any, skip: int) -> list[bytes] | None:
    """The path segments after the first `skip` ones, as sent (still
    percent-encoded: twisted.web does not collapse '..' for us)."""
    raw_path = request.uri.partition(b"?")[0]
    segments = raw_path.split(b"/")[skip:]
    if segments in ([], [b""]):
        return None
    return segments


class AudioResource(JsonResource):
    """GET /audio/<rest>: straight to the audio_proxy consumer; no scheduling."""

    isLeaf = True

    def __init__(self, broker: Broker) -> None:
        super().__init__()
        self._broker = broker

    def respond(self, request: Any) -> Any:
        return self._broker.relay_audio(request, _raw_subpath(request, 2) or [])


class StatusResource(JsonResource):
    isLeaf = True

    def __init__(self, broker: Broker) -> None:
        super().__init__()
        self._broker = broker

    def respond(self, request: Any) -> Any:
        return self._broker.status()


class HealthzResource(JsonResource):
    isLeaf = True

    def respond(self, request: Any) -> Any:
        return {"status": "ok"}


class IndexResource(JsonResource):
    isLeaf = True

    def respond(self, request: Any) -> Any:
        if request.postpath not in ([], [b""]):
            raise _no_route(request)
        return {
            "name": "gpumgr",
            "version": __version__,
            "endpoints": {
                **{f"POST /v1/{k}": f"proxied to routes.{k}" for k in KINDS},
                "ANY /v1/<kind>/<path>": "the consumer's native API (passthrough: true)",
                "GET /audio/<name>": "proxied to routes.audio_proxy",
                "GET /v1/status": "live state of GPU, consumers and scheduler",
                "POST /v1/consumers/<name>/load|unload": "admin: load or unload a consumer",
                "POST /v1/admin/reload": "admin: re-read the config file (as SIGHUP does)",
                "GET /healthz": "liveness of gpumgr itself",
                "GET /metrics": "Prometheus metrics",
                "GET /ui": "live status page for people",
            },
        }


def _is_loopback(request: Any) -> bool:
    """The client is on this host: 127.0.0.0/8, ::1, or IPv4-mapped loopback.

    A dual-stack listener (tcp6 on ::) sees IPv4 clients as ::ffff:127.0.0.1,
    which ipaddress does not call loopback by itself (before Python 3.13).
    """
    host = getattr(request.getClientAddress(), "host", None)
    if not isinstance(host, str):
        return False
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def admin_refusal(request: Any, token: str | None) -> GpumgrError | None:
    """Bearer token when one is configured; otherwise loopback clients only.

    An empty or blank token is never a match, even if one slipped past the
    config check: `Authorization: Bearer ` must not open the door.
    """
    if token is None:
        if _is_loopback(request):
            return None
        return Forbidden("admin endpoints are served to loopback clients only "
                         "unless admin_token is set")
    expected = token.strip().encode("utf-8")
    given = request.getHeader(b"authorization") or b""
    scheme, _, value = given.partition(b" ")
    value = value.strip()
    if (expected and value and scheme.lower() == b"bearer"
            and hmac.compare_digest(value, expected)):
        return None
    return Unauthorized("a valid 'Authorization: Bearer <admin_token>' is required")


class _AdminResource(JsonResource):
    """An admin route: POST only, the bearer token (or loopback) first."""

    isLeaf = True
    allowed_methods = ("POST",)

    def __init__(self, broker: Broker) -> None:
        super().__init__()
        self._broker = broker

    def respond(self, request: Any) -> Any:
        refusal = admin_refusal(request, self._broker.config.admin_token)
        if refusal is not None:
            raise refusal
        return self.respond_admin(request)

    def respond_admin(self, request: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


class ConsumerAdminResource(_AdminResource):
    """POST /v1/consumers/<name>/{load,unload}: through the scheduler, like any job."""

    def respond_admin(self, request: Any) -> Any:
        parts = request.postpath
        if len(parts) != 2 or parts[1] not in (b"load", b"unload"):
            raise UnknownRoute("use /v1/consumers/<name>/load or .../unload")
        name, action = parts[0].decode("utf-8", "replace"), parts[1].decode("ascii")
        d = self._broker.admin(name, action)
        request.notifyFinish().addErrback(lambda _: d.cancel())
        return d


class ReloadResource(_AdminResource):
    """POST /v1/admin/reload: re-read the config file, as SIGHUP does."""

    def respond_admin(self, request: Any) -> Any:
        if request.postpath != [b"reload"]:
            raise UnknownRoute("use POST /v1/admin/reload")
        outcome = self._broker.reload()
        if not outcome["reloaded"]:
            raise ConfigRejected(outcome["error"])
        return outcome


class V1Resource(JsonResource):
    def __init__(self, broker: Broker) -> None:
        super().__init__()
        for kind in KINDS:
            self.putChild(kind.encode("ascii"), KindResource(broker, kind))
        self.putChild(b"status", StatusResource(broker))
        self.putChild(b"consumers", ConsumerAdminResource(broker))
        self.putChild(b"admin", ReloadResource(broker))

    def respond(self, request: Any) -> Any:
        raise _no_route(request)


class RootResource(JsonResource):
    def __init__(self, broker: Broker) -> None:
        super().__init__()
        self._index = IndexResource()
        self.putChild(b"v1", V1Resource(broker))
        self.putChild(b"audio", AudioResource(broker))
        self.putChild(b"healthz", HealthzResource())
        self.putChild(b"metrics", MetricsResource(broker.snapshot))
        self.putChild(b"ui", UiResource())

    def getChild(self, path: bytes, request: Any) -> Resource:
        if path == b"":
            return self._index
        return super().getChild(path, request)

    def respond(self, request: Any) -> Any:
        return self._index.render(request)
