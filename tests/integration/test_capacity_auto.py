"""`scheduler.capacity: auto` through the real broker, on a simulated 10,000 MiB card.

The simulated services hold their model (`vram_mib`) once loaded and their
working memory (`working_mib`) while a job runs; the simulated nvidia-smi (a
real subprocess) reports both; anything that does not fit is a simulated
CUDA out-of-memory, counted in `world.gpu.oom_count`. The config's figures
(`vram_resident_mib`, `vram_job_mib`) are what gpumgr admits on.

Figures: baseline 350 MiB, headroom 512. L (ollama, llm) 3000 + 1000 per
job; T (mvoice, tts) 2000 + 500; S (mvoice, stt) 4000 + 2000.
"""

from __future__ import annotations

import os
import random

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from gpumgr.memory import FigureSource, MemoryFigure, MemoryProfile, configured
from gpumgr.testing import Behaviour, SimulatedGpu, SimulatedWorld, world_config
from tests.helpers import HeldStream, metric_value, parse_metrics, sleep, wait_for

GPU_MIB = 10_000
FIGURES = {"L": (3000, 1000), "T": (2000, 500), "S": (4000, 2000)}


def auto_world(tmp_path, figures=FIGURES) -> SimulatedWorld:
    gpu = SimulatedGpu(os.path.join(str(tmp_path), "gpu.json"), total_mib=GPU_MIB,
                       baseline_mib=350)
    world = SimulatedWorld(reactor, gpu)
    flavours = {"L": "ollama", "T": "mvoice", "S": "mvoice"}
    for name, (resident, job) in figures.items():
        world.add(flavours.get(name, "ollama"), name,
                  Behaviour(vram_mib=resident, working_mib=job))
    world.listen(reactor)
    return world


@pytest_twisted.async_yield_fixture
async def world(tmp_path):
    w = auto_world(tmp_path)
    yield w
    await w.stop()


async def auto_broker(world, start_broker, consumers=None, scheduler=None, figures=FIGURES):
    entries = {n: {"vram_job_mib": job} for n, (_, job) in figures.items()}
    for name, extra in (consumers or {}).items():
        entries.setdefault(name, {}).update(extra)
    config = world_config(world, kinds={"T": "tts", "S": "stt"}, consumers=entries,
                          scheduler={"mode": "evicting", "capacity": "auto",
                                     **(scheduler or {})},
                          gpu={"interval_s": 0.1}, health={"interval_s": 5})
    service, url = await start_broker(config)
    await service.health.probe_all_now()
    await service.broker.gpu.sample_now()
    return service, url


def waiting(service) -> list[tuple[str, str]]:
    budget = service.broker.status()["scheduler"]["budget"]
    return [(w["consumer"], w["reason"]) for w in budget["waiting"]]


@pytest_twisted.ensureDeferred
async def test_side_by_side_when_they_fit_and_a_job_that_does_not_waits(world, start_broker,
                                                                         client):
    service, url = await auto_broker(world, start_broker)
    held = await HeldStream(world["L"]).start(client, url)
    # T (2000 + 500) fits beside L's running job (3000 + 1000): it runs at once.
    tts = await client.request("POST", url + "/v1/tts", b"hello")
    assert tts.code == 200 and not held.reply.called
    assert world.max_active_jobs == 2
    # S (4000 + 2000) does not fit beside L's job, even with the idle T evicted: it waits.
    stt = defer.ensureDeferred(client.request("POST", url + "/v1/stt", b"audio"))
    await wait_for(lambda: waiting(service) == [("S", "memory")])
    assert not stt.called and world["S"].work_requests() == []
    status = (await client.request("GET", url + "/v1/status")).json()["scheduler"]
    assert status["capacity"] == "auto" and len(status["holders"]) == 1
    budget = status["budget"]
    assert budget["total_mib"] == GPU_MIB and budget["headroom_mib"] == 512
    assert budget["consumers"]["L"] == {"resident_mib": 3000, "job_mib": 1000, "running": 1}
    assert budget["consumers"]["T"]["job_mib"] == 0 and budget["waiting"][0]["kind"] == "stt"
    assert "cards" not in budget  # one card: the document of a one-card box
    metrics = parse_metrics((await client.request("GET", url + "/metrics")).body.decode())
    assert metric_value(metrics["gpumgr_waiting_jobs"], reason="memory") == 1
    assert metric_value(metrics["gpumgr_budget_bytes"], card="0", consumer="L",
                        part="job") == 1000 * 2**20
    held.release()
    assert (await held.reply).code == 200
    reply = await stt  # memory came back: it runs, never refused
    assert reply.code == 200
    assert world.gpu.oom_count == 0
    status = service.broker.status()["scheduler"]
    assert status["budget"]["waiting"] == [] and status["holders"] == []


