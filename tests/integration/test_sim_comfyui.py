"""The simulated ComfyUI behaves like the real one: queue, worker, history, /free, WebSocket."""

from __future__ import annotations

import json
import struct
import zlib

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.error import ConnectionRefusedError

from gpumgr.testing.multipart import encode_multipart
from gpumgr.testing.websocket import connect
from tests.helpers import wait_for

WORKFLOW = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd.safetensors"}},
    "3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 20, "model": ["4", 0]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0]}},
}


class Gates:
    """Each render ends only when the test opens its gate (no timing in the tests)."""

    def __init__(self, comfy) -> None:
        self.gates: dict[str, defer.Deferred] = {}
        comfy.behaviour.render_gate = lambda prompt_id: self.gates.setdefault(
            prompt_id, defer.Deferred())

    async def open(self, prompt_id: str) -> None:
        await wait_for(lambda: prompt_id in self.gates, timeout_s=5)
        self.gates[prompt_id].callback(None)


@pytest.fixture
def comfy(world):
    c = world["comfyui"]
    c.behaviour.job_s = 0.01
    c.behaviour.render_steps = 2
    return c


async def post(client, url, value=None, raw: bytes | None = None):
    body = raw if raw is not None else json.dumps(value if value is not None else {}).encode()
    return await client.request("POST", url, body, {"Content-Type": "application/json"})


async def get_json(client, url):
    reply = await client.request("GET", url)
    assert reply.code == 200, reply.body
    return reply.json()


async def submit(client, comfy, **extra):
    reply = await post(client, comfy.url + "/prompt", {"prompt": WORKFLOW, **extra})
    assert reply.code == 200, reply.body
    return reply.json()


# -- /prompt, the worker and /history -----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_prompt_answers_at_once_and_history_fills_when_the_render_ends(world, comfy, client):
    gates = Gates(comfy)
    answer = await submit(client, comfy, client_id="me")
    prompt_id = answer["prompt_id"]
    assert answer["node_errors"] == {} and isinstance(answer["number"], int)
    assert await get_json(client, f"{comfy.url}/history/{prompt_id}") == {}
    queue = await get_json(client, comfy.url + "/queue")
    assert [e[1] for e in queue["queue_running"]] == [prompt_id] and queue["queue_pending"] == []
    assert world.active_jobs == 1 and comfy.loaded

    await gates.open(prompt_id)
    await wait_for(lambda: prompt_id in comfy.history, timeout_s=5)
    entry = (await get_json(client, f"{comfy.url}/history/{prompt_id}"))[prompt_id]
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
    assert [m[0] for m in entry["status"]["messages"]] == [
        "execution_start", "execution_cached", "execution_success"]
    assert entry["outputs"] == {"9": {"images": [
        {"filename": "ComfyUI_00001_.png", "subfolder": "", "type": "output"}]}}
    assert entry["prompt"][1] == prompt_id and entry["prompt"][2] == WORKFLOW
    assert world.active_jobs == 0 and comfy.jobs_started == 1
    assert (await get_json(client, comfy.url + "/history")).keys() == {prompt_id}
    assert await get_json(client, comfy.url + "/prompt") == {"exec_info": {"queue_remaining": 0}}


@pytest_twisted.ensureDeferred
async def test_client_prompt_id_is_kept_and_every_route_is_also_under_api(comfy, client):
    mine = "0b7a1c1e-5d1b-4f4e-9a55-2f0f3c2a7d10"
    reply = await post(client, comfy.url + "/api/prompt", {"prompt": WORKFLOW, "prompt_id": mine})
    assert reply.code == 200 and reply.json()["prompt_id"] == mine
    await wait_for(lambda: mine in comfy.history, timeout_s=5)
    assert mine in await get_json(client, f"{comfy.url}/api/history/{mine}")
    assert "KSampler" in await get_json(client, comfy.url + "/api/object_info")
    assert (await get_json(client, comfy.url + "/api/object_info/SaveImage"))["SaveImage"][
        "output_node"] is True
    stats = await get_json(client, comfy.url + "/api/system_stats")
    assert stats["devices"][0]["vram_total"] == 24576 << 20


