"""YAML reading that a hostile or broken file cannot turn into a hang or a traceback.

PyYAML composes a graph, not a tree: an alias points back at its anchor's
node, so `a: &a [*a]` is a cycle and a few hundred bytes of nested aliases
stand for billions of nodes. Walking (or printing) such a value naively
never ends. Here every node is visited once; cycles, nesting depth and the
size the aliases expand to are bounded before anything is constructed.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import attrs
import yaml

#: Largest config file read; a real one is a few KiB.
MAX_CONFIG_BYTES = 1024 * 1024
#: Nesting through mappings, sequences and aliases. gpumgr's schema needs 6.
MAX_DEPTH = 32
#: Nodes the document stands for with every alias expanded. A large real
#: config is a few thousand; an alias bomb is billions.
MAX_EXPANDED_NODES = 100_000


@attrs.frozen
class YamlProblem(Exception):
    """Why a YAML text is refused, and where (a dotted key path, or "")."""

    key_path: str
    problem: str


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader whose composer refuses to nest deeper than MAX_DEPTH.

    PyYAML composes recursively, so deep text would otherwise end in a
    RecursionError (a traceback) before any check could run.
    """

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                # PyYAML's stubs leave peek_event untyped; it returns the next event.
                peek_event: Callable[[], yaml.Event] = self.peek_event
                mark = peek_event().start_mark
                where = f" (line {mark.line + 1})" if mark is not None else ""
                raise YamlProblem("", f"nested more than {MAX_DEPTH} levels deep{where}")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def load(text: bytes | str) -> Any:
    """The document in `text`, as plain Python values; raises YamlProblem.

    None for an empty document.
    """
    if len(text) > MAX_CONFIG_BYTES:
        raise YamlProblem("", f"larger than {MAX_CONFIG_BYTES // 1024} KiB; "
                              "this is not a gpumgr config")
    try:
        loader = _BoundedLoader(text)  # the reader checks the characters at once
    except yaml.YAMLError as e:
        raise YamlProblem("", f"not valid YAML: {_describe(e)}") from None
    try:
        try:
            node = loader.get_single_node()
        except yaml.YAMLError as e:
            raise YamlProblem("", f"not valid YAML: {_describe(e)}") from None
        if node is None:
            return None
        check_graph(node)
        try:
            return loader.construct_document(node)
        except yaml.YAMLError as e:
            raise YamlProblem("", f"not valid YAML: {_describe(e)}") from None
        except (ValueError, OverflowError) as e:
            # e.g. `2001-02-30` read as a timestamp, or an integer too long to convert
            raise YamlProblem("", f"a value cannot be read: {e}") from None
        except (IndexError, KeyError, AttributeError, TypeError):
            # SafeConstructor on an explicit tag its value does not fit: `!!int ''`
            # (IndexError), `!!bool x` (KeyError), `!!timestamp x` (AttributeError)
            raise YamlProblem("", "a value does not fit its explicit tag "
                                  "(such as !!int on text that is not a number)") from None
    finally:
        loader.dispose()


def check_graph(root: yaml.Node) -> None:
    """Refuse cycles, deep nesting, alias bombs, complex and duplicate keys, bad text.

    One iterative post-order walk over the node graph: each node is expanded
    once, and its depth and expanded size are remembered, so a node reached
    through many aliases costs nothing more.
    """
    size: dict[int, int] = {}   # id(node) -> nodes it stands for, itself included
    depth: dict[int, int] = {}  # id(node) -> levels below and including it
    on_path: set[int] = set()
    # (node, key path, children expanded yet?)
    stack: list[tuple[yaml.Node, str, bool]] = [(root, "", False)]
    while stack:
        node, path, expanded = stack.pop()
        key = id(node)
        children = _children(node, path)
        if expanded:
            on_path.discard(key)
            size[key] = 1 + sum(size[id(c)] for c, _ in children)
            depth[key] = 1 + max((depth[id(c)] for c, _ in children), default=0)
            if depth[key] > MAX_DEPTH:
                raise YamlProblem(path, f"nested more than {MAX_DEPTH} levels deep "
                                        "(counting aliases)")
            if size[key] > MAX_EXPANDED_NODES:
                raise YamlProblem(path, f"expands to more than {MAX_EXPANDED_NODES} values "
                                        "through aliases (an alias bomb?)")
            continue
        if key in size:
            continue  # reached again through an alias: already measured
        if key in on_path:
            raise YamlProblem(path, "an alias refers to a node that contains it "
                                    "(a recursive structure)")
        _check_node(node, path)
        on_path.add(key)
        stack.append((node, path, True))
        for child, child_path in children:
            if id(child) in on_path:
                raise YamlProblem(child_path, "an alias refers to a node that contains it "
                                              "(a recursive structure)")
            if id(child) not in size:
                stack.append((child, child_path, False))


def _children(node: yaml.Node, path: str) -> list[tuple[yaml.Node, str]]:
    if isinstance(node, yaml.MappingNode):
        out = []
        for key_node, value_node in node.value:
            name = _key_name(key_node)
            child = f"{path}.{name}" if path else name
            out.append((key_node, child))
            out.append((value_node, child))
        return out
    if isinstance(node, yaml.SequenceNode):
        return [(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
    return []


def _key_name(key_node: yaml.Node) -> str:
    return str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"


def _check_node(node: yaml.Node, path: str) -> None:
    if isinstance(node, yaml.ScalarNode):
        _check_text(node.value, path)
    elif isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                line = key_node.start_mark.line + 1
                raise YamlProblem(path, "keys must be plain strings or numbers, "
                                        f"not a {key_node.id} (line {line})")
            name = str(key_node.value)
            if name in seen:
                child = f"{path}.{name}" if path else name
                line = key_node.start_mark.line + 1
                raise YamlProblem(child, f"duplicate key (again at line {line})")
            seen.add(name)


def _check_text(value: str, path: str) -> None:
    """Text a config may hold: no NUL (argv, env and URLs cannot carry it), valid Unicode."""
    if "\x00" in value:
        raise YamlProblem(path, "contains a NUL character")
    if _SURROGATE.search(value):
        raise YamlProblem(path, "contains a lone surrogate (\\uD800-\\uDFFF), "
                                "which is not valid Unicode")


_SURROGATE = re.compile("[\ud800-\udfff]")


def _describe(error: yaml.YAMLError) -> str:
    """PyYAML's message on one line: what, where (line and column)."""
    if isinstance(error, yaml.MarkedYAMLError):
        parts = [p for p in (error.context, error.problem) if p]
        mark = error.problem_mark or error.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        if parts:
            return "; ".join(parts) + where
    return " ".join(str(error).split())
