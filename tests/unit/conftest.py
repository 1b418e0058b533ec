"""Unit tests run without the network and without processes: Clock, StubTreq, MemoryReactor.

The guard below fails a unit test at the first socket it binds or connects, or the first
process it starts, so a test that needs either goes to tests/integration or tests/system.
`make test-unit-offline` also runs this directory in a network namespace with no interface
up, so a connection that slipped past the guard would fail too."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess

import pytest
from twisted.internet import reactor


class NotAUnitTest(AssertionError):
    """A unit test reached for a socket or a process."""


def _refuse(what: str):
    def refused(*args, **kwargs):
        raise NotAUnitTest(f"unit tests must not {what}; this test belongs in "
                           "tests/integration or tests/system")
    return refused


# (owner, attribute, what it does)
_GUARDED = [
    (socket.socket, "bind", "bind a socket"),
    (socket.socket, "connect", "connect a socket"),
    (socket.socket, "connect_ex", "connect a socket"),
    (socket, "create_connection", "connect a socket"),
    (subprocess.Popen, "__init__", "start a process"),
    (os, "fork", "fork"),
    (os, "posix_spawn", "start a process"),
    (os, "posix_spawnp", "start a process"),
    (os, "system", "start a process"),
    (reactor, "spawnProcess", "start a process"),
    (reactor, "listenTCP", "listen on a port"),
    (reactor, "connectTCP", "connect a socket"),
]


@contextlib.contextmanager
def no_sockets_no_processes():
    saved = []
    for owner, name, what in _GUARDED:
        if hasattr(owner, name):
            saved.append((owner, name, owner.__dict__.get(name) if isinstance(owner, type)
                          else getattr(owner, name)))
            setattr(owner, name, _refuse(what))
    try:
        yield
    finally:
        for owner, name, original in reversed(saved):
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)


@pytest.fixture(autouse=True)
def _unit_guard():
    with no_sockets_no_processes():
        yield
