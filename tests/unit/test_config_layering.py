"""The config package stands below the drivers: it never imports them, at
module level or inside a function, and the drivers' config defaults that it
holds name exactly the drivers there are."""

from __future__ import annotations

import ast
from pathlib import Path

import gpumgr.config
from gpumgr.config import DRIVER_DEFAULTS
from gpumgr.drivers import DRIVER_NAMES, get_driver

#: What the config may import of gpumgr besides itself: nothing that reads a config.
_ALLOWED = {"gpumgr.yaml_strict", "gpumgr.errors", "gpumgr.target", "gpumgr.states"}


def _config_files() -> list[Path]:
    init = Path(gpumgr.config.__file__)
    return sorted(init.parent.glob("*.py")) if init.name == "__init__.py" else [init]


def _gpumgr_imports(path: Path) -> set[str]:
    """Every gpumgr module `path` imports, wherever the import statement is."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n.startswith("gpumgr.")}


def test_config_imports_nothing_that_imports_it():
    for path in _config_files():
        outside = {n for n in _gpumgr_imports(path)
                   if not n.startswith("gpumgr.config") and n not in _ALLOWED
                   and not any(n.startswith(a + ".") for a in _ALLOWED)}
        assert outside == set(), f"{path.name} imports {sorted(outside)}"


def test_driver_defaults_name_exactly_the_drivers():
    assert set(DRIVER_DEFAULTS) == set(DRIVER_NAMES)
    for name, defaults in DRIVER_DEFAULTS.items():
        assert defaults.name == name == get_driver(name).name
