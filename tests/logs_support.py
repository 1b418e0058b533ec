"""The config file both halves of the log tests start from, with an admin token
that must come out redacted (not a test module)."""

from __future__ import annotations

from tests.helpers import free_port

TOKEN = "tok-4b1f9e07c2d8a653"


def write_config(tmp_path, port: int, token: str | None = TOKEN, name: str = "mvoice") -> str:
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
