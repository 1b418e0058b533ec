"""Where a request goes: its parsed target, in the current config, to one
frozen `Route` that every later decision, log and forward uses (pure)."""

from __future__ import annotations

from typing import Any, Callable

import attrs

from gpumgr.config import Config, ConsumerConfig
from gpumgr.drivers import get_driver
from gpumgr.errors import BadPath, BadRequest, MethodNotAllowed, UnknownRoute
from gpumgr.target import Segment, Target, forward_url, routed_target


@attrs.frozen
class Route:
    """Where one request goes, all decided on one parsed target."""

    consumer: ConsumerConfig
    #: What is classified, checked and forwarded (its origin form).
    target: Target
    url: bytes
    #: GPU work: it runs as a job under the scheduler.
    scheduled: bool
    #: One of the service's own state-changing routes (load, unload, free,
    #: interrupt...): admin only, and its memory is unknown once it was sent.
    service_control: bool
    #: /v1/<kind>/<subpath>, the consumer's native API (not /v1/<kind> itself).
    passthrough: bool
    #: The model a GPU request runs, where its driver tells (its memory profile).
    model: str | None = None


def route(config: Config, kind: str, method: str, target: Target | None,
          query: bytes | None = None,
          body: Callable[[], bytes | None] = lambda: None) -> Route:
    """Where a request to /v1/<kind>[/<target>] goes, or raise. `query` is the
    request's, for /v1/<kind> itself. `body` reads the request body, for
    drivers whose control routes depend on it (ollama's unload)."""
    c = config.consumer_for(kind)
    if c is None:
        raise UnknownRoute(f"no consumer is routed for {kind!r}")
    if method != method.upper():
        # Methods are case-sensitive (RFC 9110), but not to every server:
        # Werkzeug upper-cases them. `post` would be classified as neither
        # GPU work nor a control route, and run as POST there.
        raise BadRequest(f"the method {method!r} must be upper case", consumer=c.name)
    if target is None:
        if method != "POST":
            raise MethodNotAllowed(method, ("POST",))
        sent = routed_target(c.paths[kind], query)
        scheduled = True
    else:
        if not c.passthrough:
            raise UnknownRoute(f"{c.name} does not allow pass-through "
                               f"(consumers.{c.name}.passthrough)", consumer=c.name)
        problem = target.problem()
        if problem is not None:
            raise BadPath(problem, consumer=c.name)
        sent = target
        # With or without `;` parameters (servers differ: gpumgr.target).
        scheduled = any(is_gpu_work(c, method, p) for p in (sent.path, sent.bare_path))
    driver = get_driver(c.driver)
    service_control = any(driver.is_control(c, method, p, body)
                          for p in dict.fromkeys((sent.path, sent.bare_path)))
    model = driver.model_of(method, sent.path, body) if scheduled else None
    return Route(c, sent, forward_url(c.url, sent), scheduled, service_control,
                 passthrough=target is not None, model=model)


def is_gpu_work(c: ConsumerConfig, method: str, path: str) -> bool:
    """The consumer's `scheduled` routes, then its driver's own idea."""
    if any(s.matches(method, path) for s in c.scheduled):
        return True
    return bool(get_driver(c.driver).is_gpu_work(method, path))


def path_is_safe(segments: list[bytes]) -> bool:
    """Reject traversal, encoded separators and empty segments (pure)."""
    return bool(segments) and Target(tuple(Segment.of(s) for s in segments)).problem() is None


def wants_websocket(request: Any) -> bool:
    return bool((request.getHeader(b"upgrade") or b"").strip().lower() == b"websocket")
