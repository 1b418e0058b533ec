"""Config loading against hostile and broken files: a ConfigError naming the place, fast.

Every case here used to end in a traceback (or a hang) before the loader
walked the YAML node graph itself.
"""

from __future__ import annotations

import os
import re
import textwrap

import attrs
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpumgr import yaml_strict
from gpumgr.config import (
    Config,
    ConfigError,
    LimitsConfig,
    ListenAddress,
    admin_token_problem,
    listen_address,
    load_config,
    parse_config,
    parse_config_text,
    parse_process_pattern,
    url_reaches_listener,
)
from tests.config_support import MINIMAL, alias_bomb


def _refused(text: str, environ: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config_text(text, "/etc/gpumgr/bad.yaml", environ or {})
    assert info.value.file == "/etc/gpumgr/bad.yaml"
    return info.value


# -- the YAML layer ------------------------------------------------------------


@pytest.mark.parametrize("text,key_path,problem", [
    ("a: &a [*a]\n", "a[0]", "recursive structure"),
    ("a: &a {b: *a}\n", "a.b", "recursive structure"),
    ("? [a, b]\n: 1\n", "", "keys must be plain strings or numbers, not a sequence"),
    ("x:\n  ? {a: 1}\n  : 1\n", "x", "not a mapping"),
    ("a: 1\n---\nb: 2\n", "", "not valid YAML: expected a single document"),
    ("a: 2001-02-30\n", "", "cannot be read: day is out of range"),
    ('a: "\\ud800"\n', "a", "lone surrogate"),
    ('a: {b: "x\\0y"}\n', "a.b", "NUL"),
    ("a: [1, 2\n", "", "not valid YAML"),
    ("a: 1\na: 2\n", "a", "duplicate key (again at line 2)"),
])
def test_hostile_yaml_is_refused_with_a_key_path(text, key_path, problem):
    err = _refused(text)
    assert err.key_path == key_path
    assert problem in err.problem
    assert "\n" not in str(err)


def test_deep_nesting_is_refused_before_the_composer_recurses():
    for text in ("[" * 100_000 + "]" * 100_000,
                 "".join(f"{' ' * i}k{i}:\n" for i in range(200)) + " " * 200 + "v: 1\n"):
        err = _refused(text)
        assert "nested more than 32 levels deep" in err.problem


def test_alias_chains_count_towards_depth():
    text = "a0: &a0 [1]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, 60))
    assert "nested more than 32 levels deep (counting aliases)" in _refused(text).problem


@pytest.mark.timeout(20)
def test_alias_bomb_is_refused_fast():
    # 9**30 values when expanded: an unbounded walk would outlast any timeout.
    text = alias_bomb(30)
    assert len(text) < 4000
    err = _refused(text)
    assert "through aliases (an alias bomb?)" in err.problem
    assert err.key_path.startswith("l")


def test_a_small_fan_out_of_aliases_is_ordinary_data():
    loaded = yaml_strict.load(alias_bomb(3))  # 9**4 values when expanded: fine
    assert len(loaded["l3"]) == 9 and loaded["l3"][0] is loaded["l2"]


def test_merge_keys_work_and_are_not_duplicates():
    text = textwrap.dedent("""\
        consumers:
          ollama: &base
            url: http://127.0.0.1:11434
            health: /api/version
            paths: {llm: /api/generate}
          ollama2:
            <<: *base
            url: http://127.0.0.1:11435
        routes: {llm: ollama}
        """)
    config = parse_config_text(text, "merge.yaml")
    assert config.consumers["ollama2"].url == "http://127.0.0.1:11435"
    assert config.consumers["ollama2"].health_path == "/api/version"


def test_oversized_file_is_not_read_whole(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_bytes(b"# " + b"x" * (yaml_strict.MAX_CONFIG_BYTES + 10) + b"\n")
    with pytest.raises(ConfigError, match="larger than 1024 KiB") as info:
        load_config(str(path))
    assert info.value.file == str(path)


# -- values the loader used to let through to a traceback at start-up ---------------


@pytest.mark.parametrize("snippet_or_replace,key_path,problem", [
    (("http://127.0.0.1:11434", "http://[::1"), "consumers.ollama.url", "not a valid URL"),
    (("http://127.0.0.1:11434", "http://\u2100/"), "consumers.ollama.url", "not a valid URL"),
    ("gpu: {nvidia_smi: \"nvidia-smi --format='csv\"}\n", "gpu.nvidia_smi",
     "cannot be split into arguments: No closing quotation"),
    ("gpu: {nvidia_smi: \"'' -q\"}\n", "gpu.nvidia_smi", "must start with a program"),
    ("listen: tcp:99999\n", "listen", "port must be a number from 0 to 65535"),
    ("listen: 'tcp:http'\n", "listen", "port must be a number"),
    ("listen: 'tcp6:interface=\\:\\:1'\n", "listen", "has no port"),
])
def test_values_that_failed_at_startup_fail_at_load(snippet_or_replace, key_path, problem):
    if isinstance(snippet_or_replace, tuple):
        text = MINIMAL.replace(*snippet_or_replace)
    else:
        text = MINIMAL + snippet_or_replace
    err = _refused(text)
    assert (err.key_path, problem in err.problem) == (key_path, True), str(err)


@pytest.mark.parametrize("pattern", [
    "(a+)+$",          # issue 14.10: 2-3 s per sample with re
    "(x|xx)*y",
    "a*a*a*a*a*b",
    "[a-z]+",
    "ollama?",
    "\\d+",
    "a{2}",
    "(?i)ollama",
    "a$b",
    "whisper.cpp",     # '.' alone: write \. for a dot, or .* for anything
])
def test_gpu_process_refuses_what_could_backtrack(pattern):
    err = _refused(MINIMAL.replace("    paths:", f"    gpu_process: '{pattern}'\n    paths:"))
    assert err.key_path == "consumers.ollama.gpu_process"
    assert "matched in linear time" in err.problem and "at position" in err.problem


@pytest.mark.parametrize("pattern,names", [
    ("ollama", ["/usr/local/bin/ollama", "ollama_llama_server", "llama"]),
    ("whisper-server", ["/opt/whisper.cpp/build/bin/whisper-server", "whisper"]),
    ("^A-process$", ["A-process", "xA-process", "A-processx", "A-proces"]),
    ("ollama|llama-server", ["llama-server", "/bin/ollama", "llama"]),
    ("^/usr/.*/ollama$", ["/usr/local/bin/ollama", "/usr/ollama", "/usr//ollama", "/opt/ollama"]),
    ("whisper\\.cpp", ["whisper.cpp/x", "whisperXcpp"]),
    ("^python.*comfy.*main\\.py$", ["python3 comfy/main.py", "python3 main.py comfy"]),
    ("^$", ["", "x"]),
    (".*", ["", "anything"]),
    ("^a.*a$", ["a", "aa", "aba", "ab"]),
])
def test_gpu_process_patterns_match_as_re_search_does(pattern, names):
    matcher = parse_process_pattern(pattern)
    for name in names:
        assert matcher.search(name) is bool(re.search(pattern, name)), (pattern, name)


_PATTERN_PIECES = st.sampled_from(["a", "b", "ab", "-", "\\.", ".*", "|", "|^", "$|"])


@settings(max_examples=300, deadline=None)
@given(start=st.booleans(), pieces=st.lists(_PATTERN_PIECES, max_size=6), end=st.booleans(),
       names=st.lists(st.text(alphabet="ab.-x", max_size=12), min_size=1, max_size=8))
def test_gpu_process_agrees_with_re_search_on_its_subset(start, pieces, end, names):
    text = ("^" if start else "") + "".join(pieces) + ("$" if end else "")
    try:
        matcher = parse_process_pattern(text)
    except ValueError:
        return  # e.g. '^' after text, or '$' before it: refused, never misread
    for name in names:
        assert matcher.search(name) is bool(re.search(text, name)), (text, name)


def test_gpu_process_with_a_huge_repeat_is_a_config_error():
    err = _refused(MINIMAL.replace("    paths:", "    gpu_process: 'a{99999999999}'\n    paths:"))
    assert err.key_path.endswith(".gpu_process") and "regular expression" in err.problem


# -- admin token ----------------------------------------------------------------------


@pytest.mark.parametrize("value,problem", [
    ("''", "must not be empty"),
    ("'   '", "must not be empty"),
    ("'two words'", "printable ASCII without spaces"),
    ("' padded'", "printable ASCII without spaces"),
    ("'s\u00e9cret'", "printable ASCII"),
    ("12345", "must be a string"),
])
def test_bad_admin_token_is_refused_without_echoing_it(value, problem):
    err = _refused(MINIMAL + f"admin_token: {value}\n")
    assert err.key_path == "admin_token" and problem in err.problem
    secret = value.strip("'")
    if secret.strip():
        assert secret.strip() not in str(err)


def test_admin_token_from_the_environment():
    config = parse_config_text(MINIMAL + "admin_token_env: GPUMGR_TOKEN\n", "t.yaml",
                               {"GPUMGR_TOKEN": "s3cret"})
    assert config.admin_token == "s3cret"


@pytest.mark.parametrize("snippet,environ,problem", [
    ("admin_token_env: GPUMGR_TOKEN\n", {}, "environment variable GPUMGR_TOKEN is not set"),
    ("admin_token_env: GPUMGR_TOKEN\n", {"GPUMGR_TOKEN": ""},
     "environment variable GPUMGR_TOKEN must not be empty"),
    ("admin_token_env: GPUMGR_TOKEN\n", {"GPUMGR_TOKEN": " \t"},
     "environment variable GPUMGR_TOKEN must not be empty"),
    ("admin_token_env: 'NOT A NAME'\n", {}, "must name an environment variable"),
    ("admin_token_env: ''\n", {}, "must name an environment variable"),
    ("admin_token_env: GPUMGR_TOKEN\nadmin_token: abc\n", {"GPUMGR_TOKEN": "abc"},
     "set admin_token or admin_token_env, not both"),
])
def test_bad_admin_token_env_names_the_key(snippet, environ, problem):
    err = _refused(MINIMAL + snippet, environ)
    assert err.key_path == "admin_token_env"
    assert problem in err.problem


@pytest.mark.parametrize("token,ok", [
    ("t0k", True), ("a-b_c.d~e+f/g=", True), ("", False), (" ", False), ("\t\n", False),
    ("a b", False), ("a\x00", False), ("\u00e9", False), (" t0k", False),
])
def test_admin_token_problem(token, ok):
    assert (admin_token_problem(token) is None) is ok


# -- a consumer that is gpumgr itself -----------------------------------------------


@pytest.mark.parametrize("listen,url,loops", [
    ("tcp:8770:interface=127.0.0.1", "http://127.0.0.1:8770", True),
    ("tcp:8770:interface=127.0.0.1", "http://localhost:8770/x", True),
    ("tcp:8770:interface=127.0.0.1", "http://0.0.0.0:8770", True),
    ("tcp:8770:interface=127.0.0.1", "http://127.0.0.2:8770", False),
    ("tcp:8770:interface=127.0.0.1", "http://127.0.0.1:8771", False),
    ("tcp:8770", "http://127.0.0.9:8770", True),
    ("tcp:8770", "http://[::1]:8770", False),  # an IPv4 listener does not take ::1
    ("tcp:8770", "http://[::ffff:127.0.0.1]:8770", True),
    ("tcp:port=8770:interface=0.0.0.0", "http://127.0.0.1:8770", True),
    ("tcp6:8770:interface=\\:\\:", "http://127.0.0.1:8770", True),  # dual-stack
    ("tcp6:8770:interface=\\:\\:", "http://[::1]:8770", True),
    ("tcp6:8770:interface=\\:\\:1", "http://127.0.0.1:8770", False),
    ("tcp6:8770:interface=\\:\\:1", "http://localhost:8770", True),
    ("tcp:80:interface=192.0.2.5", "http://192.0.2.5", True),
    ("tcp:443", "https://localhost", True),
    ("tcp:80", "https://localhost", False),
    ("tcp:8770", "http://gpu-box.example:8770", False),  # names are not resolved at load
    ("tcp:0:interface=127.0.0.1", "http://127.0.0.1:0", False),
    # issue 14.10: every spelling the resolver (inet_aton) takes for loopback
    ("tcp:8770:interface=127.0.0.1", "http://2130706433:8770", True),
    ("tcp:8770:interface=127.0.0.1", "http://127.1:8770", True),
    ("tcp:8770:interface=127.0.0.1", "http://127.0.1:8770", True),
    ("tcp:8770:interface=127.0.0.1", "http://0x7f.1:8770", True),
    ("tcp:8770:interface=127.0.0.1", "http://0X7F000001:8770", True),
    ("tcp:8770:interface=127.0.0.1", "http://0177.0.0.1:8770", True),
    ("tcp:8770:interface=127.0.0.1", "http://017700000001:8770", True),
    ("tcp:8770:interface=127.0.0.1", "http://[::ffff:127.0.0.1]:8770", True),
    ("tcp:8770:interface=127.0.0.1", "http://[::ffff:7f00:1]:8770", True),
    ("tcp:8770:interface=127.0.0.1", "http://localhost.:8770", True),
    ("tcp:8770:interface=127.0.0.1", "http://LocalHost:8770", True),
    ("tcp:8770:interface=127.0.0.1", "http://0:8770", True),
    ("tcp:8770:interface=127.0.0.1", "http://127.2:8770", False),
    ("tcp:8770", "http://0:8770", True),
    ("tcp:8770", "http://0.0:8770", True),
    ("tcp:8770", "http://127.255.1:8770", True),
    ("tcp:8770", "http://2130706434:8770", True),
    ("tcp:8770:interface=0.0.0.0", "http://0x7f.0.0.1:8770", True),
    ("tcp:8770:interface=127.1", "http://127.0.0.1:8770", True),
    ("tcp6:8770:interface=\\:\\:", "http://2130706433:8770", True),
    ("tcp:8770", "http://127.0.0.1.example:8770", False),  # a name
    ("tcp:8770", "http://1.2.3.4.5:8770", False),
])
def test_url_reaches_listener(listen, url, loops):
    address = listen_address(listen)
    assert isinstance(address, ListenAddress)
    assert url_reaches_listener(url, address) is loops


def test_non_tcp_listeners_have_no_address():
    assert listen_address("unix:/run/gpumgr.sock") is None


@pytest.mark.parametrize("host", ["2130706433", "127.1", "0x7f.1", "[::ffff:127.0.0.1]", "0"])
def test_consumer_pointing_at_gpumgr_itself_by_another_spelling_is_refused(host):
    text = MINIMAL.replace("127.0.0.1:11434", f"{host}:8770") + "listen: tcp:8770\n"
    assert f"{host}:8770" in text
    err = _refused(text)
    assert err.key_path == "consumers.ollama.url"
    assert "gpumgr's own listen address" in err.problem


def test_consumer_pointing_at_gpumgr_itself_is_refused():
    text = MINIMAL.replace("11434", "8770") + "listen: tcp:8770:interface=127.0.0.1\n"
    err = _refused(text)
    assert err.key_path == "consumers.ollama.url"
    assert "gpumgr's own listen address" in err.problem


# -- limits ---------------------------------------------------------------------------


def test_limits_defaults():
    limits = parse_config_text(MINIMAL, "t.yaml").limits
    assert (limits.header_timeout_s, limits.keepalive_timeout_s) == (10.0, 60.0)
    assert (limits.body_idle_timeout_s, limits.min_body_rate_kib_s,
            limits.min_body_rate_grace_s) == (30.0, 1.0, 10.0)
    assert (limits.max_connections, limits.max_spool_mib) == (1024, 2048)
    assert (limits.max_request_line_bytes, limits.max_header_bytes,
            limits.max_headers) == (8192, 16384, 100)
    assert limits.max_spool_bytes == 2048 * 1024 * 1024
    assert limits.min_body_rate_bytes_s == 1024


@pytest.mark.parametrize("snippet,key_path,problem", [
    ("{max_body_mib: 3000, max_spool_mib: 2048}", "limits.max_spool_mib",
     "at least limits.max_body_mib (3000)"),
    ("{max_spool_mib: 100}", "limits.max_spool_mib", "at least limits.max_body_mib (512)"),
    ("{max_headers: 2}", "limits.max_headers", "at least 8"),
    ("{max_request_line_bytes: 100}", "limits.max_request_line_bytes", "at least 256"),
    ("{max_connections: 0}", "limits.max_connections", "greater than 0"),
    ("{max_connections: 1.5}", "limits.max_connections", "integer"),
    ("{header_timeout_s: 0}", "limits.header_timeout_s", "greater than 0"),
    ("{keepalive_timeout_s: 1000000000000}", "limits.keepalive_timeout_s", "at most 86400"),
    ("{max_body_mib: 1.0e+308}", "limits.max_body_mib", "at most"),
    ("{min_body_rate_kib_s: -1}", "limits.min_body_rate_kib_s", "negative"),
    ("{body_idle_timeout_s: .nan}", "limits.body_idle_timeout_s", "finite"),
    ("{max_sockets: 9}", "limits.max_sockets", "unknown key"),
    ("{max_connections: 8, reserved_connections: 5}", "limits.reserved_connections",
     "at most half of limits.max_connections (4)"),
    ("{reserved_connections: -1}", "limits.reserved_connections", "negative"),
    ("{max_tunnels: 1.5}", "limits.max_tunnels", "integer"),
    ("{tunnel_idle_timeout_s: 0}", "limits.tunnel_idle_timeout_s", "greater than 0"),
    ("{max_upload_s: 0}", "limits.max_upload_s", "greater than 0"),
    ("{max_upload_s: 1.0e+9}", "limits.max_upload_s", "at most 86400"),
])
def test_bad_limits_are_refused(snippet, key_path, problem):
    err = _refused(MINIMAL + f"limits: {snippet}\n")
    assert err.key_path == key_path and problem in err.problem, str(err)


def test_reserve_tunnel_and_upload_limits_defaults_and_small_caps():
    limits = parse_config_text(MINIMAL, "t.yaml").limits
    assert (limits.reserved_connections, limits.max_tunnels, limits.tunnel_idle_timeout_s,
            limits.max_upload_s) == (16, 256, 3600.0, 900.0)
    # An existing config with a small cap keeps loading: the default reserve shrinks.
    small = parse_config_text(MINIMAL + "limits: {max_connections: 8}\n", "t.yaml").limits
    assert small.max_connections == 8


def test_an_unset_spool_grows_with_max_body():
    limits = parse_config_text(MINIMAL + "limits: {max_body_mib: 4096}\n", "t").limits
    assert limits.max_spool_mib == 4096


def test_min_body_rate_zero_turns_the_rate_check_off():
    limits = parse_config_text(MINIMAL + "limits: {min_body_rate_kib_s: 0}\n", "t").limits
    assert limits.min_body_rate_bytes_s == 0


# -- fuzzing ----------------------------------------------------------------------------

#: GPUMGR_FUZZ_EXAMPLES=5000 for a longer hunt; the default suits the shared small box.
_FUZZ = settings(max_examples=int(os.environ.get("GPUMGR_FUZZ_EXAMPLES", "300")), deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])


@_FUZZ
@given(st.text(max_size=300))
def test_random_text_gives_config_or_config_error(text):
    try:
        assert isinstance(parse_config_text(text, "fuzz.yaml"), Config)
    except ConfigError as e:
        assert e.file == "fuzz.yaml"


_YAML_BITS = st.sampled_from([
    "a", ":", " ", "\n", "  ", "- ", "[", "]", "{", "}", ",", "&x ", "*x", "&y ", "*y", "? ",
    "!!str ", "!!int ", "!!binary ", "!!timestamp ", "!!set ", "'", '"', "#", "|", ">", "---",
    "...", "<<: ", "~", "0x1F", "1e999", ".nan", "2001-02-30", "\\u0000", "\\ud800", "%YAML 1.1",
    "consumers", "routes", "limits", "listen", "url", "paths", "llm", "ollama",
])


@_FUZZ
@given(st.lists(_YAML_BITS, max_size=60).map("".join))
def test_random_yaml_like_text_gives_config_or_config_error(text):
    try:
        parse_config_text(text, "fuzz.yaml")
    except ConfigError as e:
        assert e.file == "fuzz.yaml"


def _scalars() -> st.SearchStrategy:
    return st.one_of(
        st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(alphabet=st.characters(exclude_categories=("Cs",), exclude_characters="\x00"),
                max_size=20),
        st.sampled_from(["", " ", "http://[::1", "http://127.0.0.1:8770", "tcp:99999",
                         "tcp:0:interface=127.0.0.1", "/api/generate", "ollama", "llm",
                         "evicting", "a{99}", "nvidia-smi 'x", "POST", "GPUMGR_T"]),
    )


_KEYS = st.sampled_from([
    "listen", "admin_token", "admin_token_env", "health", "gpu", "scheduler", "limits",
    "consumers", "routes", "interval_s", "timeout_s", "nvidia_smi", "mode", "capacity",
    "priority", "max_body_mib", "max_spool_mib", "max_connections", "header_timeout_s",
    "max_headers", "ollama", "url", "health", "paths", "llm", "tts", "load", "unload",
    "method", "path", "body", "process", "command", "env", "can_coexist_with", "x",
])

_DOCUMENTS = st.recursive(
    _scalars(),
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(_KEYS, children, max_size=5)),
    max_leaves=25,
)