@pytest_twisted.ensureDeferred
async def test_exclusivity_and_max_concurrency_hold_while_jobs_run(world, start_broker,
                                                                   client):
    gate: defer.Deferred = defer.Deferred()
    world["L"].behaviour.stream_chunks = 2
    world["L"].behaviour.stream_gate = lambda i: gate
    world["L"].behaviour.working_mib = 500
    service, url = await auto_broker(
        world, start_broker, figures={**FIGURES, "L": (3000, 500)},
        consumers={"L": {"max_concurrency": 2, "can_coexist_with": []}})
    llm = [defer.ensureDeferred(client.request("POST", url + "/v1/llm", b'{"prompt":"x"}'))
           for _ in range(3)]
    await wait_for(lambda: len(world["L"].work_requests()) == 2)
    tts = defer.ensureDeferred(client.request("POST", url + "/v1/tts", b"hi"))
    await wait_for(lambda: sorted(waiting(service)) == [("L", "concurrency"),
                                                        ("T", "exclusivity")])
    assert world.max_active_jobs == 2 and world["T"].work_requests() == []
    gate.callback(None)
    assert [r.code for r in [await d for d in llm]] == [200, 200, 200]
    assert (await tts).code == 200
    assert world.max_active_jobs == 2
    assert world["L"].unloads >= 1  # T may not sit beside an idle L: evicted first
    assert world.gpu.oom_count == 0


@pytest_twisted.ensureDeferred
async def test_two_loads_never_overlap(world, start_broker, client):
    world["L"].behaviour.prompt_eval_s = 0.3  # loaded, thinking: no answer head yet
    service, url = await auto_broker(world, start_broker)
    llm = defer.ensureDeferred(client.request("POST", url + "/v1/llm", b'{"prompt":"x"}'))
    await wait_for(lambda: len(world["L"].work_requests()) == 1)
    tts = defer.ensureDeferred(client.request("POST", url + "/v1/tts", b"hi"))
    await wait_for(lambda: waiting(service) == [("T", "load_in_progress")])
    assert (await llm).code == 200 and (await tts).code == 200
    # T's load (its first request) reached it only once L had answered.
    l_asked = world["L"].work_requests()[0].at
    assert world["T"].work_requests()[0].at >= l_asked + 0.3
    assert world.gpu.oom_count == 0


