"""`gpu_process`: a restricted pattern for nvidia-smi process names, matched in linear time."""

from __future__ import annotations

import attrs

@attrs.frozen
class ProcessNameMatcher:
    """`gpu_process`: which nvidia-smi process names are a consumer's.

    A restricted regular expression, matched without backtracking: literal
    text, `.*` between parts, `^` and `$` anchors, `|` between alternatives.
    `search` agrees with `re.search` on that subset, in time linear in the
    name, whereas a full regex such as `(a+)+$` cost 2-3 s per sample.
    """

    text: str
    #: Per alternative: (anchored at the start, the parts in order, anchored at the end).
    alternatives: tuple[tuple[bool, tuple[str, ...], bool], ...]

    def search(self, name: str) -> bool:
        return any(_parts_match(name, *alternative) for alternative in self.alternatives)


def _parts_match(name: str, at_start: bool, parts: tuple[str, ...], at_end: bool) -> bool:
    """Whether `parts` occur in `name` in order, honouring the anchors (pure, linear).

    Taking each part at its leftmost occurrence after the previous one is
    never wrong: an earlier end leaves more room for the rest.
    """
    pos = 0
    last = len(parts) - 1
    for i, part in enumerate(parts):
        if i == last and at_end:
            return name.endswith(part) and len(name) - len(part) >= pos and (
                not (i == 0 and at_start) or name == part)
        if i == 0 and at_start:
            if not name.startswith(part):
                return False
            pos = len(part)
            continue
        found = name.find(part, pos)
        if found < 0:
            return False
        pos = found + len(part)
    return True


_PROCESS_PATTERN_HELP = (
    "only a restricted regular expression is accepted, matched in linear time: text "
    "(a \\ before punctuation makes it literal), .* between parts, ^ and $ anchors, "
    "| between alternatives")


def parse_process_pattern(text: str) -> ProcessNameMatcher:
    """Parse a `gpu_process` pattern; ValueError says which character is refused (pure)."""
    alternatives = []
    i, n = 0, len(text)
    at_start, at_end = False, False
    parts: list[str] = []
    current: list[str] = []
    while True:
        ch = text[i] if i < n else "|"
        if i == n or ch == "|":
            parts.append("".join(current))
            alternatives.append((at_start, tuple(parts), at_end))
            if i >= n:
                break
            at_start, parts, current, at_end = False, [], [], False
            i += 1
            continue
        if at_end:
            raise ValueError(f"'$' at position {i - 1} must end its alternative; "
                             + _PROCESS_PATTERN_HELP)
        if ch == "\\":
            if i + 1 >= n or text[i + 1].isalnum() or text[i + 1] == "_":
                raise ValueError(f"{text[i:i + 2]!r} at position {i}: " + _PROCESS_PATTERN_HELP)
            current.append(text[i + 1])
            i += 2
            continue
        if ch == "^" and not parts and not current and not at_start:
            at_start = True
        elif ch == "$":
            at_end = True
        elif ch == "." and text[i + 1:i + 2] == "*":
            parts.append("".join(current))
            current = []
            i += 1
        elif ch in ".*+?()[]{}^":
            raise ValueError(f"{ch!r} at position {i}: " + _PROCESS_PATTERN_HELP)
        else:
            current.append(ch)
        i += 1
    return ProcessNameMatcher(text, tuple(alternatives))

