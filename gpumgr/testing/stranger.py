"""A stranger on a managed port: a server gpumgr did not start, already listening.

Two kinds, as found on real boxes:

- `StrangerWhisper`: another simulated whisper.cpp server (its own process,
  with ``SO_REUSEPORT`` like the real one), started by someone else. A second
  whisper-server on its port starts fine and the kernel shares connections
  between the two; stopping gpumgr's leaves the stranger's memory held.
- `StrangerListener`: a plain listener without ``SO_REUSEPORT`` (any other
  program) that answers 200 to everything. A whisper-server started on its
  port cannot bind and exits 1. With ``reuse_port=True`` it sets
  ``SO_REUSEPORT`` itself, so that a `StrangerWhisper` can join it on the
  port: the port is never free while the stranger whisper starts.

Both answer in words a test can recognise (`STRANGER_TRANSCRIPT`,
`StrangerListener.ANSWER`): a user's upload that reached a stranger shows.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from typing import Any

from twisted.internet.interfaces import IListeningPort, IReactorTCP
from twisted.web.resource import Resource
from twisted.web.server import Site



def free_port() -> int:
    """A loopback port nothing listens on right now (a connection to it is refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def port_accepts(port: int, host: str = "127.0.0.1", timeout_s: float = 1.0) -> bool:
    """Whether a TCP connection to host:port is accepted now (blocking; tests only)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


#: What a `StrangerWhisper` says in every transcript.
STRANGER_TRANSCRIPT = "a stranger's transcript"


class StrangerWhisper:
    """The simulated whisper.cpp server, started by someone other than gpumgr."""

    def __init__(self, port: int, state_dir: str, **options: Any) -> None:
        self.port = port
        from gpumgr.testing import whisper_server_argv

        options.setdefault("transcript", STRANGER_TRANSCRIPT)
        argv = whisper_server_argv(port, state_dir, **options)
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, env=dict(os.environ))

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_listening(self, timeout_s: float = 30.0) -> None:
        """Block until its port accepts (a stranger is there before gpumgr looks)."""
        deadline = time.monotonic() + timeout_s
        while not port_accepts(self.port):
            if self.process.poll() is not None:
                raise RuntimeError(f"the stranger exited with {self.process.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError("the stranger never listened")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


class _AnswerEverything(Resource):
    isLeaf = True

    def __init__(self, owner: StrangerListener) -> None:
        super().__init__()
        self._owner = owner

    def render(self, request: Any) -> bytes:
        self._owner.requests.append((request.method, request.path))
        request.setHeader(b"Content-Type", b"application/json")
        if request.method == b"GET":
            return json.dumps({"status": "ok"}).encode()
        return json.dumps({"text": StrangerListener.ANSWER}).encode()


class StrangerListener:
    """Any other program on the port: no SO_REUSEPORT (unless `reuse_port`), and
    200 to everything."""

    #: What it answers a POST.
    ANSWER = "answered by a stranger"

    def __init__(self, reuse_port: bool = False) -> None:
        self.requests: list[tuple[bytes, bytes]] = []
        self.reuse_port = reuse_port
        self._listening: IListeningPort | None = None

    def listen(self, reactor: IReactorTCP, port: int, host: str = "127.0.0.1") -> None:
        site: Any = Site(_AnswerEverything(self))
        if not self.reuse_port:
            # Twisted sets SO_REUSEADDR, never SO_REUSEPORT: a whisper-server cannot join it.
            self._listening = reactor.listenTCP(port, site, interface=host)
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            sock.listen(50)
            sock.setblocking(False)
            adopt: Any = reactor
            self._listening = adopt.adoptStreamPort(sock.fileno(), socket.AF_INET, site)
        finally:
            sock.close()  # the reactor holds its own duplicate

    async def stop(self) -> None:
        if self._listening is not None:
            listening, self._listening = self._listening, None
            stopped = listening.stopListening()
            if stopped is not None:
                await stopped


__all__ = ["STRANGER_TRANSCRIPT", "StrangerListener", "StrangerWhisper", "free_port", "port_accepts"]
