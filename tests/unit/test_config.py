import os
import textwrap

import pytest

from gpumgr.config import ConfigError, load_config, parse_config_text
from tests.config_support import MINIMAL

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_shipped_config_is_valid_and_describes_the_real_apis():
    config = load_config(os.path.join(ROOT, "etc", "consumers.yaml"))
    assert set(config.consumers) == {"ollama", "comfyui", "whisper", "mvoice"}
    ollama = config.consumers["ollama"]
    assert ollama.driver == "ollama" and ollama.passthrough
    assert ollama.paths["llm"] == "/api/generate"
    assert ollama.health_path == "/api/version"
    assert ollama.unload is None and ollama.can_unload  # every model in /api/ps
    comfy = config.consumers["comfyui"]
    assert comfy.driver == "comfyui" and comfy.passthrough
    assert comfy.paths["image"] == "/prompt" and comfy.unload.path == "/free"
    whisper = config.consumers["whisper"]
    assert whisper.driver == "whisper.cpp" and whisper.unload is None
    assert whisper.process is not None and whisper.can_unload  # a process gpumgr owns
    assert whisper.process.command[0].endswith("whisper-server")
    assert whisper.paths["stt"] == "/inference"
    assert config.routes["audio_proxy"] == "mvoice"
    assert config.scheduler.mode == "evicting"
    assert ollama.abandoned_grace_s == 15
    assert config.scheduler.priority == {"tts": 10, "stt": 10, "llm": 5, "image": 0}


def test_minimal_config_gets_documented_defaults():
    config = parse_config_text(MINIMAL, "min.yaml")
    assert config.listen == "tcp:8770:interface=127.0.0.1"
    assert (config.health.interval_s, config.health.timeout_s) == (5.0, 2.0)
    assert config.gpu.nvidia_smi == "nvidia-smi" and config.gpu.headroom_mib == 512
    assert config.scheduler.capacity == 1 and config.scheduler.max_queue == 64
    assert config.scheduler.queue_timeout_s == 600
    assert config.limits.max_body_bytes == 512 * 1024 * 1024
    assert config.limits.max_connections == 1024 and config.limits.header_timeout_s == 10
    assert config.admin_token is None
    c = config.consumers["ollama"]
    assert c.connect_timeout_s == 5 and c.request_timeout_s == 600
    assert c.load is None and c.can_coexist_with is None
    assert c.job_timeout_s == 1800 and c.render_stop_grace_s == 30


def test_fractional_durations_are_allowed():
    text = MINIMAL + "health: {interval_s: 0.5, timeout_s: 0.25}\n"
    config = parse_config_text(text, "f.yaml")
    assert config.health.interval_s == 0.5


def test_one_consumer_may_serve_several_kinds():
    text = """
consumers:
  mvoice:
    url: http://127.0.0.1:8766/
    health: /health
    paths: {tts: /tts, stt: /stt}
routes: {tts: mvoice, stt: mvoice, audio_proxy: mvoice}
"""
    config = parse_config_text(text, "multi.yaml")
    assert config.consumer_for("stt").name == "mvoice"
    assert config.consumers["mvoice"].url == "http://127.0.0.1:8766"  # trailing / dropped


def _with(snippet: str) -> str:
    return MINIMAL + textwrap.dedent(snippet)


