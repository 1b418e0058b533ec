"""Scheduling on a realistic mixed trace: `capacity: 1` against `capacity: auto`.

    python bench/sched.py [--smoke] [--out bench/results/sched.json]
                          [--minutes 4] [--scale 0.5] [--seed 16]

One seeded Poisson trace (TTS, STT, LLM and image jobs) runs, column after
column, through a real `twistd gpumgr` in front of the simulated services of
bench/sched_world.py (their own process, on a simulated 24 GiB card):

- ``capacity_1``: the seed's lock, one job at a time;
- ``auto``: admission by memory (`scheduler.capacity: auto`), default
  contention factors;
- ``auto_s1``: the same with every contention factor 1 (pure time slicing);
- ``lower_bound``: computed, not run: every job starts when it arrives and
  takes its time alone (no queue, no swap, no slowdown).

All durations are realistic ones times ``--scale``; every figure is reported
back in realistic units (divided by the scale). Where the config loader
refuses a column (``capacity: auto`` before it exists), that column says so
and has no figures. See bench/README.md for the trace, the figures and the
issue's targets.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from run import HERE, HOST, PY, ROOT, TWISTD, Procs, free_port, pct, wait_http  # noqa: E402
from sched_world import LLM_PROMPT_S, SERVICES, alone_s  # noqa: E402

#: Realistic arrivals per minute of each kind (Poisson).
RATES_PER_MIN = {"tts": 12.0, "stt": 4.0, "llm": 3.0, "image": 2.5}
IDLE_TTS_REQUESTS = 20
WORKFLOW = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}},
    "3": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "seed": 1, "steps": 20}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["3", 0]}},
}
COLUMNS = {
    # name: (scheduler.capacity, one contention factor for all, or None: each service's own)
    "capacity_1": (1, None),
    "auto": ("auto", None),
    "auto_s1": ("auto", 1.0),
}


def make_trace(seed: int, minutes: float) -> list[tuple[float, str]]:
    """(realistic arrival second, kind), sorted: one Poisson process per kind."""
    rng = random.Random(seed)
    out = []
    for kind, per_min in sorted(RATES_PER_MIN.items()):
        t = rng.expovariate(per_min / 60.0)
        while t < minutes * 60.0:
            out.append((t, kind))
            t += rng.expovariate(per_min / 60.0)
    return sorted(out)


# -- one job, from a client's side -----------------------------------------------------------


def _send(port: int, method: str, path: str, body: bytes, ctype: str):
    conn = http.client.HTTPConnection(HOST, port, timeout=300)
    conn.request(method, path, body=body, headers={"Content-Type": ctype})
    return conn, conn.getresponse()


def _split(port: int, request_id: str | None) -> dict:
    """gpumgr's own account of a finished request (`GET /v1/requests/<id>`):
    how long it waited for the GPU and how long it held it (seconds)."""
    if not request_id:
        return {}
    try:
        doc = get_json(port, f"/v1/requests/{request_id}")
    except Exception:  # kept for requests.keep_finished_s only: a figure, not a failure
        return {}
    if doc.get("wait_ms") is None or doc.get("gpu_ms") is None:
        return {}
    return {"wait_s": doc["wait_ms"] / 1000, "gpu_s": doc["gpu_ms"] / 1000}


def run_job(port: int, kind: str, poll_s: float) -> dict:
    """Send one job through gpumgr; times are perf_counter seconds."""
    rec: dict = {"kind": kind, "sent": time.perf_counter(), "ok": False}
    conn = None
    try:
        if kind == "tts":
            conn, r = _send(port, "POST", "/v1/tts", b'{"text": "The kettle is on."}',
                            "application/json")
            r.read()
            rec.update(_split(port, r.getheader("X-Gpumgr-Request-Id")))
        elif kind == "stt":
            conn, r = _send(port, "POST", "/v1/stt", b"RIFF" + bytes(4000), "audio/wav")
            r.read()
        elif kind == "llm":
            body = json.dumps({"model": "llama3", "prompt": "Plan a week of dinners.",
                               "stream": True}).encode()
            conn, r = _send(port, "POST", "/v1/llm", body, "application/json")
            for line in r:
                if "first" not in rec and r.status == 200:
                    rec["first"] = time.perf_counter()
                if b'"error"' in line:
                    rec["error"] = line.decode(errors="replace")[:200]
        else:
            conn, r = _send(port, "POST", "/v1/image",
                            json.dumps({"prompt": WORKFLOW, "client_id": "bench"}).encode(),
                            "application/json")
            answer = r.read()
            if r.status == 200:
                prompt_id = json.loads(answer)["prompt_id"]
                rec["status"] = r.status
                while True:  # the render is over when ComfyUI's history has it
                    time.sleep(poll_s)
                    url = f"http://{HOST}:{port}/v1/image/history/{prompt_id}"
                    history = json.loads(urllib.request.urlopen(url, timeout=60).read())
                    if prompt_id in history:
                        if not history[prompt_id]["status"]["completed"]:
                            rec["error"] = "render failed"
                        break
        rec["status"] = r.status
        rec["ok"] = r.status == 200 and "error" not in rec
        if r.status != 200 and "error" not in rec:
            rec["error"] = f"HTTP {r.status}"
    except Exception as e:  # recorded, counted as an error
        rec["error"] = repr(e)[:200]
    finally:
        if conn is not None:
            conn.close()
    rec["end"] = time.perf_counter()
    return rec


def play(port: int, trace, scale: float) -> list[dict]:
    """Send each job at its (scaled) arrival time, each on its own thread."""
    records: list[dict] = []
    threads = []
    lock = threading.Lock()
    poll_s = max(0.005, 0.1 * scale)
    t0 = time.perf_counter()

    def one(arrival: float, kind: str) -> None:
        rec = run_job(port, kind, poll_s)
        rec["arrival"] = arrival
        with lock:
            records.append(rec)

    for arrival, kind in trace:
        delay = t0 + arrival * scale - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        th = threading.Thread(target=one, args=(arrival, kind), daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join(600)
    for rec in records:
        for k in ("sent", "first", "end"):
            if k in rec:
                rec[k] -= t0
    return sorted(records, key=lambda r: r["arrival"])


# -- figures ---------------------------------------------------------------------------------


def overlaps(a: dict, b: dict) -> bool:
    return a["sent"] < b["end"] and b["sent"] < a["end"]


def figures(records: list[dict], idle_ms: list[float], scale: float,
            busy_s: float | None) -> dict:
    """Every figure in realistic units (milliseconds, per minute)."""
    def ms(r: dict, key: str = "end") -> float:
        return (r[key] - r["sent"]) * 1000 / scale

    if not records:
        raise RuntimeError("the trace produced no records")
    done = [r for r in records if r["ok"]]
    tts = [ms(r) for r in done if r["kind"] == "tts"]
    images = [r for r in records if r["kind"] == "image"]
    tts_img_recs = [r for r in done if r["kind"] == "tts" and any(overlaps(r, i) for i in images)]
    tts_img = [ms(r) for r in tts_img_recs]
    # gpumgr's split of those: waiting for the GPU, and holding it (None when not known).
    tts_img_wait = [r["wait_s"] * 1000 / scale for r in tts_img_recs if "wait_s" in r]
    tts_img_gpu = [r["gpu_s"] * 1000 / scale for r in tts_img_recs if "gpu_s" in r]
    ttft = [ms(r, "first") for r in done if r["kind"] == "llm" and "first" in r]
    start = min(r["sent"] for r in records)
    span_min = (max(r["end"] for r in records) - start) / scale / 60
    return {
        "jobs": len(records), "completed": len(done), "errors": len(records) - len(done),
        "error_samples": sorted({r.get("error", "") for r in records if not r["ok"]})[:5],
        "tts_ms_p50": pct(tts, 50), "tts_ms_p95": pct(tts, 95),
        "tts_idle_ms_p95": pct(idle_ms, 95),
        "tts_under_image_ms_p95": pct(tts_img, 95), "tts_under_image_n": len(tts_img),
        "tts_under_image_wait_ms_p95": pct(tts_img_wait, 95),
        "tts_under_image_gpu_ms_p95": pct(tts_img_gpu, 95),
        "llm_ttft_ms_p50": pct(ttft, 50), "llm_ttft_ms_p95": pct(ttft, 95),
        "renders_per_min": sum(1 for r in done if r["kind"] == "image") / span_min,
        "jobs_per_min": len(done) / span_min,
        "makespan_min": span_min,
        "gpu_busy_share": None if busy_s is None else busy_s / scale / 60 / span_min,
    }


def lower_bound(trace, idle_n: int) -> dict:
    """Every job starts on arrival and takes its time alone: no queue, no swap, no slowdown."""
    recs = [{"kind": k, "sent": t, "end": t + alone_s(k), "ok": True, "first": t + LLM_PROMPT_S}
            for t, k in trace]  # an LLM's first token comes once its prompt is evaluated
    # busy: the union of the jobs' intervals
    busy, cur_start, cur_end = 0.0, None, None
    for r in sorted(recs, key=lambda r: r["sent"]):
        if cur_end is None or r["sent"] > cur_end:
            if cur_end is not None:
                busy += cur_end - cur_start
            cur_start, cur_end = r["sent"], r["end"]
        else:
            cur_end = max(cur_end, r["end"])
    if cur_end is not None:
        busy += cur_end - cur_start
    out = figures(recs, [alone_s("tts") * 1000] * idle_n, 1.0, busy)
    out.update(swaps=0, oom_count=0, computed=True)
    return out


# -- one column: a world, a gpumgr, the trace ----------------------------------------------------


def get_json(port: int, path: str) -> dict:
    return json.loads(urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=30).read())


def wait_file(path: str, proc, timeout_s: float = 30) -> dict:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the simulated world exited with {proc.returncode}")
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        time.sleep(0.05)
    raise RuntimeError("the simulated world never got ready")


#: gpumgr's default render poll (consumers.<name>.render_poll_s), in realistic seconds.
RENDER_POLL_S = 0.5


def gpumgr_config(ready: dict, port: int, capacity, scale: float) -> dict:
    cfg = dict(ready["config"])
    cfg["listen"] = f"tcp:{port}:interface=127.0.0.1"
    # headroom 256 MiB: the residents take 19.5 GiB of 24, a render 4 GiB more; the
    # default 512 would leave no room for a TTS reply beside a render (bench/README.md).
    cfg["gpu"] = {**cfg["gpu"], "interval_s": 1, "unload_settle_s": 5, "headroom_mib": 256}
    cfg["health"] = {"interval_s": 2, "timeout_s": 2}
    cfg["scheduler"] = {"mode": "evicting", "capacity": capacity, "max_queue": 1000,
                        "queue_timeout_s": 600}
    consumers = {n: dict(e) for n, e in cfg["consumers"].items()}
    for name, (_, _, working, growth) in SERVICES.items():
        consumers[name]["vram_job_mib"] = working + growth
    consumers["comfyui"]["passthrough"] = True  # the client reads /history through gpumgr
    # The render poll in realistic time, as everything else: at the default 0.5 s of
    # wall time a scaled render would be held up to 0.5/scale s (realistic) too long.
    consumers["comfyui"]["render_poll_s"] = RENDER_POLL_S * scale
    cfg["consumers"] = consumers
    return cfg


def run_column(name: str, capacity, contention, trace, scale: float, tmp: str,
               procs: Procs) -> dict:
    import yaml

    from gpumgr.config import load_config
    from gpumgr.config.section import ConfigError

    col = os.path.join(tmp, name)
    os.makedirs(col)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    ready_path = os.path.join(col, "ready.json")
    argv = [PY, os.path.join(HERE, "sched_world.py"), col, ready_path, "--scale", str(scale)]
    if contention is not None:
        argv += ["--contention", str(contention)]
    world = procs.start(f"{name}-world", argv, env=env)
    gp = None
    try:
        ready = wait_file(ready_path, world)
        port = free_port()
        conf = os.path.join(col, "gpumgr.yaml")
        with open(conf, "w") as f:
            yaml.safe_dump(gpumgr_config(ready, port, capacity, scale), f, sort_keys=False)
        try:
            load_config(conf)
        except ConfigError as e:
            return {"refused": f"the config loader refuses scheduler.capacity: {capacity}: {e}"}
        gp = procs.start(f"{name}-gpumgr", [TWISTD, "--nodaemon", "--pidfile=", "gpumgr",
                                             "--config", conf], env=env)
        wait_http(port, "/healthz", proc=gp)
        wait_http(port, "/v1/status", proc=gp)
        time.sleep(0.5)  # first health probes and GPU sample
        idle = []  # TTS alone on an idle card
        for _ in range(IDLE_TTS_REQUESTS):
            rec = run_job(port, "tts", 0.01)
            if rec["ok"]:
                idle.append((rec["end"] - rec["sent"]) * 1000 / scale)
        stats0, status0 = get_json(ready["stats_port"], "/stats"), get_json(port, "/v1/status")
        records = play(port, trace, scale)
        stats1, status1 = get_json(ready["stats_port"], "/stats"), get_json(port, "/v1/status")
        out = figures(records, idle, scale, stats1["busy_s"] - stats0["busy_s"])
        s0, s1 = status0["scheduler"], status1["scheduler"]
        out.update(
            swaps=s1["evictions"] - s0["evictions"],
            loads={n: stats1["loads"][n] - stats0["loads"][n] for n in stats1["loads"]},
            unloads={n: stats1["unloads"][n] - stats0["unloads"][n] for n in stats1["unloads"]},
            oom_count=stats1["oom_count"] - stats0["oom_count"],
            oom_retries=s1["oom_retries"] - s0["oom_retries"],
            max_jobs_at_once=stats1["max_active_jobs"],
            capacity=status1["scheduler"]["capacity"],
            # The figures admission used at the end: each consumer's resident and
            # job peak, and where each came from (config, measured, oom).
            memory={n: c.get("memory") for n, c in status1["consumers"].items()},
        )
        return out
    finally:
        for p in (gp, world):
            if p is not None:
                procs.stop(p)


# -- the targets, from the run ----------------------------------------------------------


def targets(cols: dict) -> dict:
    """Each of the issue's targets for `auto`: True, False, or None (not measured)."""
    base, auto = cols.get("capacity_1", {}), cols.get("auto", {})
    if "refused" in auto or "refused" in base or not auto or not base:
        return {k: None for k in ("zero_ooms", "tts_under_image_p95_le_2x_idle",
                                  "tts_under_image_p95_le_fifth_of_capacity_1",
                                  "jobs_per_min_ge_1_2x_capacity_1",
                                  "swaps_le_capacity_1")}

    def le(a, b):
        return None if a is None or b is None else a <= b

    return {
        "zero_ooms": auto["oom_count"] == 0 and cols.get("auto_s1", {}).get("oom_count", 0) == 0,
        "tts_under_image_p95_le_2x_idle": le(auto["tts_under_image_ms_p95"],
                                             2 * (auto["tts_idle_ms_p95"] or 0)),
        "tts_under_image_p95_le_fifth_of_capacity_1": le(
            auto["tts_under_image_ms_p95"],
            None if base["tts_under_image_ms_p95"] is None else base["tts_under_image_ms_p95"] / 5),
        "jobs_per_min_ge_1_2x_capacity_1": auto["jobs_per_min"] >= 1.2 * base["jobs_per_min"],
        "swaps_le_capacity_1": auto["swaps"] <= base["swaps"],
    }


