"""Reading one YAML mapping: typed values, unknown keys refused, errors at file + key path."""

from __future__ import annotations

from typing import Any, Literal, NoReturn, overload

from gpumgr.errors import BadPath
from gpumgr.target import parse_target


class ConfigError(Exception):
    """A config problem, located by file and dotted key path."""

    def __init__(self, file: str, key_path: str, problem: str) -> None:
        self.file = file
        self.key_path = key_path
        self.problem = problem
        where = f"{file}: {key_path}" if key_path else file
        super().__init__(f"{where}: {problem}")


class Section:
    """A mapping being read; remembers which keys were used to reject the rest."""

    def __init__(self, source: str, path: str, raw: Any) -> None:
        self.source = source
        self.path = path
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            self.fail("", f"expected a mapping, got {type_name(raw)}")
        self.raw: dict[Any, Any] = raw
        self._used: set[str] = set()

    def key_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def fail(self, key: str, problem: str) -> NoReturn:
        raise ConfigError(self.source, self.key_path(key) if key else self.path, problem)

    def get(self, key: str) -> Any:
        self._used.add(key)
        return self.raw.get(key)

    def has(self, key: str) -> bool:
        return key in self.raw

    def _present(self, key: str, default: Any, what: str) -> Any:
        """The value, or `default` when the key is absent; null is an error."""
        value = self.get(key)
        if key not in self.raw:
            if default is None:
                self.fail(key, "is required")
            return default
        if value is None:
            self.fail(key, f"must be {what}, got null")
        return value

    def section(self, key: str) -> Section:
        return Section(self.source, self.key_path(key), self.get(key))

    @overload
    def number(self, key: str, default: int | None, *, integer: Literal[True],
               positive: bool = False, maximum: float | None = None) -> int: ...

    @overload
    def number(self, key: str, default: float | None, *, integer: Literal[False] = False,
               positive: bool = False, maximum: float | None = None) -> float: ...

    def number(
        self,
        key: str,
        default: float | None,
        *,
        integer: bool = False,
        positive: bool = False,
        maximum: float | None = None,
    ) -> float:
        """The number at `key`, or `default` when absent (None: it is required)."""
        raw = self._present(key, default, "a number")
        if default is not None and key not in self.raw:
            return default
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            want = "an integer" if integer else "a number"
            self.fail(key, f"must be {want}, got {type_name(raw)} {raw!r}")
        value: float = raw
        if integer and isinstance(value, float):
            if not value.is_integer():
                self.fail(key, f"must be an integer, got {value!r}")
            value = int(value)
        if value != value or value in (float("inf"), float("-inf")):
            self.fail(key, f"must be finite, got {value!r}")
        if value < 0:
            self.fail(key, f"must not be negative, got {value!r}")
        if positive and value == 0:
            self.fail(key, "must be greater than 0")
        if maximum is not None and value > maximum:
            self.fail(key, f"must be at most {maximum:g}, got {value!r}")
        return value

    def string(self, key: str, default: str | None, *, choices: tuple[str, ...] = ()) -> str:
        """The string at `key`, or `default` when absent (None: it is required)."""
        value = self._present(key, default, "a string")
        # Not `value is default`: YAML's "" *is* the interned "".
        if default is not None and key not in self.raw:
            return default
        if not isinstance(value, str):
            self.fail(key, f"must be a string, got {type_name(value)} {value!r}")
        if not value.strip():
            self.fail(key, "must not be empty")
        if choices and value not in choices:
            self.fail(key, f"must be one of {', '.join(choices)}; got {value!r}")
        return value

    def path_value(self, key: str, default: str | None) -> str:
        """A path as a request target would carry it (checked like one is)."""
        value = self.string(key, default)
        if not value.startswith("/"):
            self.fail(key, f"must be an absolute path starting with '/', got {value!r}")
        try:
            parse_target(value.encode("utf-8"))
        except BadPath as e:
            self.fail(key, f"{e.message}; got {value!r}")
        return value

    def finish(self) -> None:
        unknown = sorted(str(k) for k in self.raw if k not in self._used)
        if unknown:
            self.fail(unknown[0], f"unknown key (allowed here: {', '.join(sorted(self._used))})")


def type_name(value: Any) -> str:
    return {
        dict: "a mapping",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)

