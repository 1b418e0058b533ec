"""The docs stay true: every link between them resolves."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted([ROOT / "README.md", ROOT / "bench" / "README.md", *(ROOT / "docs").glob("*.md")])
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        m = None if fenced else _HEADING.match(line)
        if m is None:
            continue
        base = github_anchor(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(path: Path) -> list[str]:
    fenced = False
    out: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            out.extend(_LINK.findall(line))
    return out


def test_anchor_rules_match_githubs() -> None:
    assert github_anchor("Metrics: `GET /metrics`") == "metrics-get-metrics"
    assert github_anchor("Scheduling (`scheduler.mode: locked`)") == "scheduling-schedulermode-locked"
    assert github_anchor("Exposing gpumgr beyond loopback, safely") == \
        "exposing-gpumgr-beyond-loopback-safely"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves(doc: Path) -> None:
    broken = []
    for target in links(doc):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = doc if not file_part else (doc.parent / file_part).resolve()
        if not linked.exists():
            broken.append(f"{target}: no file {linked}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading with that anchor in {linked.name}")
    assert not broken, f"{doc.name}: " + "; ".join(broken)


# -- every page is reachable from the README ----------------------------------

def test_every_page_in_docs_is_reachable_from_the_readme() -> None:
    seen: set[Path] = set()
    todo = [ROOT / "README.md"]
    while todo:
        page = todo.pop()
        if page in seen or not page.exists():
            continue
        seen.add(page)
        for target in links(page):
            file_part = target.partition("#")[0]
            if file_part.endswith(".md") and not re.match(r"[a-z]+:", file_part):
                todo.append((page.parent / file_part).resolve())
    unreachable = [p.name for p in (ROOT / "docs").glob("*.md") if p.resolve() not in seen]
    assert not unreachable, f"no link leads from README.md to {unreachable}"


def test_the_readme_is_a_door() -> None:
    """The README leads to the docs; the details live behind it."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) < 250, f"README.md has {len(lines)} lines; move details to docs/"
    text = "\n".join(lines)
    assert "make run" in text and "make test" in text


# -- tables ---------------------------------------------------------------------

def table_rows(path: Path, heading: str) -> list[list[str]]:
    """The cells of the first table under `heading` (a line such as '## Errors')."""
    lines = path.read_text(encoding="utf-8").splitlines()
    start = lines.index(heading)
    rows: list[list[str]] = []
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        if line.startswith("|"):
            # A '|' inside backticks is escaped as '\|' in these tables.
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            if not all(set(c) <= set("-: ") for c in cells):
                rows.append(cells)
        elif rows:
            break
    assert rows, f"no table under {heading!r} in {path.name}"
    return rows[1:]  # the header row


def expand_braces(text: str) -> list[str]:
    """`a.{b,c}.d` -> `a.b.d`, `a.c.d` (one level at a time, left to right)."""
    m = re.search(r"\{([^{}]*)\}", text)
    if m is None:
        return [text]
    return [expanded for choice in m.group(1).split(",")
            for expanded in expand_braces(text[:m.start()] + choice + text[m.end():])]


# -- the config reference and the parser agree ----------------------------------

#: Mappings whose keys are names the user chooses, with the placeholder the
#: reference writes for them.
NAMED = {"consumers": "<name>", "scheduler.priority": "<kind>", "routes": "<kind>",
         "consumers.<name>.paths": "<kind>", "consumers.<name>.process.env": "<VAR>"}


