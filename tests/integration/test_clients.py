"""The clients people already use, through gpumgr's pass-through routes.

The official ollama and openai Python clients, and a ComfyUI API script in
the shape of ComfyUI's own `websockets_api_example.py` (websocket-client for
the progress socket, urllib for HTTP), talk to gpumgr in front of the
simulated services. The clients are synchronous, so each runs in a thread
(`deferToThread`) while the reactor serves gpumgr and the simulations.

Streams are proven incremental in lockstep (`Lockstep`): the simulated server
writes chunk i only after the client has read chunk i-1, so a hop that
buffered would never deliver the first chunk and the client's read timeout
would fail the test.
"""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
import uuid
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.threads import blockingCallFromThread, deferToThread

from gpumgr.testing import world_config
from gpumgr.testing.websocket import connect
from tests.helpers import wait_for

PASS = {"ollama": {"passthrough": True}, "comfyui": {"passthrough": True}}
#: A client that waits longer than this for a byte has found a buffering hop.
CLIENT_TIMEOUT_S = 10.0
HI = [{"role": "user", "content": "hi"}]
#: Lines (NDJSON) or events (SSE) in a simulated stream, the final one included.
CHUNKS = 4
TOKENS = ["tok0 ", "tok1 ", "tok2 "]


@pytest.fixture(autouse=True)
def _no_proxy_from_the_environment(monkeypatch):
    """httpx and urllib honour *_PROXY; these clients must reach loopback directly."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                 "all_proxy", "OLLAMA_HOST", "OLLAMA_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


async def through_gpumgr(world, start_broker, mode: str = "locked"):
    config = world_config(world, consumers=PASS, scheduler={"mode": mode},
                          health={"interval_s": 30})
    service, url = await start_broker(config)
    await service.health.probe_all_now()
    return service, url


def ollama_client(url: str):
    import ollama

    return ollama.Client(host=url + "/v1/llm", timeout=CLIENT_TIMEOUT_S)


def openai_client(url: str):
    import openai

    return openai.OpenAI(base_url=url + "/v1/llm/v1", api_key="x", max_retries=0,
                         timeout=CLIENT_TIMEOUT_S)


def openai_chat(url: str):
    """One non-streamed chat completion, from a client of its own."""
    with openai_client(url) as c:
        return c.chat.completions.create(model="llama3", messages=HI)


class Lockstep:
    """A `stream_gate` the client drives: the simulated server writes chunk i
    only once the client has read chunk i-1.

    The client thread calls `step()` after each chunk it reads. `hold_at=n`
    keeps the stream stopped after the client has read n chunks (`held`
    fires) until `release()`.
    """

    def __init__(self, consumer, chunks: int = CHUNKS, hold_at: int | None = None) -> None:
        consumer.behaviour.stream_chunks = chunks
        consumer.behaviour.stream_gate = self._gate
        self._gates: dict[int, defer.Deferred] = {}
        self._hold_at = hold_at
        self.held: defer.Deferred = defer.Deferred()
        #: For each chunk the client read: how many chunks the server had written by then.
        self.written_when_read: list[int] = []

    def _gate(self, i: int) -> defer.Deferred:
        return self._gates.setdefault(i, defer.Deferred())

    def _open(self, i: int) -> None:
        gate = self._gate(i)
        if not gate.called:
            gate.callback(None)  # the server writes chunk i now, synchronously

    def _written(self) -> int:
        return 1 + sum(1 for gate in self._gates.values() if gate.called)

    def _read(self) -> None:
        self.written_when_read.append(self._written())
        n = len(self.written_when_read)
        if n == self._hold_at:
            self.held.callback(None)
        else:
            self._open(n)

    def step(self) -> None:
        """From the client's thread: one more chunk read."""
        blockingCallFromThread(reactor, self._read)

    def release(self) -> None:
        self._hold_at = None
        self._open(len(self.written_when_read))

    def reading(self, d: defer.Deferred) -> defer.Deferred:
        """`d` is the reading thread: if it fails before `held`, so does `held`
        (a buffering hop times the client out instead of hanging the test)."""

        def failed(failure):
            if not self.held.called:
                self.held.errback(failure)
            return failure

        return d.addErrback(failed)