# -- output ---------------------------------------------------------------------------------------

ROWS = [
    ("TTS p50 / p95 (ms)", lambda c: f"{fmt(c['tts_ms_p50'])} / {fmt(c['tts_ms_p95'])}"),
    ("TTS idle p95 (ms)", lambda c: fmt(c["tts_idle_ms_p95"])),
    ("TTS p95 under image load (ms)", lambda c: f"{fmt(c['tts_under_image_ms_p95'])} "
                                                 f"(n={c['tts_under_image_n']})"),
    ("  of which waiting / on the GPU, p95 (ms)",
     lambda c: f"{fmt(c.get('tts_under_image_wait_ms_p95'))} / "
               f"{fmt(c.get('tts_under_image_gpu_ms_p95'))}"),
    ("LLM time to first token p50 / p95 (ms)",
     lambda c: f"{fmt(c['llm_ttft_ms_p50'])} / {fmt(c['llm_ttft_ms_p95'])}"),
    ("renders / min", lambda c: fmt(c["renders_per_min"], 2)),
    ("jobs completed / min", lambda c: fmt(c["jobs_per_min"], 2)),
    ("GPU busy share", lambda c: fmt(c["gpu_busy_share"], 2)),
    ("swaps (evictions)", lambda c: str(c["swaps"])),
    ("OOMs (simulated card)", lambda c: str(c["oom_count"])),
    ("errors", lambda c: f"{c['errors']} of {c['jobs']}"),
]


