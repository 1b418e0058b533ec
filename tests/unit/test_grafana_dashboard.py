"""etc/grafana-dashboard.json: well-formed, importable anywhere, and built only on
metrics a live broker really exports, so renaming a metric (or a label) breaks here
rather than as an empty panel on someone's wall."""

from __future__ import annotations

from tests.grafana_support import (
    BUILTIN_VARIABLES,
    DATASOURCE,
    VARIABLE_RE,
    label_problems,
    load,
    metric_names,
    queries,
)


# -- structure (no broker) -----------------------------------------------------

def test_the_dashboard_imports_anywhere_through_a_prometheus_input():
    d = load()
    (ds_input,) = d["__inputs"]
    assert ds_input["name"] == "DS_PROMETHEUS"
    assert (ds_input["type"], ds_input["pluginId"]) == ("datasource", "prometheus")
    assert d["id"] is None  # an export: the importing Grafana assigns it
    assert d["uid"] and d["title"]
    assert isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 39
    required = {r["id"] for r in d["__requires"] if r["type"] == "panel"}
    assert {p["type"] for p in d["panels"] if p["type"] != "row"} <= required


def test_every_panel_has_an_id_a_title_a_place_and_queries_with_units():
    d = load()
    panels = d["panels"]
    ids = [p["id"] for p in panels]
    assert all(isinstance(i, int) for i in ids) and len(set(ids)) == len(ids)
    titles = [p["title"].strip() for p in panels]
    assert all(titles) and len(set(titles)) == len(titles)
    occupied: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        for cell in ((x, y) for x in range(g["x"], g["x"] + g["w"])
                     for y in range(g["y"], g["y"] + g["h"])):
            assert cell not in occupied, (p["title"], "overlaps", occupied[cell])
            occupied[cell] = p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == DATASOURCE, p["title"]
        assert p["fieldConfig"]["defaults"].get("unit"), p["title"]
        assert p.get("description"), p["title"]
        targets = p["targets"]
        assert targets, p["title"]
        assert len({t["refId"] for t in targets}) == len(targets), p["title"]
        for t in targets:
            assert t["datasource"] == DATASOURCE, p["title"]
            assert isinstance(t["expr"], str) and metric_names(t["expr"]), (p["title"], t)


def test_every_variable_a_query_uses_is_defined():
    d = load()
    defined = {v["name"] for v in d["templating"]["list"]} | BUILTIN_VARIABLES
    for where, expr in queries(d):
        assert set(VARIABLE_RE.findall(expr)) <= defined, where


def test_the_quantile_panels_read_the_histograms_over_five_minutes():
    exprs = [expr for _, expr in queries(load())]
    for histogram in ("gpumgr_queue_wait_seconds", "gpumgr_gpu_hold_seconds"):
        for q in ("0.5", "0.95", "0.99"):
            assert any(f"histogram_quantile({q}," in e and f"{histogram}_bucket" in e
                       and "[5m]" in e for e in exprs), (histogram, q)


def test_the_checks_catch_a_renamed_metric_or_label():
    names, labels = {"gpumgr_jobs_total"}, {"gpumgr_jobs_total": {"consumer"}}
    assert metric_names('rate(gpumgr_job_total{instance=~"$instance"}[5m])') - names
    assert label_problems('gpumgr_jobs_total{consumr="x"}', labels)
    assert label_problems("sum by (kind) (gpumgr_jobs_total)", labels)
    assert not label_problems('sum by (consumer) (gpumgr_jobs_total{instance="a"})', labels)
