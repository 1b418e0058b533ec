"""A real HAProxy, configured from etc/haproxy.cfg, in front of two real
`twistd gpumgr` boxes, each with its own simulated world on loopback.

Every kind passes through it (a streamed LLM answer and a ComfyUI WebSocket
too), /audio/ comes back from the box that made the file, a box whose
service for a kind is down or whose queue for a kind is full gets no work of
that kind while the other does, and SIGTERM on one box under steady load
loses no request. HAProxy's own view (its stats socket) is what the tests
wait on; nothing asserts on time.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from gpumgr.testing import make_world, write_world_config
from gpumgr.testing.websocket import connect
from tests.helpers import (
    AUDIO,
    MULTIPART,
    TWISTD,
    Client,
    HeldStream,
    free_port,
    port_accepts,
    sleep,
    wait_for,
)
from tests.integration.test_clients import WORKFLOW

HAPROXY = shutil.which("haproxy") or next(
    (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.path.exists(p)), None)
pytestmark = pytest.mark.skipif(
    HAPROXY is None, reason="haproxy is not installed (.ci/run installs it with apt as root)")

EXAMPLE = Path(__file__).resolve().parents[2] / "etc" / "haproxy.cfg"
BOXES = ("box1", "box2")
#: The example's placeholder addresses for the boxes, and its listen line.
EXAMPLE_ADDRESSES = {"box1": "192.0.2.11:8770", "box2": "192.0.2.12:8770"}
EXAMPLE_BIND = "bind :8080"
KIND_BACKENDS = ("gpumgr_llm", "gpumgr_image", "gpumgr_stt", "gpumgr_tts")
JSON = {b"Content-Type": b"application/json"}
#: Above the example's inter 1s x fall 2, so a balancer stops sending first.
NOT_READY_S = 4
#: The steady load's bound: requests per client.
MAX_PER_CLIENT = 400


@attrs.define
class Box:
    name: str
    world: Any
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@attrs.define
class Fleet:
    boxes: dict[str, Box]
    port: int
    stats_socket: Path
    haproxy: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def servers(self) -> dict[tuple[str, str], str]:
        """(backend, server) -> status, as HAProxy sees it now."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.stats_socket))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        rows = csv.DictReader(io.StringIO(data.decode().lstrip("# ")))
        return {(r["pxname"], r["svname"]): r["status"] for r in rows
                if r["svname"] not in ("FRONTEND", "BACKEND")}

    async def wait_status(self, backend: str, box: str, status: str) -> None:
        await wait_for(lambda: self.servers().get((backend, box)) == status,
                       timeout_s=30, step_s=0.1)


def haproxy_config(boxes: dict[str, Box], port: int, stats_socket: Path) -> str:
    """etc/haproxy.cfg as shipped, pointed at the two boxes on loopback."""
    text = EXAMPLE.read_text()
    for name, address in EXAMPLE_ADDRESSES.items():
        assert address in text, f"etc/haproxy.cfg has no server {address}"
        text = text.replace(address, f"127.0.0.1:{boxes[name].port}")
    assert EXAMPLE_BIND in text and "\nglobal\n" in text
    text = text.replace(EXAMPLE_BIND, f"bind 127.0.0.1:{port}")
    text = text.replace("    log /dev/log local0\n", "")  # no syslog here
    return text.replace("\nglobal\n", f"\nglobal\n    stats socket {stats_socket} level admin\n")


async def start_box(tmp_path: Path, name: str, max_queue: int) -> Box:
    state = tmp_path / name
    state.mkdir()
    world = make_world(reactor, str(state))
    world.listen(reactor)
    port = free_port()
    config = state / "gpumgr.yaml"
    write_world_config(
        world, str(config),
        consumers={"ollama": {"passthrough": True}, "comfyui": {"passthrough": True}},
        listen=f"tcp:{port}:interface=127.0.0.1",
        health={"interval_s": 0.25, "timeout_s": 2},
        scheduler={"mode": "locked", "max_queue": 32},
        balancer={"box": name, "max_queue": max_queue, "not_ready_s": NOT_READY_S},
        shutdown_grace_s=20,
    )
    log = state / "twistd.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([TWISTD, "--nodaemon", "--pidfile=", "gpumgr", "--config",
                                 str(config)], stdout=out, stderr=subprocess.STDOUT, cwd=state)
    box = Box(name, world, port, proc, log)
    try:
        await wait_for(lambda: port_accepts(port) or proc.poll() is not None,
                       timeout_s=30, step_s=0.1)
    except AssertionError:
        pass
    if proc.poll() is not None or not port_accepts(port):
        await stop_box(box)
        pytest.fail(f"twistd {name} did not start:\n{log.read_text()}")
    return box


