"""The twisted.web Resource tree: parse, call the broker, render its answer.

Routes:
  POST /v1/{tts,stt,llm,image}     proxied to the routed consumer, scheduled
  ANY  /v1/<kind>/<subpath>        pass-through to the consumer's native API
  GET  /audio/<rest>               proxied to routes.audio_proxy, not scheduled
  GET  /v1/status                  live state (never waits for the scheduler)
  GET  /v1/ready/<kind>            readiness for a load balancer (gpumgr.balancer)
  GET  /v1/requests[/<id>]         where requests stand; DELETE cancels one
  POST /v1/consumers/<name>/<load|unload>   admin, through the scheduler
  GET  /healthz                    liveness of the broker itself
  GET  /                           a small JSON index

Every request's target is parsed once, at the root (`gpumgr.target`); the
Resources below decide on that value (`request_target`). Admin routes, and
the services' own control routes reached through pass-through, pass
`admin_guard` (gpumgr.guard) first: Host and Origin (not a web page's), a JSON body (admin
routes), then the bearer token or a loopback client.

Every error of a request is written here (`_respond`): a Resource raises a
GpumgrError, returns a Deferred that fails with one (a tunnel that could
not open, a job refused), or one that fires with a proxy `Result` whose
exchange was refused (the consumer unreachable, or silent). The Site
answers only what never became a request (gpumgr.site_channel).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource

from gpumgr import __version__
from gpumgr.admin import AdminAction
from gpumgr.broker import Broker
from gpumgr.config import KINDS
from gpumgr.guard import admin_guard, admin_refusal, is_loopback_name, read_body
from gpumgr.metrics import MetricsResource
from gpumgr.proxy import Result
from gpumgr.errors import (
    BadPath,
    ConfigRejected,
    Forbidden,
    GpumgrError,
    MethodNotAllowed,
    UnknownRoute,
    write_error,
)
from gpumgr.request_ids import CANCEL_TOKEN_HEADER
from gpumgr.target import Target, parse_target
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

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]

    def getChild(self, path: bytes, request: Any) -> Resource:
        return ErrorResource(_no_route(request))

    def render(self, request: Any) -> Any:
        method = request.method.decode("ascii", "replace")
        allowed = self.allowed_methods
        # HEAD arrives here as GET (gpumgr.site_request), so GET routes answer it.
        if allowed and method not in allowed:
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
        result.addCallback(_finish, request)
        result.addErrback(_render_failure, request)
        return server.NOT_DONE_YET
    return result


def _finish(value: object, request: Any) -> None:
    """A dict is sent as JSON; a refused exchange gets its error; any other
    answer was relayed by the proxy or the tunnel."""
    if isinstance(value, dict) and not request._disconnected and not request.finished:
        request.write(write_json(request, value))
        request.finish()
    elif isinstance(value, Result) and value.error is not None and _can_answer(request):
        write_error(request, value.error)


def _can_answer(request: Any) -> bool:
    return not request._disconnected and not request.finished and not request.startedWriting


def _render_failure(failure: Failure, request: Any) -> None:
    if isinstance(failure.value, defer.CancelledError):
        return
    if not isinstance(failure.value, GpumgrError):
        log.failure("handling {path} failed", failure, path=request.path)
    if _can_answer(request):
        err = failure.value if isinstance(failure.value, GpumgrError) else GpumgrError(
            "internal error; see the gpumgr log")
        write_error(request, err)


class ErrorResource(Resource):
    isLeaf = True

    def __init__(self, error: GpumgrError) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._error = error

    def render(self, request: Any) -> Any:
        write_error(request, self._error)
        return server.NOT_DONE_YET


def request_target(request: Any) -> Target:
    """The request's target, as the root parsed it (once) for every decision."""
    target = getattr(request, "gpumgr_target", None)
    if isinstance(target, Target):
        return target
    target = parse_target(request.uri)
    request.gpumgr_target = target
    return target


class KindResource(JsonResource):
    """/v1/<kind>: POST to the routed path; /v1/<kind>/<subpath>: pass-through.

    A service's own control routes (drivers' `is_control`) are admin routes
    here: the same checks as gpumgr's admin API, except the content type,
    which is the service's own (whisper.cpp's `/load` is multipart)."""

    isLeaf = True
    allowed_methods = ()  # the broker decides: POST only without a subpath

    def __init__(self, broker: Broker, kind: str) -> None:
        super().__init__()
        self._broker = broker
        self._kind = kind

    def respond(self, request: Any) -> Any:
        target = request_target(request)
        method = request.method.decode("ascii", "replace")
        route = self._broker.route(self._kind, method, target.after(2), target.query,
                                   body=lambda: read_body(request))
        if route.service_control:
            refusal = admin_guard(request, self._broker.config, check_media_type=False)
            if refusal is not None:
                raise refusal
        return self._broker.handle(request, self._kind, route,
                                   target.raw_path.decode("ascii"))


class AudioResource(JsonResource):
    """GET /audio/<rest>: straight to the audio_proxy consumer; no scheduling."""

    isLeaf = True

    def __init__(self, broker: Broker) -> None:
        super().__init__()
        self._broker = broker

    def respond(self, request: Any) -> Any:
        return self._broker.relay_audio(request, request_target(request))


class StatusResource(JsonResource):
    isLeaf = True

    def __init__(self, broker: Broker) -> None:
        super().__init__()
        self._broker = broker

    def respond(self, request: Any) -> Any:
        return self._broker.status()