def _base() -> dict:
    return yaml.safe_load(MINIMAL)


@_FUZZ
@given(st.lists(st.tuples(st.lists(_KEYS, min_size=1, max_size=3), _DOCUMENTS), max_size=4))
def test_random_documents_give_config_or_config_error(edits):
    """Random values grafted onto a valid config, parsed as data and as YAML text."""
    doc = _base()
    for path, value in edits:
        node = doc
        for key in path[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[path[-1]] = value
    for parse in (lambda: parse_config(doc, "fuzz.yaml", {"GPUMGR_T": "t"}),
                  lambda: parse_config_text(yaml.safe_dump(doc), "fuzz.yaml", {})):
        try:
            assert isinstance(parse(), Config)
        except ConfigError as e:
            assert e.file == "fuzz.yaml" and "\n" not in e.problem


# -- twistd itself ----------------------------------------------------------------------


def test_every_limit_and_admin_key_is_documented():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    readme = "".join(open(os.path.join(root, name)).read() for name in
                     ("docs/config.md", "docs/http-api.md"))
    with open(os.path.join(root, "etc", "consumers.yaml")) as f:
        shipped = f.read()
    for field in attrs.fields(LimitsConfig):
        assert f"`limits.{field.name}`" in readme, field.name
        assert f"  {field.name}:" in shipped, field.name
    for key in ("admin_token", "admin_token_env"):
        assert f"`{key}`" in readme and f"# {key}:" in shipped
    for code in ("bad_request", "request_timeout", "uri_too_long", "headers_too_large",
                 "too_many_connections", "spool_full", "internal_error"):
        assert f"`{code}`" in readme, code
