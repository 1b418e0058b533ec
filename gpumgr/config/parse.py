"""From YAML text to a Config: the top-level keys, and the checks across sections.

`load_config(path)` either returns a `Config` or raises
`ConfigError("file: key.path: what is wrong")`.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
from types import MappingProxyType
from typing import Any, Literal, Mapping

import attrs

from gpumgr import yaml_strict
from gpumgr.config.balancer import parse_balancer
from gpumgr.config.consumers import parse_consumers
from gpumgr.config.endpoints import (
    DEFAULT_LISTEN,
    find_self_reference,
    listen_problem,
    literal_address,
)
from gpumgr.config.files import read_config_file
from gpumgr.config.schema import (
    AUDIO_ROUTE,
    AUTO,
    KINDS,
    ROUTE_KEYS,
    SCHEDULER_MODES,
    Config,
    ConsumerConfig,
    GpuConfig,
    HealthConfig,
    RequestsConfig,
    LimitsConfig,
    SchedulerConfig,
)
from gpumgr.config.section import ConfigError, Section, type_name
from gpumgr.states import SchedulerMode


def load_config(path: str, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate a YAML config file.

    `environ` (default: os.environ) is where `admin_token_env` is looked up.
    """
    return parse_config_text(read_config_file(path), path, environ)


def parse_config_text(
    text: bytes | str, source: str, environ: Mapping[str, str] | None = None
) -> Config:
    """Validate a YAML text; a hostile one is refused quickly, never with a traceback."""
    try:
        raw = yaml_strict.load(text)
    except yaml_strict.YamlProblem as e:
        raise ConfigError(source, e.key_path, e.problem) from None
    if raw is None:
        raise ConfigError(source, "", "file is empty; expected a mapping")
    data = text.encode("utf-8") if isinstance(text, str) else text
    return attrs.evolve(parse_config(raw, source, environ),
                        sha256=hashlib.sha256(data).hexdigest())


def parse_config(raw: Any, source: str, environ: Mapping[str, str] | None = None) -> Config:
    """Validate an already-loaded YAML document."""
    top = Section(source, "", raw)
    listen = top.string("listen", DEFAULT_LISTEN)
    problem = listen_problem(listen)
    if problem is not None:
        top.fail("listen", problem)

    h = top.section("health")
    health = HealthConfig(
        interval_s=h.number("interval_s", 5.0, positive=True),
        timeout_s=h.number("timeout_s", 2.0, positive=True),
        down_grace_s=h.number("down_grace_s", 10.0, positive=True),
    )
    h.finish()

    g = top.section("gpu")
    gpu = GpuConfig(
        nvidia_smi=_parse_command_line(g, "nvidia_smi", "nvidia-smi"),
        interval_s=g.number("interval_s", 2.0, positive=True),
        timeout_s=g.number("timeout_s", 5.0, positive=True),
        headroom_mib=g.number("headroom_mib", 512, integer=True),
        unload_settle_s=g.number("unload_settle_s", 10.0),
        total_mib=g.number("total_mib", None, integer=True, positive=True) if g.has("total_mib")
        else None,
        state_dir=_parse_state_dir(g),
        loop_ms=g.number("loop_ms", 250, integer=True, positive=True),
    )
    g.finish()

    s = top.section("scheduler")
    scheduler = SchedulerConfig(
        mode=SchedulerMode(s.string("mode", "passthrough", choices=SCHEDULER_MODES)),
        capacity=_parse_capacity(s),
        max_queue=s.number("max_queue", 64, integer=True),
        queue_timeout_s=s.number("queue_timeout_s", 600.0, positive=True),
        priority=_parse_priority(s.section("priority")),
        aging_s=s.number("aging_s", 30.0, positive=True),
        max_overtakes=s.number("max_overtakes", 4, integer=True),
        max_bypass_s=s.number("max_bypass_s", 30.0),
        max_running=s.number("max_running", 8, integer=True, positive=True),
        overlap_evict_idle_s=s.number("overlap_evict_idle_s", 120.0),
    )
    s.finish()

    limits = _parse_limits(top.section("limits"))

    r = top.section("requests")
    requests = RequestsConfig(
        keep_finished=r.number("keep_finished", 256, integer=True),
        keep_finished_s=r.number("keep_finished_s", 600.0),
    )
    r.finish()

    consumers = parse_consumers(top.section("consumers"))
    routes = _parse_routes(top.section("routes"), consumers)
    admin_token = _parse_admin_token(top, os.environ if environ is None else environ)
    allowed_hosts = _parse_allowed_hosts(top)
    shutdown_grace_s = top.number("shutdown_grace_s", 30.0)
    balancer = parse_balancer(top.section("balancer"))
    top.finish()
    looping = find_self_reference(listen, consumers)
    if looping is not None:
        raise ConfigError(source, f"consumers.{looping}.url",
                          f"points at gpumgr's own listen address ({listen}); gpumgr would "
                          "proxy to itself and wait for its own GPU lock")
    return Config(
        source=source,
        listen=listen,
        health=health,
        gpu=gpu,
        scheduler=scheduler,
        limits=limits,
        routes=MappingProxyType(routes),
        consumers=MappingProxyType(consumers),
        admin_token=admin_token,
        allowed_hosts=allowed_hosts,
        shutdown_grace_s=shutdown_grace_s,
        balancer=balancer,
        requests=requests,
    )


