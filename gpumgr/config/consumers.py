"""`consumers:`: one ConsumerConfig per service, completed with its driver's defaults."""

from __future__ import annotations

import re
from types import MappingProxyType
from urllib.parse import urlsplit

from gpumgr.config.driver_defaults import DRIVER_DEFAULTS
from gpumgr.config.process_names import ProcessNameMatcher, parse_process_pattern
from gpumgr.config.schema import (
    HTTP_METHODS,
    KINDS,
    ConsumerConfig,
    GpuPlacement,
    HttpCall,
    ProcessConfig,
    ScheduledRoute,
)
from gpumgr.config.section import ConfigError, Section, type_name

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def parse_consumers(sec: Section) -> dict[str, ConsumerConfig]:
    """Each consumer on its own, then what they say of each other (`can_coexist_with`)."""
    if not sec.raw:
        sec.fail("", "at least one consumer is required")
    consumers = {}
    for name in list(sec.raw):
        if not isinstance(name, str) or not _NAME_RE.match(name):
            sec.fail(
                str(name),
                "consumer names must be 1-64 letters, digits, '_', '.' or '-'",
            )
        consumers[name] = _parse_consumer(sec.section(name), name)
    sec.finish()
    names = set(consumers)
    for c in consumers.values():
        for other in c.can_coexist_with or ():
            if other not in names:
                raise ConfigError(
                    sec.source,
                    sec.key_path(f"{c.name}.can_coexist_with"),
                    f"names unknown consumer {other!r} (known: {', '.join(sorted(names))})",
                )
            if other == c.name:
                raise ConfigError(
                    sec.source,
                    sec.key_path(f"{c.name}.can_coexist_with"),
                    "a consumer cannot list itself",
                )
    return consumers


