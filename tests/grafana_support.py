"""What both halves of the grafana-dashboard tests read: the dashboard, its
queries, and the metric and label names those use (not a test module)."""

from __future__ import annotations

import json
import os
import re
from typing import Any, Iterator


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DASHBOARD = os.path.join(ROOT, "etc", "grafana-dashboard.json")
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
#: Grafana's own variables; the dashboard defines the rest.
BUILTIN_VARIABLES = {"__rate_interval", "__interval", "__range"}

_METRIC_RE = re.compile(r"\bgpumgr_[a-zA-Z0-9_]+")
_SELECTOR_RE = re.compile(r"\b(gpumgr_[a-zA-Z0-9_]+)\s*\{([^}]*)\}")
_MATCHER_RE = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"")
_GROUPING_RE = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
VARIABLE_RE = re.compile(r"\$\{?([a-zA-Z_][a-zA-Z0-9_]*)")


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
