"""GET /metrics: a Prometheus text parse of a live broker, every metric by name,
and agreement with /v1/status."""

from __future__ import annotations

import pytest_twisted

from gpumgr.testing import world_config
from tests.helpers import metric_value, parse_metrics, wait_for

EXPECTED = {
    # name as parsed (counters lose _total) -> type
    "gpumgr_build_info": "gauge",  # an info metric, exposed as a gauge
    "gpumgr_uptime_seconds": "gauge",
    "gpumgr_config_reloads": "counter",
    "gpumgr_requests": "counter",
    "gpumgr_queue_wait_seconds": "histogram",
    "gpumgr_gpu_hold_seconds": "histogram",
    "gpumgr_received_bytes": "counter",
    "gpumgr_sent_bytes": "counter",
    "gpumgr_queue_depth": "gauge",
    "gpumgr_in_flight_jobs": "gauge",
    "gpumgr_jobs": "counter",
    "gpumgr_rejected_jobs": "counter",
    "gpumgr_evictions": "counter",
    "gpumgr_eviction_failures": "counter",
    "gpumgr_oom_retries": "counter",
    "gpumgr_renders_tracked": "counter",
    "gpumgr_renders_completed": "counter",
    "gpumgr_renders_interrupted": "counter",
    "gpumgr_renders_lost": "counter",
    "gpumgr_renders_in_progress": "gauge",
    "gpumgr_tunnels_open": "gauge",
    "gpumgr_abandoned_draining_jobs": "gauge",
    "gpumgr_abandoned_drain_seconds": "histogram",
    "gpumgr_abandoned_drains": "counter",
    "gpumgr_consumer_up": "gauge",
    "gpumgr_consumer_health": "gauge",
    "gpumgr_consumer_residency": "gauge",
    "gpumgr_consumer_gpu_resident_bytes": "gauge",
    "gpumgr_consumer_active_jobs": "gauge",
    "gpumgr_process_state": "gauge",
    "gpumgr_process_restarts": "counter",
    "gpumgr_gpu_memory_used_bytes": "gauge",
    "gpumgr_gpu_memory_free_bytes": "gauge",
    "gpumgr_gpu_memory_total_bytes": "gauge",
    "gpumgr_gpu_utilization_ratio": "gauge",
    "gpumgr_gpu_temperature_celsius": "gauge",
    "gpumgr_gpu_sample_available": "gauge",
    "gpumgr_nvidia_smi_samples": "counter",
    "gpumgr_nvidia_smi_failures": "counter",
    "gpumgr_nvidia_smi_sampling_seconds": "counter",
}


@pytest_twisted.ensureDeferred
async def test_metrics_parse_and_name_every_metric(world, start_broker, client):
    service, url = await start_broker(world_config(
        world, scheduler={"mode": "evicting"}, health={"interval_s": 30}))
    await service.health.probe_all_now()
    await wait_for(lambda: service.broker.gpu.latest.available)
    assert (await client.request("POST", url + "/v1/tts", b'{"text":"hi"}')).code == 200
    assert (await client.request("POST", url + "/v1/llm", b'{"prompt":"x"}')).code == 200
    reply = await client.request("GET", url + "/metrics")
    assert reply.code == 200
    assert reply.header("Content-Type").startswith(b"text/plain; version=")
    families = parse_metrics(reply.body.decode())
    for name, kind in EXPECTED.items():
        assert name in families, name
        assert families[name].type == kind, (name, families[name].type)
    assert all(name.startswith("gpumgr_") for name in families)

    assert metric_value(families["gpumgr_requests"], kind="tts", consumer="mvoice", code="200") == 1
    assert metric_value(families["gpumgr_requests"], kind="llm", consumer="ollama", code="200") == 1
    assert metric_value(families["gpumgr_gpu_hold_seconds"], consumer="mvoice", le="+Inf") == 1
    assert metric_value(families["gpumgr_queue_wait_seconds"], consumer="ollama", le="+Inf") == 1
    assert metric_value(families["gpumgr_received_bytes"], consumer="mvoice") == len(b'{"text":"hi"}')
    assert metric_value(families["gpumgr_sent_bytes"], consumer="mvoice") > 1000  # a WAV
    assert metric_value(families["gpumgr_consumer_residency"], consumer="mvoice", state="loaded") == 1
    assert metric_value(families["gpumgr_consumer_up"], consumer="ollama") == 1
    # Every routed kind has a queue depth series, 0 when nothing waits.
    assert {s.labels["kind"] for s in families["gpumgr_queue_depth"].samples} == \
        {"tts", "stt", "llm", "image"}
    assert metric_value(families["gpumgr_queue_depth"], kind="image") == 0

    status = service.status()
    gpu = status["gpu"]["gpus"][0]
    assert metric_value(families["gpumgr_gpu_memory_total_bytes"], gpu="0") == \
        gpu["memory_total_mib"] * 1024 * 1024
    assert metric_value(families["gpumgr_jobs"]) == status["scheduler"]["total_jobs"]
    assert metric_value(families["gpumgr_nvidia_smi_samples"]) >= 1