class ReadyResource(JsonResource):
    """GET /v1/ready/<kind>: 200 when this box can take a job of that kind
    soon, else 503 with the reason (gpumgr.balancer); for a load balancer."""

    isLeaf = True

    def __init__(self, broker: Broker) -> None:
        super().__init__()
        self._broker = broker

    def respond(self, request: Any) -> Any:
        rest = request_target(request).after(2)
        parts = () if rest is None else tuple(s.text for s in rest.segments)
        if len(parts) != 1:
            raise UnknownRoute(f"use GET /v1/ready/<kind> ({', '.join(KINDS)})")
        answer = self._broker.readiness.check(parts[0])
        request.setHeader(b"Cache-Control", b"no-store")
        return write_json(request, answer.as_json(), 200 if answer.ready else 503)


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
                "GET /v1/ready/<kind>": "200 when this box can take a job of that kind soon",
                "GET /v1/requests[/<id>]": "where requests stand (queue positions)",
                "DELETE /v1/requests/<id>": "cancel a request (admin, or its cancel token)",
                "POST /v1/consumers/<name>/load|unload": "admin: load or unload a consumer",
                "POST /v1/admin/reload": "admin: re-read the config file (as SIGHUP does)",
                "GET /healthz": "liveness of gpumgr itself",
                "GET /metrics": "Prometheus metrics",
                "GET /ui": "live status page for people",
            },
        }


class _AdminResource(JsonResource):
    """An admin route: POST only, `admin_guard` first."""

    isLeaf = True
    allowed_methods = ("POST",)

    def __init__(self, broker: Broker) -> None:
        super().__init__()
        self._broker = broker

    def respond(self, request: Any) -> Any:
        refusal = admin_guard(request, self._broker.config)
        if refusal is not None:
            raise refusal
        return self.respond_admin(request)

    def respond_admin(self, request: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


class ConsumerAdminResource(_AdminResource):
    """POST /v1/consumers/<name>/{load,unload}: through the scheduler, like any job."""

    def respond_admin(self, request: Any) -> Any:
        rest = request_target(request).after(2)
        parts = () if rest is None else tuple(s.text for s in rest.segments)
        actions = {a.value: a for a in AdminAction}
        if len(parts) != 2 or parts[1] not in actions:
            raise UnknownRoute("use /v1/consumers/<name>/load or .../unload")
        name, action = parts
        d = self._broker.admin(name, actions[action])
        request.notifyFinish().addErrback(lambda _: d.cancel())
        return d


class ReloadResource(_AdminResource):
    """POST /v1/admin/reload: re-read the config file, as SIGHUP does."""

    def respond_admin(self, request: Any) -> Any:
        rest = request_target(request).after(2)
        if rest is None or [s.text for s in rest.segments] != ["reload"]:
            raise UnknownRoute("use POST /v1/admin/reload")
        outcome = self._broker.reload()
        if not outcome.reloaded:
            raise ConfigRejected(outcome.error or "the config was not reloaded")
        return outcome.as_json()


class RequestsResource(JsonResource):
    """GET /v1/requests[/<id>]: where requests stand; DELETE /v1/requests/<id>:
    cancel one, as an admin (`admin_guard`) or as its own client (the
    `X-Gpumgr-Cancel-Token` its response carried). See gpumgr.request_book."""

    isLeaf = True
    allowed_methods = ("GET", "DELETE")

    def __init__(self, broker: Broker) -> None:
        super().__init__()
        self._broker = broker

    def respond(self, request: Any) -> Any:
        rest = request_target(request).after(2)
        parts = [] if rest is None else [s.text for s in rest.segments]
        deleting = request.method == b"DELETE"
        if parts in ([], [""]) and not deleting:
            return self._broker.requests_document()
        if len(parts) != 1 or not parts[0]:
            raise UnknownRoute("use /v1/requests/<id>")
        if not deleting:
            return self._broker.request_document(parts[0])
        entry = self._broker.requests.find(parts[0])
        token = request.getHeader(CANCEL_TOKEN_HEADER)
        if token is None:
            refusal = admin_guard(request, self._broker.config)
            if refusal is not None:
                raise refusal
        elif not entry.token_matches(token):
            raise Forbidden(f"{CANCEL_TOKEN_HEADER.decode()} does not match request "
                            f"{parts[0]}; only its own client, or an admin, may cancel it")
        self._broker.requests.cancel(entry)
        return {"cancelled": True, "request": self._broker.request_document(parts[0])}


class V1Resource(JsonResource):
    def __init__(self, broker: Broker) -> None:
        super().__init__()
        for kind in KINDS:
            self.putChild(kind.encode("ascii"), KindResource(broker, kind))
        self.putChild(b"status", StatusResource(broker))
        self.putChild(b"ready", ReadyResource(broker))
        self.putChild(b"consumers", ConsumerAdminResource(broker))
        self.putChild(b"admin", ReloadResource(broker))
        self.putChild(b"requests", RequestsResource(broker))

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

    def getChildWithDefault(self, path: bytes, request: Any) -> Resource:
        # Every request's target is parsed here, once; what it decides on
        # below is that value (request_target).
        try:
            request.gpumgr_target = parse_target(request.uri)
        except BadPath as e:
            return ErrorResource(e)
        child: Resource = super().getChildWithDefault(path, request)  # type: ignore[no-untyped-call]
        return child

    def getChild(self, path: bytes, request: Any) -> Resource:
        if path == b"":
            return self._index
        return super().getChild(path, request)

    def respond(self, request: Any) -> Any:
        return self._index.render(request)


#: Imported from here by callers that predate gpumgr.guard.
__all__ = ["RootResource", "admin_guard", "admin_refusal", "is_loopback_name", "request_target",
           "write_json"]