@pytest_twisted.ensureDeferred
async def test_an_oom_raises_the_peak_which_is_kept_and_used(world, start_broker, client):
    # S's config says 1000 MiB per job; its jobs really take 2500.
    world["S"].behaviour.working_mib = 2500
    service, url = await auto_broker(world, start_broker, figures={**FIGURES, "S": (4000, 1000)})
    held = await HeldStream(world["L"]).start(client, url)
    stt = defer.ensureDeferred(client.request("POST", url + "/v1/stt", b"audio"))
    # 350 + 4000 (L's job) + 4000 + 1000 + 512 fit by the figures: S starts and runs out.
    await wait_for(lambda: world.gpu.oom_count == 1)
    await wait_for(lambda: waiting(service) == [] and not stt.called)
    s_config = service.broker.config.consumers["S"]
    raised = service.broker.profiles.profile(s_config).job_peak
    # It had 10000 - 4000 (L's job) - 4000 (its model): it needs more than 2000.
    assert raised.source is FigureSource.OOM and raised.mib == 2001
    assert len(world["S"].work_requests()) == 1  # the replay waits until S runs alone
    held.release()
    assert (await held.reply).code == 200
    reply = await stt
    assert reply.code == 200 and len(world["S"].work_requests()) == 2
    # Kept and used: beside L's job again (4000 + 4000 + 2001 + 350 + 512 > 10000), S
    # now waits instead of running out of memory; once L's job is over it fits.
    held = await HeldStream(world["L"]).start(client, url)
    stt = defer.ensureDeferred(client.request("POST", url + "/v1/stt", b"audio"))
    await wait_for(lambda: waiting(service) == [("S", "memory")])
    held.release()
    assert (await stt).code == 200
    assert world.gpu.oom_count == 1
    assert service.broker.profiles.profile(s_config).job_peak == raised


@pytest_twisted.ensureDeferred
async def test_the_oldest_job_is_overtaken_only_for_max_bypass_s(world, start_broker, client):
    # T's job peak (1500) keeps S out while T runs, even once L's job ended:
    # 350 + 2000+1500 + 4000+2000 + 512 > 10000.
    service, url = await auto_broker(world, start_broker, scheduler={"max_bypass_s": 0.5},
                                     figures={**FIGURES, "T": (2000, 1500)})
    held = await HeldStream(world["L"]).start(client, url)
    stt = defer.ensureDeferred(client.request("POST", url + "/v1/stt", b"audio"))
    await wait_for(lambda: waiting(service) == [("S", "memory")])
    # T fits beside L's job: it overtakes the waiting S (backfill).
    assert (await client.request("POST", url + "/v1/tts", b"a")).code == 200
    await sleep(0.6)
    # The bound is spent: T fits, but would delay S; it waits for S now.
    tts = defer.ensureDeferred(client.request("POST", url + "/v1/tts", b"b"))
    await wait_for(lambda: sorted(waiting(service)) == [("S", "memory"), ("T", "bypass")])
    assert len(world["T"].work_requests()) == 1
    held.release()
    assert (await stt).code == 200 and (await tts).code == 200
    assert world.gpu.oom_count == 0


@pytest_twisted.ensureDeferred
async def test_past_the_bypass_bound_a_job_that_cannot_delay_the_oldest_starts(world,
                                                                               start_broker,
                                                                               client):
    # With T's own figures (2000 + 500), S can start beside T once L's job
    # ends (evicting the idle L): T never delays S, so it is not held back.
    service, url = await auto_broker(world, start_broker, scheduler={"max_bypass_s": 0.5})
    held = await HeldStream(world["L"]).start(client, url)
    stt = defer.ensureDeferred(client.request("POST", url + "/v1/stt", b"audio"))
    await wait_for(lambda: waiting(service) == [("S", "memory")])
    assert (await client.request("POST", url + "/v1/tts", b"a")).code == 200
    await sleep(0.6)
    assert (await client.request("POST", url + "/v1/tts", b"b")).code == 200  # past the bound
    assert waiting(service) == [("S", "memory")] and not stt.called
    held.release()
    assert (await stt).code == 200
    assert world.gpu.oom_count == 0


class PerModel:
    """Profiles by model (what branch prof learns from ollama's /api/ps)."""

    def __init__(self, models: dict[str, tuple[int, int]]) -> None:
        self.models = models

    def profile(self, consumer, model=None):
        if model in self.models:
            resident, job = self.models[model]
            return MemoryProfile(MemoryFigure(resident, FigureSource.MEASURED, 3),
                                 MemoryFigure(job, FigureSource.MEASURED, 3))
        return configured(consumer)

    def raise_peak(self, consumer, model, seen_mib):
        resident, job = self.models[model]
        self.models[model] = (resident, max(job, seen_mib))


