"""Log lines: JSON for journald and Loki, twistd's text by default, secrets redacted."""

from __future__ import annotations


from gpumgr import tap
from tests.helpers import free_port, parse_twistd_options
from gpumgr.logs import REDACTED, TwistdLogging, twistd_logging_problem

TOKEN = "tok-4b1f9e07c2d8a653"


# Wiring into twistd ---------------------------------------------------------------


def _write_config(tmp_path, port: int, token: str | None = TOKEN, name: str = "mvoice") -> str:
    path = tmp_path / "gpumgr.yaml"
    lines = [f"listen: tcp:{port}:interface=127.0.0.1",
             "health: {interval_s: 0.2, timeout_s: 1}",
             "gpu: {nvidia_smi: /nonexistent/nvidia-smi, interval_s: 30}",
             f"routes: {{tts: {name}}}",
             f"consumers: {{{name}: {{url: 'http://127.0.0.1:{free_port()}', health: /health, "
             "paths: {tts: /tts}}}"]
    if token:
        lines.append(f"admin_token: {token}")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_twistd_options_give_the_config_token_to_the_redactor(tmp_path):
    options = parse_twistd_options(["-n", "gpumgr", "--config", _write_config(tmp_path, 0),
                             "--log-format", "json"])
    assert options.subOptions["redactor"].text(f"x {TOKEN}") == f"x {REDACTED}"
    made = tap.makeService(options.subOptions)
    assert isinstance(made, TwistdLogging)


def test_twistds_own_choice_stands_with_syslog_or_a_logger_and_text():
    options = parse_twistd_options(["--syslog", "gpumgr", "--demo"])
    assert not isinstance(tap.makeService(options.subOptions), TwistdLogging)
    assert twistd_logging_problem({"logger": "x"}, "text") is None


def test_outside_twistd_the_service_is_not_wrapped():
    options = tap.Options()
    options.parseOptions(["--demo", "--log-format", "json"])
    assert not isinstance(tap.makeService(options), TwistdLogging)
