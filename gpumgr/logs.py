"""Log output for operators: JSON lines for journald and Loki, and redaction.

twistd's own text format stays the default. `--log-format json` makes every
line one JSON object::

    {"time": "2026-11-23T07:19:02.950Z", "level": "info", "namespace": "gpumgr.admission",
     "message": "evicted ollama (pressure, 9000 MiB)", "name": "ollama", "mib": 9000}

Both formats pass through a `Redactor`: known secrets (the admin token) and
the value of any `Authorization` header are replaced before a line is written.

twistd picks its log observer *after* `makeService` returns, and takes it from
the Application's `ILogObserver` component when one is set (the hook a `.tac`
file uses). A plugin never sees the Application, except as the parent passed to
`setServiceParent`; `TwistdLogging` sets the component there.
"""

from __future__ import annotations

import datetime
import json
import math
import re
import signal
import sys
from typing import IO, Any, Callable, Iterable, Mapping, cast

from twisted.application.service import IService, MultiService
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
    timeFormatRFC3339,
)
from twisted.python.components import Componentized
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile

LOG_FORMATS = ("text", "json")
REDACTED = "[REDACTED]"

#: Keys of a JSON line that an event's own fields never overwrite.
_CORE_KEYS = frozenset({"time", "level", "namespace", "message", "system", "traceback"})
#: What a twisted.python.log event carries besides its message.
_LEGACY_KEYS = frozenset({"isError", "message", "format", "why", "failure", "logLevel", "printed"})
#: Field names whose values are secret whatever they hold.
_SECRET_FIELD_RE = re.compile(r"(?i)^(authorization|proxy-authorization|admin_token|token)$")
#: `Authorization: Bearer x`, `b'authorization': [b'Bearer x']`, `authorization=x`, ...
_AUTH_HEADER_RE = re.compile(
    r"""(?ix)
    (\b(?:proxy-)?authorization\b ["']? \s* [:=,] \s* \[? \s* (?:b?["'])?)  # name, separator, quote
    ((?:bearer|basic|token|digest)\s+)?                                   # an optional scheme
    (?!(?:bearer|basic|token|digest)\s|\[REDACTED\])[^\s"',\])&;]+          # the credential
    """
)
_BEARER_RE = re.compile(r"(?i)\b(bearer\s+)(?!\[REDACTED\])[^\s\"',\])&;]+")


