"""A seeded fault-injection run of the real broker: every promise, under fire.

gpumgr (`GpumgrService`, `evicting` mode, capacity 1, and once more with
capacity `auto`) fronts every driver at once: ollama (token streams, pass-through on), a tracked ComfyUI (renders,
pass-through on), mvoice (the `http` driver, also serving /audio) and
whisper.cpp as a process gpumgr starts on demand and stops to evict. Their
VRAM adds up to more than the simulated GPU. The config is a file, so a
reload can run half-way.

Twenty clients send 2,000 requests (after a fault-free warm-up) in a seeded
random mix of kinds and pass-through metadata GETs; some of them disconnect
at a random moment (while queued, before the answer, mid-body) or after a
few stream chunks. Some are scheduled routes spelt otherwise (VARIANTS: `;`,
`#`, `;#`, `;v=1`, percent-encoded, mixed case), sent as raw request lines
(twisted's Agent would itself rewrite `;` and `#`), each with the answer the
README's request-target rules give it. Meanwhile a seeded injector, at
random moments, stops and restarts consumers (resets before and after
headers), stalls them (tokens stop: body_idle_timeout_s; the answer is late:
request_timeout_s), flaps mvoice's health, makes nvidia-smi hang (with and
without a child holding its pipe), fail and print garbage, makes unloads
fail, SIGKILLs the whisper process, freezes it (SIGSTOP, SIGCONT 0.3-5 s
later; past health.down_grace_s gpumgr stops it and aborts its job), puts a
stranger on its port while it is stopped (a plain listener, or another
whisper-server that shares the port with SO_REUSEPORT) and then sends it
away, hangs and slows ComfyUI renders, times out renders that run (their
sampler sees the interrupt only at its next step) and gpumgr's prompts still
pending behind one another client sent to ComfyUI directly, and reloads the
config with new priorities half-way.

It runs twice: on one card, and on a box of two (issue 17) where ollama and
ComfyUI share card 0, mvoice lives on card 1 and whisper is `gpu: auto`;
there two jobs overlap only if they share a card, and the invariants below
are the same.

At the end, each invariant is its own assertion:
- every client call finished (none hung past CALL_BOUND_S); every 200 was
  complete unless the client cut it or an injected fault hit its consumer
  while it ran; every error gpumgr made itself is JSON with a known code (and
  never `internal_error`); no consumer error reached a client (but the 404
  ollama gives a variant that is no route to it); every variant got its
  expected answer (`400 bad_path`; scheduled and 200; scheduled, or relayed
  unscheduled, and ollama's 404; gpumgr's own 404), or under faults a known
  gpumgr error, and none skipped the lock (the overlap invariants below);
- no request reached a stranger on whisper's port (no stt 200 carries a
  stranger's words, no probe reached the listener); while it was there a
  transcription was refused with `503 process_start_failed` naming the port
  and gpumgr spawned nothing; the first transcription after each stranger left was
  gpumgr's whisper's, and at the end there is at most one whisper process
  on its port (none after its unload);
- the scheduler is idle (in_flight and queue_depth 0) and never ran more
  than `capacity` jobs (`max_running_seen`);
- the simulated GPU saw 0 OOMs (external processes and renders included);
- with capacity 1, two simulated GPU jobs ran at once only when one of them was work gpumgr
  had already walked away from (its HTTP exchange dropped: a stall deadline
  passed, the consumer was reset), never two exchanges gpumgr was relaying,
  never beside work whose client left (gpumgr holds the GPU until such work
  stopped, unless a fault hit that consumer meanwhile), and no ComfyUI
  render ran without gpumgr holding ComfyUI's slot (prompts sent to ComfyUI
  directly, which gpumgr never saw, excepted). `world.max_active_jobs` counts such orphans too (a
  simulated job ends on its own timer, not when its connection drops), so it
  is printed, and this sharper form is what is asserted;
- RSS within 30 MiB of its level after the warm-up; open fds back to their
  idle count: no more pipes, files, listening or client sockets than after
  the warm-up, and every upstream socket an idle keep-alive connection
  cached in gpumgr's pools (health probes every 0.25 s keep up to
  `maxPersistentPerHost` = 2 per consumer alive; each is two fds here,
  since the simulated consumers live in this process). The listening port,
  the reactor's own descriptors and those idle connections are what gpumgr
  legitimately keeps;
- nothing at warn level or above in the log but what the injected faults
  explain (an allow-list of formats), and no `log.failure` or traceback.

The seed comes from GPUMGR_FAULT_SEED (else DEFAULT_SEED); a failure names
it and how to run it again. The timing of a run is not reproducible, but the
request mix, the client cuts and the order of the faults are.
"""

from __future__ import annotations

import collections
import gc
import io
import json
import os
import random
import re
import signal
import struct
import uuid
from typing import Any

import attrs
import pytest
import pytest_twisted
import yaml
from twisted.internet import defer, reactor
from twisted.logger import LogLevel, globalLogPublisher
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool
from twisted.web.http_headers import Headers

from gpumgr import errors
from gpumgr import service as service_module
from gpumgr.measure import activity_of
from gpumgr.reload import ReloadOutcome
from gpumgr.service import GpumgrService
from gpumgr.testing import (
    Behaviour,
    make_world,
    managed_whisper_entry,
    world_config_raw,
    write_world_config,
)
from gpumgr.testing.stranger import STRANGER_TRANSCRIPT, StrangerListener, StrangerWhisper
from tests.helpers import Collector, RawReply, raw_request, sleep, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEFAULT_SEED = 20261201
REQUESTS = 2000
WARMUP_REQUESTS = 100
CLIENTS = 20
#: No client call may take longer (queue_timeout_s 15 s is the longest wait gpumgr imposes).
CALL_BOUND_S = 45.0
RSS_SLACK_MIB = 30

GPU_MIB = 16000
#: 17,000 MiB on a 16,000 MiB card (350 MiB taken by the driver, 512 MiB headroom): all
#: four never fit, and ollama and ComfyUI together leave room for whisper, not for mvoice.
VRAM_MIB = {"ollama": 7000, "comfyui": 6500, "mvoice": 2000, "whisper": 1500}
PRIORITY = {"tts": 10, "stt": 10, "llm": 5, "image": 0}
PRIORITY_AFTER_RELOAD = {"tts": 4, "stt": 8, "llm": 6, "image": 2}

#: The client_id of prompts sent to ComfyUI directly, not through gpumgr.
DIRECT_CLIENT = "direct-web-ui"

MVOICE_JOB_S = 0.003
#: mvoice's answer during a before-headers stall: past its request_timeout_s.
MVOICE_STALL_JOB_S = 1.5
COMFY_JOB_S = 0.0
SIM_CONSUMERS = ("ollama", "comfyui", "mvoice")

AUDIO = (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
         b"Content-Type: audio/wav\r\n\r\nRIFF....WAVE\r\n--b--\r\n")
KNOWN_CODES = frozenset(
    cls.code for cls in vars(errors).values()
    if isinstance(cls, type) and issubclass(cls, errors.GpumgrError))

#: Warnings the injected faults explain, by format. Anything else at warn
#: level or above, and any log.failure, fails the run.
EXPECTED_WARNINGS = {
    ("gpumgr.gpu", "GPU sampling failed: {message}"),
    ("gpumgr.admission", "refusing a job for {target}: {message}"),
    ("gpumgr.admission", "unloading {name} ({reason}) failed: {why}"),
    ("gpumgr.admission", "{name}: only {freed} of {mib} MiB came back within {s:g}s"),
    ("gpumgr.broker", "{consumer} unreachable ({reason}); re-probing now"),
    ("gpumgr.renders", "{name}: render {id} lost ({why}); releasing the GPU"),
    ("gpumgr.jobs", "{name}: a job held the GPU past job_timeout_s; it was aborted"),
    ("gpumgr.renders", "{name}: render {id} ran past job_timeout_s ({s:g}s); stopping "
                      "it, and holding the GPU until {name} shows it ended"),
    # The same since DELETE /v1/requests shares it (render_timeout_running).
    ("gpumgr.renders", "{name}: render {id} {what}; stopping it, and holding the GPU "
                      "until {name} shows it ended"),
    # The nvidia-smi stream while jobs run (smi_garbage, smi_driver): restarted.
    ("gpumgr.gpu_stream", "GPU stream: {why}; restarting in {s:g}s (periodic sampling goes on)"),
    ("gpumgr.renders", "{name}: polling render {id} failed: {e}"),
    # A hung render past job_timeout_s on a ComfyUI the injector just stopped.
    ("gpumgr.renders", "{name}: stopping render {id} failed: {e}"),
    ("gpumgr.proxy", "{consumer} broke mid-body ({why}); aborting the client"),
    ("gpumgr.proxy", "{consumer} {reason}; aborting the exchange"),
    ("gpumgr.process", "{name} {description} unexpectedly; last stderr: {stderr}"),
    # A frozen whisper (whisper_freeze) past health.down_grace_s: stopped, and
    # TERM waits in a stopped process, so KILL ends it.
    ("gpumgr.fleet", "{why}; stopping its process (TERM, then KILL)"),
    ("gpumgr.jobs", "{why}; aborting {n} job(s) that hold the GPU for it"),
    ("gpumgr.process", "{name}: no exit {t:g}s after SIGTERM; sending SIGKILL"),
}
#: Warnings allowed only by their text (a bare "{message}" format, or a format
#: that any failed load shares):
#: a start refused because a stranger holds whisper's port, or (when the
#: stranger came between gpumgr's look at the port and the spawn) the
#: server's own "couldn't bind".
_STRANGER_REFUSAL = (r"whisper: refusing to start: something already answers on "
                     r"127\.0\.0\.1:\d+ "
                     r"|whisper exited with status 1 during start: couldn't bind to server socket")