@pytest.mark.parametrize("body,kind", [
    ({"client_id": "x"}, "no_prompt"),
    ({"prompt": ["not", "nodes"]}, "invalid_prompt"),
    ({"prompt": "a string"}, "invalid_prompt"),
    ({"prompt": {"3": {"inputs": {}}}}, "invalid_prompt"),
    ({"prompt": {"3": "not a node"}}, "invalid_prompt"),
    (b"{not json", "no_prompt"),
])
@pytest_twisted.ensureDeferred
async def test_an_invalid_prompt_is_refused_with_400_and_never_queued(world, comfy, client, body,
                                                                      kind):
    raw = body if isinstance(body, bytes) else None
    reply = await post(client, comfy.url + "/prompt", body if raw is None else None, raw=raw)
    assert reply.code == 400
    answer = reply.json()
    assert answer["node_errors"] == {} and answer["error"]["type"] == kind
    assert answer["error"]["message"]
    assert comfy.queue_remaining == 0 and world.total_jobs == 0 and not comfy.loaded


@pytest_twisted.ensureDeferred
async def test_renders_run_one_at_a_time_in_submission_order(world, comfy, client):
    gates = Gates(comfy)
    ids = [(await submit(client, comfy))["prompt_id"] for _ in range(3)]
    queue = await get_json(client, comfy.url + "/queue")
    assert [e[1] for e in queue["queue_running"]] == ids[:1]
    assert [e[1] for e in queue["queue_pending"]] == ids[1:]
    assert await get_json(client, comfy.url + "/prompt") == {"exec_info": {"queue_remaining": 3}}
    for i, prompt_id in enumerate(ids):
        assert world.active_jobs == 1 and comfy.running_item.prompt_id == prompt_id
        await gates.open(prompt_id)
        await wait_for(lambda: prompt_id in comfy.history, timeout_s=5)
        assert comfy.queue_remaining == 2 - i
    assert world.max_active_jobs == 1 and world.work_log == ["comfyui"] * 3
    assert list(comfy.history) == ids
    numbers = [comfy.history[i]["prompt"][0] for i in ids]
    assert numbers == sorted(numbers)


@pytest_twisted.ensureDeferred
async def test_render_that_does_not_fit_ends_in_an_out_of_memory_error(world, comfy, client):
    world.gpu.allocate("hog", 1, "/usr/bin/hog", world.gpu.free_mib - 100)
    prompt_id = (await submit(client, comfy))["prompt_id"]
    await wait_for(lambda: prompt_id in comfy.history, timeout_s=5)
    status = comfy.history[prompt_id]["status"]
    assert status["status_str"] == "error" and status["completed"] is False
    error = dict(status["messages"])["execution_error"]
    assert "CUDA out of memory" in error["exception_message"]
    assert error["exception_type"] == "torch.OutOfMemoryError"
    assert world.gpu.oom_count == 1 and world.total_jobs == 0 and not comfy.loaded


@pytest_twisted.ensureDeferred
async def test_a_failing_render_ends_in_execution_error(world, comfy, client):
    comfy.behaviour.render_error = "mat1 and mat2 shapes cannot be multiplied"
    prompt_id = (await submit(client, comfy))["prompt_id"]
    await wait_for(lambda: prompt_id in comfy.history, timeout_s=5)
    entry = comfy.history[prompt_id]
    assert entry["status"]["status_str"] == "error" and entry["outputs"] == {}
    assert dict(entry["status"]["messages"])["execution_error"]["exception_message"] == (
        "mat1 and mat2 shapes cannot be multiplied")
    assert world.active_jobs == 0


