"""Config schema: parsed once into frozen values; every error names file and key path.

The rest of gpumgr never touches raw YAML. `load_config(path)` either returns a
`Config` or raises `ConfigError("file: key.path: what is wrong")`.
"""

from __future__ import annotations

import hashlib

import ipaddress
import os
import re
import shlex
import socket
import stat
from types import MappingProxyType
from typing import Any, Mapping, NoReturn
from urllib.parse import urlsplit

import attrs

from gpumgr import yaml_strict
from gpumgr.errors import BadPath
from gpumgr.states import SchedulerMode
from gpumgr.target import parse_target

KINDS = ("tts", "stt", "llm", "image")
AUDIO_ROUTE = "audio_proxy"
ROUTE_KEYS = KINDS + (AUDIO_ROUTE,)
SCHEDULER_MODES = tuple(m.value for m in SchedulerMode)
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
class ProcessNameMatcher:
    """`gpu_process`: which nvidia-smi process names are a consumer's.

    A restricted regular expression, matched without backtracking: literal
    text, `.*` between parts, `^` and `$` anchors, `|` between alternatives.
    `search` agrees with `re.search` on that subset, in time linear in the
    name, whereas a full regex such as `(a+)+$` cost 2-3 s per sample.
    """

    text: str
    #: Per alternative: (anchored at the start, the parts in order, anchored at the end).
    alternatives: tuple[tuple[bool, tuple[str, ...], bool], ...]

    def search(self, name: str) -> bool:
        return any(_parts_match(name, *alternative) for alternative in self.alternatives)


def _parts_match(name: str, at_start: bool, parts: tuple[str, ...], at_end: bool) -> bool:
    """Whether `parts` occur in `name` in order, honouring the anchors (pure, linear).

    Taking each part at its leftmost occurrence after the previous one is
    never wrong: an earlier end leaves more room for the rest.
    """
    pos = 0
    last = len(parts) - 1
    for i, part in enumerate(parts):
        if i == last and at_end:
            return name.endswith(part) and len(name) - len(part) >= pos and (
                not (i == 0 and at_start) or name == part)
        if i == 0 and at_start:
            if not name.startswith(part):
                return False
            pos = len(part)
            continue
        found = name.find(part, pos)
        if found < 0:
            return False
        pos = found + len(part)
    return True


_PROCESS_PATTERN_HELP = (
    "only a restricted regular expression is accepted, matched in linear time: text "
    "(a \\ before punctuation makes it literal), .* between parts, ^ and $ anchors, "
    "| between alternatives")


def parse_process_pattern(text: str) -> ProcessNameMatcher:
    """Parse a `gpu_process` pattern; ValueError says which character is refused (pure)."""
    alternatives = []
    i, n = 0, len(text)
    at_start, at_end = False, False
    parts: list[str] = []
    current: list[str] = []
    while True:
        ch = text[i] if i < n else "|"
        if i == n or ch == "|":
            parts.append("".join(current))
            alternatives.append((at_start, tuple(parts), at_end))
            if i >= n:
                break
            at_start, parts, current, at_end = False, [], [], False
            i += 1
            continue
        if at_end:
            raise ValueError(f"'$' at position {i - 1} must end its alternative; "
                             + _PROCESS_PATTERN_HELP)
        if ch == "\\":
            if i + 1 >= n or text[i + 1].isalnum() or text[i + 1] == "_":
                raise ValueError(f"{text[i:i + 2]!r} at position {i}: " + _PROCESS_PATTERN_HELP)
            current.append(text[i + 1])
            i += 2
            continue
        if ch == "^" and not parts and not current and not at_start:
            at_start = True
        elif ch == "$":
            at_end = True
        elif ch == "." and text[i + 1:i + 2] == "*":
            parts.append("".join(current))
            current = []
            i += 1
        elif ch in ".*+?()[]{}^":
            raise ValueError(f"{ch!r} at position {i}: " + _PROCESS_PATTERN_HELP)
        else:
            current.append(ch)
        i += 1
    return ProcessNameMatcher(text, tuple(alternatives))


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
    #: Which nvidia-smi process names are this consumer's; when set, residency is measured.
    gpu_process: ProcessNameMatcher | None = None
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
    #: After its client left, how long a job holds the GPU at most waiting for
    #: evidence that the service stopped (gpumgr.abandoned); 0: not at all.
    abandoned_grace_s: float = 30.0
    #: After a render's interrupt, how long gpumgr waits for evidence that it
    #: stopped before it stops the owned process (or, with none, reports it stuck).
    render_stop_grace_s: float = 30.0

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
    #: A consumer down this long (failed probes; a frozen process) has the jobs
    #: holding the GPU for it aborted, and a process gpumgr owns stopped.
    down_grace_s: float = 10.0


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
    mode: SchedulerMode = SchedulerMode.PASSTHROUGH
    capacity: int = 1
    max_queue: int = 64
    queue_timeout_s: float = 600.0
    #: kind -> priority; higher runs first. Kinds not listed get 0.
    priority: Mapping[str, int] = attrs.field(factory=lambda: MappingProxyType({}))
    aging_s: float = 30.0
    max_overtakes: int = 4


