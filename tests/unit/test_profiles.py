"""The learner's decisions (gpumgr.profiles): pure, over (figures, sample, who runs)."""

import attrs
from hypothesis import given
from hypothesis import strategies as st

from gpumgr.config import parse_config_text
from gpumgr.gpu_sample import GpuInfo, GpuProcess, GpuSample
from gpumgr.memory import FigureSource
from gpumgr.profiles import (
    NOTHING_LEARNED,
    Activity,
    Baseline,
    Learned,
    Reading,
    Via,
    card_reading,
    figure,
    fold,
    learn,
    next_baseline,
    process_readings,
    profile_of,
    readings_for,
    service_readings,
)

CONFIG = """
consumers:
  ollama:
    url: http://127.0.0.1:11434
    driver: ollama
    paths: {llm: /api/generate}
    vram_resident_mib: 5000
    vram_job_mib: 500
    gpu_process: ollama
  comfyui:
    url: http://127.0.0.1:8188
    driver: comfyui
    paths: {image: /prompt}
    vram_resident_mib: 7000
    vram_job_mib: 1000
  tts:
    url: http://127.0.0.1:9000
    paths: {tts: /speak}
    health: /health
    vram_resident_mib: 2000
"""
CONSUMERS = parse_config_text(CONFIG, "test.yaml").consumers
OLLAMA, COMFY, TTS = CONSUMERS["ollama"], CONSUMERS["comfyui"], CONSUMERS["tts"]


def sample(used=1000, procs=(), gpus=1, at=1.0, error=None):
    gpu = GpuInfo(0, "sim", 24576, used, 24576 - used, 0, 40)
    if error:
        return GpuSample(sampled_at=at, error=error)
    return GpuSample(sampled_at=at, gpus=tuple(attrs.evolve(gpu, index=i) for i in range(gpus)),
                     processes=tuple(GpuProcess(pid, name, mib) for pid, name, mib in procs))


IDLE = Activity()


def test_a_process_reading_sums_the_matching_processes_whatever_else_runs():
    s = sample(procs=[(1, "ollama", 3000), (2, "ollama_runner", 2500), (3, "python", 7000)])
    busy = Activity(running={"ollama": 1, "comfyui": 1}, loaded=frozenset({"ollama", "comfyui"}))
    assert process_readings(s, CONSUMERS.values(), busy) == [
        Reading("ollama", None, 5500, 1, Via.PROCESS)]


def test_no_process_reading_when_a_matching_process_memory_is_unknown_or_none_matches():
    assert process_readings(sample(procs=[(1, "ollama", None)]), [OLLAMA], IDLE) == []
    assert process_readings(sample(procs=[(1, "python", 10)]), [OLLAMA], IDLE) == []
    assert process_readings(sample(error="driver"), [OLLAMA], IDLE) == []


def test_the_baseline_is_the_newest_empty_card_and_only_an_empty_one():
    b = next_baseline(None, sample(used=700, at=5), IDLE)
    assert b == Baseline(700, 5)
    for busy in (Activity(loaded=frozenset({"tts"})), Activity(running={"tts": 1}),
                 Activity(changing=True)):
        assert next_baseline(b, sample(used=9000, at=6), busy) == b
    assert next_baseline(b, sample(used=9000, gpus=2), IDLE) == b  # which card? not ours to say
    assert next_baseline(b, sample(error="x"), IDLE) == b


ALONE = Activity(running={"tts": 1}, loaded=frozenset({"tts"}))


def test_the_card_is_attributed_to_a_consumer_alone_above_the_baseline():
    r = card_reading(sample(used=3700), CONSUMERS.values(), ALONE, Baseline(700, 0))
    assert r == Reading("tts", None, 3000, 1, Via.CARD)