# -- /interrupt ----------------------------------------------------------------------------------


class NodeGates:
    """Each node of each render ends only when the test opens its gate."""

    def __init__(self, comfy) -> None:
        self.gates: dict[tuple[str, str], defer.Deferred] = {}
        comfy.behaviour.node_gate = lambda prompt_id, node: self.gates.setdefault(
            (prompt_id, node), defer.Deferred())

    async def reached(self, prompt_id: str, node: str) -> None:
        """The node has run its time and waits for its gate."""
        await wait_for(lambda: (prompt_id, node) in self.gates, timeout_s=5)

    async def open(self, prompt_id: str, node: str) -> None:
        await self.reached(prompt_id, node)
        self.gates[(prompt_id, node)].callback(None)

    def open_all(self) -> None:
        self.gates, gates = {}, self.gates
        for d in gates.values():
            if not d.called:
                d.callback(None)


def _queue_ids(queue: dict) -> tuple[list[str], list[str]]:
    return [e[1] for e in queue["queue_running"]], [e[1] for e in queue["queue_pending"]]


@pytest_twisted.ensureDeferred
async def test_interrupt_only_sets_a_flag_honoured_at_the_next_node_boundary(world, comfy,
                                                                            client):
    """As the real one: the render, its memory and its /queue entry go on until
    the node that runs now ends; then execution_interrupted (to every socket)."""
    gates = NodeGates(comfy)
    first = (await submit(client, comfy, client_id="a"))["prompt_id"]
    second = (await submit(client, comfy, client_id="b"))["prompt_id"]
    await gates.reached(first, "4")  # the loader node has run its time, and still runs

    reply = await post(client, comfy.url + "/interrupt", {"prompt_id": first})
    assert reply.code == 200 and comfy.interrupt_flag
    assert _queue_ids(await get_json(client, comfy.url + "/queue")) == ([first], [second])
    assert await get_json(client, f"{comfy.url}/history/{first}") == {}
    assert comfy.interrupts == 0 and world.active_jobs == 1 and "comfyui" in world.gpu.allocations

    await gates.open(first, "4")  # the node ends: the next one sees the flag
    await wait_for(lambda: first in comfy.history, timeout_s=5)
    status = (await get_json(client, f"{comfy.url}/history/{first}"))[first]["status"]
    assert status["status_str"] == "error" and status["completed"] is False
    (interrupted,) = [m[1] for m in status["messages"] if m[0] == "execution_interrupted"]
    assert interrupted["node_id"] == "3"  # raised as the sampler was about to run
    assert comfy.interrupts == 1
    # The next prompt starts after the interrupted one ended, with the flag cleared.
    await wait_for(lambda: comfy.running_item is not None, timeout_s=5)
    assert comfy.running_item.prompt_id == second and not comfy.interrupt_flag
    assert [(p, how) for _, p, how in comfy.timeline] == [
        (first, "started"), (first, "interrupted"), (second, "started")]
    gates.open_all()


@pytest_twisted.ensureDeferred
async def test_an_interrupt_during_the_last_node_is_moot(world, comfy, client):
    gates = NodeGates(comfy)
    prompt_id = (await submit(client, comfy))["prompt_id"]
    for node in ("4", "3", "8"):
        await gates.open(prompt_id, node)
    await gates.reached(prompt_id, "9")
    await post(client, comfy.url + "/interrupt", {"prompt_id": prompt_id})
    await gates.open(prompt_id, "9")
    await wait_for(lambda: prompt_id in comfy.history, timeout_s=5)
    assert comfy.history[prompt_id]["status"]["status_str"] == "success"
    assert comfy.interrupts == 0 and world.active_jobs == 0