EXPECTED_MESSAGES = {
    ("gpumgr.process", "{message}"): re.compile(_STRANGER_REFUSAL),
    ("gpumgr.admission", "loading {name} ({reason}) failed: {why}"): re.compile(
        r"loading whisper \(demand\) failed: (" + _STRANGER_REFUSAL + ")"),
}


# -- requests --------------------------------------------------------------------------


@attrs.frozen
class Spec:
    n: int
    label: str
    consumer: str | None
    method: str
    path: str
    body: bytes | None = None
    content_type: bytes | None = None
    #: The client disconnects this long after sending, whatever stage it is at.
    cut_at_s: float | None = None
    #: The client disconnects after this many body chunks.
    cut_after_chunks: int | None = None
    #: Sent by a raw socket, the target exactly as `path` (a variant): what
    #: gpumgr must make of it (see VARIANTS).
    expect: str | None = None


_META = [("ollama", "/v1/llm/api/tags"), ("ollama", "/v1/llm/api/ps"),
         ("ollama", "/v1/llm/api/version"), ("comfyui", "/v1/image/system_stats"),
         ("comfyui", "/v1/image/queue"), ("comfyui", "/v1/image/history?max_items=1"),
         ("comfyui", "/v1/image/object_info/KSampler")]
_MIX = [("llm", 24), ("llm_once", 4), ("llm_chat", 5), ("tts", 18), ("stt", 14),
        ("image", 2), ("meta", 17), ("audio", 6), ("status", 4), ("variant", 4)]
#: Scheduled routes spelt otherwise, sent raw (twisted's Agent would itself
#: rewrite `;` and `#`), and what gpumgr must make of each (the README's
#: "Request targets"):
#: - bad_path: `400 bad_path`, always: the service would receive a target
#:   other than the one classified;
#: - scheduled: GPU work (`%67` is `g` to the service's router): it waits
#:   for the lock (X-Gpumgr-Wait-Ms) and is answered 200;
#: - scheduled_404: GPU work to a server that strips `;` parameters, so it
#:   waits for the lock; ollama's router (gin) has no such route: relayed 404;
#: - unscheduled_404: no GPU work to a case-sensitive router: relayed at once,
#:   unscheduled, and ollama answers 404 (no GPU job: it never reaches one);
#: - unknown_route: `/v1/LLM` is no kind of gpumgr's: its own 404.
#: Under faults, any variant but bad_path may also get a gpumgr error with a
#: known code (a consumer stopped, a queue timeout).
VARIANTS = [
    (b"/v1/llm/api/generate;", "bad_path"),
    (b"/v1/llm/api/generate#x", "bad_path"),
    (b"/v1/llm/api/generate;#x", "bad_path"),
    (b"/v1/llm/api/chat;", "bad_path"),
    (b"/v1/image/prompt;", "bad_path"),
    (b"/v1/llm/v1/chat/completions;", "bad_path"),
    (b"/v1/llm/api/%67enerate", "scheduled"),
    (b"/v1/llm/api/generate;v=1", "scheduled_404"),
    (b"/v1/llm/API/generate", "unscheduled_404"),
    (b"/v1/LLM/api/generate", "unknown_route"),
]
_STREAMS = ("llm", "llm_chat")
_JSON = b"application/json"


def make_specs(rng: random.Random, count: int, first: int, faults: bool) -> list[Spec]:
    mix = _MIX if faults else [m for m in _MIX if m[0] != "variant"]  # the warm-up: all 200
    labels = [label for label, _ in mix]
    weights = [w for _, w in mix]
    specs = []
    for n in range(first, first + count):
        label = rng.choices(labels, weights)[0]
        if label == "llm":
            spec = Spec(n, label, "ollama", "POST", "/v1/llm",
                        json.dumps({"model": "llama3", "prompt": f"p{n}"}).encode(), _JSON)
        elif label == "llm_once":
            spec = Spec(n, label, "ollama", "POST", "/v1/llm",
                        json.dumps({"prompt": f"p{n}", "stream": False}).encode(), _JSON)
        elif label == "llm_chat":  # GPU work through a pass-through route
            spec = Spec(n, label, "ollama", "POST", "/v1/llm/api/chat", json.dumps(
                {"model": "llama3", "messages": [{"role": "user", "content": f"m{n}"}]}
            ).encode(), _JSON)
        elif label == "tts":
            spec = Spec(n, label, "mvoice", "POST", "/v1/tts",
                        json.dumps({"text": f"hallo {n}"}).encode(), _JSON)
        elif label == "stt":
            spec = Spec(n, label, "whisper", "POST", "/v1/stt", AUDIO,
                        b"multipart/form-data; boundary=b")
        elif label == "image":
            spec = Spec(n, label, "comfyui", "POST", "/v1/image", b'{"prompt": {}}', _JSON)
        elif label == "meta":
            consumer, path = rng.choice(_META)
            spec = Spec(n, label, consumer, "GET", path)
        elif label == "variant":
            target, expect = rng.choice(VARIANTS)
            if b"/image/" in target:
                body = b'{"prompt": {}}'
            elif b"/chat" in target:
                body = json.dumps({"model": "llama3", "stream": False,
                                   "messages": [{"role": "user", "content": f"m{n}"}]}).encode()
            else:
                body = json.dumps({"model": "llama3", "prompt": f"p{n}",
                                   "stream": False}).encode()
            spec = Spec(n, label, "ollama" if b"/llm/" in target else "comfyui", "POST",
                        target.decode("ascii"), body, _JSON, expect=expect)
        elif label == "audio":
            spec = Spec(n, label, "mvoice", "GET", f"/audio/sample-{n}.wav")
        else:
            spec = Spec(n, label, None, "GET", rng.choice(["/v1/status", "/healthz"]))
        # Image prompts are cut too: a client that leaves once ComfyUI took its
        # prompt must not free the GPU under the render it started.
        if faults and label not in ("status", "variant"):
            if rng.random() < 0.05:
                spec = attrs.evolve(spec, cut_at_s=rng.uniform(0.0, 0.06))
            elif label in _STREAMS and rng.random() < 0.07:
                spec = attrs.evolve(spec, cut_after_chunks=rng.randint(1, 3))
        specs.append(spec)
    return specs


@attrs.define
class Record:
    spec: Spec
    started: float
    ended: float | None = None
    #: completed | cut | no_answer | hung
    outcome: str = "pending"
    status: int | None = None
    complete: bool = False
    #: Set only for a complete 200: what is wrong with its body, if anything.
    body_problem: str | None = None
    #: gpumgr's own error code, for an answer gpumgr made itself.
    code: str | None = None
    #: Not None for a non-2xx answer gpumgr relayed from a consumer.
    consumer_error: str | None = None
    error: str | None = None
    #: For a variant: how its answer differs from what gpumgr must make of it.
    variant_problem: str | None = None


def body_problem(label: str, body: bytes) -> str | None:
    """What is wrong with the body of a complete 200 (None: nothing)."""
    try:
        if label in _STREAMS:
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            return None if lines and lines[-1].get("done") is True else "stream without done"
        if label in ("tts", "audio"):
            ok = body[:4] == b"RIFF" and len(body) == struct.unpack("<I", body[4:8])[0] + 8
            return None if ok else f"broken WAV of {len(body)} bytes"
        doc = json.loads(body)
    except (ValueError, struct.error) as e:
        return f"unreadable body: {e}"
    expected = {"llm_once": "done", "variant": "done", "stt": "text",
                "image": "prompt_id"}.get(label)
    if expected is not None and expected not in doc:
        return f"no {expected!r} in {body[:120]!r}"
    if label == "stt" and any(mark in str(doc.get("text"))
                              for mark in (STRANGER_TRANSCRIPT, StrangerListener.ANSWER)):
        return f"answered by a stranger on whisper's port: {body[:120]!r}"
    return None