class Redactor:
    """Removes secrets from log text: known ones, and any Authorization value.

    Secrets can be added later (a config reload may bring a new admin token);
    an old one stays redacted, as it may still show up in a client's request.
    """

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        self._secrets: list[str] = []
        for secret in secrets:
            self.add(secret)

    def add(self, secret: str | None) -> None:
        if secret and secret not in self._secrets:
            self._secrets.append(secret)
            # Longest first, so a secret that contains another is removed whole.
            self._secrets.sort(key=len, reverse=True)

    def text(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        text = _AUTH_HEADER_RE.sub(lambda m: f"{m.group(1)}{m.group(2) or ''}{REDACTED}", text)
        return _BEARER_RE.sub(lambda m: f"{m.group(1)}{REDACTED}", text)

    def field(self, name: str, value: Any) -> Any:
        if _SECRET_FIELD_RE.match(name) and value is not None:
            return REDACTED
        return self.text(value) if isinstance(value, str) else value


def _iso_utc(ts: float | None) -> str | None:
    if ts is None:
        return None
    moment = datetime.datetime.fromtimestamp(ts, tz=datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _simple(value: Any) -> bool:
    """JSON scalars only: an object's repr is noise in a log index."""
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or isinstance(value, (str, int, bool))


def json_record(event: LogEvent, redactor: Redactor | None = None) -> dict[str, Any]:
    """The JSON object for one event (pure; the observer writes it)."""
    redactor = redactor or Redactor()
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": _iso_utc(event.get("log_time")),
        "level": getattr(level, "name", None),
        "namespace": event.get("log_namespace"),
        "message": redactor.text(formatEvent(event)),
    }
    system = event.get("log_system")
    if isinstance(system, str) and system != "-":
        record["system"] = system
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        record["traceback"] = redactor.text(failure.getTraceback())
    legacy = "isError" in event  # from twisted.python.log: its keys are bookkeeping
    for key, value in event.items():
        if not isinstance(key, str) or key.startswith("log_") or key in _CORE_KEYS:
            continue
        if legacy and key in _LEGACY_KEYS:
            continue
        if _simple(value):
            record[key] = redactor.field(key, value)
    return record


def json_line(event: LogEvent, redactor: Redactor | None = None) -> str:
    return json.dumps(json_record(event, redactor), ensure_ascii=False) + "\n"


def json_file_observer(out: IO[Any], redactor: Redactor | None = None) -> FileLogObserver:
    """One JSON object per line on `out`."""
    return FileLogObserver(out, lambda event: json_line(event, redactor))


def text_file_observer(out: IO[Any], redactor: Redactor | None = None) -> FileLogObserver:
    """twistd's classic text lines, redacted."""
    redactor = redactor or Redactor()

    def format_text(event: LogEvent) -> str | None:
        text = formatEventAsClassicLogText(
            event, formatTime=lambda t: formatTime(t, timeFormatRFC3339))
        return None if text is None else redactor.text(text)

    return FileLogObserver(out, format_text)


def open_log_file(logfile: str | None, nodaemon: bool) -> IO[Any]:
    """Where twistd itself would log: stdout with -n or `-l -`, else a rotating file.

    The same rule as twistd's UnixAppLogger, SIGUSR1 rotation included; a daemon
    cannot log to stdout, which `twistd_logging_problem` refuses.
    """
    if logfile == "-" or (nodaemon and not logfile):
        return sys.stdout
    log_file: LogFile = LogFile.fromFullPath(logfile or "twistd.log")
    if not signal.getsignal(signal.SIGUSR1):
        from twisted.internet import reactor

        from_threads = cast(IReactorFromThreads, reactor)
        signal.signal(signal.SIGUSR1,
                      lambda _sig, _frame: from_threads.callFromThread(log_file.rotate))
    return cast(IO[Any], log_file)  # file-like enough for FileLogObserver, as in twistd


def make_observer(log_format: str, out: IO[Any], redactor: Redactor) -> FileLogObserver:
    if log_format == "json":
        return json_file_observer(out, redactor)
    return text_file_observer(out, redactor)


def twistd_logging_problem(twistd: Mapping[str, Any], log_format: str) -> str | None:
    """Why `--log-format` cannot work with these twistd options, or None (pure)."""
    if log_format not in LOG_FORMATS:
        return f"--log-format: must be one of {', '.join(LOG_FORMATS)}; got {log_format!r}"
    if twistd.get("logfile") == "-" and not twistd.get("nodaemon"):
        return "a daemon cannot log to stdout: add -n or give --logfile a path"
    if log_format == "json" and twistd.get("logger"):
        return "--log-format json and twistd --logger both choose the log observer; use one"
    if log_format == "json" and twistd.get("syslog"):
        return "--log-format json writes to stdout or --logfile, not to --syslog"
    return None


def with_twistd_logging(service: IService, twistd: Mapping[str, Any] | None, log_format: str,
                        redactor: Redactor) -> IService:
    """`service`, wrapped so that twistd logs in `log_format` through `redactor`.

    Not wrapped outside twistd (no options), or where twistd's own choice
    stands: an explicit `--logger`, or `--syslog` with the text format.
    """
    if twistd is None or twistd.get("logger") or twistd.get("syslog"):
        return service
    logfile, nodaemon = twistd.get("logfile"), bool(twistd.get("nodaemon"))
    return TwistdLogging(
        service, lambda: make_observer(log_format, open_log_file(logfile, nodaemon), redactor))


class TwistdLogging(MultiService):
    """Wraps the service twistd runs; hands twistd our observer via the Application.

    `make_observer` is called once, when twistd attaches this service to its
    Application, which is just before twistd starts logging; messages logged
    earlier (while making the service) are buffered by twistd and replayed.
    """

    def __init__(self, service: IService, make_observer: Callable[[], ILogObserver]) -> None:
        MultiService.__init__(self)  # super() would hide it from untyped_calls_exclude
        self._make_observer = make_observer
        self.wrapped = service
        service.setServiceParent(self)

    def setServiceParent(self, parent: Any) -> None:
        if isinstance(parent, Componentized) and parent.getComponent(ILogObserver) is None:
            parent.setComponent(ILogObserver, self._make_observer())
        MultiService.setServiceParent(self, parent)