@pytest_twisted.ensureDeferred
async def test_an_ollama_request_is_admitted_on_its_models_profile(tmp_path, start_broker,
                                                                   client):
    figures = {"L": (3000, 1000), "M": (1000, 200)}
    world = auto_world(tmp_path, figures)
    try:
        world["M"].behaviour.models = {"small": 1000, "big": 6000}
        world["M"].behaviour.working_mib = 200
        entries = {"L": {"vram_job_mib": 1000}, "M": {"vram_job_mib": 200}}
        raw_kinds = {"M": "tts"}
        config = world_config(world, kinds=raw_kinds, consumers=entries,
                              scheduler={"mode": "evicting", "capacity": "auto"},
                              gpu={"interval_s": 0.1}, health={"interval_s": 5})
        assert config.routes["llm"] == "L" and config.routes["tts"] == "M"
        service, url = await start_broker(config)
        await service.health.probe_all_now()
        service.broker.profiles = PerModel({"small": (1000, 200), "big": (6000, 1000)})
        held = await HeldStream(world["L"]).start(client, url)
        small = await client.request("POST", url + "/v1/tts",
                                     b'{"model":"small","prompt":"x","stream":false}')
        assert small.code == 200 and world.max_active_jobs == 2  # beside L's job
        big = defer.ensureDeferred(client.request(
            "POST", url + "/v1/tts", b'{"model":"big","prompt":"x","stream":false}'))
        # 350 + 4000 (L's job) + 6000 + 1000 + 512 > 10000: big waits on its own figures.
        await wait_for(lambda: waiting(service) == [("M", "memory")])
        held.release()
        assert (await big).code == 200
        assert world.gpu.oom_count == 0
    finally:
        await world.stop()


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest_twisted.ensureDeferred
async def test_random_arrivals_sizes_and_ends_never_overflow_the_card(tmp_path, start_broker,
                                                                      client, seed):
    """Seeded: four consumers of random sizes (their figures true), clients
    sending at random moments, jobs of random lengths. The simulated card
    never runs out of memory, and every slot comes back."""
    rng = random.Random(seed)
    kinds = {"A": "tts", "B": "stt", "C": "llm", "D": "image"}
    gpu = SimulatedGpu(os.path.join(str(tmp_path), "gpu.json"), total_mib=GPU_MIB,
                       baseline_mib=350)
    world = SimulatedWorld(reactor, gpu)
    entries = {}
    for name in kinds:
        resident, job = rng.randint(500, 5000), rng.randint(0, 3000)
        world.add("mvoice", name, Behaviour(vram_mib=resident, working_mib=job,
                                            job_s=rng.uniform(0.01, 0.15)))
        entries[name] = {"vram_job_mib": job, "max_concurrency": rng.randint(1, 2)}
    world.listen(reactor)
    try:
        config = world_config(world, kinds=kinds, consumers=entries,
                              scheduler={"mode": "evicting", "capacity": "auto",
                                         "max_bypass_s": 0.3},
                              gpu={"interval_s": 0.1}, health={"interval_s": 5})
        service, url = await start_broker(config)
        await service.health.probe_all_now()

        async def one(delay_s: float, kind: str):
            await sleep(delay_s)
            return await client.request("POST", url + f"/v1/{kind}", b"x")

        replies = await defer.gatherResults([
            defer.ensureDeferred(one(rng.uniform(0, 1.5), rng.choice(list(kinds.values()))))
            for _ in range(40)])
        codes = [r.code for r in replies]
        # Each fits an empty card (5000 + 3000 + 350 + 512 < 10000): none is refused.
        assert codes == [200] * 40, codes
        assert world.gpu.oom_count == 0
        stats = service.scheduler.stats()
        assert stats.in_flight == 0 and stats.queue_depth == 0 and stats.holders == ()
        assert all(service.registry[n].active == 0 for n in kinds)
        assert world.active_jobs == 0
        print(f"[capacity auto, seed {seed}] codes {sorted(set(codes))}, max GPU jobs at once "
              f"{world.max_active_jobs}, evictions {service.broker.admission.evictions}")
    finally:
        await world.stop()