def read_in_lockstep(lockstep: Lockstep, stream, text) -> list[str]:
    """Iterate a client's stream in its thread, one `step` per chunk."""
    pieces = []
    for chunk in stream:
        pieces.append(text(chunk))
        lockstep.step()
    return pieces


def assert_incremental(lockstep: Lockstep, chunks: int = CHUNKS) -> None:
    """Chunk k reached the client when the server had written k+1 of them."""
    assert lockstep.written_when_read == list(range(1, chunks + 1))


async def status(client, url: str) -> dict[str, Any]:
    return (await client.request("GET", url + "/v1/status")).json()


# -- ollama's own client -----------------------------------------------------------------------


def is_gpumgrs_own(r) -> bool:
    return any(ua.startswith(b"gpumgr/") for ua in r.headers.getRawHeaders(b"user-agent", []))


@pytest_twisted.ensureDeferred
async def test_the_ollama_client_through_gpumgr(world, start_broker):
    service, url = await through_gpumgr(world, start_broker)
    lockstep = Lockstep(world["ollama"])

    def use_client():
        c = ollama_client(url)
        try:
            streamed = read_in_lockstep(lockstep, c.chat(model="llama3", messages=HI,
                                                         stream=True),
                                        lambda part: part.message.content)
            whole = c.chat(model="llama3", messages=HI)
            generated = c.generate(model="llama3", prompt="hi")
            listed = [m.model for m in c.list().models]
            running = [m.model for m in c.ps().models]
            vectors = c.embed(model="llama3", input=["a", "b"]).embeddings
            return streamed, whole, generated, listed, running, vectors
        finally:
            c.close()

    streamed, whole, generated, listed, running, vectors = await deferToThread(use_client)
    assert streamed == TOKENS + [""]
    assert_incremental(lockstep)
    assert whole.message.content == "".join(TOKENS) and whole.done
    assert generated.response == "".join(TOKENS) and generated.done_reason == "stop"
    assert listed == ["llama3:latest"] and running == ["llama3:latest"]
    assert len(vectors) == 2 and len(vectors[0]) == 16
    # What the client sent, in order; gpumgr's own calls (probes, asking /api/ps
    # for the models' sizes) say who sent them.
    mine = [r for r in world["ollama"].requests if is_gpumgrs_own(r)]
    paths = [(r.method, r.path) for r in world["ollama"].requests if not is_gpumgrs_own(r)]
    assert paths == [("POST", "/api/chat"), ("POST", "/api/chat"), ("POST", "/api/generate"),
                     ("GET", "/api/tags"), ("GET", "/api/ps"), ("POST", "/api/embed")]
    assert {r.path for r in mine} <= {"/api/version", "/api/ps"}
    # The two chats, generate and embed were GPU work; tags and ps were not.
    assert service.registry["ollama"].total_requests == 4
    assert service.scheduler.stats().total_jobs == 4


# -- the OpenAI client on ollama's OpenAI-compatible API ---------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_openai_client_through_gpumgr(world, start_broker):
    service, url = await through_gpumgr(world, start_broker)
    lockstep = Lockstep(world["ollama"])

    def use_client():
        c = openai_client(url)
        try:
            streamed = read_in_lockstep(
                lockstep, c.chat.completions.create(model="llama3", messages=HI, stream=True),
                lambda chunk: (chunk.choices[0].delta.content, chunk.choices[0].finish_reason))
            whole = c.chat.completions.create(model="llama3", messages=HI)
            models = [m.id for m in c.models.list()]
            return streamed, whole, models
        finally:
            c.close()

    streamed, whole, models = await deferToThread(use_client)
    assert streamed == [(t, None) for t in TOKENS] + [("", "stop")]
    assert_incremental(lockstep)
    assert whole.choices[0].message.content == "".join(TOKENS)
    assert whole.choices[0].finish_reason == "stop" and whole.usage.completion_tokens == 3
    assert models == ["llama3:latest"]
    assert service.registry["ollama"].total_requests == 2  # the completions, not the list


# -- scheduling, seen from the clients ---------------------------------------------------------


