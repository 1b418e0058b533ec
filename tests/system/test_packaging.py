"""The wheel carries the twistd plugin, and twistd lists it."""

import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_wheel_contains_plugin_and_simulator(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp_path), ROOT],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = tmp_path.glob("gpumgr-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/gpumgr_plugin.py" in names
    assert "twisted/__init__.py" not in names and "twisted/plugins/__init__.py" not in names
    assert "gpumgr/testing/nvidia_smi.py" in names
    entry_points = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "gpumgr-sim-nvidia-smi = gpumgr.testing.nvidia_smi:main" in entry_points


def test_twistd_lists_gpumgr():
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    out = subprocess.run([twistd, "--help"], capture_output=True, text=True, timeout=60).stdout
    assert "gpumgr" in out


def test_mode_help_names_every_mode():
    from gpumgr.config import SCHEDULER_MODES
    from gpumgr.tap import Options

    text = str(Options())
    assert SCHEDULER_MODES and all(mode in text for mode in SCHEDULER_MODES)