def _parse_consumer(sec: Section, name: str) -> ConsumerConfig:
    url = sec.string("url", None)
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError for a bad port
        _ = parts.hostname  # checks the contents of [...] too
    except ValueError as e:
        sec.fail("url", f"is not a valid URL ({e}): {url!r}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        sec.fail("url", f"must be an http:// or https:// URL with a host, got {url!r}")
    if parts.query or parts.fragment:
        sec.fail("url", "must not carry a query or fragment")
    del port

    defaults = DRIVER_DEFAULTS[sec.string("driver", "http", choices=tuple(DRIVER_DEFAULTS))]

    paths_sec = sec.section("paths")
    paths: dict[str, str] = {}
    for kind in list(paths_sec.raw):
        if kind not in KINDS:
            paths_sec.fail(str(kind), f"unknown kind (known: {', '.join(KINDS)})")
        paths[kind] = paths_sec.path_value(kind, None)
    paths_sec.finish()

    coexist_raw = sec.get("can_coexist_with")
    coexist: tuple[str, ...] | None = None
    if coexist_raw is not None:
        if not isinstance(coexist_raw, list) or not all(isinstance(x, str) for x in coexist_raw):
            sec.fail("can_coexist_with", "must be a list of consumer names")
        if len(set(coexist_raw)) != len(coexist_raw):
            sec.fail("can_coexist_with", "lists a consumer twice")
        coexist = tuple(coexist_raw)

    if defaults.health is None and not sec.has("health"):
        sec.fail("health", f"is required (driver {defaults.name} has no default health route)")
    load = _parse_call(sec, "load") if sec.has("load") else defaults.load
    unload = _parse_call(sec, "unload") if sec.has("unload") else defaults.unload
    process = _parse_process(sec)
    consumer = ConsumerConfig(
        name=name,
        url=url.rstrip("/"),
        health_path=sec.path_value("health", defaults.health),
        paths=MappingProxyType(paths),
        vram_resident_mib=sec.number("vram_resident_mib", 0, integer=True),
        vram_job_mib=sec.number("vram_job_mib", 0, integer=True),
        max_concurrency=sec.number("max_concurrency", 1, integer=True, positive=True),
        can_coexist_with=coexist,
        load=load,
        unload=unload,
        connect_timeout_s=sec.number("connect_timeout_s", 5.0, positive=True),
        request_timeout_s=sec.number("request_timeout_s", 600.0, positive=True),
        body_idle_timeout_s=sec.number("body_idle_timeout_s", 300.0, positive=True),
        gpu_process=_parse_process_pattern(sec, "gpu_process"),
        idle_unload_s=sec.number("idle_unload_s", None, positive=True)
        if sec.has("idle_unload_s") else None,
        preload=_parse_bool(sec, "preload", False),
        process=process,
        driver=defaults.name,
        can_unload=process is not None or unload is not None or defaults.native_unload,
        can_load=process is not None or load is not None,
        passthrough=_parse_bool(sec, "passthrough", False),
        scheduled=_parse_scheduled(sec),
        job_timeout_s=sec.number("job_timeout_s", 1800.0, positive=True),
        abandoned_grace_s=sec.number("abandoned_grace_s", defaults.abandoned_grace_s,
                                     maximum=3600.0),
        render_stop_grace_s=sec.number("render_stop_grace_s", 30.0, positive=True),
        render_poll_s=sec.number("render_poll_s", 0.5, positive=True, maximum=60),
        pin=_parse_bool(sec, "pin", False),
        gpu=_parse_gpu(sec, process),
    )
    sec.finish()
    if consumer.idle_unload_s is not None and not consumer.can_unload:
        sec.fail("idle_unload_s", "needs a way to unload (an unload route or a process)")
    if consumer.preload and not consumer.can_load:
        sec.fail("preload", "needs a way to load (a load route or a process)")
    return consumer


#: No box has more cards than this; a bigger index is a typo.
_MAX_CARD_INDEX = 63


def _parse_gpu(sec: Section, process: ProcessConfig | None) -> GpuPlacement:
    """A card index, a list of them, or `auto` (only for a process gpumgr owns)."""
    raw = sec.get("gpu")
    if not sec.has("gpu"):
        return GpuPlacement()
    if raw == "auto":
        if process is None:
            sec.fail("gpu", "auto needs a process gpumgr owns (consumers.<name>.process): "
                     "only then can gpumgr choose its card and start it there")
        return GpuPlacement(cards=(), auto=True)
    items = raw if isinstance(raw, list) else [raw]
    if (not items or not all(isinstance(i, int) and not isinstance(i, bool) for i in items)
            or not all(0 <= i <= _MAX_CARD_INDEX for i in items)):
        sec.fail("gpu", "must be a card index (0-63), a non-empty list of them, or auto; "
                 f"got {type_name(raw)} {raw!r}")
    if len(set(items)) != len(items):
        sec.fail("gpu", f"lists a card twice: {raw!r}")
    return GpuPlacement(cards=tuple(sorted(items)))


def _parse_scheduled(sec: Section) -> tuple[ScheduledRoute, ...]:
    raw = sec.get("scheduled")
    if raw is None:
        return ()
    if not isinstance(raw, list):
        sec.fail("scheduled", f"must be a list of 'METHOD /path-prefix', got {type_name(raw)}")
    routes = []
    for i, item in enumerate(raw):
        method, _, prefix = item.partition(" ") if isinstance(item, str) else ("", "", "")
        if method not in HTTP_METHODS or not prefix.startswith("/") or " " in prefix:
            sec.fail(f"scheduled[{i}]", f"must be 'METHOD /path-prefix' with METHOD one of "
                     f"{', '.join(HTTP_METHODS)}; got {item!r}")
        routes.append(ScheduledRoute(method, prefix))
    return tuple(routes)


def _parse_process(parent: Section) -> ProcessConfig | None:
    if parent.raw.get("process") is None:
        parent.get("process")
        return None
    sec = parent.section("process")
    command = sec.get("command")
    if "command" not in sec.raw:
        sec.fail("command", "is required")
    if (not isinstance(command, list) or not command
            or not all(isinstance(a, str) and a for a in command)):
        sec.fail("command", "must be a non-empty list of strings (an argv, not a shell line), "
                 f"got {type_name(command)} {command!r}")
    env_sec = sec.section("env")
    env: dict[str, str] = {}
    for key in list(env_sec.raw):
        value = env_sec.get(key)
        if not isinstance(key, str) or not key or "=" in key:
            env_sec.fail(str(key), "environment variable names must be non-empty, without '='")
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            env_sec.fail(key, f"must be a string, got {type_name(value)} {value!r}")
        env[key] = str(value)
    env_sec.finish()
    process = ProcessConfig(
        command=tuple(command),
        cwd=sec.string("cwd", None) if sec.has("cwd") else None,
        env=MappingProxyType(env),
        start_timeout_s=sec.number("start_timeout_s", 120.0, positive=True),
        stop_timeout_s=sec.number("stop_timeout_s", 10.0, positive=True),
    )
    sec.finish()
    return process


def _parse_process_pattern(sec: Section, key: str) -> ProcessNameMatcher | None:
    if not sec.has(key):
        return None
    text = sec.string(key, None)
    try:
        return parse_process_pattern(text)
    except ValueError as e:
        sec.fail(key, str(e))


def _parse_bool(sec: Section, key: str, default: bool) -> bool:
    value = sec.get(key)
    if not sec.has(key):
        return default
    if not isinstance(value, bool):
        sec.fail(key, f"must be true or false, got {type_name(value)} {value!r}")
    return value


def _parse_call(parent: Section, key: str) -> HttpCall | None:
    if parent.raw.get(key) is None:
        parent.get(key)
        return None
    sec = parent.section(key)
    body = sec.get("body")
    if body is None:
        body = ""
    if not isinstance(body, str):
        sec.fail("body", f"must be a string (write JSON in quotes), got {type_name(body)}")
    content_type = sec.get("content_type")
    if content_type is not None and not isinstance(content_type, str):
        sec.fail("content_type", "must be a string")
    call = HttpCall(
        method=sec.string("method", "POST", choices=HTTP_METHODS),
        path=sec.path_value("path", None),
        body=body.encode("utf-8"),
        content_type=content_type,
    )
    sec.finish()
    return call