def full_config() -> dict[str, Any]:
    """A config that sets every optional section, so that the parser reads
    every key it knows. A key the parser reads only when present (`has`)
    must be set here, or it is reported as undocumented-in-the-parser."""
    call = {"method": "POST", "path": "/unload", "body": "{}", "content_type": "application/json"}
    return {
        "listen": "tcp:18770:interface=127.0.0.1",
        "health": {"interval_s": 5, "timeout_s": 2, "down_grace_s": 10},
        "gpu": {"nvidia_smi": "nvidia-smi", "interval_s": 2, "timeout_s": 5,
                "headroom_mib": 512, "unload_settle_s": 10, "total_mib": 24564},
        "scheduler": {"mode": "evicting", "capacity": 1, "max_queue": 64,
                      "queue_timeout_s": 600, "priority": {"tts": 1}, "aging_s": 30,
                      "max_overtakes": 4},
        "limits": {"max_body_mib": 512, "client_stall_timeout_s": 60, "header_timeout_s": 10,
                   "keepalive_timeout_s": 60, "body_idle_timeout_s": 30,
                   "min_body_rate_kib_s": 1, "min_body_rate_grace_s": 10,
                   "max_connections": 1024, "max_spool_mib": 2048,
                   "max_request_line_bytes": 8192, "max_header_bytes": 16384,
                   "max_headers": 100, "reserved_connections": 16, "max_tunnels": 256,
                   "tunnel_idle_timeout_s": 3600, "max_upload_s": 900},
        "consumers": {"svc": {
            "url": "http://127.0.0.1:18178", "driver": "http", "health": "/health",
            "passthrough": True, "scheduled": ["POST /generate"],
            "paths": {"tts": "/tts"}, "vram_resident_mib": 100, "can_coexist_with": [],
            "load": dict(call, path="/load"), "unload": call,
            "process": {"command": ["/bin/true"], "cwd": "/", "env": {"A": "1"},
                        "start_timeout_s": 120, "stop_timeout_s": 10},
            "job_timeout_s": 1800, "render_stop_grace_s": 30, "abandoned_grace_s": 30,
            "connect_timeout_s": 5, "request_timeout_s": 600, "body_idle_timeout_s": 300,
            "gpu_process": "svc", "idle_unload_s": 60, "preload": True, "pin": False}},
        "routes": {"tts": "svc", "audio_proxy": "svc"},
        "admin_token": "secret",
        "allowed_hosts": ["gpu-box.lan"],
        "shutdown_grace_s": 30,
        "balancer": {"box": "gpu-1", "max_queue": 4, "not_ready_s": 5},
        "requests": {"keep_finished": 256, "keep_finished_s": 600},
    }


