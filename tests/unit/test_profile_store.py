"""Learned profiles at the edges (gpumgr.profile_store): samples in, a state file out."""

import json
import os

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from gpumgr.memory import FigureSource
from gpumgr.profile_store import (
    STATE_FILE,
    STATE_WRITE_INTERVAL_S,
    LearnedProfiles,
    StateFileError,
    decode_state,
    encode_state,
    read_state,
)
from gpumgr.profiles import Activity, Learned
from gpumgr.status import memory_document
from tests.unit.test_profiles import CONSUMERS, sample


@pytest.fixture
def capture_logs():
    """Formatted gpumgr.profile_store log lines while the test runs."""
    lines = []

    def observe(event):
        if event.get("log_namespace") == "gpumgr.profile_store":
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


class World:
    """Who runs, set by the test."""

    def __init__(self):
        self.activity = Activity()


def make(tmp_path=None, model_sizes=lambda c: None):
    clock, world = Clock(), World()
    lp = LearnedProfiles(clock, lambda: CONSUMERS, lambda: world.activity,
                         state_dir=lambda: None if tmp_path is None else str(tmp_path),
                         model_sizes=model_sizes)
    return clock, world, lp


def test_a_consumer_alone_is_learned_from_the_card_and_used_over_the_config():
    clock, world, lp = make()
    lp.observe(sample(used=600))  # empty card: the baseline
    world.activity = Activity(loaded=frozenset({"tts"}))
    lp.observe(sample(used=600 + 2300))
    world.activity = Activity(loaded=frozenset({"tts"}), running={"tts": 1})
    lp.observe(sample(used=600 + 3100))
    p = lp.profile(CONSUMERS["tts"])
    assert (p.resident.mib, p.resident.source, p.resident.samples) == (
        2300, FigureSource.MEASURED, 1)
    assert (p.job_peak.mib, p.job_peak.source) == (800, FigureSource.MEASURED)


def test_an_oom_raise_is_kept_over_smaller_measurements():
    clock, world, lp = make()
    lp.raise_peak("comfyui", None, 6000)
    assert lp.profile(CONSUMERS["comfyui"]).job_peak.source is FigureSource.OOM
    assert lp.profile(CONSUMERS["comfyui"]).job_peak.mib == 6000


def test_an_ollama_job_end_and_a_load_ask_for_its_models_sizes():
    asked = []

    def sizes(c):
        asked.append(c.name)
        return defer.succeed({"llama3": 5200}) if c.name == "ollama" else None

    clock, world, lp = make(model_sizes=sizes)
    ollama = [(1, "ollama", 5600)]
    world.activity = Activity(loaded=frozenset({"ollama"}))
    lp.observe(sample(procs=ollama))  # became loaded
    assert asked.count("ollama") == 1
    world.activity = Activity(loaded=frozenset({"ollama"}), running={"ollama": 1})
    lp.observe(sample(procs=[(1, "ollama", 6400)]))  # no job ended: not asked
    assert asked.count("ollama") == 1
    world.activity = Activity(loaded=frozenset({"ollama"}))
    lp.observe(sample(procs=ollama))  # its job ended
    assert asked.count("ollama") == 2
    p = lp.profile(CONSUMERS["ollama"], "llama3")
    assert (p.resident.mib, p.resident.source) == (5200, FigureSource.MEASURED)
    # While only llama3 was loaded, its job held 6400 - 5200 above the model.
    assert p.job_peak.mib == 1200
    doc = memory_document(lp.profiles_of(CONSUMERS["ollama"]))["memory"]
    assert doc["models"]["llama3"]["resident"] == {"mib": 5200, "source": "measured",
                                                   "samples": 2}
    assert doc["resident"]["source"] == "measured"