def variant_problem(expect: str, reply: RawReply) -> str | None:
    """How a variant's answer differs from what gpumgr must make of it (VARIANTS)."""
    relayed = reply.header(b"x-gpumgr-consumer")
    scheduled = reply.header(b"x-gpumgr-wait-ms") is not None
    code = None
    if not 200 <= reply.code < 300 and relayed is None:
        try:
            code = json.loads(reply.body)["error"]["code"]
        except (ValueError, KeyError, TypeError):
            return f"{reply.code}, not gpumgr's JSON: {reply.body[:120]!r}"
        if code not in KNOWN_CODES or code == "internal_error":
            return f"{reply.code} with the code {code!r}"
    if expect == "bad_path":
        return None if (reply.code, code) == (400, "bad_path") else \
            f"{reply.code} {code or relayed!r}, not 400 bad_path"
    if code is not None:  # a gpumgr error under faults (a consumer down, a queue timeout)
        return None if code != "bad_path" else "400 bad_path for a target gpumgr accepts"
    if expect == "unknown_route":
        return f"{reply.code} relayed by {relayed!r}, not gpumgr's 404 unknown_route"
    want = {"scheduled": 200, "scheduled_404": 404, "unscheduled_404": 404}[expect]
    if reply.code != want or relayed != b"ollama":
        return f"{reply.code} relayed by {relayed!r}, not {want} from ollama"
    if scheduled != (expect != "unscheduled_404"):
        return f"{'scheduled' if scheduled else 'unscheduled'}, for {expect}"
    return None


