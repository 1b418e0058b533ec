"""Log lines: JSON for journald and Loki, twistd's text by default, secrets redacted."""

from __future__ import annotations

import io
import json
import re

import pytest
from twisted.application import service
from twisted.logger import ILogObserver, Logger, textFileLogObserver
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.python.log import textFromEventDict
from twisted.logger._legacy import publishToNewObserver

from gpumgr.logs import (
    REDACTED,
    Redactor,
    TwistdLogging,
    json_file_observer,
    json_record,
    text_file_observer,
)
from tests.helpers import parse_twistd_options

TOKEN = "tok-4b1f9e07c2d8a653"


def _events(emit) -> list[dict]:
    """The events `emit(log)` produces, as twisted.logger hands them to observers."""
    events: list[dict] = []
    emit(Logger(namespace="gpumgr.test", observer=events.append))
    return events


# The JSON record ----------------------------------------------------------------


def test_json_record_has_time_level_namespace_message_and_simple_fields():
    (event,) = _events(lambda log: log.info(
        "evicted {name} ({reason}, {mib} MiB)", name="ollama", reason="pressure", mib=9000,
        ratio=0.5, flag=True, nothing=None, thing=object(), items=[1, 2], nan=float("nan")))
    event["log_time"] = 1795418342.950
    record = json_record(event)
    assert record == {
        "time": "2026-11-23T07:19:02.950Z", "level": "info", "namespace": "gpumgr.test",
        "message": "evicted ollama (pressure, 9000 MiB)",
        "name": "ollama", "reason": "pressure", "mib": 9000, "ratio": 0.5, "flag": True,
        "nothing": None,
    }


def test_json_record_carries_a_failure_as_a_traceback_string():
    try:
        raise ValueError("the GPU caught fire")
    except ValueError:
        failure = Failure()
    (event,) = _events(lambda log: log.failure("a job for {consumer} failed", failure,
                                               consumer="comfyui"))
    record = json_record(event)
    assert record["level"] == "critical"
    assert record["message"] == "a job for comfyui failed"
    assert record["traceback"].startswith("Traceback (most recent call last):")
    assert "ValueError: the GPU caught fire" in record["traceback"]
    assert record["consumer"] == "comfyui"


def test_event_fields_never_replace_the_core_keys():
    (event,) = _events(lambda log: log.warn("{message} at {time}", message="hi", time="noon",
                                            traceback="no", namespace="y"))
    record = json_record(event)
    assert record["message"] == "hi at noon" and record["level"] == "warn"
    assert record["namespace"] == "gpumgr.test" and record["time"].endswith("Z")
    assert "traceback" not in record


def test_legacy_log_events_lose_their_bookkeeping():
    seen: list[dict] = []
    publishToNewObserver(seen.append, {"message": ("Site starting on 8770",), "isError": 0,
                                       "system": "-", "time": 1.0}, textFromEventDict)
    record = json_record(seen[0])
    assert record == {"time": "1970-01-01T00:00:01.000Z", "level": "info",
                      "namespace": "log_legacy", "message": "Site starting on 8770"}


def test_json_observer_writes_one_parseable_line_per_event_even_with_newlines():
    out = io.StringIO()
    observer = json_file_observer(out)
    for event in _events(lambda log: (log.info("two\nlines {x}", x="a\nb"), log.error("x"))):
        observer(event)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert json.loads(lines[0])["message"] == "two\nlines a\nb"
    assert json.loads(lines[1])["level"] == "error"


# Redaction ----------------------------------------------------------------------


@pytest.mark.parametrize("text, shown", [
    (f"token is {TOKEN}!", f"token is {REDACTED}!"),
    ("Authorization: Bearer abc.def", f"Authorization: Bearer {REDACTED}"),
    ("authorization: Basic Zm9vOmJhcg==", f"authorization: Basic {REDACTED}"),
    ("{b'authorization': [b'Bearer abc']}", f"{{b'authorization': [b'Bearer {REDACTED}']}}"),
    ("Headers({b'Authorization': [b'Bearer abc']})",
     f"Headers({{b'Authorization': [b'Bearer {REDACTED}']}})"),
    ('{"Authorization": "Bearer abc"}', f'{{"Authorization": "Bearer {REDACTED}"}}'),
    ("[(b'authorization', b'xyz')]", f"[(b'authorization', b'{REDACTED}')]"),
    ("authorization=abc&x=1", f"authorization={REDACTED}&x=1"),
    ("sent bearer abc to ollama", f"sent bearer {REDACTED} to ollama"),
    ("Proxy-Authorization: Basic abc", f"Proxy-Authorization: Basic {REDACTED}"),
    ("nothing secret here, 9000 MiB", "nothing secret here, 9000 MiB"),
])
def test_redactor_removes_known_secrets_and_authorization_values(text, shown):
    assert Redactor([TOKEN]).text(text) == shown


