"""etc/grafana-dashboard.json: well-formed, importable anywhere, and built only on
metrics a live broker really exports, so renaming a metric (or a label) breaks here
rather than as an empty panel on someone's wall."""

from __future__ import annotations

import json
import os
import re
from typing import Any, Iterator

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor

from gpumgr.testing import make_world, managed_whisper_entry, world_config
from tests.helpers import wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DASHBOARD = os.path.join(ROOT, "etc", "grafana-dashboard.json")
#: Grafana's own variables; the dashboard defines the rest.

_METRIC_RE = re.compile(r"\bgpumgr_[a-zA-Z0-9_]+")
_SELECTOR_RE = re.compile(r"\b(gpumgr_[a-zA-Z0-9_]+)\s*\{([^}]*)\}")
_MATCHER_RE = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"")
_GROUPING_RE = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def load() -> dict[str, Any]:
    with open(DASHBOARD, encoding="utf-8") as f:
        return json.load(f)


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    for panel in dashboard["panels"]:
        for target in panel.get("targets", ()):
            yield f"panel {panel['id']} {panel['title']!r} {target['refId']}", target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            if isinstance(query, dict):
                query = query["query"]
            yield f"variable {variable['name']}", query


def metric_names(expr: str) -> set[str]:
    return set(_METRIC_RE.findall(expr))


def exported(scrape: str) -> tuple[set[str], dict[str, set[str]]]:
    """Every series name the scrape exports, and the label names seen on each.

    A family with no samples (nothing queued: no `gpumgr_queue_depth` series)
    still has its TYPE line, which gives its names.
    """
    names: set[str] = set()
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(scrape):
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
        for sample in family.samples:
            names.add(sample.name)
            labels.setdefault(sample.name, set()).update(sample.labels)
    return names, labels


def label_problems(expr: str, labels: dict[str, set[str]]) -> list[str]:
    """Label names in selectors and groupings that the metrics do not carry.

    Scrape labels (`instance`, `job`) come from Prometheus, not from gpumgr.
    """
    scrape_labels = {"instance", "job"}
    problems = []
    used = metric_names(expr)
    for name, matchers in _SELECTOR_RE.findall(expr):
        if name not in labels:
            continue  # no series in this scrape: its name was checked, its labels cannot be
        for label in _MATCHER_RE.findall(matchers):
            if label not in labels[name] | scrape_labels:
                problems.append(f"{name} has no label {label!r}")
    known = set().union(*(labels.get(name, set()) for name in used)) | scrape_labels
    if all(name in labels for name in used):
        for grouping in _GROUPING_RE.findall(expr):
            for label in filter(None, (part.strip() for part in grouping.split(","))):
                if label not in known:
                    problems.append(f"grouping by {label!r}, which none of {sorted(used)} has")
    return problems


# -- against a live broker -----------------------------------------------------

@pytest_twisted.async_yield_fixture
async def managed_world(tmp_path):
    """The simulated world with whisper as a managed process, so that the
    process metrics have series too (the process is never started here)."""
    w = make_world(reactor, str(tmp_path), managed_whisper=True)
    w.listen(reactor)
    yield w
    await w.stop()


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_every_metric_and_label_the_dashboard_queries_is_exported(managed_world,
                                                                       start_broker, client):
    config = world_config(managed_world, managed={"whisper": managed_whisper_entry(managed_world)},
                          scheduler={"mode": "evicting"}, health={"interval_s": 30})
    service, url = await start_broker(config)
    await service.health.probe_all_now()
    await wait_for(lambda: service.broker.gpu.latest.available)
    # A request and an unload, so requests, histograms and evictions have series.
    assert (await client.request("POST", url + "/v1/tts", b'{"text":"hi"}')).code == 200
    assert (await client.request("POST", url + "/v1/consumers/mvoice/unload")).code == 200
    reply = await client.request("GET", url + "/metrics")
    assert reply.code == 200
    names, labels = exported(reply.body.decode())

    unknown, problems = {}, {}
    for where, expr in queries(load()):
        if metric_names(expr) - names:
            unknown[where] = sorted(metric_names(expr) - names)
        if label_problems(expr, labels):
            problems[where] = label_problems(expr, labels)
    assert not unknown, f"metrics gpumgr does not export: {unknown}"
    assert not problems, problems