@pytest_twisted.ensureDeferred
async def test_an_interrupt_for_a_pending_prompt_is_skipped_and_it_runs_later(world, comfy,
                                                                             client):
    """Another client's prompt runs; ours waits behind it. Interrupting ours
    does nothing ("not currently running, skipping interrupt"): it runs later."""
    gates = NodeGates(comfy)
    theirs = (await submit(client, comfy, client_id="web-ui"))["prompt_id"]
    ours = (await submit(client, comfy, client_id="gpumgr"))["prompt_id"]
    reply = await post(client, comfy.url + "/api/interrupt", {"prompt_id": ours})
    assert reply.code == 200
    assert comfy.skipped_interrupts == [ours] and not comfy.interrupt_flag
    assert _queue_ids(await get_json(client, comfy.url + "/queue")) == ([theirs], [ours])
    for node in ("4", "3", "8", "9"):
        await gates.open(theirs, node)
    for node in ("4", "3", "8", "9"):
        await gates.open(ours, node)
    await wait_for(lambda: ours in comfy.history, timeout_s=5)
    assert comfy.history[theirs]["status"]["status_str"] == "success"
    assert comfy.history[ours]["status"]["status_str"] == "success"
    assert comfy.interrupts == 0 and world.max_active_jobs == 1
    assert [(p, how) for _, p, how in comfy.timeline] == [
        (theirs, "started"), (theirs, "success"), (ours, "started"), (ours, "success")]


@pytest_twisted.ensureDeferred
async def test_a_bare_interrupt_ends_whatever_runs_and_an_idle_one_is_forgotten(world, comfy,
                                                                               client):
    comfy.behaviour.render_hangs = True  # the sampler looks at the flag at each step
    await post(client, comfy.url + "/interrupt", raw=b"")  # idle: a flag nobody reads
    first = (await submit(client, comfy))["prompt_id"]
    await wait_for(lambda: comfy._executing_node == "3", timeout_s=5)
    assert comfy.running_item.prompt_id == first and not comfy.interrupt_flag
    await post(client, comfy.url + "/interrupt", raw=b"")
    await wait_for(lambda: first in comfy.history, timeout_s=5)
    assert comfy.interrupts == 1 and world.active_jobs == 0 and comfy.queue_remaining == 0


@pytest_twisted.ensureDeferred
async def test_a_stuck_node_never_sees_the_interrupt_until_the_process_dies(world, comfy,
                                                                           client):
    comfy.behaviour.render_stuck = True
    comfy.behaviour.render_node_s = 0.001
    prompt_id = (await submit(client, comfy))["prompt_id"]
    await wait_for(lambda: comfy._executing_node == "3", timeout_s=5)
    await post(client, comfy.url + "/interrupt", {"prompt_id": prompt_id})
    assert comfy.interrupt_flag
    assert _queue_ids(await get_json(client, comfy.url + "/queue")) == ([prompt_id], [])
    assert comfy.interrupts == 0 and world.active_jobs == 1
    await world.stop_consumer("comfyui")
    assert world.active_jobs == 0 and [how for _, _, how in comfy.timeline] == [
        "started", "lost"]


@pytest_twisted.ensureDeferred
async def test_queue_delete_removes_pending_prompts_never_the_running_one(world, comfy, client):
    gates = NodeGates(comfy)
    ids = [(await submit(client, comfy))["prompt_id"] for _ in range(4)]
    await post(client, comfy.url + "/queue", {"delete": [ids[0], ids[2], "unknown"]})
    assert _queue_ids(await get_json(client, comfy.url + "/queue")) == (
        [ids[0]], [ids[1], ids[3]])
    await post(client, comfy.url + "/api/queue", {"clear": True})
    assert _queue_ids(await get_json(client, comfy.url + "/queue")) == ([ids[0]], [])
    for node in ("4", "3", "8", "9"):
        await gates.open(ids[0], node)
    await wait_for(lambda: ids[0] in comfy.history, timeout_s=5)
    assert comfy.history.keys() == {ids[0]}  # the deleted ones never ran, nor left history
    assert [p for _, p, how in comfy.timeline if how == "started"] == [ids[0]]