BAD = [
    ("unknown top-level key", _with("colour: blue\n"), "colour", "unknown key"),
    ("unknown nested key", _with("health: {interval: 5}\n"), "health.interval", "unknown key"),
    ("wrong type", _with("health: {interval_s: soon}\n"), "health.interval_s", "must be a number"),
    ("boolean as number", _with("gpu: {headroom_mib: true}\n"), "gpu.headroom_mib", "must be an integer"),
    ("negative", _with("scheduler: {max_queue: -1}\n"), "scheduler.max_queue", "negative"),
    ("zero interval", _with("health: {interval_s: 0}\n"), "health.interval_s", "greater than 0"),
    ("fractional integer", _with("scheduler: {capacity: 1.5}\n"), "scheduler.capacity", "integer"),
    ("unknown mode", _with("scheduler: {mode: yolo}\n"), "scheduler.mode", "one of passthrough"),
    ("route to missing consumer", MINIMAL.replace("llm: ollama", "llm: llamas"), "routes.llm",
     "unknown consumer 'llamas'"),
    ("route without path", MINIMAL + "  tts: ollama\n", "routes.tts", "no paths.tts"),
    ("unknown route", MINIMAL + "  video: ollama\n", "routes.video", "unknown route"),
    ("duplicate key", MINIMAL.replace("    health: /api/version\n",
                                      "    health: /api/version\n    health: /\n"),
     "consumers.ollama.health", "duplicate key"),
    ("duplicate consumer", MINIMAL + "consumers: {}\n", "consumers", "duplicate key"),
    ("bad url", MINIMAL.replace("http://127.0.0.1:11434", "127.0.0.1:11434"),
     "consumers.ollama.url", "http:// or https://"),
    ("missing url", MINIMAL.replace("    url: http://127.0.0.1:11434\n", ""),
     "consumers.ollama.url", "is required"),
    ("relative path", MINIMAL.replace("/api/generate", "api/generate"),
     "consumers.ollama.paths.llm", "absolute path"),
    ("unknown kind in paths", MINIMAL.replace("{llm: /api/generate}", "{chat: /api/chat}"),
     "consumers.ollama.paths.chat", "unknown kind"),
    ("coexist with stranger", MINIMAL.replace("    paths:", "    can_coexist_with: [ghost]\n    paths:"),
     "consumers.ollama.can_coexist_with", "unknown consumer 'ghost'"),
    ("coexist listed twice",
     MINIMAL.replace("    paths:", "    can_coexist_with: [ollama, ollama]\n    paths:"),
     "consumers.ollama.can_coexist_with", "twice"),
    ("unload without path", MINIMAL.replace("    paths:", "    unload: {method: POST}\n    paths:"),
     "consumers.ollama.unload.path", "is required"),
    ("unload bad method", MINIMAL.replace("    paths:", "    unload: {method: FETCH, path: /x}\n    paths:"),
     "consumers.ollama.unload.method", "one of GET"),
    ("no consumers", "routes: {}\n", "consumers", "at least one consumer"),
    ("null value", _with("listen: null\n"), "listen", "got null"),
    ("not a mapping", "- just\n- a list\n", "", "expected a mapping"),
    ("bad consumer name", MINIMAL.replace("  ollama:\n", "  'bad name!':\n").replace(
        "llm: ollama", "llm: x"), "consumers.bad name!", "consumer names"),
    ("priority for unknown kind", _with("scheduler: {priority: {video: 1}}\n"),
     "scheduler.priority.video", "unknown kind"),
    ("priority not an integer", _with("scheduler: {priority: {tts: high}}\n"),
     "scheduler.priority.tts", "must be an integer"),
    ("bad regex", MINIMAL.replace("    paths:", "    gpu_process: '(ollama'\n    paths:"),
     "consumers.ollama.gpu_process", "'(' at position 0: only a restricted regular expression"),
    ("idle unload without route", MINIMAL.replace("    paths:", "    idle_unload_s: 60\n    paths:"),
     "consumers.ollama.idle_unload_s", "needs a way to unload"),
    ("preload not a bool", MINIMAL.replace("    paths:", "    preload: yes please\n    paths:"),
     "consumers.ollama.preload", "true or false"),
    ("infinite number", _with("health: {timeout_s: .inf}\n"), "health.timeout_s", "finite"),
    ("render grace zero", MINIMAL.replace("    paths:", "    render_stop_grace_s: 0\n    paths:"),
     "consumers.ollama.render_stop_grace_s", "greater than 0"),
    ("render grace not a number",
     MINIMAL.replace("    paths:", "    render_stop_grace_s: soon\n    paths:"),
     "consumers.ollama.render_stop_grace_s", "must be a number"),
    ("empty admin token", _with("admin_token: ''\n"), "admin_token", "must not be empty"),
    ("admin token and env", _with("admin_token: a\nadmin_token_env: B\n"), "admin_token_env",
     "not both"),
    ("spool below body", _with("limits: {max_body_mib: 64, max_spool_mib: 32}\n"),
     "limits.max_spool_mib", "at least limits.max_body_mib"),
    ("unbalanced quote in nvidia_smi", _with("gpu: {nvidia_smi: \"smi 'x\"}\n"), "gpu.nvidia_smi",
     "No closing quotation"),
    ("recursive alias", _with("x: &a [*a]\n"), "x[0]", "recursive"),
    ("complex key", _with("? [a, b]\n: 1\n"), "", "keys must be plain"),
    ("negative abandoned grace",
     MINIMAL.replace("    paths:", "    abandoned_grace_s: -1\n    paths:"),
     "consumers.ollama.abandoned_grace_s", "must not be negative"),
    ("abandoned grace not a number",
     MINIMAL.replace("    paths:", "    abandoned_grace_s: soon\n    paths:"),
     "consumers.ollama.abandoned_grace_s", "must be a number"),
    ("abandoned grace over an hour",
     MINIMAL.replace("    paths:", "    abandoned_grace_s: 7200\n    paths:"),
     "consumers.ollama.abandoned_grace_s", "at most 3600"),
]


@pytest.mark.parametrize("text,key_path,problem", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_config_is_rejected_with_file_and_key_path(text, key_path, problem):
    with pytest.raises(ConfigError) as info:
        parse_config_text(text, "/etc/gpumgr/bad.yaml")
    err = info.value
    assert err.file == "/etc/gpumgr/bad.yaml"
    assert err.key_path == key_path
    assert problem in err.problem
    assert str(err).startswith(f"/etc/gpumgr/bad.yaml: {key_path}" if key_path else "/etc/gpumgr/bad.yaml")


def test_invalid_yaml_and_empty_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_config_text("consumers: [unclosed", "x.yaml")
    with pytest.raises(ConfigError, match="empty"):
        parse_config_text("", "x.yaml")
    with pytest.raises(ConfigError, match="cannot read") as info:
        load_config(str(tmp_path / "nope.yaml"))
    assert info.value.file.endswith("nope.yaml")


def test_the_abandoned_grace_defaults_to_the_drivers_and_may_be_zero():
    config = parse_config_text(MINIMAL, "x.yaml")
    assert config.consumers["ollama"].abandoned_grace_s == 30.0  # the http driver's
    ollama = parse_config_text(MINIMAL.replace("    paths:", "    driver: ollama\n    paths:"),
                               "x.yaml")
    assert ollama.consumers["ollama"].abandoned_grace_s == 15.0  # the ollama driver's
    zero = parse_config_text(MINIMAL.replace("    paths:", "    abandoned_grace_s: 0\n    paths:"),
                             "x.yaml")
    assert zero.consumers["ollama"].abandoned_grace_s == 0