class Clients:
    """CLIENTS concurrent loops over one list of specs, each call bounded."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = CLIENTS
        self.agent = Agent(reactor, pool=self.pool)
        self.records: list[Record] = []

    async def run(self, specs: list[Spec]) -> None:
        todo = list(specs)

        async def loop() -> None:
            while todo:
                spec = todo.pop(0)
                record = Record(spec, reactor.seconds())
                self.records.append(record)
                call = defer.ensureDeferred(self._send(spec, record))
                try:
                    await call.addTimeout(CALL_BOUND_S, reactor)
                except defer.TimeoutError:
                    record.outcome = "hung"
                record.ended = reactor.seconds()

        await defer.gatherResults([defer.ensureDeferred(loop()) for _ in range(CLIENTS)])

    async def _send(self, spec: Spec, record: Record) -> None:
        if spec.expect is not None:
            await self._send_raw(spec, record)
            return
        headers = Headers({b"X-Fault-Req": [str(spec.n).encode()]})
        if spec.content_type is not None:
            headers.setRawHeaders(b"Content-Type", [spec.content_type])
        producer = None if spec.body is None else FileBodyProducer(io.BytesIO(spec.body))
        pending = self.agent.request(spec.method.encode(), (self.url + spec.path).encode(),
                                     headers, producer)
        stage: dict[str, Any] = {}

        def cut() -> None:
            collector = stage.get("collector")
            if collector is None:
                record.outcome = "cut"
                pending.cancel()
            elif collector.reason is None:
                record.outcome = "cut"
                collector.transport.stopProducing()

        timer = None if spec.cut_at_s is None else reactor.callLater(spec.cut_at_s, cut)
        try:
            try:
                response = await pending
            except Exception as e:
                if record.outcome != "cut":
                    record.outcome, record.error = "no_answer", repr(e)
                return
            record.status = response.code

            def on_chunk(collector: Collector, data: bytes) -> None:
                if (spec.cut_after_chunks is not None
                        and len(collector.chunks) == spec.cut_after_chunks):
                    # Not from inside dataReceived: on the body's last chunk
                    # Twisted's pool would cache the closing connection and
                    # hand it to this client's next request.
                    reactor.callLater(0, cut)

            collector = Collector(on_chunk)
            stage["collector"] = collector
            response.deliverBody(collector)
            await collector.done
        finally:
            if timer is not None and timer.active():
                timer.cancel()
        record.complete = collector.complete
        if record.outcome != "cut":
            record.outcome = "completed"
        if not record.complete:
            return
        body = collector.body
        if response.code == 200:
            record.body_problem = body_problem(spec.label, body)
        elif not 200 <= response.code < 300:
            relayed = response.headers.getRawHeaders(b"X-Gpumgr-Consumer")
            if relayed:
                record.consumer_error = f"{relayed[0].decode()} {response.code} {body[:200]!r}"
            else:
                try:
                    record.code = json.loads(body)["error"]["code"]
                except (ValueError, KeyError, TypeError):
                    record.code = f"<not gpumgr's JSON: {body[:120]!r}>"

    async def _send_raw(self, spec: Spec, record: Record) -> None:
        assert spec.expect is not None
        try:
            reply = await raw_request(self.url, spec.method.encode(), spec.path.encode("ascii"),
                                      spec.body or b"", b"X-Fault-Req: %d\r\n" % spec.n)
        except Exception as e:
            record.outcome, record.error = "no_answer", repr(e)
            return
        record.outcome, record.status, record.complete = "completed", reply.code, reply.complete
        record.variant_problem = variant_problem(spec.expect, reply)
        if reply.code == 200 and reply.complete:
            record.body_problem = body_problem(spec.label, reply.body)
        elif reply.header(b"x-gpumgr-consumer") is None and reply.code >= 300:
            try:
                record.code = json.loads(reply.body)["error"]["code"]
            except (ValueError, KeyError, TypeError):
                record.code = f"<not gpumgr's JSON: {reply.body[:120]!r}>"

    async def close(self) -> None:
        await self.pool.closeCachedConnections()


# -- simulated GPU jobs ------------------------------------------------------------------


@attrs.define(eq=False)
class SimJob:
    consumer: str
    started: float
    ended: float | None = None
    #: Its HTTP exchange was dropped before the answer was done (gpumgr gave it up).
    abandoned: bool = False
    #: When that exchange was dropped.
    dropped_at: float | None = None
    #: The client request it serves (X-Fault-Req), when it serves one.
    request_n: int | None = None
    #: A ComfyUI prompt another client sent to ComfyUI directly: gpumgr never saw it.
    foreign: bool = False


class SimJobs:
    """Every GPU job the simulated consumers ran, and which ran at once.

    ollama's and mvoice's jobs belong to one HTTP exchange (`run_job`); a
    ComfyUI render belongs to none: it goes on whatever the connection does.
    """

    def __init__(self, world: Any, service: GpumgrService) -> None:
        self._service = service
        self.jobs: list[SimJob] = []
        self.running: list[SimJob] = []
        self.overlaps: list[tuple[SimJob, SimJob]] = []
        self.renders_without_slot = 0
        #: (when, (prompt id, client id)) of each render that started without the slot.
        self.slotless: list[tuple[float, Any]] = []
        self._exchange: tuple[Any, dict[str, SimJob]] | None = None
        self._render: SimJob | None = None
        started, ended = world.job_started, world.job_ended

        def job_started(consumer: Any) -> None:
            started(consumer)
            job = SimJob(consumer.name, reactor.seconds())
            if self._exchange is not None:
                request, slot = self._exchange
                slot["job"] = job
                n = request.getHeader(b"x-fault-req")
                job.request_n = None if n is None else int(n)
                def dropped(_: Any) -> None:
                    job.abandoned, job.dropped_at = True, reactor.seconds()

                request.notifyFinish().addErrback(dropped)
            else:
                self._render = job
                item = getattr(consumer, "running_item", None)
                job.foreign = item is not None and item.client_id == DIRECT_CLIENT
                held = {h.consumer for h in service.scheduler.stats().holders}
                if consumer.name not in held and not job.foreign:
                    self.renders_without_slot += 1
                    self.slotless.append((reactor.seconds(), None if item is None else (
                        item.prompt_id, item.client_id)))
            # Jobs on different cards of a box of several share nothing.
            mine = set(world.gpu.cards_of(consumer.name))
            self.overlaps.extend((other, job) for other in self.running
                                 if mine & set(world.gpu.cards_of(other.consumer)))
            self.running.append(job)
            self.jobs.append(job)

        def job_ended(consumer: Any) -> None:
            ended(consumer)
            if self._exchange is None and self._render is not None:
                self._end(self._render)
                self._render = None

        world.job_started, world.job_ended = job_started, job_ended
        for name in ("ollama", "mvoice"):
            self._wrap(world[name])

    def _wrap(self, consumer: Any) -> None:
        run_job = consumer.run_job

        def wrapped(request, work, load=None, oom=None, ended=None, **more):
            slot: dict[str, SimJob] = {}

            def job_over() -> None:
                if "job" in slot:
                    self._end(slot["job"])
                if ended is not None:
                    ended()

            self._exchange = (request, slot)
            try:
                return run_job(request, work, load=load, oom=oom, ended=job_over, **more)
            finally:
                self._exchange = None

        consumer.run_job = wrapped

    def _end(self, job: SimJob) -> None:
        job.ended = reactor.seconds()
        if job in self.running:
            self.running.remove(job)

    def unexplained_overlaps(self) -> list[tuple[SimJob, SimJob]]:
        """Overlaps of two jobs gpumgr was running: neither dropped by it, nor
        a prompt sent to ComfyUI directly (gpumgr cannot hold the GPU for those)."""
        return [(a, b) for a, b in self.overlaps
                if not (a.abandoned or b.abandoned or a.foreign or b.foreign)]

    def overlaps_after_client_cuts(self, cut: set[int],
                                   disrupted: Any) -> list[tuple[SimJob, SimJob]]:
        """Overlaps with a job whose client left (and no fault hit its consumer
        meanwhile): gpumgr must hold the GPU until such work stopped.

        In a pair (a, b), b started while a ran. If a's client left, b must
        not have started. If b's client left, the overlap is gpumgr's doing
        only when a was still an exchange gpumgr relayed: b starting once
        gpumgr had dropped a (its request_timeout_s passed) is the overlap
        with dropped work that `unexplained_overlaps` allows, whatever b's
        client did afterwards.
        """
        def left(job: SimJob) -> bool:
            return (job.abandoned and job.request_n in cut
                    and not disrupted(job.consumer, job.started, job.ended or reactor.seconds()))

        def dropped_before(job: SimJob, at: float) -> bool:
            return job.foreign or (job.dropped_at is not None and job.dropped_at <= at)

        return [(a, b) for a, b in self.overlaps
                if left(a) or (left(b) and not dropped_before(a, b.started))]


class OomWatch:
    """Each simulated out-of-memory, with what the GPU and gpumgr held then."""

    def __init__(self, world: Any, service: GpumgrService) -> None:
        self.events: list[str] = []
        gpu = world.gpu
        allocate = gpu.allocate

        def watched(owner: str, pid: int, process_name: str, mib: int) -> bool:
            before = gpu.oom_count
            ok = allocate(owner, pid, process_name, mib)
            if gpu.oom_count > before and len(self.events) < 10:
                held = {a: v.used_mib for a, v in gpu.allocations.items()}
                held.update({f"pid {e.pid}": e.used_mib for e in gpu.external_allocations()})
                loaded = {c.name: c.residency.value for c in service.registry}
                self.events.append(
                    f"t={reactor.seconds():.2f} {owner} wanted {mib} MiB, {gpu.free_mib} free; "
                    f"held {held}; smi failure {gpu.smi_failure}; gpumgr thinks {loaded}; "
                    f"last sample {service.gpu.latest.error or service.gpu.latest.memory_free_mib}")
            return ok

        gpu.allocate = watched


# -- the log ------------------------------------------------------------------------------


class LogWatch:
    """Counts every event; keeps those at warn level and above."""

    def __init__(self) -> None:
        self.by_level: collections.Counter[str] = collections.Counter()
        self.warnings: collections.Counter[tuple[str, str]] = collections.Counter()
        self.unexpected: list[str] = []
        #: The latest events (time, text), to show what gpumgr did around a failure.
        self.timeline: collections.deque[tuple[float, str]] = collections.deque(maxlen=4000)

    def around(self, start: float, end: float) -> str:
        return "\n".join(f"  {t:.3f} {text}" for t, text in self.timeline
                         if start - 0.5 <= t <= end + 0.5)

    def __call__(self, event: dict[str, Any]) -> None:
        from twisted.logger import formatEvent

        level = event.get("log_level", LogLevel.info)
        self.by_level[level.name] += 1
        if str(event.get("log_namespace", "")).startswith("gpumgr"):
            self.timeline.append((event.get("log_time", 0.0), f"[{level.name}] "
                                  f"{event.get('log_namespace')}: {formatEvent(event)[:300]}"))
        failure = event.get("log_failure")
        if level < LogLevel.warn and failure is None:
            return
        key = (event.get("log_namespace", "?"), event.get("log_format") or "")
        from twisted.logger import formatEvent

        text = formatEvent(event)
        if failure is None and level is LogLevel.warn and (
                key in EXPECTED_WARNINGS
                or key in EXPECTED_MESSAGES and EXPECTED_MESSAGES[key].match(text)):
            self.warnings[key] += 1
            return
        if failure is not None:
            text += "\n" + failure.getTraceback()
        if len(self.unexpected) < 20:
            self.unexpected.append(f"[{level.name}] {key[0]}: {text[:2000]}")
        else:
            self.unexpected.append("...")


# -- the process: memory and descriptors --------------------------------------------------


def listening_sockets(port: int) -> int:
    """How many sockets listen on this TCP port (on this host's loopback)."""
    return sum(1 for local, _, state in _tcp_sockets().values() if local == port and state == "0A")


def whisper_processes(port: int) -> list[int]:
    """Pids of simulated whisper servers for this port, whoever started them."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"gpumgr.testing.whisper_server" in argv and str(port).encode() in argv:
            found.append(int(pid))
    return found


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def _tcp_sockets() -> dict[str, tuple[int, int, str]]:
    """inode -> (local port, remote port, state) for every TCP socket here."""
    table = {}
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            table[inode] = (int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16),
                            state)
    return table


@attrs.frozen
class Census:
    #: Connected sockets to or from a consumer's port: gpumgr's upstream
    #: connections, and the simulated consumers' ends of them.
    consumer_links: int
    #: Everything else: listening sockets, client connections, pipes, files.
    other: int
    kinds: tuple[tuple[str, int], ...]
    #: Idle keep-alive connections cached in gpumgr's pools, read at the same
    #: instant: what consumer_links may legitimately be (two fds each).
    pooled_links: int = 0

    @property
    def total(self) -> int:
        return self.consumer_links + self.other


def pooled_connections(service: GpumgrService) -> int:
    """Idle connections cached in gpumgr's control and data pools (Twisted's
    HTTPConnectionPool keeps them in `_connections`, per origin)."""
    return sum(len(cached) for pool in (service._control_pool, service._data_pool)
               for cached in pool._connections.values())


def fd_census(consumer_ports: set[int], service: GpumgrService) -> Census:
    pooled = pooled_connections(service)
    tcp = _tcp_sockets()
    links = 0
    kinds: collections.Counter[str] = collections.Counter()
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the directory's own descriptor, closed meanwhile
        if target.startswith("socket:["):
            entry = tcp.get(target[len("socket:["):-1])
            if entry is not None and entry[2] != "0A" and (
                    entry[0] in consumer_ports or entry[1] in consumer_ports):
                links += 1
                continue
            kinds["listening" if entry is not None and entry[2] == "0A" else "socket"] += 1
        elif target.startswith("pipe:"):
            kinds["pipe"] += 1
        elif target.startswith("anon_inode:"):
            kinds[target] += 1
        else:
            kinds["file"] += 1
    return Census(links, sum(kinds.values()), tuple(sorted(kinds.items())), 2 * pooled)


def _parent_of(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return "?"
    return "us" if int(fields[1]) == os.getpid() else fields[1]


def pipe_holders() -> dict[str, int]:
    """Our pipes, by what holds their other end: a process's command line
    (several of ours may lead to one), or "ours" when both ends are ours."""
    mine: collections.Counter[str] = collections.Counter()
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith("pipe:"):
            mine[target] += 1
    holders: dict[str, str] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace")[-160:]
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target in mine:
                holders.setdefault(target, f"pid {pid} (parent {_parent_of(pid)}): {cmd}")
    by: collections.Counter[str] = collections.Counter()
    for pipe, n in mine.items():
        by[holders.get(pipe, "ours" if n > 1 else "nobody (its other end closed)")] += n
    return dict(by.most_common())


async def quiet_census(consumer_ports: set[int], service: GpumgrService) -> Census:
    """The quietest of a few readings: a sample of nvidia-smi in flight holds
    pipes for a moment, and a health probe takes a connection out of the pool."""
    readings = []
    stream = service.broker.measuring.stream
    for _ in range(60):
        # A reading while the nvidia-smi stream runs (an idle unload holds the
        # GPU) counts its pipes; `stream_stopped` shows it stops on its own.
        if stream is None or stream.live_processes == 0:
            readings.append(fd_census(consumer_ports, service))
            if len(readings) == 6:
                break
        await sleep(0.1)
    assert readings, "the nvidia-smi stream ran for 6 s on an idle card"
    return min(readings, key=lambda c: (c.consumer_links != c.pooled_links, c.total))


# -- the faults ----------------------------------------------------------------------------


@attrs.frozen
class Window:
    fault: str
    consumer: str | None
    start: float
    end: float


#: Faults that may cut a response of their consumer short. A health flap
#: (down for up to ~3 s) may outlast health.down_grace_s, and gpumgr then
#: aborts mvoice's jobs, as it promises for a consumer that is down; a
#: stranger is put on whisper's port after its process was killed.
DISRUPTIVE = frozenset({"stop_restart", "stall_stream", "whisper_crash", "whisper_freeze",
                        "stranger", "health_flap"})


class Injector:
    """Breaks one thing at a time, at seeded random moments, and mends it."""

    #: Fault -> weight. Restarts weigh most: a consumer that comes back empty
    #: while gpumgr still counts it loaded is how a GPU runs out of memory.
    FAULTS = {"stop_restart": 3, "stall_stream": 1, "stall_headers": 1, "health_flap": 1,
              "smi_hang": 1, "smi_hang_child": 1, "smi_driver": 1, "smi_garbage": 1,
              "unload_fails": 1, "whisper_crash": 1, "render_hang": 1, "slow_render": 1,
              "render_timeout_running": 1, "direct_prompt": 2, "whisper_freeze": 2,
              "stranger": 2}

    def __init__(self, rng: random.Random, world: Any, service: GpumgrService,
                 rewrite_config: Any, url: str) -> None:
        self.rng = rng
        self.url = url
        self.world = world
        self.service = service
        self.rewrite_config = rewrite_config
        self.windows: list[Window] = []
        self.counts: collections.Counter[str] = collections.Counter()
        self.reload_result: ReloadOutcome | None = None
        self._gates: list[defer.Deferred[None]] = []
        self._stopped: set[str] = set()
        #: The whisper process frozen now (SIGSTOP), to thaw.
        self._frozen: int | None = None
        #: Strangers on whisper's port now, to send away.
        self._listeners: list[StrangerListener] = []
        self._stranger_whispers: list[StrangerWhisper] = []
        #: What reached the strangers (gpumgr must send them nothing).
        self.stranger_requests: list[tuple[bytes, bytes]] = []
        #: A stt request while each stranger was there: (port, status, body,
        #: gpumgr's whisper pid then).
        self.during_stranger: list[tuple[int, int | None, bytes, int | None]] = []
        #: The first stt request after each stranger left: (status, body).
        self.after_stranger: list[tuple[int | None, bytes]] = []

    def disrupted(self, consumer: str | None, start: float, end: float) -> bool:
        return any(w.consumer == consumer and w.fault in DISRUPTIVE
                   and w.start <= end and start <= w.end for w in self.windows)

    async def run(self, progress: Any, total: int) -> None:
        """Until `progress()` reaches `total`; the reload once half of it is done."""
        reloading = defer.ensureDeferred(self._reload_half_way(progress, total))
        while progress() < total:
            await sleep(self.rng.uniform(0.1, 0.4))
            if progress() >= total:
                break
            self.forget_requests()
            fault = self.rng.choices(list(self.FAULTS), list(self.FAULTS.values()))[0]
            start = reactor.seconds()
            consumer, extra_s = await getattr(self, fault)()
            if consumer is not False:
                self.counts[fault] += 1
                self.windows.append(Window(fault, consumer, start, reactor.seconds() + extra_s))
        await reloading

    async def _reload_half_way(self, progress: Any, total: int) -> None:
        await wait_for(lambda: progress() >= total // 2, timeout_s=CALL_BOUND_S * 4)
        self.reload()

    def hold(self) -> defer.Deferred[None]:
        return sleep(self.rng.uniform(0.3, 1.0))

    def forget_requests(self) -> None:
        """The simulators record every request; keep that from growing the heap."""
        for consumer in self.world.consumers.values():
            consumer.requests.clear()
        self.world["mvoice"].audio.clear()

    # Each fault returns (consumer it disrupts, seconds its effect outlives it),
    # or (False, 0) when it could not be injected now.

    async def stop_restart(self):
        name = self.rng.choice(SIM_CONSUMERS)
        self._stopped.add(name)
        await self.world.stop_consumer(name)
        await self.hold()
        self.world.restart_consumer(name)
        self._stopped.discard(name)
        return name, 0.0

    async def stall_stream(self):
        """Tokens stop after the first: body_idle_timeout_s ends the exchange."""
        def gate(i: int) -> defer.Deferred[None]:
            d: defer.Deferred[None] = defer.Deferred()
            self._gates.append(d)
            return d

        self.world["ollama"].behaviour.stream_gate = gate
        await self.hold()
        self._release_gates()
        return "ollama", 0.0

    async def stall_headers(self):
        """mvoice answers after its request_timeout_s: 504."""
        self.world["mvoice"].behaviour.job_s = MVOICE_STALL_JOB_S
        await self.hold()
        self.world["mvoice"].behaviour.job_s = MVOICE_JOB_S
        return "mvoice", MVOICE_STALL_JOB_S

    async def health_flap(self):
        behaviour = self.world["mvoice"].behaviour
        for _ in range(self.rng.randint(1, 3)):
            behaviour.healthy = False
            await sleep(self.rng.uniform(0.3, 0.7))
            behaviour.healthy = True
            await sleep(self.rng.uniform(0.1, 0.4))
        return "mvoice", 0.0

    async def _smi(self, mode: str):
        self.world.gpu.set_smi_failure(mode, hang_child_s=1.0)
        await self.hold()
        self.world.gpu.set_smi_failure(None)
        return None, 0.0

    async def smi_hang(self):
        return await self._smi("hang")

    async def smi_hang_child(self):
        return await self._smi("hang_child")

    async def smi_driver(self):
        return await self._smi("driver")

    async def smi_garbage(self):
        return await self._smi("garbage")

    async def unload_fails(self):
        name = self.rng.choice(SIM_CONSUMERS)
        self.world[name].behaviour.unload_fails = True
        await self.hold()
        self.world[name].behaviour.unload_fails = False
        return name, 0.0

    async def whisper_crash(self):
        process = self.service.status()["consumers"]["whisper"]["process"]
        if process["state"] != "running" or not process["pid"]:
            return False, 0.0
        os.kill(process["pid"], signal.SIGKILL)
        await sleep(0.2)
        return "whisper", 0.0

    def _whisper(self) -> Any:
        return self.service.broker.processes["whisper"]

    async def whisper_freeze(self):
        """SIGSTOP the running whisper, SIGCONT it a moment later; a third of
        the time long enough that health.down_grace_s passes and gpumgr
        stops it (TERM waits in a stopped process: KILL) and aborts its job."""
        process = self._whisper()
        if process.state.value != "running" or not process.pid:
            return False, 0.0
        self._frozen = process.pid
        os.kill(process.pid, signal.SIGSTOP)
        long = self.rng.random() < 1 / 3
        await sleep(self.rng.uniform(4.0, 5.0) if long else self.rng.uniform(0.3, 3.0))
        self._thaw()
        self.counts["whisper_freeze (long)" if long else "whisper_freeze (short)"] += 1
        return "whisper", 0.0

    def _thaw(self) -> None:
        pid, self._frozen = self._frozen, None
        if pid is not None:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass  # gpumgr stopped it (KILL) meanwhile

    async def stranger(self):
        """Something gpumgr did not start takes whisper's port while gpumgr's
        whisper is stopped (killed here if it runs): a plain listener, or
        another whisper-server (SO_REUSEPORT; it joins a listener that holds
        the port meanwhile, so the port is never free while it starts).
        gpumgr must refuse to start its own (process_start_failed), spawn
        nothing and send the stranger nothing; once the stranger left, the
        next transcription is gpumgr's whisper's."""
        process = self._whisper()
        if process.state.value == "running" and process.pid:
            os.kill(process.pid, signal.SIGKILL)
        try:
            # Listening in the same turn as the look: no start can slip in between,
            # and no health probe sent while whisper still ran is on its way (it
            # would land on the stranger: a probe gpumgr sent to its own process).
            await wait_for(lambda: process.state.value in ("stopped", "failed")
                           and not self.service.broker.health.probing("whisper"), timeout_s=5)
        except AssertionError:
            self.counts["stranger (port never free)"] += 1
            return "whisper", 0.0
        port = int(self.service.config.consumers["whisper"].url.rsplit(":", 1)[1])
        with_whisper = self.rng.random() < 0.5
        listener = StrangerListener(reuse_port=with_whisper)
        listener.listen(reactor, port)
        self._listeners.append(listener)
        if with_whisper:
            state_dir = os.path.dirname(os.path.abspath(self.world.gpu.state_path))
            other = StrangerWhisper(port, state_dir, vram_mib=64, job_s=0.003)
            self._stranger_whispers.append(other)
            try:
                await wait_for(lambda: listening_sockets(port) >= 2
                               or other.process.poll() is not None, timeout_s=20, step_s=0.05)
            except AssertionError:
                pass
            if other.process.poll() is None and listening_sockets(port) >= 2:
                await self._send_away(listeners_only=True)  # the stranger whisper stays alone
            # else it could not start (no room on the card): the listener stays
        await sleep(self.rng.uniform(0.5, 2.0))
        # While it is there: a transcription is refused, naming the port, and
        # gpumgr spawned nothing.
        code, body = await self._post(self.url + "/v1/stt", AUDIO,
                                      b"multipart/form-data; boundary=b")
        self.during_stranger.append((port, code, body, process.pid))
        await self._send_away()
        # After the stranger left, whisper starts again normally.
        self.after_stranger.append(await self._post(
            self.url + "/v1/stt", AUDIO, b"multipart/form-data; boundary=b"))
        self.counts["stranger (a whisper-server)" if with_whisper else
                    "stranger (a listener)"] += 1
        return "whisper", 0.0

    async def _send_away(self, listeners_only: bool = False) -> None:
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            self.stranger_requests.extend(listener.requests)
            await listener.stop()
        if listeners_only:
            return
        others, self._stranger_whispers = self._stranger_whispers, []
        for other in others:
            if other.process.poll() is None:
                other.process.terminate()
            try:
                await wait_for(lambda: other.process.poll() is not None, timeout_s=10)
            except AssertionError:
                other.process.kill()
                await wait_for(lambda: other.process.poll() is not None, timeout_s=10)

    async def _post(self, url: str, body: bytes, content_type: bytes) -> tuple[int | None, bytes]:
        """The injector's own request: (status, body); (None, why) if it got no answer."""
        try:
            response = await Agent(reactor).request(
                b"POST", url.encode(), Headers({b"Content-Type": [content_type]}),
                FileBodyProducer(io.BytesIO(body))).addTimeout(CALL_BOUND_S, reactor)
            collector = Collector()
            response.deliverBody(collector)
            await collector.done
        except Exception as e:
            return None, repr(e).encode()
        return response.code, collector.body

    async def render_hang(self):
        """Renders started now never finish: gpumgr interrupts them at job_timeout_s."""
        self.world["comfyui"].behaviour.render_hangs = True
        await self.hold()
        self.world["comfyui"].behaviour.render_hangs = False
        return "comfyui", 0.0

    async def render_timeout_running(self):
        """Renders started now hang in a sampler whose steps take 0.4 s: gpumgr
        stops them at job_timeout_s, and ComfyUI ends them only at the next
        step. The GPU must stay held until then (no overlap)."""
        b = self.world["comfyui"].behaviour
        b.render_hangs, b.render_node_s = True, 0.4
        prompt = defer.ensureDeferred(self._post_json(self.url + "/v1/image", {"prompt": {}}))
        await self.hold()
        b.render_hangs, b.render_node_s = False, None
        await prompt
        return "comfyui", 0.0

    async def _post_json(self, url: str, value: dict[str, Any]) -> None:
        """The injector's own request (a prompt it needs in place); its answer is not checked."""
        try:
            response = await Agent(reactor).request(
                b"POST", url.encode(), Headers({b"Content-Type": [b"application/json"]}),
                FileBodyProducer(io.BytesIO(json.dumps(value).encode()))).addTimeout(
                    CALL_BOUND_S, reactor)
            collector = Collector()
            response.deliverBody(collector)
            await collector.done
        except Exception:
            pass  # a fault of the injector's own (a stopped ComfyUI) may cut it

    async def direct_prompt(self):
        """Another client sends ComfyUI a prompt directly, just before gpumgr's
        next one reaches it, that renders for longer than job_timeout_s:
        gpumgr's prompt waits behind it in ComfyUI's queue and times out; it
        must be deleted from the queue, never run without gpumgr's slot. The
        direct prompt lands while gpumgr holds ComfyUI's slot, so the model it
        may load is the one gpumgr made room for."""
        comfy = self.world["comfyui"]
        if not comfy.running or comfy.url is None:
            return False, 0.0
        prompt_id = str(uuid.uuid4())
        comfy.behaviour.node_gate = lambda pid, node: (
            sleep(0.8) if pid == prompt_id else defer.succeed(None))  # 2 nodes: 1.6 s
        take_prompt = comfy.prompt

        def prompt(request: Any) -> Any:
            del comfy.prompt  # one shot
            comfy.submit({}, DIRECT_CLIENT, prompt_id)
            return take_prompt(request)

        comfy.prompt = prompt
        try:
            await self._post_json(self.url + "/v1/image", {"prompt": {}})
            await wait_for(lambda: prompt_id in comfy.history or not comfy.running,
                           timeout_s=10)
        except AssertionError:
            pass
        finally:
            if "prompt" in vars(comfy):
                del comfy.prompt
            comfy.behaviour.node_gate = None
        return "comfyui", 0.0

    async def slow_render(self):
        self.world["comfyui"].behaviour.job_s = 0.3
        await self.hold()
        self.world["comfyui"].behaviour.job_s = COMFY_JOB_S
        return "comfyui", 0.3

    def reload(self) -> None:
        """Half-way: new priorities from the rewritten file."""
        self.rewrite_config(PRIORITY_AFTER_RELOAD)
        self.reload_result = self.service.broker.reload()
        self.counts["reload"] += 1

    def _release_gates(self) -> None:
        self.world["ollama"].behaviour.stream_gate = None
        gates, self._gates = self._gates, []
        for d in gates:
            if not d.called:
                d.callback(None)

    async def mend_everything(self) -> None:
        """After the run: every knob back, every consumer up, leftovers ended."""
        self._release_gates()
        self._thaw()
        await self._send_away()
        for name in SIM_CONSUMERS:
            b = self.world[name].behaviour
            b.healthy, b.unload_fails = True, False
            if name in self._stopped:
                self.world.restart_consumer(name)
        self._stopped.clear()
        self.world["mvoice"].behaviour.job_s = MVOICE_JOB_S
        comfy = self.world["comfyui"]
        comfy.behaviour.render_hangs, comfy.behaviour.job_s = False, COMFY_JOB_S
        comfy.behaviour.render_node_s = comfy.behaviour.node_gate = None
        self.world.gpu.set_smi_failure(None)


