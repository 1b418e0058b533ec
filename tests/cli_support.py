"""What both halves of the CLI tests use: `gpumgr(...)` runs `main()` in a thread
and returns its exit code and output; `shipped_config_here` copies etc/consumers.yaml
with paths that exist on this machine (not a test module)."""

from __future__ import annotations

import io
import os
import sys

from twisted.internet.threads import deferToThread

from gpumgr.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Run:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err


async def gpumgr(*argv: str, env: dict | None = None) -> Run:
    out, err = io.StringIO(), io.StringIO()
    code = await deferToThread(main, list(argv), env=env or {}, stdout=out, stderr=err)
    return Run(code, out.getvalue(), err.getvalue())


def shipped_config_here(tmp_path) -> str:
    """etc/consumers.yaml with whisper's process paths pointed at this machine:
    the shipped ones (/opt/whisper.cpp) exist only on a real box."""
    text = open(os.path.join(ROOT, "etc", "consumers.yaml")).read()
    assert "/opt/whisper.cpp/build/bin/whisper-server" in text and "cwd: /opt/whisper.cpp" in text
    text = text.replace("/opt/whisper.cpp/build/bin/whisper-server", sys.executable)
    text = text.replace("cwd: /opt/whisper.cpp", f"cwd: {tmp_path}")
    path = tmp_path / "consumers.yaml"
    path.write_text(text)
    return str(path)