def fmt(v, digits=0) -> str:
    return "–" if v is None else f"{v:,.{digits}f}"


def table(result: dict) -> str:
    cols = result["columns"]
    names = list(cols)
    lines = ["| figure | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, cell in ROWS:
        row = [("refused" if "refused" in cols[n] else cell(cols[n])) for n in names]
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    for n in names:
        if "refused" in cols[n]:
            lines.append(f"\n{n}: {cols[n]['refused']}")
    lines.append("\nTargets (auto against capacity_1; None: not measured):")
    lines += [f"  {k}: {v}" for k, v in result["targets"].items()]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="a short trace: checks the bench works")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "sched.json"))
    ap.add_argument("--minutes", type=float, default=None, help="realistic trace length")
    ap.add_argument("--scale", type=float, default=None, help="wall time / realistic time")
    ap.add_argument("--seed", type=int, default=16)
    ap.add_argument("--only", nargs="*", choices=list(COLUMNS), help="run only these columns")
    args = ap.parse_args()
    minutes = args.minutes or (1.0 if args.smoke else 4.0)
    scale = args.scale or (0.1 if args.smoke else 0.5)
    trace = make_trace(args.seed, minutes)
    result: dict = {
        "smoke": args.smoke, "seed": args.seed, "trace_minutes": minutes, "scale": scale,
        "rates_per_min": RATES_PER_MIN, "jobs": {k: sum(1 for _, x in trace if x == k)
                                                 for k in RATES_PER_MIN},
        "alone_s": {k: alone_s(k) for k in RATES_PER_MIN},
        "card_mib": 24576, "columns": {}, "notes": [],
    }
    tmp = tempfile.mkdtemp(prefix="gpumgr-sched-")
    procs = Procs(tmp)
    try:
        for name, (capacity, contention) in COLUMNS.items():
            if args.only and name not in args.only:
                continue
            began = time.time()
            result["columns"][name] = run_column(name, capacity, contention, trace, scale,
                                                 tmp, procs)
            result["columns"][name]["wall_s"] = time.time() - began
        result["columns"]["lower_bound"] = lower_bound(trace, IDLE_TTS_REQUESTS)
    finally:
        procs.stop_all()
    result["targets"] = targets(result["columns"])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(table(result))
    print(f"\nwritten to {args.out} (logs in {tmp})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