# -- the run --------------------------------------------------------------------------------


#: The box of the two-card run: ollama and ComfyUI on card 0 (they do not fit
#: together there), mvoice on card 1, whisper `auto` (it fits beside mvoice).
TWO_CARDS_MIB = (12000, 12000)


def build_world(tmp_path: Any, cards_mib: tuple[int, ...] | None = None
                ) -> tuple[Any, dict[str, Any]]:
    world = make_world(reactor, str(tmp_path), total_mib=GPU_MIB, managed_whisper=True,
                       cards_mib=cards_mib,
                       behaviours={
                           "ollama": Behaviour(vram_mib=VRAM_MIB["ollama"], stream_chunks=4,
                                               chunk_interval_s=0.002, job_s=0.003),
                           "comfyui": Behaviour(vram_mib=VRAM_MIB["comfyui"], job_s=COMFY_JOB_S,
                                                render_steps=2),
                           "mvoice": Behaviour(vram_mib=VRAM_MIB["mvoice"], job_s=MVOICE_JOB_S,
                                               audio_bytes=16 * 1024),
                       })
    world.listen(reactor)
    if cards_mib is not None:
        world.gpu.place("mvoice", (1,))
    whisper = managed_whisper_entry(world, vram_mib=VRAM_MIB["whisper"], job_s=0.003,
                                    start_timeout_s=10.0, stop_timeout_s=2.0)
    return world, whisper