def test_state_round_trips_and_is_written_rate_bounded(tmp_path):
    clock, world, lp = make(tmp_path)
    lp.raise_peak("tts", None, 3000)
    clock.advance(0)
    path = tmp_path / STATE_FILE
    assert lp.writes == 1 and decode_state(path.read_bytes())[("tts", None)].oom_peak_mib == 3000
    lp.raise_peak("tts", None, 3100)
    lp.raise_peak("tts", None, 3200)
    clock.advance(STATE_WRITE_INTERVAL_S - 1)
    assert lp.writes == 1  # not on every change
    clock.advance(1)
    assert lp.writes == 2
    assert decode_state(path.read_bytes())[("tts", None)].oom_peak_mib == 3200
    lp.raise_peak("tts", None, 3300)
    lp.stop()  # shutdown writes what is pending
    assert lp.writes == 3 and not clock.getDelayedCalls()
    assert [p.name for p in tmp_path.iterdir()] == [STATE_FILE]  # no temp file left
    # A new broker starts from it.
    _, _, again = make(tmp_path)
    again.start()
    assert again.profile(CONSUMERS["tts"]).job_peak.mib == 3300


def test_nothing_is_written_without_a_state_dir():
    clock, world, lp = make()
    lp.raise_peak("tts", None, 3000)
    assert not clock.getDelayedCalls() and lp.writes == 0


@pytest.mark.parametrize("content", [
    b"{not json", b"\xff\xfe", b"[]", b'{"version": 2, "profiles": []}',
    b'{"version": 1}', b'{"version": 1, "profiles": [3]}',
    b'{"version": 1, "profiles": [{"model": null}]}',
    b'{"version": 1, "profiles": [{"consumer": "a", "resident_samples": -1}]}',
    b'{"version": 1, "profiles": [{"consumer": "a", "resident_samples": true}]}',
    b'{"version": 1, "profiles": [{"consumer": "a", "resident_mib": "9"}]}',
])
def test_a_corrupt_or_wrong_shaped_file_is_ignored_with_one_warning(tmp_path, content,
                                                                     capture_logs):
    path = tmp_path / STATE_FILE
    path.write_bytes(content)
    with pytest.raises(StateFileError):
        decode_state(content)
    assert read_state(str(path)) == {}
    warnings = [e for e in capture_logs if "memory profile state" in e]
    assert len(warnings) == 1, capture_logs


def test_a_missing_file_is_ignored_with_one_warning(tmp_path, capture_logs):
    assert read_state(str(tmp_path / "nope.json")) == {}
    assert len([e for e in capture_logs if "memory profile state" in e]) == 1


def test_encoding_is_what_decoding_reads():
    learned = {("ollama", None): Learned(5000, 3, 700, 2, None),
               ("ollama", "llama3"): Learned(5200, 1, None, 0, 900)}
    assert decode_state(encode_state(learned)) == learned
    assert json.loads(encode_state(learned))["version"] == 1


def test_an_unwritable_state_dir_is_logged_not_raised(tmp_path):
    target = tmp_path / "file"
    target.write_text("not a directory")
    clock, world, lp = make(target)
    lp.raise_peak("tts", None, 3000)
    clock.advance(0)
    assert lp.writes == 0 and os.path.isfile(target)


_ONE = "consumers:\n  t:\n    url: http://127.0.0.1:1\n    paths: {tts: /s}\n    health: /h\n"


def test_the_config_keys_state_dir_and_loop_ms():
    from gpumgr.config import ConfigError, parse_config_text

    gpu = parse_config_text("gpu: {state_dir: /var/lib/gpumgr, loop_ms: 100}\n" + _ONE, "c.yaml").gpu
    assert (gpu.state_dir, gpu.loop_ms) == ("/var/lib/gpumgr", 100)
    gpu = parse_config_text(_ONE, "c.yaml").gpu
    assert (gpu.state_dir, gpu.loop_ms) == (None, 250)
    for bad, key in (("state_dir: rel", "gpu.state_dir"), ('state_dir: ""', "gpu.state_dir"),
                     ("loop_ms: 0", "gpu.loop_ms"), ("loop_ms: 1.5", "gpu.loop_ms")):
        with pytest.raises(ConfigError) as e:
            parse_config_text(f"gpu: {{{bad}}}\n" + _ONE, "c.yaml")
        assert str(e.value).startswith(f"c.yaml: {key}:"), str(e.value)
