"""Config schema: parsed once into frozen values; every error names file and key path.

The rest of gpumgr never touches raw YAML. `load_config(path)` either returns a
`Config` or raises `ConfigError("file: key.path: what is wrong")`.
"""

from __future__ import annotations

import re
from types import MappingProxyType
from typing import Any, Mapping
from urllib.parse import urlsplit

import attrs
import yaml

KINDS = ("tts", "stt", "llm", "image")
AUDIO_ROUTE = "audio_proxy"
ROUTE_KEYS = KINDS + (AUDIO_ROUTE,)
SCHEDULER_MODES = ("passthrough", "locked", "evicting")
HTTP_METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ConfigError(Exception):
    """A config problem, located by file and dotted key path."""

    def __init__(self, file: str, key_path: str, problem: str) -> None:
        self.file = file
        self.key_path = key_path
        self.problem = problem
        where = f"{file}: {key_path}" if key_path else file
        super().__init__(f"{where}: {problem}")


@attrs.frozen
class HttpCall:
    """A control call on a consumer (load or unload)."""

    method: str
    path: str
    body: bytes
    content_type: str | None


@attrs.frozen
class ProcessConfig:
    """A service whose process gpumgr starts and stops itself."""

    #: argv, never a shell string.
    command: tuple[str, ...]
    cwd: str | None = None
    #: Added to gpumgr's own environment.
    env: Mapping[str, str] = attrs.field(factory=lambda: MappingProxyType({}))
    #: From spawn until the health probe first passes.
    start_timeout_s: float = 120.0
    #: SIGTERM, then SIGKILL after this long.
    stop_timeout_s: float = 10.0


@attrs.frozen
class ScheduledRoute:
    """`METHOD /path-prefix`: pass-through requests that are GPU work."""

    method: str
    path_prefix: str

    def matches(self, method: str, path: str) -> bool:
        return method == self.method and path.startswith(self.path_prefix)


@attrs.frozen
class ConsumerConfig:
    name: str
    url: str
    health_path: str
    paths: Mapping[str, str]
    vram_resident_mib: int
    can_coexist_with: tuple[str, ...] | None
    load: HttpCall | None
    unload: HttpCall | None
    connect_timeout_s: float
    request_timeout_s: float
    body_idle_timeout_s: float = 300.0
    #: Regex over nvidia-smi process names; when set, residency is measured.
    gpu_process: re.Pattern[str] | None = None
    idle_unload_s: float | None = None
    preload: bool = False
    process: ProcessConfig | None = None
    #: Names a driver in gpumgr.drivers: how gpumgr talks to the service.
    driver: str = "http"
    #: It can give its memory back: an unload route, a native unload, or a process.
    can_unload: bool = False
    #: It can be warmed: a load route, or a process to start.
    can_load: bool = False
    #: /v1/<kind>/<subpath> reaches url + /<subpath>.
    passthrough: bool = False
    #: Extra pass-through requests that are GPU work.
    scheduled: tuple[ScheduledRoute, ...] = ()
    #: Longest a job (a tracked render included) may hold the GPU.
    job_timeout_s: float = 1800.0

    @property
    def pinned(self) -> bool:
        """With no way to unload, a consumer is never evicted."""
        return not self.can_unload

    def url_for(self, path: str) -> str:
        return self.url + path


@attrs.frozen
class HealthConfig:
    interval_s: float = 5.0
    timeout_s: float = 2.0


@attrs.frozen
class GpuConfig:
    nvidia_smi: str = "nvidia-smi"
    interval_s: float = 2.0
    timeout_s: float = 5.0
    headroom_mib: int = 512
    unload_settle_s: float = 10.0
    #: Used for accounting only when no GPU sample is available.
    total_mib: int | None = None


@attrs.frozen
class SchedulerConfig:
    mode: str = "passthrough"
    capacity: int = 1
    max_queue: int = 64
    queue_timeout_s: float = 600.0
    #: kind -> priority; higher runs first. Kinds not listed get 0.
    priority: Mapping[str, int] = attrs.field(factory=lambda: MappingProxyType({}))
    aging_s: float = 30.0
    max_overtakes: int = 4