def config_sections(whisper: dict[str, Any], priority: dict[str, int],
                    two_cards: bool = False, capacity: int | str = 1) -> dict[str, Any]:
    on = ({"mvoice": {"gpu": 1}, "whisper": {"gpu": "auto"}} if two_cards
          else {"mvoice": {}, "whisper": {}})
    return dict(
        managed={"whisper": whisper},
        consumers={
            "ollama": {"passthrough": True, "request_timeout_s": 2, "body_idle_timeout_s": 0.4},
            "comfyui": {"passthrough": True, "request_timeout_s": 2, "body_idle_timeout_s": 1,
                        "job_timeout_s": 1.0},
            "mvoice": {"request_timeout_s": 0.5, "body_idle_timeout_s": 1, **on["mvoice"]},
            "whisper": {"request_timeout_s": 2, "body_idle_timeout_s": 1, **on["whisper"]},
        },
        scheduler={"mode": "evicting", "capacity": capacity, "max_queue": 64,
                   "queue_timeout_s": 15,
                   "priority": priority, "aging_s": 1},
        # A frozen whisper is down once a probe times out (1 s), then probed
        # again after down_grace_s: a freeze of ~3.5 s or more gets it stopped.
        health={"interval_s": 0.25, "timeout_s": 1, "down_grace_s": 1.5},
        gpu={"interval_s": 0.5, "timeout_s": 0.3,
             "total_mib": TWO_CARDS_MIB[0] if two_cards else GPU_MIB, "unload_settle_s": 2},
        shutdown_grace_s=2,
    )


