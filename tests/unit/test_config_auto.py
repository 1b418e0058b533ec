"""`scheduler.capacity: auto`, `max_bypass_s`, `max_running`: parsed once, errors located,
and a reload between a number and auto refused; the ollama request's model, read once."""

import textwrap

import attrs
import pytest

from gpumgr.config import AUTO, ConfigError, parse_config_text
from gpumgr.drivers.ollama import is_unload_request, model_of_request
from gpumgr.jobs import make_scheduler
from gpumgr.registry import Registry
from gpumgr.reload import reload_refusal
from gpumgr.scheduler import Locked
from gpumgr.scheduler_auto import Auto
from tests.config_support import MINIMAL


def parse(snippet: str):
    return parse_config_text(MINIMAL + textwrap.dedent(snippet), "auto.yaml")


def test_auto_and_its_limits_parse():
    s = parse("scheduler: {mode: evicting, capacity: auto, max_bypass_s: 5, max_running: 3}\n"
              ).scheduler
    assert s.capacity == AUTO and s.auto and s.max_bypass_s == 5 and s.max_running == 3


def test_an_integer_capacity_is_as_before():
    s = parse("scheduler: {capacity: 2}\n").scheduler
    assert s.capacity == 2 and not s.auto and s.max_bypass_s == 30 and s.max_running == 8


@pytest.mark.parametrize("snippet, key, words", [
    ("scheduler: {capacity: automatic}\n", "scheduler.capacity", "positive integer or 'auto'"),
    ("scheduler: {capacity: 0}\n", "scheduler.capacity", "greater than 0"),
    ("scheduler: {max_running: 0}\n", "scheduler.max_running", "greater than 0"),
    ("scheduler: {max_bypass_s: -1}\n", "scheduler.max_bypass_s", "negative"),
])
def test_bad_values_name_the_file_and_key(snippet, key, words):
    with pytest.raises(ConfigError) as e:
        parse(snippet)
    assert e.value.file == "auto.yaml" and e.value.key_path == key and words in str(e.value)


def test_a_reload_between_a_number_and_auto_needs_a_restart():
    old = parse("scheduler: {mode: evicting, capacity: 1}\n")
    new = parse("scheduler: {mode: evicting, capacity: auto}\n")
    assert "restart" in reload_refusal(old, new)
    assert reload_refusal(new, attrs.evolve(new, scheduler=attrs.evolve(
        new.scheduler, max_running=2))) is None


def test_the_scheduler_follows_the_capacity():
    config = parse("scheduler: {mode: evicting, capacity: auto}\n")
    registry = Registry(config.consumers)
    auto = make_scheduler(None, registry, config.scheduler, True, False,
                          figures=lambda: None, profile_of=lambda n, m: None)
    assert isinstance(auto, Auto)
    number = parse("scheduler: {mode: evicting, capacity: 3}\n")
    locked = make_scheduler(None, registry, number.scheduler, True, False,
                            figures=lambda: None, profile_of=lambda n, m: None)
    assert isinstance(locked, Locked) and locked.capacity == 3


@pytest.mark.parametrize("path, body, model", [
    ("/api/generate", b'{"model": "llama3", "prompt": "hi"}', "llama3"),
    ("/api/chat", b' \n{"model":"qwen:7b","messages":[]} trailing', "qwen:7b"),
    ("/v1/chat/completions", b'{"model": "big"}', "big"),
    ("/api/generate", b'{"prompt": "no model"}', None),
    ("/api/generate", b'{"model": 7}', None),
    ("/api/generate", b'not json', None),
    ("/api/generate", None, None),
    ("/api/tags", b'{"model": "x"}', None),
])
def test_the_model_of_an_ollama_request(path, body, model):
    assert model_of_request(path, body) == model


def test_the_unload_detection_reads_the_body_as_before():
    assert is_unload_request("/api/generate", b'{"model": "m", "keep_alive": 0}')
    assert not is_unload_request("/api/generate", b'{"model": "m", "prompt": "x", "keep_alive": 0}')
    assert is_unload_request("/api/generate", b"[" * 100_000)  # too deep: it could be one
    assert not is_unload_request("/api/generate", b"nonsense")