#: Bigger sizes than this (1 TiB) are typos, and overflow when turned into bytes.
_MAX_MIB = 1024 * 1024
#: A day: longer timeouts are typos, and huge ones overflow the reactor's timers.
_MAX_TIMEOUT_S = 86400.0


def _parse_limits(sec: Section) -> LimitsConfig:
    def seconds(key: str, default: float) -> float:
        return sec.number(key, default, positive=True, maximum=_MAX_TIMEOUT_S)

    def count(key: str, default: int, minimum: int) -> int:
        value = sec.number(key, default, integer=True, positive=True, maximum=1_000_000)
        if value < minimum:
            sec.fail(key, f"must be at least {minimum}; less refuses ordinary clients")
        return value

    max_body_mib = sec.number("max_body_mib", 512, positive=True, maximum=_MAX_MIB)
    limits = LimitsConfig(
        max_body_mib=max_body_mib,
        client_stall_timeout_s=seconds("client_stall_timeout_s", 60.0),
        header_timeout_s=seconds("header_timeout_s", 10.0),
        keepalive_timeout_s=seconds("keepalive_timeout_s", 60.0),
        body_idle_timeout_s=seconds("body_idle_timeout_s", 30.0),
        min_body_rate_kib_s=sec.number("min_body_rate_kib_s", 1.0, maximum=_MAX_MIB),
        min_body_rate_grace_s=sec.number("min_body_rate_grace_s", 10.0,
                                         maximum=_MAX_TIMEOUT_S),
        max_connections=count("max_connections", 1024, 1),
        # Unset, the spool grows with max_body_mib: one largest body always fits.
        max_spool_mib=sec.number("max_spool_mib", max(2048, max_body_mib), positive=True,
                                 maximum=_MAX_MIB),
        max_request_line_bytes=count("max_request_line_bytes", 8192, 256),
        max_header_bytes=count("max_header_bytes", 16384, 1024),
        max_headers=count("max_headers", 100, 8),
        reserved_connections=sec.number("reserved_connections", 16, integer=True,
                                        maximum=1_000_000),
        max_tunnels=sec.number("max_tunnels", 256, integer=True, maximum=1_000_000),
        tunnel_idle_timeout_s=seconds("tunnel_idle_timeout_s", 3600.0),
        max_upload_s=seconds("max_upload_s", 900.0),
    )
    sec.finish()
    if sec.has("reserved_connections") and \
            limits.reserved_connections > limits.max_connections // 2:
        sec.fail("reserved_connections", f"must be at most half of limits.max_connections "
                 f"({limits.max_connections // 2}), or too few connections are left for "
                 "GPU work")
    if limits.max_spool_mib < limits.max_body_mib:
        sec.fail("max_spool_mib", f"must be at least limits.max_body_mib "
                 f"({limits.max_body_mib:g}), or a body within the limit could never be spooled")
    return limits


_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def admin_token_problem(token: str) -> str | None:
    """Why `token` cannot be a bearer token, or None (pure; never echoes the token)."""
    if not token.strip():
        return "must not be empty or only whitespace"
    if any(not "\x21" <= ch <= "\x7e" for ch in token):
        return ("must be printable ASCII without spaces or control characters "
                "(it travels in an Authorization header)")
    return None


_HOST_NAME = re.compile(r"\A(?=.{1,253}\Z)[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
                        r"(?:\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)*\Z")