async def settle(service: GpumgrService, world: Any) -> None:
    """Wait (bounded) until gpumgr holds no job and the simulated GPU runs none."""
    def idle() -> bool:
        stats = service.scheduler.stats()
        return stats.in_flight == 0 and stats.queue_depth == 0 and world.active_jobs == 0

    try:
        await wait_for(idle, timeout_s=20.0, step_s=0.05)
    except AssertionError:
        pass  # the invariants below say what is left


async def idle_fds_and_rss(service: GpumgrService, url: str, ports: set[int],
                           clients: Clients) -> tuple[Census, float]:
    """The same quiet state at both measuring points: whisper stopped, client
    connections closed, gpumgr's data pool idle (it drops idle upstream
    connections after gpumgr.service._IDLE_CONNECTION_S)."""
    reply = await clients.agent.request(b"POST", f"{url}/v1/consumers/whisper/unload".encode())
    collector = Collector()
    reply.deliverBody(collector)
    await collector.done
    assert reply.code == 200, collector.body
    await clients.close()
    await sleep(service_module._IDLE_CONNECTION_S + 1.0)
    await stream_stopped(service)
    gc.collect()
    return await quiet_census(ports, service), rss_mib()


async def stream_stopped(service: GpumgrService) -> None:
    """The nvidia-smi stream runs while jobs run, and stops two loop periods
    after they end: its processes' pipes are not a leak, but one that never
    stops on an idle card is (a job count that leaked keeps it wanted)."""
    stream = service.broker.measuring.stream
    if stream is None:
        return
    try:
        await wait_for(lambda: not stream.wanted and stream.live_processes == 0,
                       timeout_s=10.0, step_s=0.05)
    except AssertionError:
        activity = activity_of(service.broker.registry, service.scheduler)
        raise AssertionError(f"the nvidia-smi stream still runs on an idle card: wanted "
                             f"{stream.wanted}, {stream.live_processes} process(es); "
                             f"{activity}") from None


def variant_outcomes(records: list[Record]) -> dict[str, int]:
    counts: collections.Counter[str] = collections.Counter(
        f"{r.spec.expect}: {r.status} {r.code or ''}".strip()
        for r in records if r.spec.expect is not None)
    return dict(counts.most_common())


def summarise(records: list[Record], injector: Injector, service: GpumgrService, world: Any,
              jobs: SimJobs, watch: LogWatch, seed: int, elapsed_s: float,
              rss: tuple[float, float], fds: tuple[Census, Census]) -> str:
    outcomes: collections.Counter[str] = collections.Counter()
    for r in records:
        if r.outcome == "completed" and r.status is not None:
            key = (f"{r.status} {r.code}" if r.code else
                   "200 ok" if r.status == 200 and r.complete else
                   "200 cut by a fault" if r.status == 200 else str(r.status))
        else:
            key = r.outcome
        outcomes[key] += 1
    status = service.status()
    sched = status["scheduler"]
    process = status["consumers"]["whisper"]["process"]
    orphans = len(jobs.overlaps) - len(jobs.unexplained_overlaps())
    return (
        f"\n[fault suite] seed {seed}: {len(records)} requests from {CLIENTS} clients in "
        f"{elapsed_s:.1f}s; outcomes {dict(outcomes.most_common())}; faults injected "
        f"{dict(injector.counts.most_common())}; evictions {sched['evictions']} "
        f"(failed {sched['eviction_failures']}, by reason "
        f"{dict(service.admission.evictions_by_reason)}); "
        f"request-target variants {variant_outcomes(records)}; "
        f"stranger: stt while there {[c for _, c, _, _ in injector.during_stranger]}, "
        f"first stt after it left {[c for c, _ in injector.after_stranger]}; "
        f"frozen whisper stopped by gpumgr "
        f"{watch.warnings[('gpumgr.fleet', '{why}; stopping its process (TERM, then KILL)')]}"
        f"x; "
        f"renders {sched.get('renders')} (prompts deleted from ComfyUI's queue "
        f"{len(world['comfyui'].deleted)}, renders ended by an interrupt "
        f"{world['comfyui'].interrupts}); whisper restarts {process['restarts']}; "
        f"GPU samples {service.gpu.samples_taken} ({service.gpu.samples_failed} failed); "
        f"OOMs {world.gpu.oom_count}; max GPU jobs at once: gpumgr "
        f"{service.scheduler.max_running_seen}, simulator {world.max_active_jobs} "
        f"({orphans} overlaps with work gpumgr had dropped); drains after a client left "
        f"{dict(service.broker.abandoned.outcomes)}; RSS {rss[0]:.1f} -> "
        f"{rss[1]:.1f} MiB; fds {fds[0].total} -> {fds[1].total} "
        f"(upstream links {fds[0].consumer_links} -> {fds[1].consumer_links}, all idle in "
        f"gpumgr's pools: {fds[1].consumer_links == fds[1].pooled_links}); "
        f"warnings {sum(watch.warnings.values())}, log events {dict(watch.by_level)}")


@pytest.mark.timeout(400)
@pytest.mark.parametrize(("capacity", "two_cards"),
                         [(1, False), ("auto", False), (1, True), ("auto", True)],
                         ids=["capacity 1, one card", "capacity auto, one card",
                              "capacity 1, two cards", "capacity auto, two cards"])
@pytest_twisted.ensureDeferred
async def test_seeded_faults_keep_every_promise(tmp_path, capsys, capacity, two_cards):
    seed = int(os.environ.get("GPUMGR_FAULT_SEED", DEFAULT_SEED))
    repro = (f"fault suite seed {seed}; run it again with: "
             f"GPUMGR_FAULT_SEED={seed} make test PYTEST_ARGS='-k fault'")
    try:
        await _fault_run(tmp_path, seed, capsys, two_cards, capacity)
    except AssertionError as e:
        raise AssertionError(f"{e}\n\n{repro}") from None
    except BaseException:
        with capsys.disabled():
            print(f"\n{repro}")
        raise