@pytest.mark.parametrize("mode", ["locked", "evicting"])
@pytest_twisted.ensureDeferred
async def test_a_streamed_chat_holds_the_gpu_while_listing_answers_and_a_second_chat_waits(
        world, start_broker, client, mode):
    service, url = await through_gpumgr(world, start_broker, mode)
    ollama_sim = world["ollama"]
    lockstep = Lockstep(ollama_sim, hold_at=1)

    def streamed_chat():
        c = ollama_client(url)
        try:
            return read_in_lockstep(lockstep, c.chat(model="llama3", messages=HI, stream=True),
                                    lambda part: part.message.content)
        finally:
            c.close()

    def list_models():
        native, compatible = ollama_client(url), openai_client(url)
        try:
            return ([m.model for m in native.list().models],
                    [m.id for m in compatible.models.list()])
        finally:
            native.close()
            compatible.close()

    first_chat = lockstep.reading(deferToThread(streamed_chat))
    await lockstep.held  # the client has its first chunk; the rest waits
    assert (await status(client, url))["scheduler"]["in_flight"] == 1
    assert await deferToThread(list_models) == (["llama3:latest"], ["llama3:latest"])
    assert not first_chat.called  # ...answered while the stream still held the GPU

    second_chat = deferToThread(openai_chat, url)
    await wait_for(lambda: service.scheduler.stats().queue_depth == 1)
    snapshot = await status(client, url)
    assert snapshot["scheduler"]["in_flight"] == 1 and snapshot["scheduler"]["queue_depth"] == 1
    assert len(ollama_sim.work_requests()) == 1  # the second chat never left gpumgr's queue
    assert not second_chat.called

    lockstep.release()
    assert await first_chat == TOKENS + [""]
    assert (await second_chat).choices[0].message.content == "".join(TOKENS)
    assert [r.path for r in ollama_sim.work_requests()] == ["/api/chat", "/v1/chat/completions"]
    assert world.max_active_jobs == 1
    snapshot = await status(client, url)
    assert snapshot["consumers"]["ollama"]["total_requests"] == 2
    assert snapshot["scheduler"]["in_flight"] == 0 and snapshot["scheduler"]["queue_depth"] == 0


@pytest_twisted.ensureDeferred
async def test_a_client_that_abandons_a_stream_frees_the_gpu_once_the_service_stopped(
        world, start_broker):
    service, url = await through_gpumgr(world, start_broker)
    ollama_sim = world["ollama"]
    lockstep = Lockstep(ollama_sim, hold_at=1)

    def read_one_then_close():
        with openai_client(url) as c:
            stream = c.chat.completions.create(model="llama3", messages=HI, stream=True)
            first = next(iter(stream)).choices[0].delta.content
            lockstep.step()
            stream.close()  # the user stopped reading: the connection closes
            return first

    assert await deferToThread(read_one_then_close) == "tok0 "
    # The simulated server still sits on its next chunk: it has not noticed and
    # computes on, so gpumgr keeps the GPU, draining, and the next chat waits.
    await wait_for(lambda: service.broker.abandoned.draining)
    second_chat = deferToThread(openai_chat, url)
    await wait_for(lambda: service.scheduler.stats().queue_depth == 1)
    (holder,) = service.status()["scheduler"]["holders"]
    assert holder["consumer"] == "ollama" and holder["state"] == "draining after the client left"
    assert world.active_jobs == 1 and not second_chat.called

    lockstep.release()  # the abandoned stream's next write finds its client gone: it stops
    assert (await second_chat).choices[0].message.content == "".join(TOKENS)
    assert ollama_sim.jobs_cancelled == 1
    assert world.gpu.overlaps == [] and world.max_active_jobs == 1
    assert service.registry["ollama"].total_requests == 2
    assert service.status()["scheduler"]["drains"] == {"gpu_idle": 1}


# -- a ComfyUI API script ----------------------------------------------------------------------

