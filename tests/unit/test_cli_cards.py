"""`gpumgr status` on a box of several cards: consumers grouped by card; one
card, and a box without a balancer name, read as before."""

from __future__ import annotations

import copy

from gpumgr.cli import format_status

ROW = {"driver": "mvoice", "health": "ok", "loaded": True, "active": 0, "total_requests": 1,
       "errors": 0, "gpu_resident_mib": 2500, "process": None, "renders": []}


def card(index: int, name: str) -> dict:
    return {"index": index, "name": name, "memory_total_mib": 16384, "memory_used_mib": 4000}


def doc(gpus: list[dict], consumers: dict[str, dict], balancer: dict | None = None) -> dict:
    broker = {"version": "1", "mode": "evicting", "uptime_s": 3}
    if balancer is not None:
        broker["balancer"] = balancer
    return {"broker": broker, "gpu": {"available": True, "gpus": gpus},
            "consumers": consumers, "scheduler": {"queue_depth": 0}}


def test_one_card_reads_as_before_the_new_fields():
    before = doc([card(0, "A")], {"a": dict(ROW), "b": dict(ROW)})
    after = copy.deepcopy(before)
    for c in after["consumers"].values():
        c.update(gpu=[0], gpu_auto=False)
    after["broker"]["balancer"] = {"phase": "serving", "box": None,
                                   "kinds": {"tts": {"ready": True, "reason": None}}}
    assert format_status(after) == format_status(before)
    assert "card 0" not in format_status(after)


def test_several_cards_group_consumers_by_card_and_list_unplaced_auto_ones():
    consumers = {"llm": {**ROW, "gpu": [0], "gpu_auto": False},
                 "split": {**ROW, "gpu": [0, 1], "gpu_auto": False},
                 "tts": {**ROW, "gpu": [1], "gpu_auto": False},
                 "stt": {**ROW, "gpu": [], "gpu_auto": True}}
    lines = format_status(doc([card(0, "RTX A"), card(1, "RTX B")], consumers)).splitlines()
    heads = [i for i, line in enumerate(lines)
             if line in ("card 0 (RTX A):", "card 1 (RTX B):", "not placed yet (gpu: auto):")]
    assert len(heads) == 3, lines

    def group(i: int) -> list[str]:
        end = next((j for j in range(heads[i] + 1, len(lines)) if not lines[j].startswith("  ")),
                   len(lines))
        return [line.split()[0] for line in lines[heads[i] + 2:end]]

    assert lines[heads[0] + 1].split()[0] == "CONSUMER"
    assert group(0) == ["llm", "split"]
    assert group(1) == ["split", "tts"]
    assert group(2) == ["stt"]


def test_the_balancer_line_names_the_box_its_phase_and_the_kinds_not_ready():
    balancer = {"phase": "leaving", "box": "box1",
                "kinds": {"tts": {"ready": False, "reason": "not_ready"},
                          "llm": {"ready": False, "reason": "not_ready"}}}
    text = format_status(doc([card(0, "A")], {"a": dict(ROW)}, balancer))
    assert "balancer: box box1, leaving (not ready: tts, llm)" in text
    serving = {"phase": "serving", "box": "box1", "kinds": {"tts": {"ready": True}}}
    assert "balancer: box box1, serving\n" in format_status(doc([card(0, "A")], {}, serving))
