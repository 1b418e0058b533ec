"""The simulation of jobs sharing the card (issue 16), Clock-driven.

With k jobs computing at once, each progresses at 1/(1 + s·(k−1)) of its
speed alone (`gpumgr.testing.contention`), re-timed whenever k changes
mid-job. Jobs hold working memory beside their resident memory: ComfyUI its
peak for a render, ollama a KV cache that grows with the tokens written. The
card counts an out-of-memory whenever an allocation would pass its total.
"""

from __future__ import annotations

import io
import json

import pytest
from twisted.internet.task import Clock
from twisted.web.test.requesthelper import DummyRequest

from gpumgr.testing import Behaviour, SimulatedGpu, make_world
from gpumgr.testing.contention import (
    DEFAULT_CONTENTION,
    SharedCompute,
    progress_rate,
    work_done,
)

WORKFLOW = {
    "3": {"class_type": "KSampler", "inputs": {}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["3", 0]}},
}


# -- the arithmetic -------------------------------------------------------------------------------


@pytest.mark.parametrize("s, k, rate", [
    (0.9, 1, 1.0),      # alone: full speed, whatever the factor
    (0.0, 4, 1.0),      # not GPU-bound: others do not slow it
    (1.0, 2, 0.5),      # pure time slicing: half each
    (1.0, 4, 0.25),
    (0.5, 3, 0.5),      # 1 / (1 + 0.5 * 2)
    (0.6, 2, 1 / 1.6),
    (0.3, 0, 1.0),      # no job counted yet: as alone
])
def test_the_rate_is_one_over_one_plus_s_times_the_others(s, k, rate):
    assert progress_rate(s, k) == pytest.approx(rate)
    assert work_done(2.0, s, k) == pytest.approx(2.0 * rate)


@pytest.mark.parametrize("s", [-0.1, 1.5])
def test_a_factor_outside_zero_to_one_is_refused(s):
    with pytest.raises(ValueError, match="between 0 and 1"):
        progress_rate(s, 2)


def test_the_documented_defaults_are_factors_and_every_flavour_has_one(tmp_path):
    world = make_world(Clock(), str(tmp_path))
    assert {c.contention for c in world.consumers.values()} <= set(DEFAULT_CONTENTION.values())
    assert {n: world[n].contention for n in world.consumers} == DEFAULT_CONTENTION
    world["ollama"].behaviour.contention = 1.0  # a test's or the bench's own setting wins
    assert world["ollama"].contention == 1.0


# -- rates adapt while a job runs -------------------------------------------------------------------


def test_alone_a_timer_is_a_plain_call_later():
    clock = Clock()
    compute = SharedCompute(clock)
    compute.set_jobs(1)
    fired = []
    compute.later(1.5, 0.9, lambda: fired.append(clock.seconds()))
    clock.advance(1.4999)
    assert fired == []
    clock.advance(0.0001)
    assert fired == [pytest.approx(1.5)]


def test_a_job_slows_when_another_starts_and_speeds_up_when_it_ends():
    clock = Clock()
    compute = SharedCompute(clock)
    compute.set_jobs(1)
    fired = []
    compute.later(1.0, 1.0, lambda: fired.append(clock.seconds()))
    clock.advance(0.5)        # 0.5 s of work done alone
    compute.set_jobs(2)       # time slicing: half speed
    clock.advance(0.5)        # 0.25 s of work done
    assert fired == []
    compute.set_jobs(1)       # 0.25 s left, alone again
    clock.advance(0.2499)
    assert fired == []
    clock.advance(0.0002)
    assert fired == [pytest.approx(1.25, abs=1e-3)]


def test_each_job_slows_by_its_own_factor():
    clock = Clock()
    compute = SharedCompute(clock)
    compute.set_jobs(2)
    compute.later(1.0, 0.3, lambda: None)    # a TTS job
    compute.later(1.0, 0.9, lambda: None)    # a render
    assert sorted(c.getTime() for c in clock.getDelayedCalls()) == [
        pytest.approx(1.3), pytest.approx(1.9)]


def test_a_cancelled_timer_never_fires_and_is_not_re_timed():
    clock = Clock()
    compute = SharedCompute(clock)
    compute.set_jobs(1)
    fired = []
    d = compute.work(1.0, 0.5)
    d.addBoth(fired.append)
    d.cancel()
    compute.set_jobs(2)
    clock.advance(5)
    assert len(fired) == 1 and fired[0].check(Exception)  # CancelledError, nothing else
    fired[0].trap(Exception)
    assert compute.timers == set() and clock.getDelayedCalls() == []


def test_busy_time_counts_only_while_a_job_computes():
    clock = Clock()
    compute = SharedCompute(clock)
    clock.advance(1)
    compute.set_jobs(1)
    clock.advance(2)
    compute.set_jobs(2)
    clock.advance(1)
    compute.set_jobs(0)
    clock.advance(5)
    assert compute.busy_seconds() == pytest.approx(3.0)