#: A text-to-image workflow in ComfyUI's API format.
WORKFLOW = {
    "3": {"class_type": "KSampler",
          "inputs": {"seed": 5, "steps": 20, "model": ["4", 0], "positive": ["6", 0],
                     "negative": ["7", 0], "latent_image": ["5", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple",
          "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512,
                                                       "batch_size": 1}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI",
                                                "images": ["8", 0]}},
}


def comfyui_script(base: str, client_id: str, submitted: defer.Deferred,
                   messages: list[dict]) -> dict[str, Any]:
    """What ComfyUI's websockets_api_example.py does, against `base` (gpumgr's
    /v1/image): open the socket, queue the prompt, follow the socket until the
    prompt is done, then read its history and fetch its images."""
    import websocket  # websocket-client

    host = base.split("://", 1)[1]
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def get(path: str):
        with opener.open(base + path, timeout=CLIENT_TIMEOUT_S) as reply:
            return reply.headers.get("Content-Type"), reply.read()

    ws = websocket.create_connection(f"ws://{host}/ws?clientId={client_id}",
                                     timeout=CLIENT_TIMEOUT_S)
    try:
        body = json.dumps({"prompt": WORKFLOW, "client_id": client_id}).encode()
        post = urllib.request.Request(base + "/prompt", data=body,
                                      headers={"Content-Type": "application/json"})
        with opener.open(post, timeout=CLIENT_TIMEOUT_S) as reply:
            prompt_id = json.loads(reply.read())["prompt_id"]
        reactor.callFromThread(submitted.callback, prompt_id)
        while True:
            out = ws.recv()
            if not isinstance(out, str):
                continue  # previews are binary
            message = json.loads(out)
            messages.append(message)
            data = message["data"]
            if (message["type"] == "executing" and data["node"] is None
                    and data["prompt_id"] == prompt_id):
                break
        history = json.loads(get(f"/history/{prompt_id}")[1])[prompt_id]
        images = []
        for output in history["outputs"].values():
            for image in output.get("images", []):
                query = urllib.parse.urlencode({"filename": image["filename"],
                                                "subfolder": image["subfolder"],
                                                "type": image["type"]})
                images.append(get("/view?" + query))
        return {"prompt_id": prompt_id, "history": history, "images": images}
    finally:
        ws.close()


@pytest.mark.parametrize("mode", ["locked", "evicting"])
@pytest_twisted.ensureDeferred
async def test_a_comfyui_script_renders_through_gpumgr_and_the_render_holds_the_gpu(
        world, start_broker, client, mode):
    service, url = await through_gpumgr(world, start_broker, mode)
    comfy = world["comfyui"]
    render_gates: dict[str, defer.Deferred] = {}
    comfy.behaviour.render_gate = lambda pid: render_gates.setdefault(pid, defer.Deferred())
    submitted: defer.Deferred = defer.Deferred()
    messages: list[dict] = []
    script = deferToThread(comfyui_script, url + "/v1/image", "script-1", submitted, messages)

    prompt_id = await submitted  # /prompt answered at once; the render goes on
    tts = defer.ensureDeferred(client.request("POST", url + "/v1/tts", b"say hello"))
    await wait_for(lambda: prompt_id in render_gates)  # the render waits for our word to end
    await wait_for(lambda: service.scheduler.stats().queue_depth == 1)  # the TTS, queued
    steps = comfy.behaviour.render_steps
    # Its progress reached the script through the tunnel while it ran.
    await wait_for(lambda: sum(m["type"] == "progress" for m in messages) == steps)
    snapshot = await status(client, url)
    assert [r["prompt_id"] for r in snapshot["consumers"]["comfyui"]["renders"]] == [prompt_id]
    assert snapshot["scheduler"]["in_flight"] == 1 and snapshot["scheduler"]["queue_depth"] == 1
    (holder,) = snapshot["scheduler"]["holders"]
    assert holder["consumer"] == "comfyui" and holder["render"] == prompt_id
    assert snapshot["broker"]["tunnels"]["open"] == 1
    assert not tts.called and world["mvoice"].work_requests() == []
    assert not script.called

    render_gates[prompt_id].callback(None)
    result = await script
    tts_reply = await tts
    assert tts_reply.code == 200 and tts_reply.header("Content-Type") == b"audio/wav"
    # One job at a time on the GPU, the render first: the TTS waited for it.
    assert world.work_log == ["comfyui", "mvoice"] and world.max_active_jobs == 1

    assert result["prompt_id"] == prompt_id
    mine = [m for m in messages if m["data"].get("prompt_id") == prompt_id]
    kinds = [m["type"] for m in mine]
    assert kinds[0] == "execution_start" and kinds.count("progress") == steps
    assert kinds.index("executed") < kinds.index("execution_success") < len(kinds) - 1
    assert mine[-1] == {"type": "executing", "data": {"node": None, "prompt_id": prompt_id}}
    assert result["history"]["status"]["completed"] is True
    ((content_type, png),) = result["images"]
    assert content_type == "image/png" and png.startswith(b"\x89PNG\r\n\x1a\n")
    assert png == comfy.images[("output", "", "ComfyUI_00001_.png")]

    await wait_for(lambda: comfy.open_sockets == 0)  # the script closed its socket
    await wait_for(lambda: service.status()["broker"]["tunnels"]["open"] == 0)
    snapshot = await status(client, url)
    assert snapshot["consumers"]["comfyui"]["renders"] == []
    assert snapshot["scheduler"]["renders"]["completed"] == 1
    assert snapshot["consumers"]["comfyui"]["total_requests"] == 1  # only /prompt was GPU work