@pytest_twisted.ensureDeferred
async def test_evictions_are_counted_by_reason_and_agree_with_status(world, start_broker, client):
    world["comfyui"].behaviour.vram_mib = 20000  # with ollama loaded it needs room
    service, url = await start_broker(world_config(
        world, scheduler={"mode": "evicting"}, health={"interval_s": 30}))
    await service.health.probe_all_now()
    assert (await client.request("POST", url + "/v1/llm", b'{"prompt":"x"}')).code == 200
    assert (await client.request("POST", url + "/v1/image", b'{"prompt":{}}')).code == 200
    families = parse_metrics((await client.request("GET", url + "/metrics")).body.decode())
    evictions = {s.labels["reason"]: s.value for s in families["gpumgr_evictions"].samples
                 if s.name.endswith("_total")}
    assert evictions.get("pressure", 0) >= 1  # ollama made room for the image
    assert sum(evictions.values()) == service.status()["scheduler"]["evictions"]


@pytest_twisted.ensureDeferred
async def test_a_failing_nvidia_smi_is_counted_and_unknown_values_are_absent(world,
                                                                           start_broker,
                                                                           client):
    world.gpu.set_smi_failure("driver")
    service, url = await start_broker(world_config(world, health={"interval_s": 30}))
    await wait_for(lambda: service.broker.gpu.samples_failed >= 1)
    families = parse_metrics((await client.request("GET", url + "/metrics")).body.decode())
    assert metric_value(families["gpumgr_nvidia_smi_failures"]) >= 1
    assert metric_value(families["gpumgr_gpu_sample_available"]) == 0
    assert families["gpumgr_gpu_memory_used_bytes"].samples == []


@pytest_twisted.ensureDeferred
async def test_memory_profiles_in_status_agree_with_metrics(world, start_broker, client):
    service, url = await start_broker(world_config(
        world, scheduler={"mode": "evicting"}, health={"interval_s": 30}))
    await service.health.probe_all_now()
    assert (await client.request("POST", url + "/v1/llm", b'{"prompt":"x"}')).code == 200

    def ollama_memory():
        return service.status()["consumers"]["ollama"].get("memory", {})

    # After the job, gpumgr asks ollama's /api/ps for its models' sizes.
    await wait_for(lambda: ollama_memory().get("models"))
    memory = ollama_memory()
    assert memory["resident"]["mib"] >= 9000  # the configured figure is a floor
    assert memory["models"], memory  # one entry per model ollama reported
    families = parse_metrics((await client.request("GET", url + "/metrics")).body.decode())
    series = families["gpumgr_consumer_memory_profile_bytes"]
    for model, figures in [("", memory)] + list(memory["models"].items()):
        for figure in ("resident", "job_peak"):
            f = figures[figure]
            assert metric_value(series, consumer="ollama", model=model, figure=figure,
                                source=f["source"]) == f["mib"] * 1024 * 1024
    # Every consumer has its figures, whatever their source.
    assert all("memory" in c for c in service.status()["consumers"].values())
