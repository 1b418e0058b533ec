"""ComfyUI, simulated: a render queue worked one prompt at a time, history, a WebSocket.

What it copies from the real server (shared CONSUMERS-NOTES, and ComfyUI's
``main.py``/``server.py``):

- ``POST /prompt`` validates, queues and answers AT ONCE with
  ``{prompt_id, number, node_errors}`` (the client's ``prompt_id`` if it sent
  one); a missing or malformed workflow gets 400 ``{error, node_errors}``.
- One worker renders in submission order (prompts from gpumgr and from other
  clients alike, FIFO), one at a time, each render a chain of nodes run one
  after the other on the simulated GPU (counted by
  `world.job_started/job_ended`). A node takes `Behaviour.render_node_s`
  (None: `job_s` spread over the nodes). The model loads at the first render;
  one that does not fit ends that render in ``execution_error`` (CUDA out of
  memory).
- ``POST /interrupt`` only sets a flag, checked before each node (and at each
  step of a hanging sampler, as KSampler checks it): the render, its memory
  and its ``/queue`` entry go on until the node that runs now ends; then
  ``execution_interrupted``. An interrupt naming a prompt that is not running
  (pending, or unknown) is skipped, logged as the real one does; a bare one
  interrupts whatever runs now. A flag left over is cleared when the next
  prompt starts (``execute_async``).
- ``GET /history/<id>`` is ``{}`` until the prompt finished; ``/queue``,
  ``GET /prompt``, ``POST /queue`` (``delete`` and ``clear`` remove pending
  prompts only, never the running one) and ``POST /history`` (clear, delete).
- ``POST /free`` only sets flags; the worker acts on them between renders,
  never during one (at once when idle).
- ``GET /view`` serves the PNGs renders produced and images uploaded with
  ``POST /upload/image``; ``/object_info``, ``/system_stats``.
- ``GET /ws?clientId=X``: ``status`` to every socket on connect and whenever
  the queue changes; ``execution_start``, ``execution_cached``, ``executing``,
  ``progress``, ``executed``, ``execution_success`` (or ``execution_error``,
  ``execution_interrupted``) and then ``executing`` with ``node: null`` only to
  the sockets of the client that submitted the prompt, in the real server's
  order (history is filled before that last message).
- Every route is also served under ``/api/``.

Knobs: `job_s`, `render_node_s`, `node_gate` (tests), `render_steps`, `render_hangs` (the sampler
never ends, but honours an interrupt at its next step), `render_stuck` (the
sampler never ends and never looks at the flag: only the process dying ends
it), `render_error`, `render_gate` (tests), `unload_fails`, `unload_settle_s`.
"""

from __future__ import annotations

import itertools
import logging
import struct
import uuid
import zlib
from typing import Any

import attrs

from gpumgr.testing.base import SimulatedConsumer, json_body, read_json
from gpumgr.testing.contention import DEFAULT_CONTENTION
from gpumgr.testing.multipart import parse_multipart
from gpumgr.testing.websocket import WebSocketConnection, accept

log = logging.getLogger("gpumgr.testing.comfyui")


