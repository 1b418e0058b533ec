"""The config-only memory profiles (gpumgr.memory)."""

from gpumgr.config import parse_config_text
from gpumgr.memory import ConfiguredProfiles, FigureSource

CONFIG = """
consumers:
  ollama:
    url: http://127.0.0.1:11434
    driver: ollama
    paths: {llm: /api/generate}
    vram_resident_mib: 9000
    vram_job_mib: 1500
    max_concurrency: 2
"""


def _consumer():
    return parse_config_text(CONFIG, "test.yaml").consumers["ollama"]


def test_config_keys_are_read():
    c = _consumer()
    assert (c.vram_job_mib, c.max_concurrency) == (1500, 2)


def test_configured_profile_is_the_config():
    p = ConfiguredProfiles().profile(_consumer())
    assert (p.resident.mib, p.job_peak.mib, p.running_mib) == (9000, 1500, 10500)
    assert p.resident.source is FigureSource.CONFIG and p.job_peak.source is FigureSource.CONFIG


def test_an_oom_raises_the_peak_per_model_and_never_lowers_it():
    profiles = ConfiguredProfiles()
    c = _consumer()
    profiles.raise_peak("ollama", "llama3", 4000)
    profiles.raise_peak("ollama", "llama3", 2000)
    assert profiles.profile(c, "llama3").job_peak.mib == 4000
    assert profiles.profile(c, "llama3").job_peak.source is FigureSource.OOM
    assert profiles.profile(c, "qwen").job_peak.mib == 1500
    profiles.raise_peak("ollama", None, 1000)  # under the configured figure: config stays
    assert profiles.profile(c).job_peak.source is FigureSource.CONFIG