def test_the_card_is_attributed_to_nobody_when_it_cannot_be():
    base = Baseline(700, 0)
    s = sample(used=3700)
    cases = [
        (s, ALONE, None),  # no baseline: the driver's reserve would count as the consumer's
        (s, attrs.evolve(ALONE, changing=True), base),  # memory on the move
        (s, Activity(running={"tts": 1}, loaded=frozenset({"tts", "comfyui"})), base),
        (s, Activity(loaded=frozenset({"tts"}), running={"comfyui": 1}), base),
        (s, Activity(), base),  # nobody
        (sample(used=3700, gpus=2), ALONE, base),
        (sample(error="x"), ALONE, base),
        # a consumer with gpu_process is read by its processes, not the card
        (s, Activity(running={"ollama": 1}, loaded=frozenset({"ollama"})), base),
    ]
    for smp, act, b in cases:
        assert card_reading(smp, CONSUMERS.values(), act, b) is None, (act, b)


def test_a_stranger_after_the_baseline_makes_the_card_figure_err_high():
    r = card_reading(sample(used=3700 + 900), [TTS], ALONE, Baseline(700, 0))
    assert r is not None and r.held_mib == 3900


def test_idle_readings_keep_the_most_held_as_resident():
    lr = learn(NOTHING_LEARNED, Reading("tts", None, 1800, 0, Via.CARD), 2000)
    lr = learn(lr, Reading("tts", None, 2100, 0, Via.CARD), 2000)
    lr = learn(lr, Reading("tts", None, 1900, 0, Via.CARD), 2000)
    assert (lr.resident_mib, lr.resident_samples, lr.job_peak_mib) == (2100, 3, None)


def test_a_running_reading_is_the_extra_above_resident_shared_by_the_jobs():
    lr = Learned(resident_mib=2000, resident_samples=1)
    lr = learn(lr, Reading("tts", None, 2600, 1, Via.CARD), 9999)
    assert (lr.job_peak_mib, lr.job_peak_samples) == (600, 1)
    lr = learn(lr, Reading("tts", None, 3401, 2, Via.CARD), 9999)  # two jobs: 1401 / 2, up
    assert (lr.job_peak_mib, lr.job_peak_samples) == (701, 2)
    lr = learn(lr, Reading("tts", None, 2100, 1, Via.CARD), 9999)  # less: kept
    assert lr.job_peak_mib == 701


def test_without_a_measured_resident_the_peak_is_above_the_configured_one():
    lr = learn(NOTHING_LEARNED, Reading("tts", None, 2500, 1, Via.CARD), 2000)
    assert lr.job_peak_mib == 500 and lr.resident_mib is None
    lr = learn(NOTHING_LEARNED, Reading("tts", None, 1500, 1, Via.CARD), 2000)
    assert lr.job_peak_mib == 0


def test_a_figure_is_the_largest_with_its_source_and_samples():
    assert figure(2000, None, 0) == figure(2000, 5000, 0)  # no samples: nothing measured
    assert figure(2000, 1500, 4).source is FigureSource.CONFIG
    assert figure(2000, 1500, 4).samples == 4
    f = figure(2000, 2500, 4)
    assert (f.mib, f.source, f.samples) == (2500, FigureSource.MEASURED, 4)
    f = figure(2000, 2500, 4, oom_mib=3000)
    assert (f.mib, f.source) == (3000, FigureSource.OOM)
    assert figure(2000, 2500, 4, oom_mib=2400).source is FigureSource.MEASURED


def test_a_model_uses_its_own_figures_and_falls_back_to_the_consumer():
    wide = Learned(resident_mib=6000, resident_samples=3, job_peak_mib=800, job_peak_samples=2)
    model = Learned(resident_mib=5200, resident_samples=1)
    p = profile_of(OLLAMA, wide, model)
    assert (p.resident.mib, p.resident.source) == (5200, FigureSource.MEASURED)
    assert (p.job_peak.mib, p.job_peak.samples) == (800, 2)  # the consumer's
    p = profile_of(OLLAMA, wide, None)
    assert p.resident.mib == 6000
    small = profile_of(OLLAMA, NOTHING_LEARNED, Learned(resident_mib=100, resident_samples=1))
    assert (small.resident.mib, small.resident.source) == (5000, FigureSource.CONFIG)