def make_png(seed: int = 0, size: int = 8) -> bytes:
    """A small valid RGB PNG, different for each seed."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack("!I", len(data)) + kind + data
                + struct.pack("!I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    rows = b"".join(
        b"\x00" + bytes(((x * 32 + seed * 7) % 256, (y * 32 + seed * 13) % 256, seed % 256)
                        [c] for x in range(size) for c in range(3))
        for y in range(size))
    header = struct.pack("!IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


#: (class, required inputs, outputs, category) for a few common nodes.
_NODE_CLASSES: list[tuple[str, dict[str, Any], list[str], str]] = [
    ("CheckpointLoaderSimple", {"ckpt_name": [["sd_xl_base_1.0.safetensors"]]},
     ["MODEL", "CLIP", "VAE"], "loaders"),
    ("CLIPTextEncode", {"text": ["STRING", {"multiline": True}], "clip": ["CLIP"]},
     ["CONDITIONING"], "conditioning"),
    ("EmptyLatentImage", {"width": ["INT", {"default": 512}], "height": ["INT", {"default": 512}],
                          "batch_size": ["INT", {"default": 1}]}, ["LATENT"], "latent"),
    ("KSampler", {"model": ["MODEL"], "seed": ["INT", {"default": 0}],
                  "steps": ["INT", {"default": 20}], "positive": ["CONDITIONING"],
                  "negative": ["CONDITIONING"], "latent_image": ["LATENT"]},
     ["LATENT"], "sampling"),
    ("VAEDecode", {"samples": ["LATENT"], "vae": ["VAE"]}, ["IMAGE"], "latent"),
    ("LoadImage", {"image": [["example.png"], {"image_upload": True}]}, ["IMAGE", "MASK"],
     "image"),
    ("SaveImage", {"images": ["IMAGE"], "filename_prefix": ["STRING", {"default": "ComfyUI"}]},
     [], "image"),
]
#: Those nodes, shaped like ComfyUI's /object_info.
_OBJECT_INFO = {
    name: {"input": {"required": inputs}, "input_order": {"required": list(inputs)},
           "output": outputs, "output_is_list": [False] * len(outputs), "output_name": outputs,
           "name": name, "display_name": name, "description": "", "python_module": "nodes",
           "category": category, "output_node": name in ("SaveImage", "PreviewImage")}
    for name, inputs, outputs, category in _NODE_CLASSES
}


@attrs.frozen
class QueueItem:
    number: int
    prompt_id: str
    prompt: dict
    client_id: str | None
    nodes: tuple[str, ...]
    sampler_node: str
    output_node: str

    def entry(self) -> list[Any]:
        """As /queue and /history show it: [number, id, prompt, extra_data, outputs]."""
        return [self.number, self.prompt_id, self.prompt, {"client_id": self.client_id},
                [self.output_node]]


def _plan(prompt: dict) -> tuple[tuple[str, ...], str, str]:
    """The node order (inputs first, as ComfyUI runs a graph), the node that
    reports progress and the node that saves images."""
    if not prompt:
        return ("3", "9"), "3", "9"
    ids = sorted(prompt, key=lambda k: (0, int(k), k) if k.isdigit() else (1, 0, k))

    def kind(i: str) -> str:
        return str(prompt[i].get("class_type", ""))

    def inputs_of(i: str) -> list[str]:
        values = (prompt[i].get("inputs") or {}).values()
        return [str(v[0]) for v in values
                if isinstance(v, list) and len(v) == 2 and str(v[0]) in prompt]

    order: list[str] = []
    seen: set[str] = set()

    def visit(i: str) -> None:
        if i not in seen:
            seen.add(i)
            for dependency in inputs_of(i):
                visit(dependency)
            order.append(i)

    output = next((i for i in ids if kind(i) in ("SaveImage", "PreviewImage")), ids[-1])
    for i in ids:
        if i != output:
            visit(i)
    visit(output)
    order.remove(output)
    sampler = next((i for i in order if "Sampler" in kind(i)), order[0] if order else output)
    return tuple(order) + (output,), sampler, output


class ComfyUISim(SimulatedConsumer):
    process_name = "python3 main.py --listen"
    default_contention = DEFAULT_CONTENTION["comfyui"]

    def __init__(self, world, name, behaviour):
        super().__init__(world, name, behaviour)
        self._numbers = itertools.count(0)
        self._images_made = itertools.count(1)
        self.history: dict[str, dict] = {}
        self.pending: list[QueueItem] = []
        self.running_item: QueueItem | None = None
        self._executing_node: str | None = None
        self._messages: list[list[Any]] = []
        self._timers: list[Any] = []
        self._free_flags: tuple[bool, bool] | None = None
        #: The running render's working memory (`Behaviour.working_mib`, its peak), if any.
        self._working_owner: str | None = None
        #: Renders ended by POST /interrupt.
        self.interrupts = 0
        #: The interrupt flag (nodes.interrupt_processing): honoured at the next node.
        self.interrupt_flag = False
        #: Pending prompts removed by POST /queue (delete or clear): they never run.
        self.deleted: list[str] = []
        #: Prompt ids an interrupt named while they were not running (skipped).
        self.skipped_interrupts: list[str] = []
        #: (seconds, prompt_id, "started" | "success" | "error" | "interrupted"):
        #: when each render really started and ended on the simulated GPU.
        self.timeline: list[tuple[float, str, str]] = []
        #: (clientId, socket) for every open /ws connection.
        self.sockets: list[tuple[str, WebSocketConnection]] = []
        #: (type, subfolder, filename) -> PNG bytes, for /view.
        self.images: dict[tuple[str, str, str], bytes] = {}

    # -- what tests read -----------------------------------------------------------

    @property
    def open_sockets(self) -> int:
        return sum(1 for _, conn in self.sockets if not conn.is_closed)

    @property
    def queue_remaining(self) -> int:
        return len(self.pending) + (self.running_item is not None)

    def is_work(self, method, path, body_head):
        return method == "POST" and path in ("/prompt", "/api/prompt")

    # -- routing -------------------------------------------------------------------

    def route(self, method, path):
        if path.startswith("/api/"):
            path = path[4:]
        if method == "GET" and path.startswith("/history/"):
            prompt_id = path[len("/history/"):]
            return lambda r: json_body(r, {k: v for k, v in self.history.items() if k == prompt_id})
        if method == "GET" and path.startswith("/object_info/"):
            node = path[len("/object_info/"):]
            return lambda r: json_body(r, {node: _OBJECT_INFO[node]} if node in _OBJECT_INFO else {})
        return {
            ("GET", "/system_stats"): self.system_stats,
            ("GET", "/object_info"): lambda r: json_body(r, _OBJECT_INFO),
            ("GET", "/prompt"): lambda r: json_body(
                r, {"exec_info": {"queue_remaining": self.queue_remaining}}),
            ("POST", "/prompt"): self.prompt,
            ("GET", "/queue"): self.queue,
            ("POST", "/queue"): self.edit_queue,
            ("GET", "/history"): self.all_history,
            ("POST", "/history"): self.edit_history,
            ("POST", "/interrupt"): self.interrupt,
            ("POST", "/free"): self.free,
            ("GET", "/view"): self.view,
            ("POST", "/upload/image"): self.upload_image,
            ("GET", "/ws"): self.websocket,
        }.get((method, path))

    # -- small routes --------------------------------------------------------------------

    def system_stats(self, request):
        if not self.behaviour.healthy:
            # Behaviour.healthy=False stands for a health route that fails
            # (gpumgr probes /system_stats): an error, not a closed port.
            return json_body(request, {"error": "simulated unhealthy"}, 500)
        gpu = self.world.gpu
        return json_body(request, {
            "system": {"os": "posix", "python_version": "3.12.3", "embedded_python": False,
                       "comfyui_version": "0.3.60", "pytorch_version": "2.8.0+cu128",
                       "argv": ["main.py", "--listen"], "ram_total": 64 << 30,
                       "ram_free": 48 << 30},
            "devices": [{"name": f"cuda:0 {gpu.name} : cudaMallocAsync", "type": "cuda",
                         "index": 0, "vram_total": gpu.total_mib << 20,
                         "vram_free": gpu.free_mib << 20, "torch_vram_total": 0,
                         "torch_vram_free": 0}]})

    def queue(self, request):
        return json_body(request, {
            "queue_running": [self.running_item.entry()] if self.running_item else [],
            "queue_pending": [item.entry() for item in self.pending]})

    def edit_queue(self, request):
        """Deletes and clears touch pending prompts only (PromptQueue.delete_queue_item)."""
        body = _json_object(request)
        if body.get("clear"):
            self.deleted.extend(i.prompt_id for i in self.pending)
            self.pending.clear()
        doomed = set(body.get("delete") or ())
        self.deleted.extend(i.prompt_id for i in self.pending if i.prompt_id in doomed)
        self.pending[:] = [i for i in self.pending if i.prompt_id not in doomed]
        self._broadcast_status()
        return _empty(request)

    def all_history(self, request):
        items = list(self.history.items())
        limit = request.args.get(b"max_items", [b""])[0]
        if limit.isdigit():
            items = items[-int(limit):] if int(limit) else []
        return json_body(request, dict(items))

    def edit_history(self, request):
        body = _json_object(request)
        if body.get("clear"):
            self.history.clear()
        for prompt_id in body.get("delete") or ():
            self.history.pop(prompt_id, None)
        return _empty(request)

    def view(self, request):
        def arg(name: bytes, default: str) -> str:
            return request.args.get(name, [default.encode()])[0].decode("utf-8", "replace")

        key = (arg(b"type", "output"), arg(b"subfolder", ""), arg(b"filename", ""))
        data = self.images.get(key)
        if data is None:
            return json_body(request, {"error": f"no such image {key[2]!r}"}, 404)
        request.setHeader(b"Content-Type", b"image/png")
        request.setHeader(b"Content-Disposition", f'filename="{key[2]}"'.encode())
        request.setHeader(b"Content-Length", str(len(data)).encode())
        return data

    def upload_image(self, request):
        request.content.seek(0)
        fields = parse_multipart(request.getHeader(b"content-type"), request.content.read())
        image = fields.get("image")
        if image is None or not image.filename:
            return json_body(request, {"error": "no image in the upload"}, 400)
        kind = fields["type"].data.decode() if "type" in fields else "input"
        subfolder = fields["subfolder"].data.decode() if "subfolder" in fields else ""
        overwrite = "overwrite" in fields and fields["overwrite"].data.lower() in (b"true", b"1")
        name = image.filename.rsplit("/", 1)[-1]
        stem, dot, ext = name.rpartition(".")
        n = 1
        while (kind, subfolder, name) in self.images and not overwrite:
            name = f"{stem} ({n}).{ext}" if dot else f"{ext} ({n})"
            n += 1
        self.images[(kind, subfolder, name)] = image.data
        return json_body(request, {"name": name, "subfolder": subfolder, "type": kind})

    # -- the queue and the worker -------------------------------------------------------------

    def prompt(self, request):
        """Validate, queue, and answer at once; the render runs afterwards."""
        body = _json_object(request)
        workflow = body.get("prompt")
        if workflow is None:
            return _invalid(request, "no_prompt", "No prompt provided", "No prompt provided")
        if not isinstance(workflow, dict):
            return _invalid(request, "invalid_prompt", "Invalid prompt",
                            "the prompt must be a JSON object of nodes")
        for node_id, node in workflow.items():
            if not isinstance(node, dict) or "class_type" not in node:
                return _invalid(request, "invalid_prompt",
                                "Cannot execute because a node is missing the class_type property.",
                                f"Node ID '#{node_id}'")
        client_id = body.get("client_id")
        item = self.submit(workflow, client_id if isinstance(client_id, str) else None,
                           str(body.get("prompt_id") or "") or None)
        return json_body(request, {"prompt_id": item.prompt_id, "number": item.number,
                                   "node_errors": {}})

    def submit(self, workflow: dict, client_id: str | None = None,
               prompt_id: str | None = None) -> QueueItem:
        """Queue a valid workflow, as POST /prompt does (tests use it for a
        prompt another client sends ComfyUI directly)."""
        nodes, sampler, output = _plan(workflow)
        item = QueueItem(next(self._numbers), prompt_id or str(uuid.uuid4()), workflow,
                         client_id, nodes, sampler, output)
        self.pending.append(item)
        self._broadcast_status()
        self._advance()
        return item

    def _advance(self) -> None:
        """The worker's loop body: act on /free flags between renders, then start the next."""
        if self.running_item is not None or not self.running:
            return
        self._apply_free_flags()
        if self.pending:
            self._start(self.pending.pop(0))

    def _start(self, item: QueueItem) -> None:
        self.running_item = item
        self.interrupt_flag = False  # execute_async: interrupt_processing(False)
        self._messages = []
        self._record(item, "execution_start", {"prompt_id": item.prompt_id,
                                               "timestamp": self._ms()})
        self._record(item, "execution_cached", {"nodes": [], "prompt_id": item.prompt_id,
                                                "timestamp": self._ms()})
        if not self.load():
            self._executing(item, item.nodes[0])
            self._finish_with_error(item, self.oom_message(self.behaviour.vram_mib),
                                    "torch.OutOfMemoryError")
            return
        working = self._take_working_memory(self.pid)
        if working is False:  # the render's peak does not fit beside what the card holds
            self._executing(item, item.nodes[0])
            self._finish_with_error(item, self.oom_message(self.behaviour.working_mib),
                                    "torch.OutOfMemoryError")
            return
        self._working_owner = working if isinstance(working, str) else None
        self.jobs_started += 1
        self.world.job_started(self)
        self.timeline.append((self.clock.seconds(), item.prompt_id, "started"))
        self._run_node(item, 0)

    def _node_s(self, item: QueueItem) -> float:
        b = self.behaviour
        return b.render_node_s if b.render_node_s is not None else b.job_s / len(item.nodes)

    def _run_node(self, item: QueueItem, index: int) -> None:
        """Node `index` runs for one node time; the flag is looked at only before it."""
        node = item.nodes[index]
        self._executing(item, node)
        if self.interrupt_flag:  # before_node_execution() raises in this node
            self._interrupt(item)
            return
        node_s = self._node_s(item)
        b = self.behaviour
        if node == item.sampler_node:
            steps = max(0, b.render_steps)
            for k in range(1, steps + 1):
                self._later(node_s * k / (steps + 1), self._send_to, item, "progress",
                            {"value": k, "max": steps, "prompt_id": item.prompt_id,
                             "node": item.sampler_node})
            if b.render_stuck:
                return  # never ends, never looks at the flag
            if b.render_hangs:
                self._later(max(node_s, 0.005), self._sampler_step, item)
                return
        # A node's time is work on the card: slower while other jobs compute.
        self._timers.append(self.world.compute.later(
            node_s, self.contention, lambda: self._node_time_over(item, index)))

    def _node_time_over(self, item: QueueItem, index: int) -> None:
        gate = self.behaviour.node_gate
        if gate is None or self.running_item is not item:
            self._node_done(item, index)
        else:
            gate(item.prompt_id, item.nodes[index]).addCallback(
                lambda _: self._node_done(item, index))

    def _sampler_step(self, item: QueueItem) -> None:
        """A hanging sampler: it never ends, but checks the flag at every step."""
        if self.running_item is not item:
            return
        if self.interrupt_flag:
            self._interrupt(item)
        else:
            self._later(max(self._node_s(item), 0.005), self._sampler_step, item)

    def _node_done(self, item: QueueItem, index: int) -> None:
        if self.running_item is not item:
            return
        if index + 1 < len(item.nodes):
            self._run_node(item, index + 1)
            return
        gate = self.behaviour.render_gate
        if gate is None:
            self._render_done(item)
        else:
            gate(item.prompt_id).addCallback(lambda _: self._render_done(item))

    def _render_done(self, item: QueueItem) -> None:
        """The last node ended: no flag is looked at after it (a late interrupt is moot)."""
        if self.running_item is not item:
            return  # the process died while the gate was shut
        self._timers = []
        if self.behaviour.render_error is not None:
            self._ended(item, "error")
            self._finish_with_error(item, self.behaviour.render_error, "RuntimeError")
            return
        n = next(self._images_made)
        filename = f"ComfyUI_{n:05d}_.png"
        self.images[("output", "", filename)] = make_png(n)
        images = [{"filename": filename, "subfolder": "", "type": "output"}]
        self._send_to(item, "executed", {"node": item.output_node,
                                         "display_node": item.output_node,
                                         "output": {"images": images},
                                         "prompt_id": item.prompt_id})
        self._record(item, "execution_success", {"prompt_id": item.prompt_id,
                                                 "timestamp": self._ms()})
        self._ended(item, "success")
        self._task_done(item, {item.output_node: {"images": images}}, "success")

    def _ended(self, item: QueueItem, how: str) -> None:
        self.timeline.append((self.clock.seconds(), item.prompt_id, how))
        if self._working_owner is not None:
            self.world.gpu.free(self._working_owner)
            self._working_owner = None
        self.world.job_ended(self)

    def _finish_with_error(self, item: QueueItem, message: str, exception_type: str) -> None:
        node = self._executing_node or item.nodes[0]
        self._record(item, "execution_error", {
            "prompt_id": item.prompt_id, "node_id": node,
            "node_type": str(item.prompt.get(node, {}).get("class_type", "KSampler")),
            "executed": [], "exception_message": message, "exception_type": exception_type,
            "traceback": [f"{exception_type}: {message}\n"], "current_inputs": {},
            "current_outputs": {}, "timestamp": self._ms()})
        self._task_done(item, {}, "error")

    def _interrupt(self, item: QueueItem) -> None:
        """The flag was seen at a node boundary: the render ends here."""
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        self._timers = []
        node = self._executing_node or item.nodes[0]
        message = {"prompt_id": item.prompt_id, "node_id": node,
                   "node_type": str(item.prompt.get(node, {}).get("class_type", "KSampler")),
                   "executed": [], "timestamp": self._ms()}
        self._messages.append(["execution_interrupted", message])
        self._broadcast({"type": "execution_interrupted", "data": message})  # broadcast=True
        self.interrupts += 1
        self._ended(item, "interrupted")
        self._task_done(item, {}, "error")

    def _task_done(self, item: QueueItem, outputs: dict, status: str) -> None:
        """Like ComfyUI's task_done: history first, then ``executing`` with node null."""
        self.history[item.prompt_id] = {
            "prompt": item.entry(), "outputs": outputs,
            "status": {"status_str": status, "completed": status == "success",
                       "messages": self._messages},
            "meta": {node: {"node_id": node, "display_node": node, "parent_node": None,
                            "real_node_id": node} for node in outputs}}
        self.running_item = None
        self._executing_node = None
        self._broadcast_status()
        self._send_to(item, "executing", {"node": None, "prompt_id": item.prompt_id})
        self._advance()

    def _apply_free_flags(self) -> None:
        if self._free_flags is None:
            return
        unload_models, _free_memory = self._free_flags
        self._free_flags = None
        if unload_models and self._loaded:
            self.unload()

    # -- control routes ----------------------------------------------------------------------

    def interrupt(self, request):
        """Only sets the flag (server.py post_interrupt): the running render ends
        at its next node boundary. A prompt_id that is not the running prompt's
        is skipped, pending or not; no prompt_id interrupts whatever runs."""
        target = _json_object(request).get("prompt_id")
        item = self.running_item
        if target:
            if item is not None and item.prompt_id == target:
                log.info("Interrupting prompt %s", target)
                self.interrupt_flag = True
            else:
                log.info("Prompt %s is not currently running, skipping interrupt", target)
                self.skipped_interrupts.append(str(target))
        else:
            log.info("Global interrupt (no prompt_id specified)")
            self.interrupt_flag = True
        return _empty(request)

    def free(self, request):
        """Only sets flags: the worker acts on them between renders, never during one."""
        if self.behaviour.unload_fails:
            return json_body(request, {"error": "simulated unload failure"}, 500)
        body = _json_object(request)
        free_memory = bool(body.get("free_memory", False))
        unload_models = bool(body.get("unload_models", free_memory))
        if unload_models or free_memory:
            self._free_flags = (unload_models, free_memory)
        if self.running_item is None:
            self._apply_free_flags()  # an idle worker wakes up for the flags
        return _empty(request)

    # -- WebSocket ------------------------------------------------------------------------------

    def websocket(self, request):
        sid = request.args.get(b"clientId", [b""])[0].decode("utf-8", "replace") or uuid.uuid4().hex
        conn = WebSocketConnection(self.clock, on_message=lambda message: None)
        conn.on_close = lambda info: self._socket_closed(conn)
        result = accept(request, conn)
        if conn.is_open:
            self.sockets.append((sid, conn))
            conn.send_json({"type": "status", "data": {
                "status": {"exec_info": {"queue_remaining": self.queue_remaining}}, "sid": sid}})
            item = self.running_item
            if item is not None and item.client_id == sid and self._executing_node is not None:
                conn.send_json({"type": "executing", "data": {
                    "node": self._executing_node, "display_node": self._executing_node,
                    "prompt_id": item.prompt_id}})
        return result

    def _socket_closed(self, conn: WebSocketConnection) -> None:
        self.sockets = [(s, c) for s, c in self.sockets if c is not conn]

    def _broadcast_status(self) -> None:
        self._broadcast({"type": "status", "data": {
            "status": {"exec_info": {"queue_remaining": self.queue_remaining}}}})

    def _broadcast(self, message: dict) -> None:
        for _, conn in self.sockets:
            conn.send_json(message)

    def _send_to(self, item: QueueItem, kind: str, data: dict) -> None:
        """Execution events go only to the submitting client's sockets."""
        if item.client_id is None:
            return
        for sid, conn in self.sockets:
            if sid == item.client_id:
                conn.send_json({"type": kind, "data": data})

    def _record(self, item: QueueItem, kind: str, data: dict) -> None:
        """A status message: kept in the history entry and sent to the client."""
        self._messages.append([kind, data])
        self._send_to(item, kind, data)

    def _executing(self, item: QueueItem, node: str) -> None:
        self._executing_node = node
        self._send_to(item, "executing", {"node": node, "display_node": node,
                                          "prompt_id": item.prompt_id})

    def _later(self, seconds: float, f, *args) -> None:
        self._timers.append(self.clock.callLater(seconds, f, *args))

    def _ms(self) -> int:
        return int(self.clock.seconds() * 1000)

    # -- the process's life ------------------------------------------------------------------

    def process_stopped(self) -> None:
        """The process died: the running render, the queue and the history are gone."""
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        self._timers = []
        if self.running_item is not None and self._loaded:
            self._ended(self.running_item, "lost")
        self.running_item = None
        self.interrupt_flag = False
        self._executing_node = None
        self.pending.clear()
        self.history.clear()
        self._free_flags = None
        super().process_stopped()


def _json_object(request) -> dict:
    try:
        body = read_json(request)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _invalid(request, kind: str, message: str, details: str) -> bytes:
    return json_body(request, {"error": {"type": kind, "message": message, "details": details,
                                         "extra_info": {}}, "node_errors": {}}, 400)


def _empty(request) -> bytes:
    request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
    request.setHeader(b"Content-Length", b"0")
    return b""
