"""The benchmark still runs and writes well-formed JSON (no timing is asserted)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_bench_smoke_pass_produces_wellformed_results(tmp_path):
    out = tmp_path / "smoke.json"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "run.py"), "--smoke",
                          "--out", str(out)], capture_output=True, text=True, timeout=180)
    notes = json.loads(out.read_text())["notes"] if out.exists() else []
    assert run.returncode == 0, (notes, run.stderr[-2000:])
    result = json.loads(out.read_text())
    assert result["smoke"] is True
    assert {"machine", "versions", "scenarios", "targets", "notes"} <= set(result)
    s = result["scenarios"]
    assert set(s) == {"small_requests", "token_streams", "bulk_bodies", "scheduler_handoff",
                      "status_under_load", "eviction_overhead"}
    assert s["token_streams"]["gpumgr"]["lines"] == 200  # every chunk arrived
    access = s["small_requests"]["access_log"]  # a gpumgr without the access line beside
    assert {"line_costs_ms", "cpu_us_per_request_sequential"} <= set(access)
    assert s["scheduler_handoff"]["codes"] == {"200": 20}
    assert s["scheduler_handoff"]["overlaps"] == 0
    assert s["status_under_load"]["queued"] == 50
    assert s["eviction_overhead"]["swaps"] == 6
    assert all(isinstance(v, bool) for v in result["targets"].values())
    assert "gpumgr adds" in run.stdout  # the table was printed


@pytest.mark.slow
def test_bench_without_nginx_and_wrk_skips_only_those_columns(tmp_path):
    out = tmp_path / "smoke.json"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "run.py"), "--smoke",
                          "--without", "nginx", "wrk", "--only", "small_requests",
                          "bulk_bodies", "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    small = result["scenarios"]["small_requests"]
    assert set(small["latency_ms"]) == {"direct", "gpumgr", "gpumgr_no_access_log"}  # no nginx
    assert "throughput_rps_32conn" not in small  # no wrk
    assert set(result["scenarios"]["bulk_bodies"]["download_mib_s"]) == {"direct", "gpumgr"}
    assert any("apt-get install nginx-light" in n for n in result["notes"])
    assert any("apt-get install wrk" in n for n in result["notes"])


SCHED_FIGURES = {"jobs", "completed", "errors", "tts_ms_p50", "tts_ms_p95", "tts_idle_ms_p95",
                 "tts_under_image_ms_p95", "llm_ttft_ms_p50", "renders_per_min", "jobs_per_min",
                 "gpu_busy_share", "swaps", "oom_count"}


@pytest.mark.slow
def test_sched_bench_smoke_pass_produces_wellformed_results(tmp_path):
    """The scheduling bench (bench/sched.py): every column has its figures, or says
    why the config loader refused it; the targets are booleans or None (not measured)."""
    out = tmp_path / "sched-smoke.json"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "sched.py"), "--smoke",
                          "--out", str(out)], capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["smoke"] is True and result["card_mib"] == 24576
    columns = result["columns"]
    assert set(columns) == {"capacity_1", "auto", "auto_s1", "lower_bound"}
    jobs = sum(result["jobs"].values())
    for name, column in columns.items():
        if "refused" in column:  # `capacity: auto` before the loader knows it
            assert name != "capacity_1" and "capacity" in column["refused"]
            continue
        assert SCHED_FIGURES <= set(column), name
        assert column["jobs"] == jobs
    base = columns["capacity_1"]
    assert base["completed"] == jobs and base["oom_count"] == 0  # the lock never OOMs
    assert base["max_jobs_at_once"] == 1
    assert all(v is None or isinstance(v, bool) for v in result["targets"].values())
    assert "TTS p95 under image load" in run.stdout  # the table was printed