def _parse_allowed_hosts(top: Section) -> frozenset[str]:
    """allowed_hosts: the names (or addresses) clients use to reach gpumgr
    when that is not loopback; no scheme, no port, no wildcard."""
    raw = top.get("allowed_hosts")
    if raw is None:
        return frozenset()
    if not isinstance(raw, list):
        top.fail("allowed_hosts", f"must be a list of host names, got {type_name(raw)}")
    names = set()
    for i, item in enumerate(raw):
        key = f"allowed_hosts[{i}]"
        if not isinstance(item, str):
            top.fail(key, f"must be a host name, got {type_name(item)}")
        name = item.strip().lower().rstrip(".")
        if name.startswith("[") and name.endswith("]"):
            name = name[1:-1]
        if literal_address(name) is None and not _HOST_NAME.match(name):
            top.fail(key, f"must be a host name or an IP address without scheme or port, "
                          f"got {item!r}")
        names.add(name)
    return frozenset(names)


def _parse_admin_token(top: Section, environ: Mapping[str, str]) -> str | None:
    """admin_token, or the variable admin_token_env names; never both, never empty."""
    token = top.get("admin_token")
    var = top.get("admin_token_env")
    if top.has("admin_token") and top.has("admin_token_env"):
        top.fail("admin_token_env", "set admin_token or admin_token_env, not both")
    if top.has("admin_token"):
        if not isinstance(token, str):
            top.fail("admin_token", f"must be a string, got {type_name(token)}")
        problem = admin_token_problem(token)
        if problem is not None:
            top.fail("admin_token", problem)
        return token
    if not top.has("admin_token_env"):
        return None
    if not isinstance(var, str) or not _ENV_NAME_RE.match(var):
        top.fail("admin_token_env", "must name an environment variable "
                 f"(letters, digits and '_'), got {type_name(var)} {var!r}")
    value = environ.get(var)
    if value is None:
        top.fail("admin_token_env", f"environment variable {var} is not set")
    problem = admin_token_problem(value)
    if problem is not None:
        top.fail("admin_token_env", f"environment variable {var} {problem}")
    return value


def _parse_command_line(sec: Section, key: str, default: str) -> str:
    """A command line split like a shell would, checked now rather than at first use."""
    value = sec.string(key, default)
    try:
        argv = shlex.split(value)
    except ValueError as e:
        sec.fail(key, f"cannot be split into arguments: {e}")
    if not argv or not argv[0]:
        sec.fail(key, "must start with a program to run")
    return value


def _parse_capacity(sec: Section) -> int | Literal["auto"]:
    """A positive integer (jobs at once), or `auto` (as many as fit in memory)."""
    if sec.raw.get("capacity") == AUTO:
        sec.get("capacity")
        return AUTO
    if isinstance(sec.raw.get("capacity"), str):
        sec.fail("capacity", f"must be a positive integer or {AUTO!r}, "
                 f"got {sec.raw['capacity']!r}")
    return sec.number("capacity", 1, integer=True, positive=True)


def _parse_priority(sec: Section) -> Mapping[str, int]:
    priority = {}
    for kind in list(sec.raw):
        if kind not in KINDS:
            sec.fail(str(kind), f"unknown kind (known: {', '.join(KINDS)})")
        value = sec.get(kind)
        if isinstance(value, bool) or not isinstance(value, int):
            sec.fail(kind, f"must be an integer, got {type_name(value)} {value!r}")
        priority[kind] = value
    sec.finish()
    return MappingProxyType(priority)


def _parse_routes(sec: Section, consumers: Mapping[str, ConsumerConfig]) -> dict[str, str]:
    routes: dict[str, str] = {}
    for kind in list(sec.raw):
        if kind not in ROUTE_KEYS:
            sec.fail(str(kind), f"unknown route (known: {', '.join(ROUTE_KEYS)})")
        target = sec.string(kind, None)
        if target not in consumers:
            sec.fail(
                kind,
                f"routes to unknown consumer {target!r} (known: {', '.join(sorted(consumers))})",
            )
        if kind != AUDIO_ROUTE and kind not in consumers[target].paths:
            sec.fail(kind, f"consumer {target!r} has no paths.{kind}")
        routes[kind] = target
    sec.finish()
    return routes


def _parse_state_dir(g: Section) -> str | None:
    """gpu.state_dir: an absolute directory for learned memory profiles, or unset."""
    value = g.string("state_dir", "")  # "": absent
    if not g.has("state_dir"):
        return None
    if not os.path.isabs(value):
        g.fail("state_dir", f"must be an absolute directory path, got {value!r}")
    return value
