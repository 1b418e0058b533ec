"""Small HTTP client helpers for tests: a real Agent, bodies collected with timestamps."""

from __future__ import annotations

import json
import os
import sys

import attrs
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers


class Collector(Protocol):
    """Collects a response body chunk by chunk, with arrival times."""

    def __init__(self, on_chunk=None) -> None:
        self.chunks: list[tuple[float, bytes]] = []
        self.done: defer.Deferred = defer.Deferred()
        self.on_chunk = on_chunk
        self.reason = None

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append((reactor.seconds(), data))
        if self.on_chunk is not None:
            self.on_chunk(self, data)

    def connectionLost(self, reason) -> None:
        self.reason = reason
        self.done.callback(None)

    @property
    def body(self) -> bytes:
        return b"".join(c for _, c in self.chunks)

    @property
    def complete(self) -> bool:
        return bool(self.reason and self.reason.check(ResponseDone, PotentialDataLoss))


@attrs.define
class Reply:
    code: int
    headers: Headers
    body: bytes
    complete: bool
    collector: Collector

    def json(self):
        return json.loads(self.body)

    def header(self, name: str) -> bytes | None:
        values = self.headers.getRawHeaders(name.encode("ascii"))
        return values[0] if values else None


class Client:
    def __init__(self) -> None:
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.agent = Agent(reactor, pool=self.pool)

    async def request(self, method: str, url: str, body: bytes | None = None,
                      headers: dict | None = None, on_chunk=None) -> Reply:
        import io

        producer = None if body is None else FileBodyProducer(io.BytesIO(body))
        hdrs = Headers({k: [v] for k, v in (headers or {}).items()})
        response = await self.agent.request(method.encode(), url.encode(), hdrs, producer)
        collector = Collector(on_chunk)
        response.deliverBody(collector)
        await collector.done
        return Reply(response.code, response.headers, collector.body, collector.complete, collector)

    async def close(self) -> None:
        await self.pool.closeCachedConnections()


class RawClient(Protocol):
    """Everything a raw connection receives, until it closes."""

    def connectionMade(self):
        self.data = b""
        self.closed = defer.Deferred()

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason=None):
        if not self.closed.called:  # cancelled by a caller that gave up
            self.closed.callback(None)


@attrs.frozen
class RawReply:
    """One raw HTTP/1.1 exchange's answer: status, headers (lower-case names), body.
    `complete`: the body as its Content-Length or chunked framing said."""

    code: int
    headers: dict[bytes, bytes]
    body: bytes
    complete: bool

    def header(self, name: bytes) -> bytes | None:
        return self.headers.get(name.lower())


def _dechunk(data: bytes) -> tuple[bytes, bool]:
    body = b""
    while True:
        size_line, sep, rest = data.partition(b"\r\n")
        if not sep:
            return body, False
        size = int(size_line.split(b";")[0] or b"x", 16)
        if size == 0:
            return body, True
        if len(rest) < size + 2:
            return body + rest[:size], False
        body, data = body + rest[:size], rest[size + 2:]


async def raw_request(url: str, method: bytes, target: bytes, body: bytes = b"",
                      headers: bytes = b"") -> RawReply:
    """One raw HTTP/1.1 exchange, the request target sent exactly as given
    (an HTTP client library would rewrite `;`, `#` and escapes)."""
    port = int(url.rsplit(":", 1)[1])
    client = RawClient()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    client.transport.write(
        method + b" " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        + b"Content-Type: application/json\r\n" + headers
        + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    try:
        await client.closed
    except defer.CancelledError:
        client.transport.abortConnection()
        raise
    head, _, rest = client.data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        fields[name.strip().lower()] = value.strip()
    if fields.get(b"transfer-encoding", b"").lower() == b"chunked":
        rest, complete = _dechunk(rest)
    elif b"content-length" in fields:
        complete = len(rest) == int(fields[b"content-length"])
    else:
        complete = True  # delimited by the close
    return RawReply(int(lines[0].split(b" ", 2)[1]), fields, rest, complete)


async def raw_exchange(url: str, method: bytes, target: bytes, body: bytes = b"",
                       headers: bytes = b"") -> tuple[int, bytes]:
    """(status, body) of one raw HTTP/1.1 exchange, the target sent as is."""
    reply = await raw_request(url, method, target, body, headers)
    return reply.code, reply.body


def sleep(seconds: float) -> defer.Deferred:
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: None)


async def wait_for(predicate, timeout_s: float = 10.0, step_s: float = 0.01) -> None:
    """Poll a condition on the real reactor (integration tests only)."""
    waited = 0.0
    while not predicate():
        if waited >= timeout_s:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await sleep(step_s)
        waited += step_s


class HeldStream:
    """A simulated ollama stream that holds the GPU lock until `release()`.

    Its first chunk goes out at once; the rest wait for the release.
    """

    def __init__(self, consumer, chunks: int = 2) -> None:
        self.gates: dict[int, defer.Deferred] = {}
        self._released = False
        consumer.behaviour.stream_chunks = chunks
        consumer.behaviour.stream_gate = self._gate
        self.reply: defer.Deferred | None = None

    def _gate(self, i: int) -> defer.Deferred:
        if self._released:
            return defer.succeed(None)
        return self.gates.setdefault(i, defer.Deferred())

    async def start(self, client, url: str, body: bytes = b'{"prompt":"hold"}') -> "HeldStream":
        self.reply = defer.ensureDeferred(client.request("POST", url + "/v1/llm", body))
        await wait_for(lambda: 1 in self.gates)
        return self

    def release(self) -> None:
        self._released = True
        for gate in self.gates.values():
            if not gate.called:
                gate.callback(None)


# -- real twistd processes --------------------------------------------------------

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_twistd(cwd, port: int, *args: str, env=None, log_name: str = "twistd.log"):
    """`twistd -n gpumgr ARGS` in `cwd`, waited for until `port` accepts.

    Returns (process, output) where output() reads what it logged so far;
    the caller stops the process (`stop_twistd`)."""
    import socket
    import subprocess
    import time

    import pytest

    log_path = cwd / log_name
    log = open(log_path, "w")
    proc = subprocess.Popen([TWISTD, "--nodaemon", "--pidfile=", "gpumgr", *args],
                            stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env)
    log.close()
    output = log_path.read_text
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, output
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait(timeout=10)
                pytest.fail(f"twistd did not start:\n{output()}")
            time.sleep(0.1)


def stop_twistd(proc, timeout_s: float = 20) -> int:
    """SIGTERM, then SIGKILL if it does not exit in time; the exit status."""
    import subprocess

    if proc.poll() is None:
        proc.terminate()
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(timeout=10)
