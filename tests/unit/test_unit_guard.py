"""The guard in tests/unit/conftest.py: a unit test cannot reach a socket or start a process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
from twisted.internet import protocol, reactor

from tests.unit.conftest import NotAUnitTest


@pytest.mark.parametrize("reach", [
    lambda: socket.socket().bind(("127.0.0.1", 0)),
    lambda: socket.socket().connect(("127.0.0.1", 9)),
    lambda: socket.socket().connect_ex(("127.0.0.1", 9)),
    lambda: socket.create_connection(("127.0.0.1", 9)),
    lambda: reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1"),
    lambda: reactor.connectTCP("127.0.0.1", 9, protocol.ClientFactory()),
], ids=["bind", "connect", "connect_ex", "create_connection", "listenTCP", "connectTCP"])
def test_a_socket_fails_the_test(reach):
    with pytest.raises(NotAUnitTest, match="tests/integration or tests/system"):
        reach()


@pytest.mark.parametrize("start", [
    lambda: subprocess.run([sys.executable, "-c", "pass"]),
    lambda: subprocess.Popen([sys.executable, "-c", "pass"]),
    lambda: os.fork(),
    lambda: os.posix_spawn(sys.executable, [sys.executable, "-c", "pass"], os.environ),
    lambda: reactor.spawnProcess(protocol.ProcessProtocol(), sys.executable,
                                 [sys.executable, "-c", "pass"]),
], ids=["run", "Popen", "fork", "posix_spawn", "spawnProcess"])
def test_a_process_fails_the_test(start):
    with pytest.raises(NotAUnitTest, match="start a process|fork"):
        start()


def test_a_socketpair_and_a_pipe_stay_allowed():
    """In-memory plumbing is not the network: Twisted's wakers and StringTransport need it."""
    a, b = socket.socketpair()
    a.sendall(b"x")
    assert b.recv(1) == b"x"
    a.close(), b.close()
    r, w = os.pipe()
    os.close(r), os.close(w)