def _section_at(config: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    for key in path:
        config = config[key]
    return config


def parser_keys() -> tuple[set[str], set[str]]:
    """The key paths the parser accepts (leaves, sections), asked of the
    parser itself: an unknown key in a section is refused with the list of
    the keys that section reads."""
    from gpumgr.config import ConfigError, parse_config

    parse_config(full_config(), "full.yaml")  # the base is valid
    leaves: set[str] = set()
    sections: set[str] = set()

    def spelled(path: tuple[str, ...]) -> str:
        out: list[str] = []
        for key in path:
            out.append(NAMED.get(".".join(out), key))
        return ".".join(out)

    def walk(path: tuple[str, ...]) -> None:
        config = full_config()
        _section_at(config, path)["zz_not_a_key"] = 1
        with pytest.raises(ConfigError) as e:
            parse_config(config, "full.yaml")
        m = re.fullmatch(r"unknown key \(allowed here: (.*)\)", e.value.problem)
        assert m and e.value.key_path == ".".join(path + ("zz_not_a_key",)), str(e.value)
        for key in m.group(1).split(", "):
            child = path + (key,)
            value = _section_at(full_config(), path).get(key)
            name = spelled(child)
            if name in NAMED:
                sections.add(name)
                named = _section_at(full_config(), child)
                if NAMED[name] == "<name>":  # named sections: walk one of them
                    walk(child + (next(iter(named)),))
                else:
                    leaves.add(f"{name}.{NAMED[name]}")
            elif isinstance(value, dict):
                sections.add(name)
                walk(child)
            else:
                leaves.add(name)

    walk(())
    return leaves, sections


def documented_keys() -> set[str]:
    keys: set[str] = set()
    for cells in table_rows(ROOT / "docs" / "config.md", "# Config reference"):
        for token in re.findall(r"`([^`]+)`", cells[0]):
            keys.update(expand_braces(token))
    return keys


def test_the_walk_finds_the_keys_it_should() -> None:
    leaves, sections = parser_keys()
    assert {"listen", "limits.max_upload_s", "consumers.<name>.process.stop_timeout_s",
            "consumers.<name>.unload.content_type", "routes.<kind>",
            "scheduler.priority.<kind>", "consumers.<name>.process.env.<VAR>",
            "gpu.total_mib", "admin_token_env"} <= leaves
    assert {"consumers", "consumers.<name>.process", "limits"} <= sections


def test_every_config_key_is_documented_and_every_documented_key_exists() -> None:
    leaves, sections = parser_keys()
    documented = documented_keys()
    assert not leaves - documented, f"keys the parser reads that docs/config.md lacks: " \
                                    f"{sorted(leaves - documented)}"
    unknown = documented - leaves - sections
    assert not unknown, f"docs/config.md documents keys the parser refuses: {sorted(unknown)}"


def test_every_key_the_shipped_config_sets_is_documented() -> None:
    from gpumgr import yaml_strict

    shipped = yaml_strict.load((ROOT / "etc" / "consumers.yaml").read_text(encoding="utf-8"))
    documented = documented_keys()
    missing: list[str] = []

    def walk(value: object, path: str) -> None:
        if not isinstance(value, dict):
            if path not in documented:
                missing.append(path)
            return
        for key, child in value.items():
            name = NAMED.get(path, str(key))
            walk(child, f"{path}.{name}" if path else name)

    walk(shipped, "")
    assert not missing, f"etc/consumers.yaml sets keys docs/config.md lacks: {missing}"


# -- the errors table and gpumgr's error codes agree -----------------------------

def error_classes() -> dict[str, int]:
    from gpumgr.errors import GpumgrError

    found = {GpumgrError.code: GpumgrError.status}
    todo = [GpumgrError]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            assert found.setdefault(sub.code, sub.status) == sub.status, sub
    return found


def documented_errors() -> dict[str, set[int]]:
    table: dict[str, set[int]] = {}
    for cells in table_rows(ROOT / "docs" / "http-api.md", "## Errors"):
        code = re.match(r"`([a-z_]+)`", cells[2])
        assert code and cells[1].isdigit(), f"malformed row: {cells}"
        table.setdefault(code.group(1), set()).add(int(cells[1]))
    return table


def test_every_error_code_gpumgr_defines_is_in_the_table_with_its_status() -> None:
    defined, table = error_classes(), documented_errors()
    assert not set(defined) - set(table), \
        f"error codes missing from docs/http-api.md: {sorted(set(defined) - set(table))}"
    wrong = {code: (sorted(table[code]), status) for code, status in defined.items()
             if table.get(code) != {status}}
    assert not wrong, f"documented status differs from the code's (table, code): {wrong}"


def test_every_code_in_the_table_can_be_produced() -> None:
    unknown = set(documented_errors()) - set(error_classes())
    assert not unknown, f"docs/http-api.md lists codes no GpumgrError has: {sorted(unknown)}"


# -- the module map matches the package ------------------------------------------

def test_the_module_map_names_every_module_and_only_modules() -> None:
    rows = table_rows(ROOT / "docs" / "architecture.md", "## Module map")
    mapped = {m.group(1) for cells in rows for m in [re.fullmatch(r"`([^`]+)`", cells[0])] if m}
    assert len(mapped) == len(rows), "every row's first cell is one module path in backticks"
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "gpumgr").rglob("*.py")}
    assert not modules - mapped, f"modules missing from the map: {sorted(modules - mapped)}"
    assert not mapped - modules, f"the map names modules that do not exist: {sorted(mapped - modules)}"


_TEST_REF = re.compile(r"(tests/[\w/]+\.py)((?:::\w+)?)|(?<![\w/])::(test_\w+)")


def test_every_test_the_docs_name_exists():
    """A guarantee is only as good as the test named beside it: each
    `tests/...py[::test]` and each `::test` after it on the same line must exist."""
    missing = []
    for doc in DOCS:
        for line in doc.read_text(encoding="utf-8").splitlines():
            current: Path | None = None
            for m in _TEST_REF.finditer(line):
                if m.group(1):
                    current = ROOT / m.group(1)
                    name = m.group(2)[2:] if m.group(2) else None
                    if not current.exists():
                        missing.append(f"{doc.name}: {m.group(1)}")
                        current = None
                        continue
                else:
                    name = m.group(3)
                    if current is None:
                        continue
                if name and not re.search(rf"def {name}\b", current.read_text(encoding="utf-8")):
                    missing.append(f"{doc.name}: {current.relative_to(ROOT)}::{name}")
    assert not missing, missing