@attrs.frozen
class LimitsConfig:
    """What one client, or all of them together, may hold of gpumgr.

    Connections, file descriptors, spool disk and time: each is bounded so
    that slow or hostile clients cannot starve `/healthz` or everyone else.
    """

    max_body_mib: float = 512
    client_stall_timeout_s: float = 60.0
    #: The whole request head (request line and headers) must arrive within this.
    header_timeout_s: float = 10.0
    #: A connection idle between requests is closed after this.
    keepalive_timeout_s: float = 60.0
    #: No request-body byte for this long: 408 and close.
    body_idle_timeout_s: float = 30.0
    #: A body must average this much once the grace period is over; 0 turns it off.
    min_body_rate_kib_s: float = 1.0
    min_body_rate_grace_s: float = 10.0
    #: Client connections held at once; keep well below the file-descriptor limit.
    max_connections: int = 1024
    #: Request bodies buffered at once, across all connections (memory and temp files).
    max_spool_mib: float = 2048
    max_request_line_bytes: int = 8192
    #: Bytes of all header lines together, and how many lines.
    max_header_bytes: int = 16384
    max_headers: int = 100
    #: Of max_connections, kept for /healthz, /v1/status, /metrics and admin
    #: (at most half of them): tunnels and uploads never take these.
    reserved_connections: int = 16
    #: WebSocket tunnels open at once; more get 503.
    max_tunnels: int = 256
    #: A tunnel that carries no byte either way for this long is closed.
    tunnel_idle_timeout_s: float = 3600.0
    #: A whole request body must arrive within this, whatever its rate.
    max_upload_s: float = 900.0

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mib * 1024 * 1024)

    @property
    def max_spool_bytes(self) -> int:
        return int(self.max_spool_mib * 1024 * 1024)

    @property
    def min_body_rate_bytes_s(self) -> float:
        return self.min_body_rate_kib_s * 1024


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
    #: Host names (lower case, no port) besides loopback addresses and
    #: localhost under which admin and control routes answer.
    allowed_hosts: frozenset[str] = frozenset()
    #: On SIGTERM, how long running jobs may finish before they are aborted.
    shutdown_grace_s: float = 30.0
    #: SHA-256 of the file text this config was parsed from ("" if built in code).
    sha256: str = ""

    def consumer_for(self, route: str) -> ConsumerConfig | None:
        name = self.routes.get(route)
        return None if name is None else self.consumers[name]


DEFAULT_LISTEN = "tcp:8770:interface=127.0.0.1"


@attrs.frozen
class ListenAddress:
    """Where a tcp/tcp6 listen endpoint accepts connections."""

    port: int
    #: "" (tcp) or "::" (tcp6) for every interface.
    interface: str
    ipv6: bool


def _split_endpoint(description: str) -> list[str]:
    """Split a Twisted endpoint description on unescaped ':' (as serverFromString does)."""
    parts, current, escaped = [], [], False
    for ch in description:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def listen_address(description: str) -> ListenAddress | None:
    """The port and interface of a tcp or tcp6 endpoint; None for other kinds (pure).

    Raises ValueError when a tcp port is not a number from 0 to 65535.
    """
    kind, *args = _split_endpoint(description)
    if kind not in ("tcp", "tcp6"):
        return None
    positional = [a for a in args if "=" not in a]
    named = dict(a.split("=", 1) for a in args if "=" in a)
    port_text = named.get("port", positional[0] if positional else None)
    if port_text is None:
        raise ValueError("has no port")
    if not port_text.strip().isdigit() or int(port_text) > 65535:
        raise ValueError(f"port must be a number from 0 to 65535, got {port_text!r}")
    default_interface = "::" if kind == "tcp6" else ""
    interface = named.get("interface", positional[1] if len(positional) > 1 else default_interface)
    return ListenAddress(port=int(port_text), interface=interface, ipv6=kind == "tcp6")


