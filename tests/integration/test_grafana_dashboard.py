"""etc/grafana-dashboard.json: well-formed, importable anywhere, and built only on
metrics a live broker really exports, so renaming a metric (or a label) breaks here
rather than as an empty panel on someone's wall."""

from __future__ import annotations

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor

from gpumgr.testing import make_world, managed_whisper_entry, world_config
from tests.grafana_support import label_problems, load, metric_names, queries
from tests.helpers import wait_for


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
