"""The simulated whisper.cpp server as its own process: start-up order, failures, signals, memory."""

from __future__ import annotations

import json
import os
import signal

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.error import ConnectionRefusedError, ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol

from gpumgr.gpu import run_command
from gpumgr.testing import SimulatedGpu, sim_nvidia_smi_command
from gpumgr.testing.multipart import encode_multipart
from gpumgr.testing.whisper_server import PROCESS_NAME, whisper_server_argv
from tests.helpers import free_port, Client, sleep, wait_for


class ServerProcess(ProcessProtocol):
    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.stdout = b""
        self.stderr = b""
        self.ended: defer.Deferred = defer.Deferred()
        self.exit_code: int | None = None
        self.signal: int | None = None

    def outReceived(self, data: bytes) -> None:
        self.stdout += data

    def errReceived(self, data: bytes) -> None:
        self.stderr += data

    def processEnded(self, reason) -> None:
        self.exit_code = reason.value.exitCode
        self.signal = reason.value.signal
        self.ended.callback(None)

    def kill(self, sig: str) -> None:
        try:
            self.transport.signalProcess(sig)
        except ProcessExitedAlready:
            pass


@pytest.fixture
def gpu(tmp_path):
    return SimulatedGpu(str(tmp_path / "gpu-state.json"), total_mib=24576, baseline_mib=350)


@pytest_twisted.async_yield_fixture
async def spawn(tmp_path):
    """spawn(**whisper_server_argv options) -> ServerProcess; killed at teardown if still running."""
    started: list[ServerProcess] = []

    def start(**options) -> ServerProcess:
        proto = ServerProcess(free_port())
        argv = whisper_server_argv(proto.port, str(tmp_path), **options)
        reactor.spawnProcess(proto, argv[0], argv, env=os.environ)
        started.append(proto)
        return proto

    yield start
    for proto in started:
        if not proto.ended.called:
            proto.kill("KILL")
            await proto.ended


@pytest_twisted.async_yield_fixture
async def client():
    c = Client()
    yield c
    await c.close()


async def healthy(client: Client, server: ServerProcess) -> None:
    """Poll until the server answers /health (connections are refused until it binds)."""
    for _ in range(500):
        if server.ended.called:
            raise AssertionError(f"server exited {server.exit_code}: {server.stderr!r}")
        try:
            reply = await client.request("GET", server.url + "/health")
        except ConnectionRefusedError:
            await sleep(0.02)
            continue
        assert reply.code == 200 and reply.json() == {"status": "ok"}
        return
    raise AssertionError("whisper server never became healthy")


async def smi_processes(gpu: SimulatedGpu) -> list[str]:
    out = await run_command(reactor, sim_nvidia_smi_command(gpu.state_path).split() + [
        "--query-compute-apps=pid,process_name,used_memory", "--format=csv,noheader,nounits"], 10)
    return out.decode().splitlines()


@pytest_twisted.ensureDeferred
async def test_connections_are_refused_while_the_model_loads(gpu, spawn, client):
    server = spawn(load_s=60)
    await wait_for(lambda: b"loading model" in server.stderr, timeout_s=15)
    with pytest.raises(ConnectionRefusedError):
        await client.request("GET", server.url + "/health")
    assert gpu.external_allocations() == []  # the model is not loaded yet
    server.kill("TERM")
    await server.ended.addTimeout(15, reactor)
    assert server.exit_code == 0