@attrs.frozen
class LimitsConfig:
    max_body_mib: float = 512
    client_stall_timeout_s: float = 60.0

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mib * 1024 * 1024)


@attrs.frozen
class Config:
    source: str
    listen: str
    health: HealthConfig
    gpu: GpuConfig
    scheduler: SchedulerConfig
    limits: LimitsConfig
    routes: Mapping[str, str]
    consumers: Mapping[str, ConsumerConfig]
    admin_token: str | None = None
    #: On SIGTERM, how long running jobs may finish before they are aborted.
    shutdown_grace_s: float = 30.0

    def consumer_for(self, route: str) -> ConsumerConfig | None:
        name = self.routes.get(route)
        return None if name is None else self.consumers[name]


DEFAULT_LISTEN = "tcp:8770:interface=127.0.0.1"


def load_config(path: str) -> Config:
    """Read and validate a YAML config file."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(path, "", f"cannot read: {e.strerror or e}") from None
    return parse_config_text(text, path)


def parse_config_text(text: bytes | str, source: str) -> Config:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise ConfigError(source, "", f"not valid YAML: {e}") from None
    if node is None:
        raise ConfigError(source, "", "file is empty; expected a mapping")
    _reject_duplicate_keys(node, source, "")
    try:
        raw = yaml.load(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:  # pragma: no cover - compose already parsed it
        raise ConfigError(source, "", f"not valid YAML: {e}") from None
    return parse_config(raw, source)


def _reject_duplicate_keys(node: yaml.Node, source: str, path: str) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        for key_node, value_node in node.value:
            key = key_node.value
            child = f"{path}.{key}" if path else str(key)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise ConfigError(source, child, f"duplicate key (again at line {line})")
            seen.add(key)
            _reject_duplicate_keys(value_node, source, child)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _reject_duplicate_keys(item, source, f"{path}[{i}]")


class _Section:
    """A mapping being read; remembers which keys were used to reject the rest."""

    def __init__(self, source: str, path: str, raw: Any) -> None:
        self.source = source
        self.path = path
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            self.fail("", f"expected a mapping, got {_type_name(raw)}")
        self.raw: dict[Any, Any] = raw
        self._used: set[str] = set()

    def key_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def fail(self, key: str, problem: str) -> None:
        raise ConfigError(self.source, self.key_path(key) if key else self.path, problem)

    def get(self, key: str) -> Any:
        self._used.add(key)
        return self.raw.get(key)

    def has(self, key: str) -> bool:
        return key in self.raw

    def _present(self, key: str, default: Any, what: str) -> Any:
        """The value, or `default` when the key is absent; null is an error."""
        value = self.get(key)
        if key not in self.raw:
            if default is None:
                self.fail(key, "is required")
            return default
        if value is None:
            self.fail(key, f"must be {what}, got null")
        return value

    def section(self, key: str) -> _Section:
        return _Section(self.source, self.key_path(key), self.get(key))

    def number(
        self,
        key: str,
        default: float | None,
        *,
        integer: bool = False,
        positive: bool = False,
    ) -> Any:
        value = self._present(key, default, "a number")
        if value is default:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            want = "an integer" if integer else "a number"
            self.fail(key, f"must be {want}, got {_type_name(value)} {value!r}")
        if integer and isinstance(value, float):
            if not value.is_integer():
                self.fail(key, f"must be an integer, got {value!r}")
            value = int(value)
        if value != value or value in (float("inf"), float("-inf")):
            self.fail(key, f"must be finite, got {value!r}")
        if value < 0:
            self.fail(key, f"must not be negative, got {value!r}")
        if positive and value == 0:
            self.fail(key, "must be greater than 0")
        return value

    def string(self, key: str, default: str | None, *, choices: tuple[str, ...] = ()) -> Any:
        value = self._present(key, default, "a string")
        if value is default:
            return default
        if not isinstance(value, str):
            self.fail(key, f"must be a string, got {_type_name(value)} {value!r}")
        if not value.strip():
            self.fail(key, "must not be empty")
        if choices and value not in choices:
            self.fail(key, f"must be one of {', '.join(choices)}; got {value!r}")
        return value

    def path_value(self, key: str, default: str | None) -> Any:
        value = self.string(key, default)
        if value is not None and not value.startswith("/"):
            self.fail(key, f"must be an absolute path starting with '/', got {value!r}")
        return value

    def finish(self) -> None:
        unknown = sorted(str(k) for k in self.raw if k not in self._used)
        if unknown:
            self.fail(unknown[0], f"unknown key (allowed here: {', '.join(sorted(self._used))})")


def _type_name(value: Any) -> str:
    return {
        dict: "a mapping",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def parse_config(raw: Any, source: str) -> Config:
    """Validate an already-loaded YAML document."""
    top = _Section(source, "", raw)
    listen = top.string("listen", DEFAULT_LISTEN)

    h = top.section("health")
    health = HealthConfig(
        interval_s=h.number("interval_s", 5.0, positive=True),
        timeout_s=h.number("timeout_s", 2.0, positive=True),
    )
    h.finish()

    g = top.section("gpu")
    gpu = GpuConfig(
        nvidia_smi=g.string("nvidia_smi", "nvidia-smi"),
        interval_s=g.number("interval_s", 2.0, positive=True),
        timeout_s=g.number("timeout_s", 5.0, positive=True),
        headroom_mib=g.number("headroom_mib", 512, integer=True),
        unload_settle_s=g.number("unload_settle_s", 10.0),
        total_mib=g.number("total_mib", None, integer=True, positive=True) if g.has("total_mib")
        else None,
    )
    g.finish()

    s = top.section("scheduler")
    scheduler = SchedulerConfig(
        mode=s.string("mode", "passthrough", choices=SCHEDULER_MODES),
        capacity=s.number("capacity", 1, integer=True, positive=True),
        max_queue=s.number("max_queue", 64, integer=True),
        queue_timeout_s=s.number("queue_timeout_s", 600.0, positive=True),
        priority=_parse_priority(s.section("priority")),
        aging_s=s.number("aging_s", 30.0, positive=True),
        max_overtakes=s.number("max_overtakes", 4, integer=True),
    )
    s.finish()

    lim = top.section("limits")
    limits = LimitsConfig(
        max_body_mib=lim.number("max_body_mib", 512, positive=True),
        client_stall_timeout_s=lim.number("client_stall_timeout_s", 60.0, positive=True),
    )
    lim.finish()

    consumers = _parse_consumers(top.section("consumers"))
    routes = _parse_routes(top.section("routes"), consumers)
    admin_token = top.string("admin_token", "") if top.has("admin_token") else None
    shutdown_grace_s = top.number("shutdown_grace_s", 30.0)
    top.finish()
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
        shutdown_grace_s=shutdown_grace_s,
    )


def _parse_priority(sec: _Section) -> Mapping[str, int]:
    priority = {}
    for kind in list(sec.raw):
        if kind not in KINDS:
            sec.fail(str(kind), f"unknown kind (known: {', '.join(KINDS)})")
        value = sec.get(kind)
        if isinstance(value, bool) or not isinstance(value, int):
            sec.fail(kind, f"must be an integer, got {_type_name(value)} {value!r}")
        priority[kind] = value
    sec.finish()
    return MappingProxyType(priority)


def _parse_consumers(sec: _Section) -> dict[str, ConsumerConfig]:
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


def _parse_consumer(sec: _Section, name: str) -> ConsumerConfig:
    from gpumgr.drivers import DRIVER_NAMES, get_driver  # drivers import this module

    url = sec.string("url", None)
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError for a bad port
    except ValueError as e:
        sec.fail("url", f"is not a valid URL ({e}): {url!r}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        sec.fail("url", f"must be an http:// or https:// URL with a host, got {url!r}")
    if parts.query or parts.fragment:
        sec.fail("url", "must not carry a query or fragment")
    del port

    driver = get_driver(sec.string("driver", "http", choices=DRIVER_NAMES))

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

    if driver.default_health is None and not sec.has("health"):
        sec.fail("health", f"is required (driver {driver.name} has no default health route)")
    load = _parse_call(sec, "load") if sec.has("load") else driver.default_load
    unload = _parse_call(sec, "unload") if sec.has("unload") else driver.default_unload
    process = _parse_process(sec)
    consumer = ConsumerConfig(
        name=name,
        url=url.rstrip("/"),
        health_path=sec.path_value("health", driver.default_health),
        paths=MappingProxyType(paths),
        vram_resident_mib=sec.number("vram_resident_mib", 0, integer=True),
        can_coexist_with=coexist,
        load=load,
        unload=unload,
        connect_timeout_s=sec.number("connect_timeout_s", 5.0, positive=True),
        request_timeout_s=sec.number("request_timeout_s", 600.0, positive=True),
        body_idle_timeout_s=sec.number("body_idle_timeout_s", 300.0, positive=True),
        gpu_process=_parse_regex(sec, "gpu_process"),
        idle_unload_s=sec.number("idle_unload_s", None, positive=True)
        if sec.has("idle_unload_s") else None,
        preload=_parse_bool(sec, "preload", False),
        process=process,
        driver=driver.name,
        can_unload=process is not None or unload is not None or driver.native_unload,
        can_load=process is not None or load is not None,
        passthrough=_parse_bool(sec, "passthrough", False),
        scheduled=_parse_scheduled(sec),
        job_timeout_s=sec.number("job_timeout_s", 1800.0, positive=True),
    )
    sec.finish()
    if consumer.idle_unload_s is not None and not consumer.can_unload:
        sec.fail("idle_unload_s", "needs a way to unload (an unload route or a process)")
    if consumer.preload and not consumer.can_load:
        sec.fail("preload", "needs a way to load (a load route or a process)")
    return consumer


def _parse_scheduled(sec: _Section) -> tuple[ScheduledRoute, ...]:
    raw = sec.get("scheduled")
    if raw is None:
        return ()
    if not isinstance(raw, list):
        sec.fail("scheduled", f"must be a list of 'METHOD /path-prefix', got {_type_name(raw)}")
    routes = []
    for i, item in enumerate(raw):
        method, _, prefix = item.partition(" ") if isinstance(item, str) else ("", "", "")
        if method not in HTTP_METHODS or not prefix.startswith("/") or " " in prefix:
            sec.fail(f"scheduled[{i}]", f"must be 'METHOD /path-prefix' with METHOD one of "
                     f"{', '.join(HTTP_METHODS)}; got {item!r}")
        routes.append(ScheduledRoute(method, prefix))
    return tuple(routes)


def _parse_process(parent: _Section) -> ProcessConfig | None:
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
                 f"got {_type_name(command)} {command!r}")
    env_sec = sec.section("env")
    env: dict[str, str] = {}
    for key in list(env_sec.raw):
        value = env_sec.get(key)
        if not isinstance(key, str) or not key or "=" in key:
            env_sec.fail(str(key), "environment variable names must be non-empty, without '='")
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            env_sec.fail(key, f"must be a string, got {_type_name(value)} {value!r}")
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


def _parse_regex(sec: _Section, key: str) -> re.Pattern[str] | None:
    if not sec.has(key):
        return None
    text = sec.string(key, None)
    try:
        return re.compile(text)
    except re.error as e:
        sec.fail(key, f"is not a valid regular expression: {e}")
        raise  # unreachable: fail() raises


def _parse_bool(sec: _Section, key: str, default: bool) -> bool:
    value = sec.get(key)
    if not sec.has(key):
        return default
    if not isinstance(value, bool):
        sec.fail(key, f"must be true or false, got {_type_name(value)} {value!r}")
    return value


def _parse_call(parent: _Section, key: str) -> HttpCall | None:
    if parent.raw.get(key) is None:
        parent.get(key)
        return None
    sec = parent.section(key)
    body = sec.get("body")
    if body is None:
        body = ""
    if not isinstance(body, str):
        sec.fail("body", f"must be a string (write JSON in quotes), got {_type_name(body)}")
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


def _parse_routes(sec: _Section, consumers: Mapping[str, ConsumerConfig]) -> dict[str, str]:
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
