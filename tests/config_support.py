"""What the halves of the config tests share: the smallest valid config, a YAML
alias bomb, and how long a FIFO's rescuer waits (not a test module)."""

from __future__ import annotations

import textwrap

#: The smallest config the loader accepts: one consumer and its route.
MINIMAL = textwrap.dedent("""\
    consumers:
      ollama:
        url: http://127.0.0.1:11434
        health: /api/version
        paths: {llm: /api/generate}
    routes:
      llm: ollama
    """)

#: How long the rescuer waits before it unblocks a reader that should never have blocked.
RESCUE_AFTER_S = 3.0


def alias_bomb(levels: int, fan_out: int = 9) -> str:
    """`levels` anchors, each a list of `fan_out` aliases of the one before."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels + 1):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * fan_out)}]")
    return "\n".join(lines) + "\n"
