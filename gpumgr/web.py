"""The twisted.web Resource tree, the body-size limit, and the Site.

Routes:
  POST /v1/{tts,stt,llm,image}   proxied to the routed consumer, scheduled
  GET  /audio/<rest>             proxied to routes.audio_proxy, not scheduled
  GET  /v1/status                live state (never waits for the scheduler)
  GET  /healthz                  liveness of the broker itself
  GET  /                         a small JSON index
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from typing import Any, Callable
from urllib.parse import unquote_to_bytes

from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource

from gpumgr import __version__
from gpumgr.config import AUDIO_ROUTE, KINDS, Config
from gpumgr.errors import (
    BadPath,
    ConsumerUnhealthy,
    Forbidden,
    GpumgrError,
    MethodNotAllowed,
    NotSupported,
    Unauthorized,
    UnknownConsumer,
    UnknownRoute,
    write_error,
)
from gpumgr.proxy import StreamingProxy, Timeouts
from gpumgr.registry import HEALTH_DOWN, Registry
from gpumgr.scheduler import Scheduler

log = Logger()



def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def write_json(request, value: Any, code: int = 200) -> bytes:
    body = _json_bytes(value)
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Content-Length", str(len(body)).encode("ascii"))
    return body


class JsonResource(Resource):
    """A Resource whose every gpumgr-made error is JSON, 405 included."""

    allowed_methods: tuple[str, ...] = ("GET",)

    def getChild(self, path: bytes, request) -> Resource:
        return ErrorResource(UnknownRoute(f"no route for {request.path.decode('latin-1')}"))

    def render(self, request):
        method = request.method.decode("ascii", "replace")
        if method not in self.allowed_methods:
            write_error(request, MethodNotAllowed(method, self.allowed_methods))
            return server.NOT_DONE_YET
        return self.handle(request)

    def handle(self, request):  # pragma: no cover - abstract
        raise NotImplementedError


class ErrorResource(Resource):
    isLeaf = True

    def __init__(self, error: GpumgrError) -> None:
        super().__init__()
        self._error = error

    def render(self, request):
        write_error(request, self._error)
        return server.NOT_DONE_YET


class Broker:
    """What the resources share: config, state, the scheduler and the proxy."""

    def __init__(
        self,
        clock: IReactorTime,
        config: Config,
        registry: Registry,
        scheduler: Scheduler,
        proxy: StreamingProxy,
        agents: dict[str, Any],
        status: Callable[[], dict],
        admission: Any = None,
    ) -> None:
        self.clock = clock
        self.config = config
        self.registry = registry
        self.scheduler = scheduler
        self.proxy = proxy
        self.agents = agents
        self.status = status
        self.admission = admission
        self._timeouts = {
            name: Timeouts(
                request_s=c.request_timeout_s,
                body_idle_s=c.body_idle_timeout_s,
                client_stall_s=config.limits.client_stall_timeout_s,
            )
            for name, c in config.consumers.items()
        }

    def timeouts_for(self, consumer) -> Timeouts:
        return self._timeouts[consumer.name]


class KindResource(JsonResource):
    """POST /v1/<kind>: health gate, then the scheduler, then the proxy."""

    isLeaf = True
    allowed_methods = ("POST",)

    def __init__(self, broker: Broker, kind: str) -> None:
        super().__init__()
        self._broker = broker
        self._kind = kind
        # The config never changes at run time: resolve the route once.
        self._consumer = broker.config.consumer_for(kind)
        if self._consumer is not None:
            c = self._consumer
            self._base_url = c.url_for(c.paths[kind]).encode("utf-8")
            self._consumer_header = (b"X-Gpumgr-Consumer", c.name.encode("utf-8"))

    def handle(self, request):
        if request.postpath not in ([], [b""]):
            write_error(request, UnknownRoute(f"no route for {request.path.decode('latin-1')}"))
            return server.NOT_DONE_YET
        broker = self._broker
        consumer = self._consumer
        if consumer is None:
            write_error(request, UnknownRoute(f"no consumer is routed for {self._kind!r}"))
            return server.NOT_DONE_YET
        refusal = _health_refusal(broker, consumer.name)
        if refusal is not None:
            write_error(request, refusal)
            return server.NOT_DONE_YET
        url = self._base_url
        consumer_header = self._consumer_header
        query = request.uri.partition(b"?")[2]
        if query:
            url += b"?" + query
        queued_at = broker.clock.seconds()

        def job(retry_oom: bool = False):
            """The whole exchange. With retry_oom an OOM answer is held back."""
            wait_ms = int((broker.clock.seconds() - queued_at) * 1000)
            return broker.proxy.forward(
                request,
                consumer.name,
                broker.agents[consumer.name],
                url,
                broker.timeouts_for(consumer),
                [consumer_header, (b"X-Gpumgr-Wait-Ms", str(wait_ms).encode("ascii"))],
                hold_oom=retry_oom,
            )

        d = broker.scheduler.run(consumer.name, job, kind=self._kind)
        # A client that leaves while queued must leave the queue at once.
        request.notifyFinish().addErrback(lambda _: d.cancel())
        d.addErrback(_render_failure, request, consumer.name)
        return server.NOT_DONE_YET


def _health_refusal(broker: Broker, name: str) -> GpumgrError | None:
    state = broker.registry[name]
    if state.health != HEALTH_DOWN:
        return None
    why = f": {state.last_error}" if state.last_error else ""
    return ConsumerUnhealthy(
        f"{name} failed its last health check{why}",
        consumer=name,
        retry_after_s=broker.config.health.interval_s,
    )


def audio_path_is_safe(segments: list[bytes]) -> bool:
    """Reject traversal, encoded separators and empty segments (pure)."""
    if not segments:
        return False
    for raw in segments:
        if not raw:
            return False
        decoded = unquote_to_bytes(raw)
        if decoded in (b".", b"..") or b"/" in decoded or b"\\" in decoded or b"\x00" in decoded:
            return False
    return True


class AudioResource(JsonResource):
    """GET /audio/<rest>: straight to the audio_proxy consumer; no scheduling."""

    isLeaf = True

    def __init__(self, broker: Broker) -> None:
        super().__init__()
        self._broker = broker

    def handle(self, request):
        broker = self._broker
        # request.postpath is already split on '/', but twisted.web does not
        # collapse '..' for us; check the raw path of the URI instead.
        raw_path = request.uri.partition(b"?")[0]
        segments = raw_path.split(b"/")[2:]  # drop "", "audio"
        if not audio_path_is_safe(segments):
            write_error(request, BadPath("audio paths must be plain file names, no '..' or '//'"))
            return server.NOT_DONE_YET
        consumer = broker.config.consumer_for(AUDIO_ROUTE)
        if consumer is None:
            write_error(request, UnknownRoute("no consumer is routed for audio_proxy"))
            return server.NOT_DONE_YET
        refusal = _health_refusal(broker, consumer.name)
        if refusal is not None:
            write_error(request, refusal)
            return server.NOT_DONE_YET
        url = consumer.url.encode("utf-8") + request.uri
        d = broker.proxy.forward(
            request,
            consumer.name,
            broker.agents[consumer.name],
            url,
            broker.timeouts_for(consumer),
            [(b"X-Gpumgr-Consumer", consumer.name.encode("utf-8"))],
        )
        d.addErrback(log.failure, "relaying /audio failed")
        return server.NOT_DONE_YET


class StatusResource(JsonResource):
    isLeaf = True

    def __init__(self, broker: Broker) -> None:
        super().__init__()
        self._broker = broker

    def handle(self, request):
        return write_json(request, self._broker.status())


class HealthzResource(JsonResource):
    isLeaf = True

    def handle(self, request):
        return write_json(request, {"status": "ok"})


class IndexResource(JsonResource):
    isLeaf = True

    def handle(self, request):
        if request.postpath not in ([], [b""]):
            write_error(request, UnknownRoute(f"no route for {request.path.decode('latin-1')}"))
            return server.NOT_DONE_YET
        return write_json(
            request,
            {
                "name": "gpumgr",
                "version": __version__,
                "endpoints": {
                    **{f"POST /v1/{k}": f"proxied to routes.{k}" for k in KINDS},
                    "GET /audio/<name>": "proxied to routes.audio_proxy",
                    "GET /v1/status": "live state of GPU, consumers and scheduler",
                    "GET /healthz": "liveness of gpumgr itself",
                },
            },
        )


def _is_loopback(request) -> bool:
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


def admin_refusal(request, token: str | None) -> GpumgrError | None:
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


class ConsumerAdminResource(JsonResource):
    """POST /v1/consumers/<name>/{load,unload}: through the scheduler, like any job."""

    isLeaf = True
    allowed_methods = ("POST",)

    def __init__(self, broker: Broker) -> None:
        super().__init__()
        self._broker = broker

    def handle(self, request):
        broker = self._broker
        refusal = admin_refusal(request, broker.config.admin_token)
        if refusal is not None:
            write_error(request, refusal)
            return server.NOT_DONE_YET
        parts = request.postpath
        if len(parts) != 2 or parts[1] not in (b"load", b"unload"):
            write_error(request, UnknownRoute("use /v1/consumers/<name>/load or .../unload"))
            return server.NOT_DONE_YET
        name, action = parts[0].decode("utf-8", "replace"), parts[1].decode("ascii")
        consumer = broker.config.consumers.get(name)
        if consumer is None:
            write_error(request, UnknownConsumer(f"no consumer named {name!r}"))
            return server.NOT_DONE_YET
        if getattr(consumer, action) is None:
            write_error(request, NotSupported(f"{name} has no {action} route configured",
                                              consumer=name))
            return server.NOT_DONE_YET
        admission = broker.admission
        if action == "load":
            job = lambda: admission.load(name, "admin")  # noqa: E731
        else:
            job = lambda: admission.admin_unload(name)  # noqa: E731
        d = broker.scheduler.run(name, job, control=True)
        request.notifyFinish().addErrback(lambda _: d.cancel())

        def done(_):
            if request._disconnected:
                return
            state = broker.registry[name]
            body = write_json(request, {"consumer": name, "action": action,
                                        "loaded": state.loaded,
                                        "gpu_resident_mib": state.gpu_resident_mib})
            request.write(body)
            request.finish()

        d.addCallback(done)
        d.addErrback(_render_failure, request, name)
        return server.NOT_DONE_YET


def _render_failure(failure: Failure, request, consumer: str) -> None:
    if failure.check(CancelledError):
        return
    if not failure.check(GpumgrError):
        log.failure("a job for {consumer} failed", failure, consumer=consumer)
    if not request._disconnected and not request.finished and not request.startedWriting:
        err = failure.value if failure.check(GpumgrError) else GpumgrError(
            "internal error; see the gpumgr log", consumer)
        write_error(request, err)


class V1Resource(JsonResource):
    def __init__(self, broker: Broker) -> None:
        super().__init__()
        for kind in KINDS:
            self.putChild(kind.encode("ascii"), KindResource(broker, kind))
        self.putChild(b"status", StatusResource(broker))
        self.putChild(b"consumers", ConsumerAdminResource(broker))

    def handle(self, request):
        write_error(request, UnknownRoute(f"no route for {request.path.decode('latin-1')}"))
        return server.NOT_DONE_YET


class RootResource(JsonResource):
    def __init__(self, broker: Broker) -> None:
        super().__init__()
        self._index = IndexResource()
        self.putChild(b"v1", V1Resource(broker))
        self.putChild(b"audio", AudioResource(broker))
        self.putChild(b"healthz", HealthzResource())

    def getChild(self, path: bytes, request) -> Resource:
        if path == b"":
            return self._index
        return super().getChild(path, request)

    def handle(self, request):
        return self._index.render(request)