@pytest_twisted.ensureDeferred
async def test_queue_and_history_can_be_edited(comfy, client):
    comfy.behaviour.render_hangs = True
    ids = [(await submit(client, comfy))["prompt_id"] for _ in range(4)]
    await post(client, comfy.url + "/queue", {"delete": [ids[2]]})
    assert [i.prompt_id for i in comfy.pending] == [ids[1], ids[3]]
    await post(client, comfy.url + "/queue", {"clear": True})
    assert comfy.pending == [] and comfy.running_item.prompt_id == ids[0]
    await post(client, comfy.url + "/interrupt")
    await wait_for(lambda: ids[0] in comfy.history, timeout_s=5)
    assert list(await get_json(client, comfy.url + "/history?max_items=1")) == [ids[0]]
    await post(client, comfy.url + "/history", {"delete": [ids[0]]})
    assert await get_json(client, comfy.url + "/history") == {}


# -- /free ---------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_free_during_a_render_acts_only_between_renders(world, comfy, client):
    gates = Gates(comfy)
    first = (await submit(client, comfy))["prompt_id"]
    second = (await submit(client, comfy))["prompt_id"]
    held = world.gpu.used_mib
    reply = await post(client, comfy.url + "/free", {"unload_models": True, "free_memory": True})
    assert reply.code == 200 and reply.body == b""
    assert comfy.loaded and world.gpu.used_mib == held  # the render keeps its model

    await gates.open(first)
    await wait_for(lambda: first in comfy.history, timeout_s=5)
    # Between the renders the worker unloaded, then the second render loaded again.
    assert comfy.unloads == 1 and comfy.loads == 2 and comfy.loaded
    await gates.open(second)
    await wait_for(lambda: second in comfy.history, timeout_s=5)
    assert comfy.loaded and comfy.unloads == 1  # the flag was used up


@pytest_twisted.ensureDeferred
async def test_free_when_idle_unloads_at_once_and_memory_settles_later(world, comfy, client):
    comfy.behaviour.unload_settle_s = 0.3
    prompt_id = (await submit(client, comfy))["prompt_id"]
    await wait_for(lambda: prompt_id in comfy.history, timeout_s=5)
    assert "comfyui" in world.gpu.allocations
    await post(client, comfy.url + "/free", {"unload_models": False})
    assert comfy.loaded  # no flag set, nothing to do
    await post(client, comfy.url + "/free", {"free_memory": True})  # unload_models defaults to it
    assert not comfy.loaded and comfy.unloads == 1
    assert "comfyui" in world.gpu.allocations  # CUDA gives it back lazily
    await wait_for(lambda: "comfyui" not in world.gpu.allocations, timeout_s=5)


@pytest_twisted.ensureDeferred
async def test_free_can_fail(comfy, client):
    comfy.behaviour.unload_fails = True
    reply = await post(client, comfy.url + "/free", {"unload_models": True})
    assert reply.code == 500 and "failure" in reply.json()["error"]


# -- images ---------------------------------------------------------------------------------------


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, at = [], 8
    while at < len(data):
        (n,) = struct.unpack("!I", data[at:at + 4])
        kind, body = data[at + 4:at + 8], data[at + 8:at + 8 + n]
        (crc,) = struct.unpack("!I", data[at + 8 + n:at + 12 + n])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        chunks.append((kind, body))
        at += 12 + n
    return chunks