def test_an_oom_of_the_consumer_or_the_model_raises_the_job_peak():
    wide = Learned(job_peak_mib=800, job_peak_samples=2, oom_peak_mib=1200)
    assert profile_of(OLLAMA, wide, None).job_peak.source is FigureSource.OOM
    assert profile_of(OLLAMA, NOTHING_LEARNED, Learned(oom_peak_mib=3000)).job_peak.mib == 3000


def test_service_reports_are_model_residents():
    rs = service_readings("ollama", {"qwen": 4000, "llama3": 5200})
    assert rs == [Reading("ollama", "llama3", 5200, 0, Via.SERVICE),
                  Reading("ollama", "qwen", 4000, 0, Via.SERVICE)]
    learned = fold({}, rs, {"ollama": 5000})
    assert learned[("ollama", "llama3")].resident_mib == 5200


def test_a_running_reading_teaches_the_only_loaded_model_above_its_own_size():
    learned = fold({}, service_readings("ollama", {"llama3": 5200}), {"ollama": 5000})
    run = Reading("ollama", None, 6000, 1, Via.PROCESS)
    learned = fold(learned, [run], {"ollama": 5000}, single_model={"ollama": "llama3"})
    assert learned[("ollama", "llama3")].job_peak_mib == 800
    assert learned[("ollama", None)].job_peak_mib == 1000  # above the configured 5000
    # Two models loaded (no single model): only the consumer-wide figure learns.
    again = fold(learned, [attrs.evolve(run, held_mib=9000)], {"ollama": 5000})
    assert again[("ollama", "llama3")].job_peak_mib == 800


def test_readings_for_takes_processes_and_the_card():
    base = Baseline(500, 0)
    act = Activity(running={"tts": 1}, loaded=frozenset({"tts"}))
    rs = readings_for(sample(used=3000, procs=[(9, "python", 2400)]), CONSUMERS.values(), act,
                      base)
    assert rs == [Reading("tts", None, 2500, 1, Via.CARD)]


_names = st.sampled_from(["ollama", "comfyui", "tts"])
_activity = st.builds(
    Activity,
    running=st.dictionaries(_names, st.integers(1, 3), max_size=3),
    loaded=st.frozensets(_names),
    changing=st.booleans(),
)


@given(_activity, st.integers(0, 24576), st.integers(0, 24576))
def test_the_card_is_attributed_only_to_the_one_present_consumer(act, used, base):
    r = card_reading(sample(used=used), CONSUMERS.values(), act, Baseline(base, 0))
    present = set(act.loaded) | set(act.running)
    if r is not None:
        assert present == {r.consumer} and not act.changing
        assert CONSUMERS[r.consumer].gpu_process is None
        assert r.held_mib == max(0, used - base) and r.jobs == act.running.get(r.consumer, 0)
    elif len(present) == 1 and not act.changing:
        assert CONSUMERS[next(iter(present))].gpu_process is not None


_readings = st.lists(st.builds(Reading, consumer=st.just("tts"), model=st.none(),
                               held_mib=st.integers(0, 30000), jobs=st.integers(0, 4),
                               via=st.just(Via.CARD)), max_size=30)


@given(_readings, st.integers(0, 10000))
def test_figures_never_fall_and_a_profile_always_covers_what_was_seen(readings, conf):
    lr = NOTHING_LEARNED
    for r in readings:
        nxt = learn(lr, r, conf)
        assert (nxt.resident_mib or 0) >= (lr.resident_mib or 0)
        assert (nxt.job_peak_mib or 0) >= (lr.job_peak_mib or 0)
        assert nxt.resident_samples + nxt.job_peak_samples == (
            lr.resident_samples + lr.job_peak_samples + 1)
        lr = nxt
    tts = attrs.evolve(TTS, vram_resident_mib=conf)
    p = profile_of(tts, lr, None)
    assert p.resident.mib >= conf and p.job_peak.mib >= tts.vram_job_mib
    for r in readings:
        if r.jobs == 0:
            assert p.resident.mib >= r.held_mib
    # A running reading taken after the resident figure it was measured
    # against: one job's running total covers its share.
    idle = [r for r in readings if r.jobs == 0]
    if not idle:
        for r in readings:
            if r.jobs == 1:
                assert p.running_mib >= r.held_mib

