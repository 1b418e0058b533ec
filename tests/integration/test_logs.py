"""Log lines: JSON for journald and Loki, twistd's text by default, secrets redacted."""

from __future__ import annotations


from gpumgr import tap
from tests.helpers import parse_twistd_options
from tests.logs_support import TOKEN, write_config
from gpumgr.logs import REDACTED, TwistdLogging, twistd_logging_problem


# Wiring into twistd ---------------------------------------------------------------


def test_twistd_options_give_the_config_token_to_the_redactor(tmp_path):
    options = parse_twistd_options(["-n", "gpumgr", "--config", write_config(tmp_path, 0),
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
