"""Several cards in one box: nvidia-smi rows with UUIDs, processes attributed
to their card, free memory read per card (issue 17)."""

from __future__ import annotations

import contextlib
import io
import json
import os

from gpumgr.gpu_sample import APPS_QUERY, CSV_FORMAT, GPU_QUERY, GpuSample, parse_apps_csv, parse_gpu_csv
from gpumgr.testing import SimulatedGpu
from gpumgr.testing.nvidia_smi import main as nvidia_smi_main
from gpumgr.testing.nvidia_smi import sim_uuid, write_external

U0, U1 = "GPU-5f2a3b1c-0000-4000-8000-aaaaaaaaaaaa", "GPU-9e1d7c44-0000-4000-8000-bbbbbbbbbbbb"
GPUS = (f"0, {U0}, NVIDIA GeForce RTX 3060, 12288, 7350, 4938, 3, 41\n"
        f"1, {U1}, NVIDIA RTX A4000, 16376, 350, 16026, 0, 35\n")
APPS = (f"{U0}, 4242, /usr/local/bin/ollama, 7000\n"
        f"{U1}, 5151, /opt/whisper/whisper-server, 1500\n"
        f"{U0}, 5151, /opt/whisper/whisper-server, 1500\n")


def _sample() -> GpuSample:
    return GpuSample(sampled_at=1.0, gpus=parse_gpu_csv(GPUS), processes=parse_apps_csv(APPS))


def test_rows_with_uuids_parse_and_name_with_commas_still_joins():
    gpus = parse_gpu_csv(GPUS + f"2, {U1[:-1]}c, NVIDIA RTX 6000 Ada, Generation, 49140, 1, 49139, 0, 30\n")
    assert [(g.index, g.uuid) for g in gpus[:2]] == [(0, U0), (1, U1)]
    assert gpus[2].name == "NVIDIA RTX 6000 Ada, Generation" and gpus[2].memory_total_mib == 49140
    procs = parse_apps_csv(APPS)
    assert [(p.gpu_uuid, p.pid, p.used_mib) for p in procs][:2] == [(U0, 4242, 7000), (U1, 5151, 1500)]


def test_free_memory_is_per_card_never_the_sum():
    sample = _sample()
    assert sample.free_mib_on(0) == 4938 and sample.free_mib_on(1) == 16026
    assert sample.free_mib_on(2) is None and sample.card_missing(2) and not sample.card_missing(1)


def test_processes_are_attributed_to_their_card_by_uuid():
    sample = _sample()
    assert [(p.pid, p.used_mib) for p in sample.processes_on(0)] == [(4242, 7000), (5151, 1500)]
    assert [(p.pid, p.used_mib) for p in sample.processes_on(1)] == [(5151, 1500)]


def test_output_without_uuids_gives_a_lone_card_every_process():
    sample = GpuSample(1.0, parse_gpu_csv("0, X, 8192, 1000, 7192, 0, 30\n"),
                       parse_apps_csv("12, python, 650\n"))
    assert sample.gpus[0].uuid is None and [p.pid for p in sample.processes_on(0)] == [12]


def test_an_unsampled_box_has_no_cards_and_misses_none():
    sample = GpuSample(sampled_at=None, error="not sampled yet")
    assert sample.card_indexes == () and not sample.card_missing(0) and sample.free_mib_on(0) is None


def _smi(gpu: SimulatedGpu, query: str) -> str:
    """What the simulated nvidia-smi prints (run in this process)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert nvidia_smi_main(["--state", gpu.state_path, query, CSV_FORMAT]) == 0
    return out.getvalue()


def test_the_simulated_box_prints_one_row_per_card_and_places_memory(tmp_path):
    gpu = SimulatedGpu(str(tmp_path / "gpu-state.json"), cards_mib=(12288, 16384), baseline_mib=300)
    gpu.place("tts", (1,))
    gpu.place("llm", (0, 1))
    assert gpu.allocate("tts", 10, "mvoice", 2000)
    assert gpu.allocate("llm/model#11", 11, "ollama", 5000)
    write_external(gpu.procs_dir, os.getpid(), "whisper-server", 700, [1])
    sample = GpuSample(1.0, parse_gpu_csv(_smi(gpu, GPU_QUERY)),
                       parse_apps_csv(_smi(gpu, APPS_QUERY)))
    assert [(g.index, g.uuid) for g in sample.gpus] == [(0, sim_uuid(0)), (1, sim_uuid(1))]
    assert sample.free_mib_on(0) == 12288 - 300 - 5000
    assert sample.free_mib_on(1) == 16384 - 300 - 5000 - 2000 - 700
    assert sorted(p.pid for p in sample.processes_on(1)) == sorted([10, 11, os.getpid()])
    assert [p.pid for p in sample.processes_on(0)] == [11]
    # A job of the TTS does not overlap one of a consumer only on card 0.
    gpu.place("img", (0,))
    gpu.begin_work("img")
    gpu.begin_work("tts")
    assert gpu.overlaps == []
    gpu.begin_work("llm")
    assert [o.already_working for o in gpu.overlaps] == [("img", "tts")]


def test_a_hidden_card_leaves_nvidia_smis_output(tmp_path):
    gpu = SimulatedGpu(str(tmp_path / "gpu-state.json"), cards_mib=(12288, 16384))
    gpu.hide_card(1)
    assert [g.index for g in parse_gpu_csv(_smi(gpu, GPU_QUERY))] == [0]
    with open(gpu.state_path) as f:
        assert [g["index"] for g in json.load(f)["gpus"]] == [0]