def test_redactor_takes_a_new_secret_and_keeps_the_old_one():
    redactor = Redactor([None, ""])  # no token configured: nothing to add
    assert redactor.text("a-new-token-123") == "a-new-token-123"
    redactor.add("a-new-token-123")
    redactor.add(TOKEN)
    assert redactor.text(f"a-new-token-123 {TOKEN}") == f"{REDACTED} {REDACTED}"


def test_json_lines_redact_message_fields_and_traceback():
    try:
        raise RuntimeError(f"upstream said {TOKEN}")
    except RuntimeError:
        failure = Failure()
    events = _events(lambda log: (
        log.warn("client sent {headers}", headers=f"Authorization: Bearer {TOKEN}"),
        log.info("admin call", authorization="Bearer abc", token="xyz", admin_token=None),
        log.failure("failed with {token}", failure, token=TOKEN)))
    out = io.StringIO()
    observer = json_file_observer(out, Redactor([TOKEN]))
    for event in events:
        observer(event)
    assert TOKEN not in out.getvalue() and "abc" not in out.getvalue()
    first, second, third = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["message"] == f"client sent Authorization: Bearer {REDACTED}"
    assert first["headers"] == f"Authorization: Bearer {REDACTED}"
    assert second["authorization"] == REDACTED and second["token"] == REDACTED
    assert second["admin_token"] is None
    assert f"RuntimeError: upstream said {REDACTED}" in third["traceback"]


def test_text_lines_are_twistds_own_format_redacted():
    events = _events(lambda log: (log.info("plain {n}", n=1),
                                  log.info("secret {t}", t=TOKEN)))
    ours, theirs = io.StringIO(), io.StringIO()
    for event in events:
        text_file_observer(ours, Redactor([TOKEN]))(event)
        textFileLogObserver(theirs)(event)
    ours_lines, theirs_lines = ours.getvalue().splitlines(), theirs.getvalue().splitlines()
    assert ours_lines[0] == theirs_lines[0]
    assert ours_lines[1] == theirs_lines[1].replace(TOKEN, REDACTED) != theirs_lines[1]


# Wiring into twistd ---------------------------------------------------------------


def test_the_observer_reaches_twistd_through_the_application(tmp_path):
    """twistd takes the Application's ILogObserver component when it starts logging."""
    made = []
    inner = service.Service()
    wrapper = TwistdLogging(inner, lambda: made.append(1) or json_file_observer(io.StringIO()))
    application = service.Application("gpumgr")
    wrapper.setServiceParent(application)
    assert made == [1]
    assert application.getComponent(ILogObserver) is not None
    assert list(service.IServiceCollection(application)) == [wrapper]
    assert inner.parent is wrapper
    wrapper.startService()
    assert inner.running
    wrapper.stopService()
    assert not inner.running


def test_an_observer_already_chosen_for_the_application_stays():
    chosen = json_file_observer(io.StringIO())
    application = service.Application("gpumgr")
    application.setComponent(ILogObserver, chosen)
    TwistdLogging(service.Service(), lambda: pytest.fail("made a second observer")) \
        .setServiceParent(application)
    assert application.getComponent(ILogObserver) is chosen


@pytest.mark.parametrize("argv, problem", [
    (["--syslog", "gpumgr", "--demo", "--log-format", "json"], "not to --syslog"),
    (["--logger", "twisted.logger.jsonFileLogObserver", "gpumgr", "--demo", "--log-format", "json"],
     "use one"),
    (["--logfile", "-", "gpumgr", "--demo"], "a daemon cannot log to stdout"),
    (["-n", "gpumgr", "--demo", "--log-format", "xml"], "must be one of text, json; got 'xml'"),
])
def test_log_format_refuses_what_cannot_work(argv, problem):
    with pytest.raises(usage.UsageError, match=re.escape(problem)):
        parse_twistd_options(argv)