def test_a_render_takes_longer_while_another_job_computes(tmp_path):
    """The world counts k from its jobs; ComfyUI's nodes are contended work."""
    clock = Clock()
    world = make_world(clock, str(tmp_path), behaviours={
        "comfyui": Behaviour(vram_mib=7000, job_s=1.0)})
    comfy, tts = world["comfyui"], world["mvoice"]
    world.job_started(tts)           # a TTS job computes for the first 0.95 s
    item = comfy.submit(WORKFLOW)    # two nodes of 0.5 s each, alone
    clock.advance(0.95)              # at 1/1.9 of its speed: 0.5 s of work done
    world.job_ended(tts)
    clock.advance(0)                 # the first node ends (what is left of it rounds to 0)
    clock.advance(0.49)
    assert comfy.timeline == [(0.0, item.prompt_id, "started")]  # alone it was done at 1 s
    clock.advance(0.01)              # the other 0.5 s, alone
    [(end, _, how)] = comfy.timeline[1:]
    assert how == "success" and end == pytest.approx(1.45)
    assert world.compute.busy_seconds() == pytest.approx(1.45)


# -- working memory -----------------------------------------------------------------------------------


def test_a_render_holds_its_peak_only_while_it_runs(tmp_path):
    clock = Clock()
    world = make_world(clock, str(tmp_path), behaviours={
        "comfyui": Behaviour(vram_mib=7000, job_s=1.0, working_mib=4000)})
    gpu, comfy = world.gpu, world["comfyui"]
    before = gpu.used_mib
    comfy.submit(WORKFLOW)
    assert gpu.used_mib == before + 7000 + 4000
    assert [r["used_mib"] for r in gpu.state()["processes"] if r["pid"] == comfy.pid] == [11000]
    clock.pump([0.5, 0.5])  # two nodes of 0.5 s
    assert gpu.used_mib == before + 7000  # the model stays, the peak is gone
    assert gpu.oom_count == 0


def test_a_render_whose_peak_does_not_fit_ends_in_an_oom_the_card_counts(tmp_path):
    clock = Clock()
    world = make_world(clock, str(tmp_path), total_mib=10000, behaviours={
        "comfyui": Behaviour(vram_mib=7000, job_s=1.0, working_mib=4000)})
    comfy, gpu = world["comfyui"], world.gpu
    before = gpu.used_mib  # the baseline and whisper's model
    item = comfy.submit(WORKFLOW)
    status = comfy.history[item.prompt_id]["status"]
    assert status["status_str"] == "error"
    assert "torch.OutOfMemoryError" in json.dumps(status["messages"])
    assert gpu.oom_count == 1 and gpu.state()["oom_count"] == 1
    with open(gpu.state_path) as f:  # what a process reading the state file sees
        assert json.load(f)["oom_count"] == 1
    assert gpu.used_mib == before + 7000  # no half-taken peak left behind
    assert world.active_jobs == 0


def _generate(prompt: str = "hello") -> DummyRequest:
    request = DummyRequest([b"api", b"generate"])
    request.method = b"POST"
    request.path = request.uri = b"/api/generate"
    request.content = io.BytesIO(json.dumps({"model": "llama3", "prompt": prompt}).encode())
    request._disconnected = False
    return request


def test_an_ollama_kv_cache_grows_with_the_tokens_and_is_freed_at_the_end(tmp_path):
    clock = Clock()
    world = make_world(clock, str(tmp_path), behaviours={"ollama": Behaviour(
        vram_mib=9000, stream_chunks=5, chunk_interval_s=1.0, working_mib=200,
        working_growth_mib=1000)})
    gpu = world.gpu
    model = gpu.used_mib + 9000
    request = _generate()
    world["ollama"].render(request)
    seen = [gpu.used_mib - model]
    for _ in range(3):
        clock.advance(1.0)
        seen.append(gpu.used_mib - model)
    # 200 MiB from the start, then a fifth of the growth at each line written.
    assert seen == [400, 600, 800, 1000]
    assert request.finished == 0
    clock.advance(1.0)  # the fifth line (1200 MiB), the end: all of it freed
    assert request.finished == 1
    assert gpu.used_mib == model and gpu.oom_count == 0
    lines = [json.loads(line) for line in b"".join(request.written).splitlines()]
    assert len(lines) == 5 and lines[-1]["done"] is True


def test_a_kv_cache_that_outgrows_the_card_ends_the_stream_with_an_error(tmp_path):
    clock = Clock()
    # 650 MiB left once the baseline (350), whisper (1500) and the model (9000) are in.
    world = make_world(clock, str(tmp_path), total_mib=11500, behaviours={"ollama": Behaviour(
        vram_mib=9000, stream_chunks=4, chunk_interval_s=1.0, working_growth_mib=1200)})
    gpu = world.gpu
    idle = gpu.used_mib
    request = _generate()
    world["ollama"].render(request)  # line 1: 300 MiB fits in the 650 left
    clock.advance(1.0)               # line 2: 600 MiB fits
    assert gpu.oom_count == 0
    clock.advance(1.0)               # line 3: 900 MiB does not
    assert gpu.oom_count == 1 and request.finished == 1
    last = json.loads(b"".join(request.written).splitlines()[-1])
    assert "out of memory" in last["error"]
    assert gpu.used_mib == idle + 9000  # the cache went with the job
    assert world.active_jobs == 0


def test_resize_grows_and_shrinks_an_allocation_and_counts_an_oom(tmp_path):
    gpu = SimulatedGpu(str(tmp_path / "gpu-state.json"), total_mib=1000, baseline_mib=0)
    assert gpu.allocate("kv", 1, "x", 100)
    assert gpu.resize("kv", 900) and gpu.used_mib == 900
    assert not gpu.resize("kv", 1001) and gpu.oom_count == 1 and gpu.used_mib == 900
    assert gpu.resize("kv", 50) and gpu.used_mib == 50
    assert not gpu.resize("nobody", 10) and gpu.oom_count == 1
