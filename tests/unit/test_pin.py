"""`consumers.<name>.pin`: the config key, and the pure eviction decision."""

from __future__ import annotations

import pytest
import yaml

from gpumgr.config import ConfigError, parse_config
from gpumgr.eviction import ConsumerView, Residency, plan_eviction
from tests.config_support import MINIMAL


def _view(name, loaded=True, mib=4000, coexist=None, pin=False, last_used=None):
    return ConsumerView(name=name, residency=Residency.LOADED if loaded else Residency.UNLOADED,
                        resident_mib=mib if loaded else 0, vram_resident_mib=mib,
                        can_coexist_with=coexist, pinned=pin, last_used=last_used, pin=pin)


def _config(**pin_entry):
    raw = yaml.safe_load(MINIMAL)
    raw["consumers"]["ollama"].update(pin_entry)
    return parse_config(raw, "test.yaml")


def test_pin_is_off_by_default_and_pins_the_consumer_when_set():
    assert _config().consumers["ollama"].pin is False
    c = _config(pin=True, unload={"method": "POST", "path": "/x"}).consumers["ollama"]
    assert c.pin is True and c.can_unload and c.pinned


@pytest.mark.parametrize("value", ["yes", 1])
def test_pin_must_be_a_boolean(value):
    with pytest.raises(ConfigError, match="consumers.ollama.pin"):
        _config(pin=value)


def test_pressure_passes_over_a_pin_and_names_it_when_short():
    views = {v.name: v for v in (_view("t", loaded=False, mib=6000),
                                 _view("a", pin=True, last_used=1, mib=6000),
                                 _view("b", last_used=5, mib=1000))}
    plan = plan_eviction("t", views, free_mib=3000, headroom_mib=0)
    assert plan.victim_names() == ("b",)
    assert plan.shortfall_mib == 2000 and plan.held_by_pin == ("a",)


def test_a_pin_that_is_not_in_the_way_is_not_named():
    views = {v.name: v for v in (_view("t", loaded=False, mib=1000),
                                 _view("a", pin=True, mib=6000), _view("b", mib=1000))}
    plan = plan_eviction("t", views, free_mib=500, headroom_mib=0)
    assert plan.victim_names() == ("b",) and plan.shortfall_mib == 0
    assert plan.held_by_pin == ()


def test_exclusivity_is_blocked_by_a_loaded_pin():
    views = {v.name: v for v in (_view("t", loaded=False, coexist=[]), _view("a", pin=True))}
    plan = plan_eviction("t", views, free_mib=50000, headroom_mib=0)
    assert plan.victims == () and plan.blocked_by == ("a",)