async def stop_box(box: Box) -> int:
    """SIGINT drains at once (no not-ready period); the exit status."""
    if box.proc.poll() is None:
        box.proc.send_signal(signal.SIGINT)
    try:
        await wait_for(lambda: box.proc.poll() is not None, timeout_s=30, step_s=0.1)
    except AssertionError:
        box.proc.kill()
        await wait_for(lambda: box.proc.poll() is not None, timeout_s=10, step_s=0.1)
    return box.proc.returncode


async def start_fleet(tmp_path: Path, max_queue: int) -> Fleet:
    boxes = {}
    for name in BOXES:
        boxes[name] = await start_box(tmp_path, name, max_queue)
    port = free_port()
    stats_socket = tmp_path / "haproxy.sock"
    config = tmp_path / "haproxy.cfg"
    config.write_text(haproxy_config(boxes, port, stats_socket))
    checked = subprocess.run([HAPROXY, "-c", "-f", str(config)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    with open(tmp_path / "haproxy.log", "w") as out:
        proc = subprocess.Popen([HAPROXY, "-db", "-f", str(config)], stdout=out,
                                stderr=subprocess.STDOUT)
    fleet = Fleet(boxes, port, stats_socket, proc)
    await wait_for(lambda: port_accepts(port) and stats_socket.exists(), timeout_s=30,
                   step_s=0.1)
    # Every box serves every kind: wait until HAProxy's checks say so.
    for backend in KIND_BACKENDS:
        for name in BOXES:
            await fleet.wait_status(backend, name, "UP")
    return fleet


@pytest_twisted.async_yield_fixture
async def make_fleet(tmp_path):
    """make_fleet(max_queue=4) -> Fleet (balancer.max_queue of both boxes); stopped at teardown."""
    made: list[Fleet] = []

    async def start(max_queue: int = 4) -> Fleet:
        made.append(await start_fleet(tmp_path, max_queue))
        return made[-1]

    yield start
    for fleet in made:
        fleet.haproxy.terminate()
        await wait_for(lambda: fleet.haproxy.poll() is not None, timeout_s=10, step_s=0.1)
        for box in fleet.boxes.values():
            await stop_box(box)
            await box.world.stop()
            assert "Traceback" not in box.log.read_text(), box.log.read_text()


@pytest_twisted.async_fixture
async def fleet(make_fleet):
    return await make_fleet()


@pytest_twisted.async_yield_fixture
async def client():
    c = Client()
    yield c
    await c.close()


def served_by(reply) -> str:
    box = reply.header("X-Gpumgr-Box")
    assert box is not None, (reply.code, reply.body[:200])
    return box.decode()


async def one_of_each(client: Client, url: str, n: int = 0) -> dict[str, Any]:
    """One request of every kind, checked; the replies by kind."""
    replies = {
        "tts": await client.request("POST", url + "/v1/tts",
                                    json.dumps({"text": "x" * (n + 1)}).encode(), JSON),
        "llm": await client.request("POST", url + "/v1/llm", b'{"prompt":"hi"}', JSON),
        "stt": await client.request("POST", url + "/v1/stt", AUDIO, MULTIPART),
        "image": await client.request("POST", url + "/v1/image",
                                      json.dumps({"prompt": WORKFLOW}).encode(), JSON),
    }
    for kind, reply in replies.items():
        assert reply.code == 200 and reply.complete, (kind, reply.code, reply.body[:300])
    assert replies["tts"].body[:4] == b"RIFF"
    assert json.loads(replies["llm"].body.splitlines()[-1])["done"] is True
    assert b"transcript" in replies["stt"].body
    assert "prompt_id" in replies["image"].json()
    return replies


def ollama_jobs(box: Box) -> int:
    return len(box.world["ollama"].work_requests())


# -- the tests ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_every_kind_passes_and_audio_comes_back_from_the_box_that_made_it(fleet, client):
    for n in range(4):
        replies = await one_of_each(client, fleet.url, n)
        tts = replies["tts"]
        box = served_by(tts)
        cookie = tts.headers.getRawHeaders(b"set-cookie")
        assert cookie == [f"gpumgr_box={box}; Path=/audio/; HttpOnly".encode()]
        audio_url = fleet.url + tts.header("X-Audio-Url").decode()
        # The file exists on one box only (same name on the other, other bytes or none).
        by_cookie = await client.request("GET", audio_url,
                                         headers={b"Cookie": f"gpumgr_box={box}".encode()})
        assert by_cookie.code == 200 and by_cookie.body == tts.body
        assert served_by(by_cookie) == box
        by_header = await client.request("GET", audio_url,
                                         headers={b"X-Gpumgr-Box": box.encode()})
        assert by_header.code == 200 and by_header.body == tts.body
    # leastconn spread the work: both boxes served some of it.
    assert all(fleet.boxes[b].world["mvoice"].work_requests() for b in BOXES)


@pytest_twisted.ensureDeferred
async def test_a_streamed_llm_answer_and_a_comfyui_websocket_pass_through(fleet, client):
    held = {name: HeldStream(box.world["ollama"], chunks=3) for name, box in fleet.boxes.items()}
    first: defer.Deferred[None] = defer.Deferred()

    def on_chunk(collector, data):
        if not first.called:
            first.callback(None)

    stream = defer.ensureDeferred(client.request("POST", fleet.url + "/v1/llm",
                                                 b'{"prompt":"hi"}', JSON, on_chunk=on_chunk))
    await first  # the first token came through HAProxy while the rest are held
    assert not stream.called
    for h in held.values():
        h.release()
    reply = await stream
    assert reply.code == 200 and reply.complete
    lines = [json.loads(line) for line in reply.body.splitlines()]
    assert len(lines) == 3 and lines[-1]["done"] is True

    ws = await connect(reactor, fleet.url.replace("http://", "ws://")
                       + "/v1/image/ws?clientId=through-haproxy", timeout_s=10)
    hello = await ws.next_json(timeout_s=10)
    assert hello["type"] == "status" and hello["data"]["sid"] == "through-haproxy"
    assert await ws.ping(b"over the tunnel").addTimeout(10, reactor) == b"over the tunnel"
    info = await ws.close(1000, "bye")
    assert info.code == 1000 and info.clean


@pytest_twisted.ensureDeferred
async def test_a_box_whose_llm_is_down_gets_no_llm_jobs_while_the_other_does(fleet, client):
    box1, box2 = fleet.boxes["box1"], fleet.boxes["box2"]
    await box1.world.stop_consumer("ollama")
    await fleet.wait_status("gpumgr_llm", "box1", "DOWN")
    before = ollama_jobs(box2)
    for _ in range(6):
        reply = await client.request("POST", fleet.url + "/v1/llm", b'{"prompt":"hi"}', JSON)
        assert reply.code == 200 and reply.complete and served_by(reply) == "box2"
    assert ollama_jobs(box2) == before + 6
    status = (await client.request("GET", box1.url + "/v1/status")).json()
    assert status["consumers"]["ollama"]["total_requests"] == 0
    # The other kinds still go to both boxes.
    servers = fleet.servers()
    assert all(servers[(b, "box1")] == "UP" for b in KIND_BACKENDS if b != "gpumgr_llm")
    box1.world.restart_consumer("ollama")
    await fleet.wait_status("gpumgr_llm", "box1", "UP")


@pytest_twisted.ensureDeferred
async def test_when_one_boxs_llm_queue_is_full_llm_work_goes_to_the_other(make_fleet, client):
    fleet = await make_fleet(max_queue=1)
    box1, box2 = fleet.boxes["box1"], fleet.boxes["box2"]
    held = HeldStream(box1.world["ollama"], chunks=2)
    # Sent to box1 itself: one runs (held), one waits: its llm queue is at 1.
    running = defer.ensureDeferred(client.request("POST", box1.url + "/v1/llm",
                                                  b'{"prompt":"a"}', JSON))
    queued = defer.ensureDeferred(client.request("POST", box1.url + "/v1/llm",
                                                 b'{"prompt":"b"}', JSON))
    await wait_for(lambda: box1_ready_code(box1) == 503, timeout_s=10, step_s=0.05)
    await fleet.wait_status("gpumgr_llm", "box1", "DOWN")
    assert fleet.servers()[("gpumgr_tts", "box1")] == "UP"  # only its llm is full
    before = ollama_jobs(box2)
    for _ in range(4):
        reply = await client.request("POST", fleet.url + "/v1/llm", b'{"prompt":"c"}', JSON)
        assert reply.code == 200 and served_by(reply) == "box2"
    assert ollama_jobs(box2) == before + 4
    held.release()
    for d in (running, queued):
        reply = await d
        assert reply.code == 200 and reply.complete and served_by(reply) == "box1"
    await fleet.wait_status("gpumgr_llm", "box1", "UP")


def box1_ready_code(box: Box) -> int:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", box.port, timeout=5)
    try:
        conn.request("GET", "/v1/ready/llm")
        response = conn.getresponse()
        body = json.loads(response.read())
        assert response.status == 200 or body["reason"]["code"] == "queue_full", body
        return response.status
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_sigterm_on_one_box_under_steady_load_loses_no_request(fleet, client):
    """Three clients send requests one after another until box1 has exited
    and each sent three more (at most MAX_PER_CLIENT); none is lost.

    The llm and stt bodies are larger than HAProxy's buffer, so HAProxy
    cannot retry them elsewhere (`retry-on 503`): without the not-ready
    period one queued on box1 when it drains is answered 503 shutting_down."""
    box1 = fleet.boxes["box1"]
    clients = 3
    results: list[tuple[str, int, bool, str | None]] = []
    after_exit = [0] * clients
    kinds = {"tts": (b'{"text":"steady"}', JSON),
             "llm": (json.dumps({"prompt": "steady " * 4096}).encode(), JSON),
             "stt": (AUDIO.replace(b"WAVE", b"WAVE" + b"\0" * 65536), MULTIPART)}

    async def load(i: int) -> None:
        for j in range(MAX_PER_CLIENT):
            if after_exit[i] >= 3:
                return
            exited = box1.proc.poll() is not None
            kind = list(kinds)[(i + j) % len(kinds)]
            body, headers = kinds[kind]
            reply = await client.request("POST", fleet.url + f"/v1/{kind}", body, headers)
            box = reply.header("X-Gpumgr-Box")
            results.append((kind, reply.code, reply.complete,
                            None if box is None else box.decode()))
            after_exit[i] += exited

    loads = [defer.ensureDeferred(load(i)) for i in range(clients)]
    await wait_for(lambda: len(results) >= 6, timeout_s=30)
    box1.proc.send_signal(signal.SIGTERM)

    async def reason() -> str | None:
        ready = await client.request("GET", box1.url + "/v1/ready/llm")
        return None if ready.code == 200 else ready.json()["reason"]["code"]

    for _ in range(200):  # SIGTERM reaches the reactor within a few polls
        if (await reason()) == "not_ready":
            break
        await sleep(0.05)
    else:
        pytest.fail("box1 never reported not_ready after SIGTERM")
    # Not ready, yet still serving: a request sent to box1 itself is answered.
    direct = await client.request("POST", box1.url + "/v1/tts", b'{"text":"still"}', JSON)
    assert direct.code == 200 and direct.complete and served_by(direct) == "box1"
    # HAProxy takes it out of every kind.
    for backend in KIND_BACKENDS:
        await fleet.wait_status(backend, "box1", "DOWN")
    await defer.gatherResults(loads, consumeErrors=True)
    assert box1.proc.poll() == 0
    assert after_exit == [3] * clients  # the load went on past the drain
    lost = [r for r in results if r[1] != 200 or not r[2]]
    assert not lost, lost
    assert {r[3] for r in results} == {"box1", "box2"}
    log = box1.log.read_text()
    assert f"reporting not ready for {NOT_READY_S}s" in log, log
