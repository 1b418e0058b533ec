"""Typed values that cross modules (issue 15): the scheduler mode, events, Health.

Inside gpumgr they are enums and frozen values; what /v1/status and /metrics
show of them is the same strings as before, which the page, the CLI and
users' scripts read.
"""

from __future__ import annotations

import ast
import json
import pathlib

import attrs
import pytest
from twisted.internet import defer
from twisted.internet.task import Clock, Cooperator

import gpumgr.registry
from gpumgr.broker import Broker
from gpumgr.config import SCHEDULER_MODES, parse_config
from gpumgr.events import Event, EventKind
from gpumgr.gpu import GpuSampler
from gpumgr.metrics import make_registry
from gpumgr.states import Health, SchedulerMode
from gpumgr.tap import with_mode

GPUMGR = pathlib.Path(__file__).resolve().parents[2] / "gpumgr"
RAW = {"consumers": {"comfy": {"url": "http://comfy:1", "driver": "comfyui",
                               "paths": {"image": "/prompt"}}},
       "routes": {"image": "comfy"}}
#: 2026-11-23T07:19:02.950Z
AT = 1795418342.95


class NoHttp:
    def request(self, method, url, body=None, content_type=None):
        return defer.Deferred()  # never answers: nothing here probes


def make_broker(mode: str = "locked") -> tuple[Clock, Broker]:
    clock = Clock()
    clock.advance(AT)
    config = parse_config({**RAW, "scheduler": {"mode": mode}}, "t.yaml")
    gpu = GpuSampler(clock, "nvidia-smi", 2, 5, run=lambda *a: defer.Deferred())
    broker = Broker(clock, config, gpu, NoHttp(), lambda c: None,
                    Cooperator(scheduler=lambda f: clock.callLater(0, f)))
    return clock, broker


def imported_modules(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


# -- scheduler mode ------------------------------------------------------------

@pytest.mark.parametrize("text", ["passthrough", "locked", "evicting"])
def test_the_mode_is_parsed_once_into_the_enum(text):
    config = parse_config({**RAW, "scheduler": {"mode": text}}, "t.yaml")
    assert config.scheduler.mode is SchedulerMode(text)


def test_the_mode_strings_stay_what_the_config_and_help_texts_say():
    assert SCHEDULER_MODES == ("passthrough", "locked", "evicting")
    assert parse_config(RAW, "t.yaml").scheduler.mode is SchedulerMode.PASSTHROUGH


def test_dash_dash_mode_gives_the_enum_too():
    config = with_mode(parse_config(RAW, "t.yaml"), "evicting")
    assert config.scheduler.mode is SchedulerMode.EVICTING


@pytest.mark.parametrize("text", ["passthrough", "locked", "evicting"])
def test_status_and_metrics_show_the_mode_as_the_same_plain_string(text):
    _, broker = make_broker(text)
    status = broker.status()
    for shown in (status["broker"]["mode"], status["scheduler"]["mode"]):
        assert shown == text and type(shown) is str
    (build,) = [f for f in make_registry(broker.snapshot).collect()
                if f.name == "gpumgr_build"]
    (sample,) = build.samples
    assert sample.labels["mode"] == text and type(sample.labels["mode"]) is str


# -- events --------------------------------------------------------------------

def test_an_event_is_a_frozen_value_with_its_time_as_seconds():
    _, broker = make_broker()
    broker.admission.event(EventKind.EVICTION, "comfy", "idle", 1200)
    (event,) = broker.admission.events
    assert event == Event(EventKind.EVICTION, "comfy", "idle", 1200, None, AT)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        event.reason = "admin"  # type: ignore[misc]


def test_recent_events_in_status_are_the_same_json_as_before():
    """Same keys, in the same order, with the same strings: the page, the CLI
    and scripts read them."""
    clock, broker = make_broker()
    broker.admission.event(EventKind.PROCESS_CRASH, "comfy", detail="exit status 1")
    clock.advance(0.5)
    broker.admission.event(EventKind.EVICTION, "comfy", "idle", 1200)
    events = broker.status()["scheduler"]["recent_events"]
    assert json.dumps(events) == json.dumps([
        {"at": "2026-11-23T07:19:02.950Z", "event": "process_crash", "consumer": "comfy",
         "reason": None, "mib": None, "detail": "exit status 1"},
        {"at": "2026-11-23T07:19:03.450Z", "event": "eviction", "consumer": "comfy",
         "reason": "idle", "mib": 1200, "detail": None},
    ])
    assert all(type(e["event"]) is str for e in events)


def test_every_event_kind_is_its_json_string():
    assert {k.value for k in EventKind} == {
        "load", "load_failed", "load_cancelled", "eviction", "eviction_failed", "unload",
        "refusal", "oom_retry", "job_timeout", "job_aborted", "process_crash",
        "process_start_failed", "process_unresponsive", "render_interrupted", "render_stuck",
        "render_released", "render_lost", "abandoned_settled", "abandoned_grace_expired"}


def test_admission_leaves_iso_formatting_to_status():
    assert "gpumgr.status" not in imported_modules(GPUMGR / "admission.py")


# -- Health ------------------------------------------------------------------------

def test_health_lives_below_drivers_and_registry_and_keeps_its_old_import():
    assert gpumgr.registry.Health is Health
    for path in (GPUMGR / "drivers").glob("*.py"):
        assert "gpumgr.registry" not in imported_modules(path), path.name
