"""`gpumgr` (or `python -m gpumgr`): the operator's command line.

    gpumgr status [--url URL] [--json]      what the broker is doing now
    gpumgr check-config FILE                the startup validation, without starting
    gpumgr load NAME | unload NAME          admin calls, through the scheduler

Synchronous and standard-library only: it runs where the daemon runs, often
over ssh, and must not need the reactor. It talks to the broker directly
(proxy variables are ignored and redirects are not followed), so the admin
token goes to the broker and nowhere else; the token is never printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from typing import IO, Any, Callable, Mapping, NoReturn, Sequence
from urllib.parse import quote, urlsplit

DEFAULT_URL = "http://127.0.0.1:8770"
STATUS_TIMEOUT_S = 10.0
#: A load or unload waits in the scheduler's queue like any job.
ADMIN_TIMEOUT_S = 660.0
RECENT_EVENTS_SHOWN = 8


class CliError(Exception):
    """A one-line failure: printed as `gpumgr: <message>`, exit status 1."""


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that reports to our streams and never exits the process."""

    def __init__(self, *args: Any, out: IO[str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.out = out or sys.stdout

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{self.format_usage()}{self.prog}: error: {message}")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            self.out.write(message)
        raise SystemExit(status)

    def print_help(self, file: Any = None) -> None:
        super().print_help(file or self.out)


def _parser(out: IO[str]) -> _Parser:
    parser = _Parser(prog="gpumgr", description="Operate a running gpumgr broker.", out=out)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def with_url(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", help=f"broker base URL (env GPUMGR_URL; default {DEFAULT_URL})")

    status = sub.add_parser("status", help="show GPU, consumers, queue and recent events", out=out)
    with_url(status)
    status.add_argument("--json", action="store_true", help="print the raw /v1/status document")

    check = sub.add_parser("check-config", help="validate a config file as startup would",
                           out=out)
    check.add_argument("file")

    for action in ("load", "unload"):
        p = sub.add_parser(action, help=f"{action} a consumer through the scheduler (admin)",
                           out=out)
        p.add_argument("name")
        with_url(p)
        p.add_argument("--token", help="admin bearer token (env GPUMGR_ADMIN_TOKEN)")
    return parser


def main(
    argv: Sequence[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
) -> int:
    """Run one command; returns the exit status (0 ok, 1 failed, 2 usage)."""
    env = os.environ if env is None else env
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    try:
        args = _parser(out).parse_args(argv)
    except _UsageError as e:
        err.write(f"{e}\n")
        return 2
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    try:
        if args.command == "status":
            return _status(_base_url(args, env), args.json, out)
        if args.command == "check-config":
            return _check_config(args.file, out, err)
        token = args.token or env.get("GPUMGR_ADMIN_TOKEN") or None
        return _admin(_base_url(args, env), args.command, args.name, token, out)
    except CliError as e:
        err.write(f"gpumgr: {e}\n")
        return 1


def _base_url(args: argparse.Namespace, env: Mapping[str, str]) -> str:
    given = args.url or env.get("GPUMGR_URL") or DEFAULT_URL
    parts = urlsplit(given)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CliError(f"the broker URL must be http:// or https:// with a host, got {given!r}")
    return given.rstrip("/")


# HTTP -------------------------------------------------------------------------


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect would carry the admin token to another place: refuse it."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects())


def _request(method: str, url: str, timeout_s: float,
             token: str | None = None) -> tuple[int, bytes]:
    """(status, body) for any HTTP answer; CliError when there is none."""
    headers = {"Accept": "application/json", "User-Agent": "gpumgr-cli"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = b"" if method == "POST" else None
    if data is not None:
        # urllib would call an empty POST form-encoded; admin routes take JSON only.
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with _opener.open(req, timeout=timeout_s) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read()
    except urllib.error.URLError as e:
        raise CliError(f"cannot reach the broker at {url}: {e.reason}") from None
    except (OSError, ValueError) as e:  # timeouts, resets, a malformed URL
        raise CliError(f"cannot reach the broker at {url}: {e}") from None


def _error_text(code: int, body: bytes) -> str:
    """`code: message` from the JSON error contract, or the start of the body."""
    try:
        error = json.loads(body)["error"]
        return f"{code} {error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        text = body.decode("utf-8", "replace").strip().replace("\n", " ")
        return f"{code}: {text[:200]}" if text else str(code)


def _json_body(url: str, body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        raise CliError(f"{url} did not answer JSON") from None


# Commands -----------------------------------------------------------------------


def _status(base_url: str, raw: bool, out: IO[str]) -> int:
    url = base_url + "/v1/status"
    code, body = _request("GET", url, STATUS_TIMEOUT_S)
    if code != 200:
        raise CliError(f"GET {url} answered {_error_text(code, body)}")
    doc = _json_body(url, body)
    if not isinstance(doc, dict):
        raise CliError(f"{url} answered JSON that is not a status document")
    if raw:
        out.write(body.decode("utf-8"))
        out.write("\n")
    else:
        out.write(format_status(doc, base_url))
    return 0


def _check_config(path: str, out: IO[str], err: IO[str]) -> int:
    # Exactly what `twistd gpumgr --config FILE` checks, with its messages.
    # Imported here, not above: the other commands stay standard-library only.
    from twisted.python.usage import UsageError

    from gpumgr.tap import Options

    # usage.Options is untyped: these typed handles keep the calls checked.
    new_options: Callable[[], Options] = Options
    options = new_options()
    parse_options: Callable[[list[str]], None] = options.parseOptions
    try:
        parse_options(["--config", path])
    except UsageError as e:
        err.write(f"{e}\n")
        return 1
    except Exception as e:  # never a traceback for an operator
        err.write(f"config error: {path}: could not be checked: {type(e).__name__}: {e}\n")
        return 1
    config = options["parsed_config"]
    # Startup leaves these to the first start (a server may be installed later);
    # an operator checking a config wants to hear of them now.
    from gpumgr.config import ConfigError
    from gpumgr.process import spawn_problems

    problems = [ConfigError(config.source, f"consumers.{name}.process.{key}", problem)
                for name, c in config.consumers.items() if c.process is not None
                for key, problem in spawn_problems(c.process, os.environ)]
    for problem in problems:
        err.write(f"config error: {problem}\n")
    if problems:
        return 1
    out.write(f"OK: {path} ({len(config.consumers)} consumers, mode {config.scheduler.mode.value})\n")
    return 0


def _admin(base_url: str, action: str, name: str, token: str | None, out: IO[str]) -> int:
    url = f"{base_url}/v1/consumers/{quote(name, safe='')}/{action}"
    code, body = _request("POST", url, ADMIN_TIMEOUT_S, token)
    if code != 200:
        raise CliError(f"{action} {name}: {_error_text(code, body)}")
    result = _json_body(url, body)
    result = result if isinstance(result, dict) else {}
    loaded = result.get("loaded")
    state = {True: "loaded", False: "unloaded", None: "state unknown"}.get(loaded, str(loaded))
    mib = result.get("gpu_resident_mib")
    resident = f", {mib} MiB resident" if mib else ""
    out.write(f"{name}: {action} done: {state}{resident}\n")
    return 0


# Rendering (pure) ---------------------------------------------------------------


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _num(value: Any) -> float | None:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _mib(value: Any) -> str:
    n = _num(value)
    return "-" if n is None else f"{n:,.0f} MiB"


def _seconds(value: Any) -> str:
    s = _num(value)
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.1f}s"
    minutes, sec = divmod(int(s), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {sec:02d}s"


def _clock(iso: Any) -> str:
    """HH:MM:SS of an ISO timestamp (UTC), or '-'."""
    return iso[11:19] if isinstance(iso, str) and len(iso) >= 19 else "-"


def _text(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return lines


def _process_text(process: Any) -> str:
    if not isinstance(process, dict):
        return "-"
    parts = [_text(process.get("state"))]
    alive = process.get("state") in ("starting", "running", "stopping")
    if process.get("pid") is not None and alive:
        parts.append(f"pid {process['pid']}")
    if process.get("exit_code") is not None and process.get("state") in ("stopped", "failed"):
        parts.append(f"exit {process['exit_code']}")
    if _num(process.get("restarts")):
        parts.append(f"{process['restarts']} restarts")
    return " ".join(parts)


def _renders_text(renders: Any) -> str:
    items = [r for r in _list(renders) if isinstance(r, dict)]
    if not items:
        return "-"
    first = items[0]
    text = f"{_text(first.get('prompt_id'))} {_seconds(first.get('held_s'))}"
    return text + (f" +{len(items) - 1}" if len(items) > 1 else "")


def _by_card(table: list[str], consumers: list[Any], gpus: list[dict[str, Any]]) -> list[str]:
    """The consumer table split by the cards each consumer lives on (one on
    several cards under each); its columns stay aligned across the groups."""
    header, rows = table[0], table[1:]
    cards = [_list(_dict(c).get("gpu")) for c in consumers]
    lines: list[str] = []
    for g in gpus:
        lines += [f"card {g.get('index', '?')} ({_text(g.get('name'))}):", "  " + header]
        lines += ["  " + r for r, on in zip(rows, cards) if g.get("index") in on]
    unplaced = [r for r, on in zip(rows, cards) if not on]
    if unplaced:
        lines += ["not placed yet (gpu: auto):", "  " + header] + ["  " + r for r in unplaced]
    return lines


def format_status(doc: Mapping[str, Any], base_url: str = "") -> str:
    """The readable status: tolerant of any field an older broker lacks."""
    lines: list[str] = []
    broker = _dict(doc.get("broker"))
    gpu = _dict(doc.get("gpu"))
    consumers = _dict(doc.get("consumers"))
    sched = _dict(doc.get("scheduler"))

    head = f"gpumgr {broker.get('version', '?')}"
    if base_url:
        head += f" at {base_url}"
    head += f"  mode {_text(broker.get('mode') or sched.get('mode'))}"
    head += f"  up {_seconds(broker.get('uptime_s'))}"
    lines.append(head)
    if broker.get("config_loaded_at"):
        lines.append(f"config loaded {broker['config_loaded_at']}")
    if broker.get("last_reload_error"):
        lines.append(f"LAST CONFIG RELOAD FAILED: {broker['last_reload_error']}")

    lines.append("")
    attributed = sum(_num(c.get("gpu_resident_mib")) or 0 for c in consumers.values()
                     if isinstance(c, dict) and c.get("loaded") is not False)
    gpus = [g for g in _list(gpu.get("gpus")) if isinstance(g, dict)]
    if gpu.get("available") is False or not gpus:
        lines.append(f"GPU: unavailable ({_text(gpu.get('error'))})")
    for g in gpus:
        used, total = _num(g.get("memory_used_mib")), _num(g.get("memory_total_mib"))
        pct = f" ({used / total:.0%})" if used is not None and total else ""
        line = (f"GPU {g.get('index', '?')} {_text(g.get('name'))}: "
                f"{_mib(used)} of {_mib(total)} used{pct}")
        if _num(g.get("utilization_pct")) is not None:
            line += f", {g['utilization_pct']}% busy"
        if _num(g.get("temperature_c")) is not None:
            line += f", {g['temperature_c']} °C"
        lines.append(line)
    if gpus:
        used_all = sum(_num(g.get("memory_used_mib")) or 0 for g in gpus)
        extra = f"  headroom kept {_mib(gpu['headroom_mib'])}" if "headroom_mib" in gpu else ""
        lines.append(f"  consumers {_mib(attributed)}, other {_mib(max(0, used_all - attributed))}"
                     + extra)

    balancer = _dict(broker.get("balancer"))
    if balancer.get("box") or balancer.get("phase", "serving") != "serving":
        not_ready = [k for k, r in _dict(balancer.get("kinds")).items()
                     if _dict(r).get("ready") is False]
        lines.append(f"balancer: box {_text(balancer.get('box'))}, {_text(balancer.get('phase'))}"
                     + (f" (not ready: {', '.join(not_ready)})" if not_ready else ""))

    lines.append("")
    rows: list[list[str]] = []
    for name, c in consumers.items():
        c = _dict(c)
        loaded = "yes" if c.get("loaded") is True else "no" if c.get("loaded") is False else "?"
        errors = _num(c.get("errors"))
        requests = _text(c.get("total_requests")) + (f" ({errors:.0f} err)" if errors else "")
        rows.append([
            str(name), _text(c.get("driver")), _text(c.get("health")), loaded,
            _process_text(c.get("process")), _text(c.get("active")), requests,
            _mib(c.get("gpu_resident_mib")) if c.get("loaded") is not False else "-",
            _renders_text(c.get("renders")),
        ])
    if rows:
        table = _table(["CONSUMER", "DRIVER", "HEALTH", "LOADED", "PROCESS", "ACTIVE", "TOTAL",
                        "RESIDENT", "RENDER"], rows)
        lines += table if len(gpus) < 2 else _by_card(table, list(consumers.values()), gpus)
        for name, c in consumers.items():
            c = _dict(c)
            if c.get("health") == "down" and c.get("last_error"):
                lines.append(f"  {name}: {c['last_error']}")
    else:
        lines.append("no consumers")

    lines.append("")
    by_kind = _dict(sched.get("queued_by_kind"))
    kinds = ", ".join(f"{k} {v}" for k, v in by_kind.items() if v)
    queue = f"queue {_text(sched.get('queue_depth'))}" + (f" ({kinds})" if kinds else "")
    lines.append(f"scheduler: {queue}, in flight {_text(sched.get('in_flight'))}"
                 f", jobs {_text(sched.get('total_jobs'))}, rejected {_text(sched.get('rejected'))}"
                 f", evictions {_text(sched.get('evictions'))}"
                 f" ({_text(sched.get('eviction_failures'))} failed)"
                 f", OOM retries {_text(sched.get('oom_retries'))}")
    for h in _list(sched.get("holders")):
        h = _dict(h)
        held = _num(h.get("held_ms"))
        render = f", render {h['render']}" if h.get("render") else ""
        draining = ", draining after the client left" \
            if h.get("state") == "draining after the client left" else ""
        lines.append(f"  holding the GPU: {_text(h.get('consumer'))} ({_text(h.get('kind'))})"
                     f" for {_seconds(None if held is None else held / 1000)}{render}{draining}")

    events = [e for e in _list(sched.get("recent_events")) if isinstance(e, dict)]
    if events:
        lines.append("")
        lines.append("recent events (times UTC):")
        rows = []
        for e in events[-RECENT_EVENTS_SHOWN:]:
            mib = _num(e.get("mib"))
            rows.append([_clock(e.get("at")), _text(e.get("event")), _text(e.get("consumer")),
                         _text(e.get("reason")), "" if mib is None else _mib(mib),
                         "" if e.get("detail") is None else str(e["detail"])])
        lines += ["  " + line for line in _table(["AT", "EVENT", "CONSUMER", "REASON", "MIB",
                                                   "DETAIL"], rows)]
    return "\n".join(lines) + "\n"