# -- WebSocket edge cases ----------------------------------------------------------------------


async def open_socket(world, url: str):
    client_id = uuid.uuid4().hex
    ws_url = url.replace("http://", "ws://") + f"/v1/image/ws?clientId={client_id}"
    conn = await connect(reactor, ws_url, timeout_s=CLIENT_TIMEOUT_S)
    hello = await conn.next_json(timeout_s=CLIENT_TIMEOUT_S)
    assert hello["type"] == "status" and hello["data"]["sid"] == client_id
    assert world["comfyui"].open_sockets == 1
    return conn, client_id


@pytest_twisted.ensureDeferred
async def test_closing_the_socket_from_the_client_closes_it_upstream(world, start_broker):
    service, url = await through_gpumgr(world, start_broker)
    conn, _ = await open_socket(world, url)
    assert service.status()["broker"]["tunnels"] == {"open": 1, "total": 1}
    info = await conn.close(1000, "bye")
    assert info.code == 1000 and info.clean  # ComfyUI answered our close through the tunnel
    await wait_for(lambda: world["comfyui"].open_sockets == 0)
    await wait_for(lambda: world.open_connections("comfyui") == 0)
    await wait_for(lambda: service.status()["broker"]["tunnels"]["open"] == 0)
    assert not service.broker.tunnels


@pytest_twisted.ensureDeferred
async def test_comfyui_dying_mid_render_closes_the_socket_and_frees_the_gpu(world, start_broker,
                                                                           client):
    service, url = await through_gpumgr(world, start_broker)
    comfy = world["comfyui"]
    render_gates: dict[str, defer.Deferred] = {}
    comfy.behaviour.render_gate = lambda pid: render_gates.setdefault(pid, defer.Deferred())
    conn, client_id = await open_socket(world, url)
    body = json.dumps({"prompt": WORKFLOW, "client_id": client_id}).encode()
    reply = await client.request("POST", url + "/v1/image/prompt", body,
                                 {b"Content-Type": b"application/json"})
    prompt_id = reply.json()["prompt_id"]
    await wait_for(lambda: prompt_id in render_gates)
    assert service.scheduler.stats().in_flight == 1

    await world.stop_consumer("comfyui")
    info = await conn.when_closed()
    assert not info.clean  # the upstream vanished: no close handshake
    await wait_for(lambda: service.status()["broker"]["tunnels"]["open"] == 0)
    assert not service.broker.tunnels and service.status()["broker"]["tunnels"]["total"] == 1
    # The tracked render is lost with its service, and the GPU is free again.
    await wait_for(lambda: service.scheduler.stats().in_flight == 0)
    snapshot = await status(client, url)
    assert snapshot["consumers"]["comfyui"]["renders"] == []
    assert snapshot["scheduler"]["renders"] == {"tracked": 1, "lost": 1}
