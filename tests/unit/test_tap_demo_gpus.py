"""`twistd gpumgr --demo --gpus N`: the option, checked before anything starts."""

from __future__ import annotations

import pytest
from twisted.python import usage

from gpumgr.tap import Options
from gpumgr.testing.demo import DEMO_MAX_GPUS


def parsed(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


def test_the_demo_has_one_card_unless_told():
    assert parsed("--demo")["demo_gpus"] == 1
    assert parsed("--demo", "--gpus", "2")["demo_gpus"] == 2


@pytest.mark.parametrize("value", ["0", str(DEMO_MAX_GPUS + 1), "two", "-1", "1.5"])
def test_a_card_count_the_demo_cannot_simulate_is_refused(value):
    with pytest.raises(usage.UsageError, match=f"--gpus: must be a whole number from 1 to "
                       f"{DEMO_MAX_GPUS}; got '{value}'"):
        parsed("--demo", "--gpus", value)


def test_gpus_without_the_demo_is_refused_and_says_where_cards_come_from(tmp_path):
    config = tmp_path / "gpumgr.yaml"
    config.write_text("consumers: {}\n")
    with pytest.raises(usage.UsageError, match="--gpus is for --demo only.*nvidia-smi"):
        parsed("--config", str(config), "--gpus", "2")