def listen_problem(description: str) -> str | None:
    """What is wrong with a listen endpoint that can be told without a reactor (pure)."""
    try:
        listen_address(description)
    except ValueError as e:
        return f"invalid endpoint {description!r}: {e}"
    return None


#: What inet_aton may read as an IPv4 address: 1 to 4 parts, decimal, octal
#: (leading 0) or hex (0x). Checked first, since inet_aton ignores anything
#: after a space.
_LEGACY_IPV4_RE = re.compile(r"\A(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}\Z", re.I)


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a literal host names, as the resolver reads it; None for a name (pure).

    getaddrinfo takes every inet_aton spelling of IPv4 (`2130706433`,
    `127.1`, `0x7f.1`, `0177.0.0.1`, `0`), so they are normalised the same
    way; an IPv4-mapped IPv6 address is its IPv4 address.
    """
    text = host.strip("[]").split("%", 1)[0]
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(text)
    except ValueError:
        if not _LEGACY_IPV4_RE.match(text):
            return None
        try:
            address = ipaddress.IPv4Address(socket.inet_aton(text))
        except OSError:
            return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def url_reaches_listener(url: str, listen: ListenAddress) -> bool:
    """Whether a consumer URL would connect back to gpumgr's own listener (pure).

    Only what can be told without DNS: a loopback, unspecified or `localhost`
    host against an every-interface listener, or the listener's own address.
    """
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return False
    if listen.port == 0 or port != listen.port or parts.hostname is None:
        return False
    host = parts.hostname.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        candidates = [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    else:
        address = _ip(host)
        if address is None:
            return False  # a name: resolving it here would make loading depend on DNS
        candidates = [address]
    interface = _ip(listen.interface) if listen.interface else None
    if listen.interface == "" or (interface is not None and interface.is_unspecified):
        # tcp6 on "::" is dual-stack: it takes IPv4 connections too.
        families = (4, 6) if listen.ipv6 else (4,)
        return any(a.version in families and (a.is_loopback or a.is_unspecified)
                   for a in candidates)
    if interface is None:
        return host == listen.interface.lower().rstrip(".")
    # Connecting to 0.0.0.0 or :: reaches the local host on any address.
    return any(a == interface or (a.is_unspecified and a.version == interface.version)
               for a in candidates)


def find_self_reference(listen: str, consumers: Mapping[str, ConsumerConfig]) -> str | None:
    """The first consumer whose URL is gpumgr's own listen address, if any (pure)."""
    try:
        address = listen_address(listen)
    except ValueError:
        return None
    if address is None:
        return None
    for name, consumer in consumers.items():
        if url_reaches_listener(consumer.url, address):
            return name
    return None


def load_config(path: str, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate a YAML config file.

    `environ` (default: os.environ) is where `admin_token_env` is looked up.
    """
    return parse_config_text(read_config_file(path), path, environ)


def read_config_file(path: str) -> bytes:
    """The bytes of a config file, read only if it is a regular file.

    Opened non-blocking and checked with fstat before any read: a FIFO, a
    terminal or a device as the config path would otherwise block the
    caller (the reactor, on a reload) until someone writes to it, or never
    end (/dev/zero). Reading at most one byte past the size limit is enough
    for yaml_strict to refuse an oversized file.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | \
        getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise ConfigError(path, "", f"cannot read: {e.strerror or e}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ConfigError(path, "", f"is not a regular file ({_file_kind(mode)}); "
                              "gpumgr reads its config only from a regular file")
        chunks, size = [], 0
        while size <= yaml_strict.MAX_CONFIG_BYTES:
            chunk = os.read(fd, yaml_strict.MAX_CONFIG_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    except OSError as e:
        raise ConfigError(path, "", f"cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a plain file"


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

    def fail(self, key: str, problem: str) -> NoReturn:
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
        maximum: float | None = None,
    ) -> Any:
        value = self._present(key, default, "a number")
        if key not in self.raw:
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
        if maximum is not None and value > maximum:
            self.fail(key, f"must be at most {maximum:g}, got {value!r}")
        return value

    def string(self, key: str, default: str | None, *, choices: tuple[str, ...] = ()) -> Any:
        value = self._present(key, default, "a string")
        if key not in self.raw:  # not `value is default`: YAML's "" *is* the interned ""
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
        if value is not None:
            try:
                parse_target(value.encode("utf-8"))
            except BadPath as e:
                self.fail(key, f"{e.message}; got {value!r}")
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


def parse_config(raw: Any, source: str, environ: Mapping[str, str] | None = None) -> Config:
    """Validate an already-loaded YAML document."""
    top = _Section(source, "", raw)
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
    )
    g.finish()

    s = top.section("scheduler")
    scheduler = SchedulerConfig(
        mode=SchedulerMode(s.string("mode", "passthrough", choices=SCHEDULER_MODES)),
        capacity=s.number("capacity", 1, integer=True, positive=True),
        max_queue=s.number("max_queue", 64, integer=True),
        queue_timeout_s=s.number("queue_timeout_s", 600.0, positive=True),
        priority=_parse_priority(s.section("priority")),
        aging_s=s.number("aging_s", 30.0, positive=True),
        max_overtakes=s.number("max_overtakes", 4, integer=True),
    )
    s.finish()

    limits = _parse_limits(top.section("limits"))

    consumers = _parse_consumers(top.section("consumers"))
    routes = _parse_routes(top.section("routes"), consumers)
    admin_token = _parse_admin_token(top, os.environ if environ is None else environ)
    allowed_hosts = _parse_allowed_hosts(top)
    shutdown_grace_s = top.number("shutdown_grace_s", 30.0)
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
    )