@pytest_twisted.ensureDeferred
async def test_view_serves_the_rendered_png_and_404s_unknown_names(comfy, client):
    prompt_id = (await submit(client, comfy))["prompt_id"]
    await wait_for(lambda: prompt_id in comfy.history, timeout_s=5)
    [image] = comfy.history[prompt_id]["outputs"]["9"]["images"]
    reply = await client.request(
        "GET", f"{comfy.url}/view?filename={image['filename']}&subfolder=&type=output")
    assert reply.code == 200 and reply.header("Content-Type") == b"image/png"
    chunks = _png_chunks(reply.body)
    assert [k for k, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    width, height = struct.unpack("!II", chunks[0][1][:8])
    assert len(zlib.decompress(chunks[1][1])) == height * (1 + 3 * width)
    missing = await client.request("GET", f"{comfy.url}/view?filename=nope.png&type=output")
    assert missing.code == 404 and "nope.png" in missing.json()["error"]


@pytest_twisted.ensureDeferred
async def test_upload_image_then_view_it_as_input(comfy, client):
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
    ctype, body = encode_multipart({"image": ("cat.png", png, "image/png"), "overwrite": b"false"})
    first = await client.request("POST", comfy.url + "/upload/image", body, {"Content-Type": ctype})
    assert first.code == 200 and first.json() == {"name": "cat.png", "subfolder": "",
                                                  "type": "input"}
    second = await client.request("POST", comfy.url + "/api/upload/image", body,
                                  {"Content-Type": ctype})
    assert second.json()["name"] == "cat (1).png"  # no overwrite: a new name
    seen = await client.request("GET", f"{comfy.url}/view?filename=cat.png&type=input")
    assert seen.code == 200 and seen.body == png
    ctype, body = encode_multipart({"subfolder": b"x"})
    refused = await client.request("POST", comfy.url + "/upload/image", body,
                                   {"Content-Type": ctype})
    assert refused.code == 400


# -- the WebSocket ---------------------------------------------------------------------------------


def _ws_url(comfy, client_id: str) -> str:
    return comfy.url.replace("http://", "ws://") + f"/ws?clientId={client_id}"


async def _messages_until(conn, last_type: str, prompt_id: str) -> list[dict]:
    """Messages up to and including `last_type` for `prompt_id` (bounded)."""
    seen = []
    for _ in range(100):
        m = await conn.next_json(timeout_s=5)
        seen.append(m)
        data = m.get("data", {})
        if m["type"] == last_type and data.get("prompt_id") == prompt_id and data.get(
                "node", "") is None:
            return seen
    raise AssertionError(f"no final {last_type}: {seen}")


@pytest_twisted.ensureDeferred
async def test_websocket_sends_status_to_all_and_execution_events_to_the_submitter(comfy, client):
    me = await connect(reactor, _ws_url(comfy, "me"))
    other = await connect(reactor, _ws_url(comfy, "other"))
    try:
        hello = await me.next_json(timeout_s=5)
        assert hello == {"type": "status", "data": {
            "status": {"exec_info": {"queue_remaining": 0}}, "sid": "me"}}
        await other.next_json(timeout_s=5)
        assert comfy.open_sockets == 2

        prompt_id = (await submit(client, comfy, client_id="me"))["prompt_id"]
        seen = await _messages_until(me, "executing", prompt_id)
        kinds = [m["type"] for m in seen]
        assert kinds == ["status", "execution_start", "execution_cached",
                         "executing", "executing",          # the loader, then the sampler
                         "progress", "progress",
                         "executing", "executing",          # VAEDecode, SaveImage
                         "executed", "execution_success", "status", "executing"]
        executing = [m["data"]["node"] for m in seen if m["type"] == "executing"]
        assert executing == ["4", "3", "8", "9", None]
        assert [m["data"]["value"] for m in seen if m["type"] == "progress"] == [1, 2]
        executed = next(m["data"] for m in seen if m["type"] == "executed")
        assert executed["node"] == "9" and executed["output"]["images"][0]["type"] == "output"
        assert all(m["data"].get("prompt_id", prompt_id) == prompt_id for m in seen)
        # History was filled before the final "executing": a client may fetch it at once.
        assert prompt_id in comfy.history

        # The other client only hears about the queue.
        assert [(await other.next_json(timeout_s=5))["type"] for _ in range(2)] == [
            "status", "status"]
        assert other.messages.pending == []
    finally:
        await me.close()
        await other.close()
    await wait_for(lambda: comfy.open_sockets == 0, timeout_s=5)


@pytest_twisted.ensureDeferred
async def test_a_prompt_without_client_id_sends_no_execution_events(comfy, client):
    ws = await connect(reactor, _ws_url(comfy, "watcher"))
    try:
        await ws.next_json(timeout_s=5)
        prompt_id = (await submit(client, comfy))["prompt_id"]
        await wait_for(lambda: prompt_id in comfy.history, timeout_s=5)
        await ws.ping().addTimeout(5, reactor)  # everything sent before the pong has arrived
        assert {json.loads(m)["type"] for m in ws.messages.pending} == {"status"}
    finally:
        await ws.close()


@pytest_twisted.ensureDeferred
async def test_reconnecting_during_a_render_says_which_node_runs(comfy, client):
    comfy.behaviour.render_hangs = True
    prompt_id = (await submit(client, comfy, client_id="me"))["prompt_id"]
    await wait_for(lambda: comfy._executing_node == "3", timeout_s=5)
    ws = await connect(reactor, _ws_url(comfy, "me"))
    try:
        assert (await ws.next_json(timeout_s=5))["type"] == "status"
        current = await ws.next_json(timeout_s=5)
        assert current["type"] == "executing" and current["data"]["prompt_id"] == prompt_id
        assert current["data"]["node"] == "3"
        await post(client, comfy.url + "/interrupt")
        seen = await _messages_until(ws, "executing", prompt_id)
        assert "execution_interrupted" in [m["type"] for m in seen]
    finally:
        await ws.close()


@pytest_twisted.ensureDeferred
async def test_client_closing_the_socket_leaves_nothing_open(world, comfy):
    ws = await connect(reactor, _ws_url(comfy, "me"))
    await ws.next_json(timeout_s=5)
    assert comfy.open_sockets == 1 and world.open_connections("comfyui") == 1
    info = await ws.close().addTimeout(5, reactor)
    assert info.clean and info.code == 1000
    await wait_for(lambda: comfy.open_sockets == 0 and world.open_connections("comfyui") == 0,
                   timeout_s=5)


@pytest_twisted.ensureDeferred
async def test_a_plain_get_on_ws_is_refused(comfy, client):
    reply = await client.request("GET", comfy.url + "/ws?clientId=x")
    assert reply.code == 400 and comfy.open_sockets == 0


# -- the process stops and starts again --------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_stopped_comfyui_drops_sockets_refuses_connections_and_frees_memory(world, comfy,
                                                                                   client):
    comfy.behaviour.render_hangs = True
    ws = await connect(reactor, _ws_url(comfy, "me"))
    await ws.next_json(timeout_s=5)
    prompt_id = (await submit(client, comfy, client_id="me"))["prompt_id"]
    assert world.active_jobs == 1 and "comfyui" in world.gpu.allocations

    await world.stop_consumer("comfyui")
    info = await ws.when_closed().addTimeout(5, reactor)
    assert info.code == 1006 and not info.clean
    assert comfy.open_sockets == 0 and world.active_jobs == 0
    assert "comfyui" not in world.gpu.allocations and comfy.queue_remaining == 0
    with pytest.raises(ConnectionRefusedError):
        await client.request("GET", comfy.url + "/queue")
    with pytest.raises(ConnectionRefusedError):
        await connect(reactor, _ws_url(comfy, "me"), timeout_s=5)

    world.restart_consumer("comfyui")
    comfy.behaviour.render_hangs = False
    assert await get_json(client, f"{comfy.url}/history/{prompt_id}") == {}  # a fresh process
    again = (await submit(client, comfy))["prompt_id"]
    await wait_for(lambda: again in comfy.history, timeout_s=5)
    with pytest.raises(RuntimeError):
        world.restart_consumer("comfyui")