@pytest_twisted.ensureDeferred
async def test_serves_holds_its_memory_and_gives_it_back_on_sigterm(gpu, spawn, client):
    free_before = gpu.free_mib
    server = spawn(vram_mib=1500, load_s=0.1, job_s=0.01)
    await healthy(client, server)
    assert b"whisper server listening at" in server.stdout
    [held] = gpu.external_allocations()
    assert (held.process_name, held.used_mib) == (PROCESS_NAME, 1500)
    assert gpu.free_mib == free_before - 1500
    assert f"{held.pid}, {PROCESS_NAME}, 1500" in await smi_processes(gpu)

    audio = bytes(range(256)) * 40
    ctype, body = encode_multipart({"file": ("a.wav", audio, "audio/wav"),
                                    "response_format": b"json"})
    reply = await client.request("POST", server.url + "/inference", body, {"Content-Type": ctype})
    assert reply.code == 200 and reply.json() == {
        "text": f" simulated transcript of {len(audio)} bytes of audio."}
    ctype, body = encode_multipart({"file": ("a.wav", audio, "audio/wav"),
                                    "response_format": b"text"})
    reply = await client.request("POST", server.url + "/inference", body, {"Content-Type": ctype})
    assert reply.body.startswith(b" simulated transcript") and b"text/plain" in reply.header(
        "Content-Type")
    # Like the real server: a missing file is a line on stderr and a 400 whose
    # body the server's error handler wrote.
    reply = await client.request("POST", server.url + "/inference", b"",
                                 {"Content-Type": "application/json"})
    assert (reply.code, reply.body) == (400, b"Invalid request")
    assert b"error: no 'file' field in the request" in server.stderr
    ctype, body = encode_multipart({"model": b"models/ggml-small.bin"})
    reply = await client.request("POST", server.url + "/load", body, {"Content-Type": ctype})
    assert reply.code == 200 and reply.body == b"Load was successful!"
    assert (await client.request("POST", server.url + "/unload", b"")).code == 404

    server.kill("TERM")
    await server.ended.addTimeout(15, reactor)
    assert server.exit_code == 0
    assert gpu.external_allocations() == [] and gpu.free_mib == free_before
    assert await smi_processes(gpu) == []


@pytest_twisted.ensureDeferred
async def test_inference_is_serialised(spawn, client):
    server = spawn(load_s=0, job_s=0.2)
    await healthy(client, server)
    ctype, body = encode_multipart({"file": ("a.wav", b"RIFF", "audio/wav")})
    other = Client()  # a second connection, so the requests really are concurrent
    try:
        first, second = await defer.gatherResults([
            defer.ensureDeferred(c.request("POST", server.url + "/inference", body,
                                           {"Content-Type": ctype})) for c in (client, other)])
    finally:
        await other.close()
    assert first.code == second.code == 200
    log = [line for line in server.stderr.decode().splitlines() if line.startswith("[REQUEST]")]
    # Inside the lock each request logs its start and its end: never two starts in a row.
    assert log == ["[REQUEST] New inference request received", "[REQUEST] inference done"] * 2


@pytest_twisted.ensureDeferred
async def test_a_request_without_file_waits_for_the_inference_before_it(spawn, client):
    """The lock comes before the field check (whisper.cpp's server.cpp): the
    error answers only once the running inference ended (gpumgr's evidence)."""
    server = spawn(load_s=0, job_s=1.0)
    await healthy(client, server)
    ctype, body = encode_multipart({"file": ("a.wav", b"RIFF", "audio/wav")})
    other = Client()
    try:
        inference = defer.ensureDeferred(other.request("POST", server.url + "/inference", body,
                                                       {"Content-Type": ctype}))
        await wait_for(lambda: b"New inference request received" in server.stderr)
        probe = await client.request("POST", server.url + "/inference", b"")
        assert probe.code == 400 and (await inference).code == 200
    finally:
        await other.close()
    lines = server.stderr.decode().splitlines()
    assert lines.index("[REQUEST] inference done") < lines.index(
        "error: no 'file' field in the request")


@pytest_twisted.ensureDeferred
async def test_fail_load_prints_the_message_and_exits_1(gpu, spawn, client):
    server = spawn(fail_load="failed to load model", load_s=0.1)
    await server.ended.addTimeout(15, reactor)
    assert server.exit_code == 1 and b"failed to load model" in server.stderr
    assert gpu.external_allocations() == []
    with pytest.raises(ConnectionRefusedError):
        await client.request("GET", server.url + "/health")


@pytest_twisted.ensureDeferred
async def test_a_model_that_does_not_fit_exits_1_with_cuda_out_of_memory(gpu, spawn):
    gpu.allocate("hog", 1, "/usr/bin/hog", gpu.free_mib - 1000)
    server = spawn(vram_mib=1500)
    await server.ended.addTimeout(15, reactor)
    assert server.exit_code == 1 and b"out of memory" in server.stderr
    assert gpu.external_allocations() == []


