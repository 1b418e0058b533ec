"""`consumers.<name>.gpu`: a card, several, or auto for a process gpumgr owns (issue 17)."""

from __future__ import annotations

import pytest

from gpumgr.config import ConfigError, GpuPlacement, parse_config_text
from tests.config_support import MINIMAL


def _with_gpu(value: str, process: bool = False) -> str:
    extra = f"    gpu: {value}\n"
    if process:
        extra += "    process: {command: [/usr/bin/ollama, serve]}\n"
    return MINIMAL.replace("    paths:", extra + "    paths:")


def test_default_is_card_0():
    assert parse_config_text(MINIMAL, "x.yaml").consumers["ollama"].gpu == GpuPlacement((0,), False)


@pytest.mark.parametrize("value,cards", [("1", (1,)), ("[1, 0]", (0, 1)), ("[3]", (3,))])
def test_an_index_or_a_list(value, cards):
    assert parse_config_text(_with_gpu(value), "x.yaml").consumers["ollama"].gpu.cards == cards


def test_auto_for_an_owned_process():
    gpu = parse_config_text(_with_gpu("auto", process=True), "x.yaml").consumers["ollama"].gpu
    assert gpu.auto and gpu.cards == () and gpu.describe() == "auto"


@pytest.mark.parametrize("value,problem", [
    ("auto", "auto needs a process gpumgr owns"),
    ("[]", "must be a card index"),
    ("-1", "must be a card index"),
    ("true", "must be a card index"),
    ("'1'", "must be a card index"),
    ("[0, 0]", "lists a card twice"),
    ("64", "must be a card index"),
])
def test_bad_values_name_the_file_and_key(value, problem):
    with pytest.raises(ConfigError) as info:
        parse_config_text(_with_gpu(value), "/etc/gpumgr/gpus.yaml")
    assert info.value.file == "/etc/gpumgr/gpus.yaml"
    assert info.value.key_path == "consumers.ollama.gpu"
    assert problem in info.value.problem
