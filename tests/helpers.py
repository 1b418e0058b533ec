"""The one set of test helpers: HTTP clients (a real Agent, a raw socket), waiting on the
real reactor, Deferred outcomes, free ports and real twistd processes.

Test modules import from here (or get fixtures from a conftest), never from each other.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import sys
import time

import attrs
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, protocol, reactor
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.logger import formatEvent
from twisted.scripts.twistd import ServerOptions
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers

from gpumgr.config import ProcessConfig
from gpumgr.gpu import NOT_SAMPLED
from gpumgr.testing import world_config, write_world_config
from gpumgr.testing.stranger import free_port, port_accepts  # free_port: tests import it here


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
    """A raw-socket HTTP client: sends `payload` when connected (or write to `transport`
    yourself), collects every byte in `data` until the server closes; `closed` fires with
    them. With `timeout_s` it aborts the connection itself then, and sets `timed_out`."""

    def __init__(self, payload: bytes = b"", timeout_s: float | None = None) -> None:
        self.payload = payload
        self.timeout_s = timeout_s
        self.data = b""
        self.timed_out = False
        self.closed: defer.Deferred[bytes] = defer.Deferred()
        self._timer = None

    def connectionMade(self) -> None:
        if self.timeout_s is not None:
            self._timer = reactor.callLater(self.timeout_s, self._give_up)
        if self.payload:
            self.transport.write(self.payload)

    def _give_up(self) -> None:
        self.timed_out = True
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason=None) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if not self.closed.called:  # cancelled by a caller that gave up
            self.closed.callback(self.data)


def url_port(url: str) -> int:
    """The port of an `http://host:port` base URL."""
    return int(url.rsplit(":", 1)[1])


async def raw_open(port: int, payload: bytes = b"", timeout_s: float | None = 10.0) -> RawClient:
    """A RawClient connected to 127.0.0.1:`port`, `payload` sent."""
    client = RawClient(payload, timeout_s)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    return client


def outcome(d: defer.Deferred):
    """What `d` has fired with so far (a result or a Failure), or None if it has not fired.

    Call it once per Deferred, when the test expects it settled: it consumes the result."""
    results: list = []
    d.addBoth(results.append)
    return results[0] if results else None


async def settled(d: defer.Deferred):
    """The result of `d`, or the exception it failed with (a job aborted may drop the
    connection, and the test looks at which it was)."""
    try:
        return await d
    except Exception as e:  # noqa: BLE001 - the test looks at what it was
        return e


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


def run_twistd(*args: str, cwd=None):
    """`twistd -n gpumgr ARGS` run to its end (a config it refuses, say): CompletedProcess."""
    import subprocess

    return subprocess.run([TWISTD, "--nodaemon", "--pidfile=", "gpumgr", *args],
                          capture_output=True, text=True, timeout=60, cwd=cwd)


def start_twistd(cwd, port: int, *args: str, env=None, log_name: str = "twistd.log"):
    """`twistd -n gpumgr ARGS` in `cwd`, waited for until `port` accepts.

    Returns (process, output) where output() reads what it logged so far;
    the caller stops the process (`stop_twistd`)."""
    import subprocess

    import pytest

    log_path = cwd / log_name
    log = open(log_path, "w")
    proc = subprocess.Popen([TWISTD, "--nodaemon", "--pidfile=", "gpumgr", *args],
                            stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env)
    log.close()
    output = log_path.read_text
    deadline = time.monotonic() + 30
    while True:
        if port_accepts(port):
            return proc, output
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


@contextlib.contextmanager
def running_twistd(cwd, port: int, *args: str, log_name: str = "twistd.out"):
    """`twistd -n gpumgr ARGS` while the block runs; yields a function returning its output."""
    proc, output = start_twistd(cwd, port, *args, log_name=log_name)
    try:
        yield output
    finally:
        stop_twistd(proc)


# -- brokers and fakes shared by several test modules ------------------------------------


PASS = {"ollama": {"passthrough": True}, "comfyui": {"passthrough": True},
        "mvoice": {"passthrough": True}}


async def locked_broker(world, start_broker, consumers=PASS, **sections):
    config = world_config(world, consumers=consumers, scheduler={"mode": "locked"},
                          health={"interval_s": 30}, **sections)
    service, url = await start_broker(config)
    await service.health.probe_all_now()
    return service, url


class FakeWebSocketServer(protocol.Protocol):
    """Answers any upgrade with 101, then echoes bytes upper-cased. A body
    `close` makes it close the connection itself."""

    instances: list[FakeWebSocketServer] = []
    refuse = False

    def connectionMade(self):
        self.buffer = b""
        self.upgraded = False
        self.head = b""
        self.closed = defer.Deferred()

    def dataReceived(self, data):
        if self.upgraded:
            if data == b"close":
                self.transport.loseConnection()
            else:
                self.transport.write(data.upper())
            return
        self.buffer += data
        if b"\r\n\r\n" in self.buffer:
            self.head, _, rest = self.buffer.partition(b"\r\n\r\n")
            if b"upgrade: websocket" not in self.head.lower():  # a health probe
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                                     b"Connection: close\r\n\r\n{}")
                self.transport.loseConnection()
                return
            FakeWebSocketServer.instances.append(self)
            if FakeWebSocketServer.refuse:
                body = b'{"error":"no such socket"}'
                self.transport.write(b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json"
                                     b"\r\nContent-Length: " + str(len(body)).encode() +
                                     b"\r\n\r\n" + body)
                return
            self.upgraded = True
            self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                 b"Connection: Upgrade\r\nSec-WebSocket-Accept: x\r\n\r\nhello")

    def connectionLost(self, reason=None):
        self.closed.callback(None)


UPGRADE = (b"GET /v1/image/ws?clientId=abc HTTP/1.1\r\nHost: gpumgr\r\nUpgrade: websocket\r\n"
           b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
           b"Sec-WebSocket-Version: 13\r\n\r\n")


async def file_broker(world, start_broker, path, **sections):
    sections.setdefault("health", {"interval_s": 30})
    config = write_world_config(world, str(path), **sections)
    service, url = await start_broker(config)
    await service.health.probe_all_now()
    return service, url


TOKEN = "s3cret-admin-token"


async def token_broker(world, start_broker, token=TOKEN):
    sections = {"admin_token": token} if token else {}
    config = world_config(world, consumers=PASS, scheduler={"mode": "locked"},
                          health={"interval_s": 30}, **sections)
    service, url = await start_broker(config)
    await service.health.probe_all_now()
    return service, url


async def comfy_broker(world, start_broker, mode="locked", **comfy):
    config = world_config(world, scheduler={"mode": mode}, health={"interval_s": 0.2},
                          consumers={"comfyui": comfy} if comfy else None)
    service, url = await start_broker(config)
    await service.health.probe_all_now()
    return service, url


class Gate:
    """Holds every render until `release()`."""

    def __init__(self, consumer):
        self.gates: dict[str, defer.Deferred] = {}
        consumer.behaviour.render_gate = lambda pid: self.gates.setdefault(pid, defer.Deferred())

    def release(self):
        for d in self.gates.values():
            if not d.called:
                d.callback(None)


def parse_metrics(text: str) -> dict:
    """/metrics text: metric families by name."""
    return {f.name: f for f in text_string_to_metric_families(text)}


def metric_value(family, **labels):
    """The one sample of `family` with these labels."""
    matches = [s.value for s in family.samples
               if all(s.labels.get(k) == v for k, v in labels.items())
               and not s.name.endswith(("_created",))]
    assert matches, (family.name, labels)
    return matches[0]


AUDIO = (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
         b"Content-Type: audio/wav\r\n\r\nRIFF....WAVE\r\n--b--\r\n")


#: AUDIO's Content-Type.
FORM = "multipart/form-data; boundary=b"
MULTIPART = {b"Content-Type": FORM.encode()}


async def transcribe(client, url):
    return await client.request("POST", url + "/v1/stt", AUDIO, headers=MULTIPART)


def process_status(service):
    return service.status()["consumers"]["whisper"]["process"]


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def get_status(port):
    """/v1/status of a gpumgr on `port`, with a blocking client (tests of real processes)."""
    _, r = http_request(port, "GET", "/v1/status")
    return json.loads(r.read())


def wait_until(predicate, timeout_s=15.0):
    """Poll a condition with time.sleep (tests of real processes, outside the reactor)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def http_request(port, method, path, body=None, headers=None):
    """A blocking HTTP request to 127.0.0.1:`port`: (connection, response)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    conn.request(method, path, body=body, headers=headers or {})
    return conn, conn.getresponse()


class NoSample:
    """A GPU sampler that has never sampled (and never will)."""

    latest = NOT_SAMPLED

    def sample_now(self):
        return defer.succeed(NOT_SAMPLED)


#: Above Linux's PID_MAX_LIMIT (2**22): a fake pid that reaches the real
#: killpg() or waitpid() (ManagedProcess's default groups) finds nothing.
FAKE_PID_BASE = 5_000_000


class FakeTransport:
    def __init__(self, proto, pid: int) -> None:
        self.proto = proto
        self.pid = pid
        self.signals: list[str] = []
        self.pipes_closed = False

    def signalProcess(self, sig: str) -> None:
        self.signals.append(sig)

    def loseConnection(self) -> None:
        self.pipes_closed = True


class FakeProcessReactor(Clock):
    def __init__(self, fail_with: Exception | None = None) -> None:
        super().__init__()
        self.spawned: list[tuple[str, list[str], dict, str | None]] = []
        self.transports: list[FakeTransport] = []
        self.fail_with = fail_with

    def spawnProcess(self, proto, executable, args, env=None, path=None, **kw):
        if self.fail_with is not None:
            raise self.fail_with
        self.spawned.append((executable, args, env, path))
        transport = FakeTransport(proto, FAKE_PID_BASE + len(self.spawned))
        self.transports.append(transport)
        proto.makeConnection(transport)
        return transport


class ScriptedProbe:
    """Fails ('connection refused') until `healthy` is set; counts calls."""

    def __init__(self) -> None:
        self.healthy = False
        self.calls = 0

    def __call__(self) -> defer.Deferred[None]:
        self.calls += 1
        if self.healthy:
            return defer.succeed(None)
        return defer.fail(ConnectionRefusedError("connection refused"))


class PortCheck:
    """What the look at the port finds, decided by the test; pending until answered."""

    def __init__(self) -> None:
        self.pending: list[defer.Deferred[str | None]] = []
        self.cancelled = 0

    def __call__(self) -> defer.Deferred[str | None]:
        def cancelled(_: defer.Deferred[str | None]) -> None:
            self.cancelled += 1

        d: defer.Deferred[str | None] = defer.Deferred(cancelled)
        self.pending.append(d)
        return d


def texts(events) -> list[str]:
    return [formatEvent(e) for e in events]


def spec(command=(sys.executable, "-c", "pass"), **kw) -> ProcessConfig:
    return ProcessConfig(command=tuple(command), **kw)


def parse_twistd_options(argv: list[str]) -> ServerOptions:
    """twistd's command line parsed as twistd does, without running anything."""
    options = ServerOptions()
    options.parseOptions(argv)
    return options
