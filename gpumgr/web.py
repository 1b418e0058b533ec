"""The twisted.web Resource tree: parse, call the broker, render its answer.

Routes:
  POST /v1/{tts,stt,llm,image}     proxied to the routed consumer, scheduled
  ANY  /v1/<kind>/<subpath>        pass-through to the consumer's native API
  GET  /audio/<rest>               proxied to routes.audio_proxy, not scheduled
  GET  /v1/status                  live state (never waits for the scheduler)
  POST /v1/consumers/<name>/<load|unload>   admin, through the scheduler
  GET  /healthz                    liveness of the broker itself
  GET  /                           a small JSON index

Every request's target is parsed once, at the root (`gpumgr.target`); the
Resources below decide on that value (`request_target`). Admin routes, and
the services' own control routes reached through pass-through, pass
`admin_guard` first: Host and Origin (not a web page's), a JSON body (admin
routes), then the bearer token or a loopback client.

Every error of a request is written here (`_respond`): a Resource raises a
GpumgrError, returns a Deferred that fails with one (a tunnel that could
not open, a job refused), or one that fires with a proxy `Result` whose
exchange was refused (the consumer unreachable, or silent). The Site
answers only what never became a request (gpumgr.site).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import re
import socket
from typing import Any, Iterable
from urllib.parse import urlsplit

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource

from gpumgr import __version__
from gpumgr.admin import AdminAction
from gpumgr.broker import Broker
from gpumgr.config import KINDS, Config
from gpumgr.metrics import MetricsResource
from gpumgr.proxy import Result
from gpumgr.errors import (
    BadPath,
    ConfigRejected,
    Forbidden,
    GpumgrError,
    MethodNotAllowed,
    Unauthorized,
    UnknownRoute,
    UnsupportedMediaType,
    write_error,
)
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
        # HEAD arrives here as GET (gpumgr.site), so GET routes answer it.
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


#: ollama's unload is told by its body: read at most this much of it.
_CONTROL_BODY_MAX_BYTES = 32 * 1024 * 1024


def _read_body(request: Any) -> bytes | None:
    """The spooled request body; None when over _CONTROL_BODY_MAX_BYTES."""
    content = request.content
    if content is None:
        return b""
    position = content.tell()
    try:
        content.seek(0)
        body = content.read(_CONTROL_BODY_MAX_BYTES + 1)
    finally:
        content.seek(position)
    return None if len(body) > _CONTROL_BODY_MAX_BYTES else bytes(body)


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
                                   body=lambda: _read_body(request))
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


def _host_and_port(value: str) -> tuple[str, int | None] | None:
    """`host[:port]` of a Host header (IPv6 in brackets); None if malformed."""
    if value.startswith("["):
        host, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        port_text = rest[1:] if rest else None
    else:
        host, colon, port_text_ = value.partition(":")
        port_text = port_text_ if colon else None
        if ":" in port_text_:
            return None
    if not host:
        return None
    if port_text is None:
        return host.lower().rstrip("."), None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        return None
    return host.lower().rstrip("."), int(port_text)


_IPV4_ANY_SPELLING = re.compile(r"\A[0-9a-fA-FxX.]+\Z")


def is_loopback_name(host: str) -> bool:
    """`localhost`, a `.localhost` name, or a loopback address in any
    spelling (127.1, 2130706433, 0x7f.0.0.1, ::1, ::ffff:127.0.0.1)."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        if _IPV4_ANY_SPELLING.match(host) is None:
            return False
        try:
            return socket.inet_aton(host)[0] == 127
        except OSError:
            return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _header_values(request: Any, name: bytes) -> list[str]:
    return [v.decode("latin-1").strip() for v in request.requestHeaders.getRawHeaders(name) or []]


def page_refusal(request: Any, allowed_hosts: Iterable[str]) -> GpumgrError | None:
    """Refuse what a web page, not an operator, would send (DNS rebinding, a
    cross-site form or fetch): a Host that is neither loopback nor one of
    `allowed_hosts`, and an Origin other than gpumgr's own (same host and
    port as the Host)."""
    hosts = _header_values(request, b"host")
    if len(hosts) > 1:
        return Forbidden("admin routes refuse a request with more than one Host header")
    own: tuple[str, int | None] | None = None
    if hosts:
        host_header = hosts[0]
        own = _host_and_port(host_header)
        if own is None:
            return Forbidden(f"admin routes refuse the malformed Host {host_header!r}")
        if not is_loopback_name(own[0]) and own[0] not in allowed_hosts:
            return Forbidden(f"admin routes answer for loopback addresses, localhost and "
                             f"allowed_hosts only, not for Host {own[0]!r}")
    origins = _header_values(request, b"origin")
    if not origins:
        return None
    if len(origins) > 1 or own is None or not _same_origin(origins[0], own):
        return Forbidden(f"admin routes refuse requests from web pages of other origins "
                         f"(Origin: {', '.join(origins)})")
    return None


def _same_origin(origin: str, own: tuple[str, int | None]) -> bool:
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path \
            or parts.query or parts.fragment:
        return False
    default = 443 if parts.scheme == "https" else 80
    return (parts.hostname.rstrip("."), port or default) == (own[0], own[1] or default)


def media_refusal(request: Any) -> GpumgrError | None:
    """A state change is a JSON request, or has no body: a page can send
    text/plain, forms and multipart across sites without asking first."""
    content_types = _header_values(request, b"content-type")
    if len(content_types) > 1:
        return UnsupportedMediaType("send one Content-Type: application/json")
    if not content_types:
        if _read_body(request) == b"":
            return None
        return UnsupportedMediaType("a request body needs Content-Type: application/json")
    media = content_types[0].partition(";")[0].strip().lower()
    if media != "application/json":
        return UnsupportedMediaType(
            f"admin routes accept application/json (or no body), not {media or '(empty)'}")
    return None


def admin_guard(request: Any, config: Config, check_media_type: bool = True) -> GpumgrError | None:
    """Everything an admin or control route checks, in order: who the page
    is (Host, Origin), what it sends (JSON or nothing), who the client is
    (the bearer token, or loopback)."""
    return (page_refusal(request, config.allowed_hosts)
            or (media_refusal(request) if check_media_type else None)
            or admin_refusal(request, config.admin_token))


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