@pytest_twisted.ensureDeferred
async def test_sigkill_gives_the_memory_back_like_the_driver(gpu, spawn, client, tmp_path):
    free_before = gpu.free_mib
    server = spawn(vram_mib=3000)
    await healthy(client, server)
    assert gpu.free_mib == free_before - 3000
    [record] = os.listdir(tmp_path / "gpu-procs")
    server.kill("KILL")
    await server.ended.addTimeout(15, reactor)
    assert server.signal == 9
    assert (tmp_path / "gpu-procs" / record).exists()  # nobody cleaned up...
    assert gpu.external_allocations() == [] and gpu.free_mib == free_before  # ...yet it is free
    assert not (tmp_path / "gpu-procs" / record).exists()  # and the stale record is gone
    assert await smi_processes(gpu) == []


def test_whisper_server_argv_is_a_python_module_command(tmp_path):
    argv = whisper_server_argv(8178, str(tmp_path), vram_mib=10, fail_load="boom")
    assert argv[1:3] == ["-m", "gpumgr.testing.whisper_server"]
    assert argv[argv.index("--port") + 1] == "8178" and argv[-2:] == ["--fail-load", "boom"]
    assert json.dumps(argv)  # plain strings, ready for a config file


# -- the real server's socket and signals (issue 14: SO_REUSEPORT, freezing) -------------------

def spawn_on(tmp_path, port: int, **options) -> ServerProcess:
    proto = ServerProcess(port)
    argv = whisper_server_argv(port, str(tmp_path), **options)
    reactor.spawnProcess(proto, argv[0], argv, env=os.environ)
    return proto


async def stopped(*servers: ServerProcess) -> None:
    for server in servers:
        server.kill("KILL")
        await server.ended.addTimeout(15, reactor)


@pytest_twisted.ensureDeferred
async def test_two_servers_share_a_port_like_cpp_httplib(gpu, tmp_path):
    port = free_port()
    first = spawn_on(tmp_path, port, job_s=0)
    second = spawn_on(tmp_path, port, job_s=0)
    try:
        for server in (first, second):
            c = Client()
            try:
                await healthy(c, server)
            finally:
                await c.close()
        # On a shared port the first server may answer the second's health check
        # before the second has bound: each says when it listens (after its model
        # loaded, as whisper-server does).
        await wait_for(lambda: all(b"whisper server listening" in s.stdout
                                   or s.ended.called for s in (first, second)), timeout_s=30)
        assert not first.ended.called and not second.ended.called  # both bound the port
        assert len(gpu.external_allocations()) == 2  # both hold their memory
        ctype, body = encode_multipart({"file": ("a.wav", b"RIFF", "audio/wav")})
        for _ in range(40):  # a new connection each time: the kernel spreads them
            c = Client()
            try:
                reply = await c.request("POST", first.url + "/inference", body,
                                        {"Content-Type": ctype})
            finally:
                await c.close()
            assert reply.code == 200
        for server in (first, second):
            assert b"[REQUEST] New inference request received" in server.stderr
    finally:
        await stopped(first, second)


@pytest_twisted.ensureDeferred
async def test_a_port_held_without_reuseport_prints_the_real_bind_error_and_exits_1(gpu, tmp_path):
    from gpumgr.testing.stranger import StrangerListener

    stranger = StrangerListener()
    port = free_port()
    stranger.listen(reactor, port)
    try:
        server = spawn_on(tmp_path, port)
        await server.ended.addTimeout(15, reactor)
    finally:
        await stranger.stop()
    assert server.exit_code == 1
    # The real whisper-server's last line is blank; the one before says why.
    assert server.stderr.endswith(
        f"couldn't bind to server socket: hostname=127.0.0.1 port={port}\n\n".encode())
    assert gpu.external_allocations() == []


@pytest_twisted.ensureDeferred
async def test_sigstop_freezes_it_with_the_port_accepting_and_sigcont_thaws_it(spawn, client):
    from twisted.web._newclient import ResponseNeverReceived

    from gpumgr.testing.stranger import port_accepts

    server = spawn(job_s=0)
    await healthy(client, server)
    server.kill("STOP")
    try:
        assert port_accepts(server.port)  # the kernel's backlog still accepts
        prober = Client()
        probe = defer.ensureDeferred(prober.request("GET", server.url + "/health"))
        probe.addTimeout(1.0, reactor)
        try:
            with pytest.raises(ResponseNeverReceived):
                await probe  # ...but nobody answers
        finally:
            await prober.close()
    finally:
        server.kill(signal.SIGCONT)
    await healthy(client, server)