async def _fault_run(tmp_path: Any, seed: int, capsys: Any, two_cards: bool = False,
                     capacity: int | str = 1) -> None:
    with capsys.disabled():
        print(f"\n[fault suite] seed {seed}: starting ({WARMUP_REQUESTS} warm-up requests, "
              f"then {REQUESTS} with faults)")
    rng = random.Random(seed)
    world, whisper = build_world(tmp_path, TWO_CARDS_MIB if two_cards else None)
    path = str(tmp_path / "gpumgr.yaml")
    config = write_world_config(world, path, **config_sections(whisper, PRIORITY, two_cards,
                                                                capacity))

    def rewrite_config(priority: dict[str, int]) -> None:
        with open(path, "w") as f:
            yaml.safe_dump(world_config_raw(world, **config_sections(whisper, priority, two_cards,
                                                                     capacity)), f)

    watch = LogWatch()
    globalLogPublisher.addObserver(watch)
    service = GpumgrService(reactor, config)
    service.startService()
    try:
        port = await service.http.listening
        url = f"http://127.0.0.1:{port.getHost().port}"
        await service.health.probe_all_now()
        ports = {int(c.url.rsplit(":", 1)[1]) for c in service.config.consumers.values()}
        jobs = SimJobs(world, service)
        ooms = OomWatch(world, service)

        # Warm-up: every kind, no faults; then the quiet baseline.
        clients = Clients(url)
        await clients.run(make_specs(random.Random(seed ^ 0x5EED), WARMUP_REQUESTS, 0, False))
        failed = [r for r in clients.records
                  if not (r.outcome == "completed" and r.status == 200 and r.complete)]
        assert not failed, f"the warm-up, with no faults, failed: {failed[:3]}"
        await settle(service, world)
        fds_before, rss_before = await idle_fds_and_rss(service, url, ports, clients)

        # The run.
        clients = Clients(url)
        injector = Injector(random.Random(rng.random()), world, service, rewrite_config, url)
        specs = make_specs(random.Random(rng.random()), REQUESTS, WARMUP_REQUESTS, True)
        began = reactor.seconds()
        injecting = defer.ensureDeferred(injector.run(
            lambda: sum(1 for r in clients.records if r.ended is not None), REQUESTS))
        await clients.run(specs)
        await injecting
        elapsed_s = reactor.seconds() - began
        await injector.mend_everything()
        await settle(service, world)
        stats = service.scheduler.stats()
        whisper_port = int(service.config.consumers["whisper"].url.rsplit(":", 1)[1])
        whisper_at_end = whisper_processes(whisper_port)
        records = clients.records
        fds_after, rss_after = await idle_fds_and_rss(service, url, ports, clients)
        if fds_after.other > fds_before.other:
            await sleep(3.0)  # a last straggler (a killed nvidia-smi's pipes) may still close
            fds_after = await quiet_census(ports, service)
        gc.collect()
        summary = summarise(records, injector, service, world, jobs, watch, seed, elapsed_s,
                            (rss_before, rss_after), (fds_before, fds_after))
        with capsys.disabled():
            print(summary)
            for line in ooms.events:
                print("  OOM:", line)

        # Every request got a complete response or a clean abort.
        assert len(records) == REQUESTS
        hung = [r for r in records if r.outcome == "hung"]
        assert not hung, f"{len(hung)} client calls never finished: {hung[:3]}"
        unanswered = [r for r in records if r.outcome == "no_answer"]
        assert not unanswered, f"{len(unanswered)} requests got no answer at all: {unanswered[:3]}"
        truncated = [r for r in records if r.outcome == "completed" and r.status == 200
                     and not r.complete
                     and not injector.disrupted(r.spec.consumer, r.started,
                                                r.ended or reactor.seconds())]
        assert not truncated, (f"{len(truncated)} 200s were cut short with no fault to explain "
                               f"it: {truncated[:3]}")
        corrupt = [r for r in records if r.body_problem is not None]
        assert not corrupt, f"{len(corrupt)} complete 200s with a broken body: {corrupt[:3]}"
        strange = [r for r in records if r.code is not None and r.code not in KNOWN_CODES]
        assert not strange, f"errors that are not gpumgr's JSON contract: {strange[:3]}"
        internal = [r for r in records if r.code == "internal_error"]
        assert not internal, f"{len(internal)} internal errors: {internal[:3]}"
        relayed = [r for r in records if r.consumer_error is not None]
        assert not relayed, (
            f"{len(relayed)} consumer errors reached clients: {relayed[:3]}; simulated "
            f"OOMs: {ooms.events[:3]}; gpumgr's log then:\n"
            + watch.around(relayed[0].started - 3.0, relayed[0].ended or relayed[0].started))
        # Scheduled routes spelt otherwise: each answered as the README says.
        variants = [r for r in records if r.spec.expect is not None]
        assert variants, "no request-target variants were sent"
        wrong = [r for r in variants if r.variant_problem is not None]
        assert not wrong, (f"{len(wrong)} request-target variants answered otherwise than "
                           f"gpumgr must: {[(r.spec.path, r.variant_problem) for r in wrong[:5]]}")

        # Strangers on whisper's port: gpumgr sent them nothing (no probe, no
        # upload: a stt 200 from one is a body_problem above), and whisper
        # started again once each left.
        assert not injector.stranger_requests, \
            f"requests reached a stranger on whisper's port: {injector.stranger_requests[:5]}"
        refused = [(code, body[:300], pid) for port, code, body, pid in injector.during_stranger
                   if code != 503 or b'"process_start_failed"' not in body
                   or f"127.0.0.1:{port}".encode() not in body or pid is not None]
        assert not refused, ("while a stranger held whisper's port, a transcription was not "
                             f"refused with process_start_failed naming it: {refused}")
        after = [(code, body[:200]) for code, body in injector.after_stranger
                 if code != 200 or b"simulated transcript" not in body]
        assert not after, f"whisper did not start again after a stranger left: {after}"
        assert len(whisper_at_end) <= 1, f"whisper processes on its port at the end: " \
            f"{whisper_at_end}"
        assert whisper_processes(whisper_port) == [], \
            f"whisper processes left after its unload: {whisper_processes(whisper_port)}"

        # The lock: free, and never more than capacity.
        assert stats.in_flight == 0, f"{stats.in_flight} jobs still hold the GPU: {stats.holders}"
        assert stats.queue_depth == 0, f"{stats.queue_depth} jobs still queued"
        sched_config = service.config.scheduler
        assert service.scheduler.max_running_seen <= (
            sched_config.max_running if sched_config.auto else sched_config.capacity)
        # The reload half-way was applied.
        assert injector.reload_result is not None and injector.reload_result.reloaded, \
            injector.reload_result
        assert dict(service.config.scheduler.priority) == PRIORITY_AFTER_RELOAD

        # The GPU: no OOM, and never two jobs gpumgr was running at once.
        assert world.gpu.oom_count == 0, (f"the simulated GPU ran out of memory "
                                          f"{world.gpu.oom_count}x:\n" + "\n".join(ooms.events))
        # With capacity auto jobs run side by side when their memory fits: only
        # the OOM count above speaks for the card.
        overlaps = jobs.unexplained_overlaps() if capacity == 1 else []
        assert not overlaps, (f"{len(overlaps)} times two simulated GPU jobs ran at once, "
                              f"neither dropped by gpumgr: {overlaps[:3]}; gpumgr's log then:\n"
                              + watch.around(overlaps[0][0].started, overlaps[0][1].started))
        cut = {r.spec.n for r in records if r.outcome == "cut"}
        after_cuts = (jobs.overlaps_after_client_cuts(cut, injector.disrupted)
                      if capacity == 1 else [])
        assert not after_cuts, (f"{len(after_cuts)} times a job ran beside work whose client "
                                f"had left: {after_cuts[:3]}; gpumgr's log then:\n"
                                + watch.around(min(after_cuts[0][0].started,
                                                   after_cuts[0][1].started),
                                               max(after_cuts[0][0].ended or 0,
                                                   after_cuts[0][1].ended or 0)))
        assert jobs.renders_without_slot == 0, (
            f"{jobs.renders_without_slot} ComfyUI renders started without gpumgr's slot: "
            f"{jobs.slotless[:3]}; faults then: "
            f"{[w for w in injector.windows if abs(w.start - jobs.slotless[0][0]) < 10]}; "
            f"gpumgr's log then:\n"
            + watch.around(jobs.slotless[0][0] - 4.0, jobs.slotless[0][0]))
        assert world.active_jobs == 0, f"{world.active_jobs} simulated GPU jobs still running"

        # Memory and descriptors back where they were after the warm-up.
        assert rss_after - rss_before <= RSS_SLACK_MIB, \
            f"RSS grew by {rss_after - rss_before:.1f} MiB"
        assert fds_after.other <= fds_before.other, \
            f"descriptors leaked: {fds_before} -> {fds_after}; our pipes now: {pipe_holders()}"
        # Every upstream socket left is an idle keep-alive connection in
        # gpumgr's pools (health probes every 0.25 s keep up to
        # maxPersistentPerHost = 2 per consumer alive in the control pool),
        # seen twice here since the simulated consumers live in this process.
        assert fds_after.consumer_links == fds_after.pooled_links, \
            f"upstream connections that no pool holds: {fds_after}"
        assert fds_after.pooled_links <= 2 * 2 * len(SIM_CONSUMERS), fds_after

        # The log: only what the faults explain.
        assert not watch.unexpected, "unexpected log events:\n" + "\n".join(watch.unexpected)
    finally:
        globalLogPublisher.removeObserver(watch)
        await service.stopService()
        await world.stop()
        world.gpu.kill_smi_children()