#: Bigger sizes than this (1 TiB) are typos, and overflow when turned into bytes.
_MAX_MIB = 1024 * 1024
#: A day: longer timeouts are typos, and huge ones overflow the reactor's timers.
_MAX_TIMEOUT_S = 86400.0


def _parse_limits(sec: _Section) -> LimitsConfig:
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


def _parse_allowed_hosts(top: _Section) -> frozenset[str]:
    """allowed_hosts: the names (or addresses) clients use to reach gpumgr
    when that is not loopback; no scheme, no port, no wildcard."""
    raw = top.get("allowed_hosts")
    if raw is None:
        return frozenset()
    if not isinstance(raw, list):
        top.fail("allowed_hosts", f"must be a list of host names, got {_type_name(raw)}")
    names = set()
    for i, item in enumerate(raw):
        key = f"allowed_hosts[{i}]"
        if not isinstance(item, str):
            top.fail(key, f"must be a host name, got {_type_name(item)}")
        name = item.strip().lower().rstrip(".")
        if name.startswith("[") and name.endswith("]"):
            name = name[1:-1]
        if _ip(name) is None and not _HOST_NAME.match(name):
            top.fail(key, f"must be a host name or an IP address without scheme or port, "
                          f"got {item!r}")
        names.add(name)
    return frozenset(names)


def _parse_admin_token(top: _Section, environ: Mapping[str, str]) -> str | None:
    """admin_token, or the variable admin_token_env names; never both, never empty."""
    token = top.get("admin_token")
    var = top.get("admin_token_env")
    if top.has("admin_token") and top.has("admin_token_env"):
        top.fail("admin_token_env", "set admin_token or admin_token_env, not both")
    if top.has("admin_token"):
        if not isinstance(token, str):
            top.fail("admin_token", f"must be a string, got {_type_name(token)}")
        problem = admin_token_problem(token)
        if problem is not None:
            top.fail("admin_token", problem)
        return token
    if not top.has("admin_token_env"):
        return None
    if not isinstance(var, str) or not _ENV_NAME_RE.match(var):
        top.fail("admin_token_env", "must name an environment variable "
                 f"(letters, digits and '_'), got {_type_name(var)} {var!r}")
    value = environ.get(var)
    if value is None:
        top.fail("admin_token_env", f"environment variable {var} is not set")
    problem = admin_token_problem(value)
    if problem is not None:
        top.fail("admin_token_env", f"environment variable {var} {problem}")
    return value


def _parse_command_line(sec: _Section, key: str, default: str) -> str:
    """A command line split like a shell would, checked now rather than at first use."""
    value = sec.string(key, default)
    try:
        argv = shlex.split(value)
    except ValueError as e:
        sec.fail(key, f"cannot be split into arguments: {e}")
    if not argv or not argv[0]:
        sec.fail(key, "must start with a program to run")
    return value


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
        _ = parts.hostname  # checks the contents of [...] too
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
        gpu_process=_parse_process_pattern(sec, "gpu_process"),
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
        abandoned_grace_s=sec.number("abandoned_grace_s", driver.abandoned_grace_s,
                                     maximum=3600.0),
        render_stop_grace_s=sec.number("render_stop_grace_s", 30.0, positive=True),
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


def _parse_process_pattern(sec: _Section, key: str) -> ProcessNameMatcher | None:
    if not sec.has(key):
        return None
    text = sec.string(key, None)
    try:
        return parse_process_pattern(text)
    except ValueError as e:
        sec.fail(key, str(e))


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
