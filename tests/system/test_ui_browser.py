"""GET /ui: the resource in memory, then the page in a real headless Chromium.

The browser is driven over the Chrome DevTools Protocol (websocket-client, a
blocking client, run in a thread so that the reactor keeps serving the page).
Without Chromium those tests skip and say why.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.protocols.portforward import ProxyFactory, ProxyServer
from twisted.web.resource import Resource
from twisted.web.server import Site

from gpumgr.testing import world_config
from gpumgr.ui import UiResource

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCREENSHOT = os.path.join(ROOT, "build", "ui-status.png")
#: A guard against a hung browser, not a timing claim: the page polls every 2 s.
WAIT_S = 30.0


# A real browser ----------------------------------------------------------------


def _find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """A headless Chromium with one page, spoken to over CDP (blocking calls)."""

    def __init__(self, executable: str, work_dir: str) -> None:
        import websocket

        self._dir = tempfile.mkdtemp(prefix="chromium-", dir=work_dir)
        self.log_path = os.path.join(work_dir, "chromium.log")
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [executable, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions",
             "--disable-background-networking", "--disable-sync", "--hide-scrollbars",
             "--mute-audio", f"--user-data-dir={self._dir}", "--remote-debugging-port=0",
             "about:blank"],
            stdout=self._log, stderr=subprocess.STDOUT)
        port_file = os.path.join(self._dir, "DevToolsActivePort")
        deadline = time.monotonic() + WAIT_S
        while not (os.path.exists(port_file) and len(open(port_file).read().split()) >= 2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"chromium did not start; see {self.log_path}")
            time.sleep(0.05)
        port, path = open(port_file).read().split()[:2]
        self._ws = websocket.create_connection(f"ws://127.0.0.1:{port}{path}", timeout=WAIT_S,
                                               suppress_origin=True)
        self._next_id = 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self._session = self.call("Target.attachToTarget", targetId=target,
                                  flatten=True)["sessionId"]

    def call(self, method: str, page: bool = False, **params: Any) -> dict:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if page:
            message["sessionId"] = self._session
        self._ws.send(json.dumps(message))
        while True:
            reply = json.loads(self._ws.recv())
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def page(self, method: str, **params: Any) -> dict:
        return self.call(method, page=True, **params)

    def open(self, url: str) -> None:
        self.page("Page.navigate", url=url)

    def evaluate(self, expression: str) -> Any:
        result = self.page("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, what: str) -> Any:
        """Poll a JS expression until it is truthy; its last value in the failure."""
        deadline = time.monotonic() + WAIT_S
        value = None
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression)
            except RuntimeError as e:  # e.g. while the page is being replaced
                value = str(e)
            else:
                if value:
                    return value
            time.sleep(0.1)
        try:
            page = self.evaluate("`${location.href} state=${document.body?.dataset.state} "
                                 "banner=${document.getElementById('banner')?.textContent}`")
        except RuntimeError as e:
            page = str(e)
        raise AssertionError(f"page never showed {what}; last value {value!r}; page: {page}")

    def screenshot(self, path: str, width: int, height: int, mobile: bool = False) -> None:
        self.page("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=2 if mobile else 1, mobile=mobile)
        full = max(height, int(self.evaluate("document.documentElement.scrollHeight")))
        shot = self.page("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                         clip={"x": 0, "y": 0, "width": width, "height": full, "scale": 1})
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(base64.b64decode(shot["data"]))

    def close(self) -> None:
        ws = getattr(self, "_ws", None)
        if ws is not None:
            ws.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)
        self._log.close()
        shutil.rmtree(self._dir, ignore_errors=True)


@pytest.fixture
def browser(tmp_path):
    executable = _find_chromium()
    if executable is None:
        pytest.skip("no chromium or chromium-browser on PATH: "
                    "apt-get install chromium to run the browser tests")
    b = Browser(executable, str(tmp_path))
    yield b
    b.close()


def _in_thread(fn, *args, **kwargs):
    return deferToThread(fn, *args, **kwargs)


def _row(name: str, attribute: str) -> str:
    return f"document.querySelector('tr[data-consumer=\"{name}\"]')?.dataset.{attribute}"


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_page_draws_live_state_and_follows_changes(browser, world, start_broker, client):
    # Evicting mode tracks what is loaded, which is what the page shows.
    service, url = await start_broker(world_config(
        world, health={"interval_s": 0.2}, scheduler={"mode": "evicting"}))
    await service.health.probe_all_now()
    await _in_thread(browser.open, url + "/ui")  # the redirect to /ui/ included
    await _in_thread(browser.wait_for, "document.body.dataset.state === 'live' && "
                     "document.querySelectorAll('#consumers tbody tr').length === 4",
                     "four consumers, live")
    names = await _in_thread(browser.evaluate, "[...document.querySelectorAll("
                             "'#consumers tbody tr')].map(r => r.dataset.consumer)")
    assert names == list(service.config.consumers)
    assert await _in_thread(browser.evaluate, _row("mvoice", "loaded")) != "yes"
    # The bar is drawn from nvidia-smi's (simulated) numbers.
    await _in_thread(browser.wait_for, "document.querySelector('.bar') !== null", "a VRAM bar")

    reply = await client.request("POST", url + "/v1/tts", b'{"text":"Hallo"}')
    assert reply.code == 200
    await _in_thread(browser.wait_for, _row("mvoice", "loaded") + " === 'yes'", "mvoice loaded")
    mib = await _in_thread(browser.wait_for,
                           "document.querySelector('.seg[data-consumer=\"mvoice\"]')?.dataset.mib",
                           "mvoice's share of the bar")
    assert int(mib) == service.registry["mvoice"].gpu_resident_mib == 2500
    reply = await client.request("POST", url + "/v1/llm", b'{"prompt":"hi"}')
    assert reply.code == 200
    await _in_thread(browser.wait_for,
                     "document.querySelector('.seg[data-consumer=\"ollama\"]') !== null",
                     "ollama in the bar beside mvoice")

    reply = await client.request("POST", url + "/v1/consumers/mvoice/unload")
    assert reply.code == 200, reply.body
    await _in_thread(browser.wait_for, _row("mvoice", "loaded") + " === 'no' && "
                     "!document.querySelector('.seg[data-consumer=\"mvoice\"]')",
                     "mvoice unloaded and gone from the bar")
    event = await _in_thread(browser.wait_for,
                             "document.querySelector('#events li[data-event=\"unload\"]')"
                             "?.textContent", "the unload event")
    assert "mvoice" in event
    assert await _in_thread(browser.evaluate, _row("ollama", "loaded")) == "yes"
    await _in_thread(browser.screenshot, SCREENSHOT, 1280, 900)
    await _in_thread(browser.screenshot, SCREENSHOT.replace(".png", "-phone.png"), 390, 844, True)


class _Cuttable(ProxyFactory):
    """A TCP hop in front of the broker that can vanish, connections and all."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self.open: set[ProxyServer] = set()
        self.listening: Any = None

    def buildProtocol(self, addr):
        factory = self

        class Tracked(ProxyServer):
            def connectionMade(self):
                factory.open.add(self)
                super().connectionMade()

            def connectionLost(self, reason):
                factory.open.discard(self)
                super().connectionLost(reason)

        protocol = Tracked()
        protocol.factory = self
        return protocol

    def listen(self, port: int = 0) -> int:
        self.listening = reactor.listenTCP(port, self, interface="127.0.0.1")
        return self.listening.getHost().port

    async def cut(self) -> None:
        await self.listening.stopListening()
        for protocol in list(self.open):
            protocol.transport.abortConnection()


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_page_says_when_the_broker_is_unreachable_and_recovers(browser, broker):
    _, url = broker
    hop = _Cuttable("127.0.0.1", int(url.rsplit(":", 1)[1]))
    port = hop.listen()
    try:
        await _in_thread(browser.open, f"http://127.0.0.1:{port}/ui/")
        await _in_thread(browser.wait_for, "document.body.dataset.state === 'live'", "live")
        assert await _in_thread(browser.evaluate, "document.getElementById('banner').hidden")

        await hop.cut()
        banner = await _in_thread(
            browser.wait_for, "document.body.dataset.state === 'unreachable' && "
            "!document.getElementById('banner').hidden && "
            "document.getElementById('banner').textContent", "the unreachable banner")
        assert "Cannot reach gpumgr" in banner
        # What it last knew stays on screen, marked as old.
        assert "Showing what it said at" in banner
        assert await _in_thread(browser.evaluate,
                                "document.querySelectorAll('#consumers tbody tr').length") == 4

        hop.listen(port)
        await _in_thread(browser.wait_for, "document.body.dataset.state === 'live' && "
                         "document.getElementById('banner').hidden", "recovery")
    finally:
        if hop.listening is not None:
            await hop.cut()


# Fields the broker is gaining, and hostile strings --------------------------------

HOSTILE = '<img src=x onerror="window.__pwned=1">'

FUTURE_STATUS = {
    "broker": {"version": "0.2.0", "uptime_s": 7384.2, "mode": "evicting",
               "config_loaded_at": "2026-11-23T07:00:00.000Z",
               "last_reload_error": f"consumers.x.url: bad {HOSTILE}"},
    "gpu": {"available": True, "error": None, "sampled_at": "2026-11-23T07:19:01.298Z",
            "age_ms": 400, "headroom_mib": 1024,
            "gpus": [{"index": 0, "name": "NVIDIA GeForce RTX 4090", "memory_total_mib": 24564,
                      "memory_used_mib": 18900, "memory_free_mib": 5664,
                      "utilization_pct": 87, "temperature_c": 64}],
            "processes": [{"pid": 2345, "name": "/usr/bin/ollama", "used_mib": 9000},
                          {"pid": 2400, "name": HOSTILE, "used_mib": 300}]},
    "consumers": {
        "ollama": {"driver": "ollama", "url": "http://127.0.0.1:11434", "health": "ok",
                   "loaded": True, "gpu_resident_mib": 9000, "active": 1,
                   "total_requests": 40, "errors": 1, "last_used": "2026-11-23T07:18:50.000Z",
                   "process": None, "renders": []},
        "comfyui": {"driver": "comfyui", "url": "http://127.0.0.1:8188", "health": "starting",
                    "loaded": True, "gpu_resident_mib": 7000, "active": 0, "total_requests": 3,
                    "errors": 0, "last_used": None,
                    "process": {"state": "running", "pid": 4242, "started_at": None,
                                "exit_code": None, "restarts": 2,
                                "last_stderr": ["CUDA warming up", HOSTILE]},
                    "renders": [{"prompt_id": "3f2a9c1e-77aa-4c1b", "held_s": 12.5}]},
        HOSTILE: {"driver": HOSTILE, "health": "down", "last_error": HOSTILE, "loaded": None,
                  "gpu_resident_mib": 0, "active": 0, "total_requests": 0, "errors": 0,
                  "process": {"state": "failed", "pid": None, "exit_code": 137, "restarts": 5,
                              "last_stderr": []}},
    },
    "scheduler": {
        "mode": "evicting", "capacity": 1, "queue_depth": 3, "in_flight": 1, "total_jobs": 52,
        "queued_by_kind": {"llm": 1, "tts": 2}, "rejected": 0, "evictions": 4,
        "eviction_failures": 1, "oom_retries": 1,
        "holders": [{"consumer": "comfyui", "kind": "image", "held_ms": 12500,
                     "render": "3f2a9c1e-77aa-4c1b"}],
        "recent_events": [
            {"at": "2026-11-23T07:10:00.000Z", "event": event, "consumer": "comfyui",
             "reason": reason, "mib": mib, "detail": detail}
            for event, reason, mib, detail in [
                ("eviction", "pressure", 2500, None), ("eviction_failed", "exclusivity", 9000,
                                                       "unload answered 500"),
                ("oom_retry", None, None, None), ("render_interrupted", None, None, HOSTILE),
                ("process_crash", None, None, "exit 137"), ("load", "admin", 7000, None)]]},
}


class _Canned(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.code = 200
        self.body = json.dumps(FUTURE_STATUS).encode()

    def render_GET(self, request):
        request.setResponseCode(self.code)
        request.setHeader(b"Content-Type", b"application/json")
        return self.body


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_page_draws_the_new_fields_and_never_runs_data_as_markup(browser):
    status = _Canned()
    root = Resource()
    root.putChild(b"ui", UiResource())
    v1 = Resource()
    v1.putChild(b"status", status)
    root.putChild(b"v1", v1)
    port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    try:
        await _in_thread(browser.open, f"http://127.0.0.1:{port.getHost().port}/ui/")
        await _in_thread(browser.wait_for, "document.body.dataset.state === 'live' && "
                         "document.querySelectorAll('#consumers tbody tr').length === 3", "live")
        page = await _in_thread(browser.evaluate, """({
            imgs: document.querySelectorAll('img').length,
            pwned: window.__pwned === 1,
            text: document.body.innerText,
            segs: [...document.querySelectorAll('.seg')]
                .map(s => [s.dataset.consumer || 'other', s.dataset.mib]),
            headroom: document.querySelector('.headroom') !== null,
            holders: document.getElementById('holders').textContent,
            kinds: [...document.querySelectorAll('#queue-by-kind .chip')].map(c => c.textContent),
            comfy: document.querySelector('tr[data-consumer="comfyui"]').textContent,
            reload: document.getElementById('reload-error').hidden
                ? null : document.getElementById('reload-error').textContent,
            events: [...document.querySelectorAll('#events li')].map(li => li.dataset.event),
            badEvents: [...document.querySelectorAll('#events .pill.bad')].length,
        })""")
        assert page["imgs"] == 0 and not page["pwned"]
        assert HOSTILE in page["text"]  # shown as text, wherever it came from
        assert page["segs"] == [["ollama", "9000"], ["comfyui", "7000"], ["other", "2900"]]
        assert page["headroom"]
        assert "comfyui" in page["holders"] and "3f2a9c1e" in page["holders"]
        assert page["kinds"] == ["llm 1", "tts 2"]
        for shown in ("running", "pid 4242", "2 restarts", "3f2a9c1e", "starting"):
            assert shown in page["comfy"], shown
        assert page["reload"] is not None and HOSTILE in page["reload"]
        assert page["events"] == ["load", "process_crash", "render_interrupted", "oom_retry",
                                  "eviction_failed", "eviction"]
        assert page["badEvents"] == 3
        await _in_thread(browser.screenshot, SCREENSHOT.replace(".png", "-all-fields.png"),
                         1280, 900)

        # An older broker's thin document still draws, and an error answer is reported.
        status.body = json.dumps({"broker": {"version": "0.0.9"}}).encode()
        await _in_thread(browser.wait_for, "document.querySelector('#consumers tbody').textContent"
                         ".includes('No consumers')", "the thin document")
        assert await _in_thread(browser.evaluate, "document.body.dataset.state") == "live"
        status.code = 503
        status.body = json.dumps({"error": {"code": "x", "message": HOSTILE}}).encode()
        banner = await _in_thread(browser.wait_for, "document.body.dataset.state === 'unreachable'"
                                  " && document.getElementById('banner').textContent",
                                  "the error answer")
        assert "HTTP 503" in banner and HOSTILE in banner
        assert await _in_thread(browser.evaluate, "document.querySelectorAll('img').length") == 0
    finally:
        await port.stopListening()


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_page_lists_the_queue_with_positions_and_cancels_with_the_admin_token(
        browser, world, start_broker, client):
    from twisted.internet import defer

    from tests.helpers import HeldStream, wait_for

    service, url = await start_broker(world_config(
        world, health={"interval_s": 30}, scheduler={"mode": "locked"}, admin_token="s3cret",
        consumers={"ollama": {"pin": True}}))
    await service.health.probe_all_now()
    held = await HeldStream(world["ollama"]).start(client, url)
    queued = {}
    for depth, n in enumerate(("first", "second"), 1):
        queued[n] = defer.ensureDeferred(client.request(
            "POST", url + "/v1/tts", b"x", {"X-Gpumgr-Request-Id": n}))
        await wait_for(lambda: service.scheduler.stats().queue_depth == depth)
    await _in_thread(browser.open, url + "/ui/")
    positions = await _in_thread(
        browser.wait_for, "[...document.querySelectorAll('#requests li[data-state=\"queued\"]')]"
        ".map(li => li.dataset.id + '@' + li.dataset.position).join(' ') || ''",
        "the queue with positions")
    assert positions == "first@1 second@2"
    assert await _in_thread(browser.evaluate, _row("ollama", "pin")) == "yes"
    # Without the token the broker refuses (the page is not on loopback's side: a token is set).
    click = ("document.querySelector('#requests li[data-id=\"first\"] button.cancel').click()")
    await _in_thread(browser.evaluate, click)
    note = await _in_thread(browser.wait_for, "document.getElementById('requests-note')"
                            ".dataset.outcome", "the refused cancel")
    assert note == "refused"
    assert service.scheduler.stats().queue_depth == 2
    await _in_thread(browser.evaluate, "document.getElementById('admin-token').value = 's3cret';"
                     "document.getElementById('requests-note').dataset.outcome = '';")
    await _in_thread(browser.wait_for, "document.querySelector('#requests li[data-id=\"first\"]"
                     " button.cancel:not([disabled])') !== null", "the button again after a redraw")
    await _in_thread(browser.evaluate, click)
    reply = await queued["first"]
    assert reply.code == 409 and reply.json()["error"]["code"] == "request_cancelled"
    await _in_thread(browser.wait_for, "[...document.querySelectorAll('#requests li"
                     "[data-state=\"queued\"]')].map(li => li.dataset.id + '@' + "
                     "li.dataset.position).join(' ') === 'second@1'", "second moved up")
    held.release()
    assert (await queued["second"]).code == 200


def _two_card_status() -> dict:
    """FUTURE_STATUS on a box of two cards: ollama on 0, comfyui on both, an
    auto whisper not placed yet; the box is leaving (SIGTERM came)."""
    doc = json.loads(json.dumps(FUTURE_STATUS))
    card1 = {**doc["gpu"]["gpus"][0], "index": 1, "name": "NVIDIA RTX A4000",
             "memory_total_mib": 16376, "memory_used_mib": 7000, "memory_free_mib": 9376}
    doc["gpu"]["gpus"].append(card1)
    doc["consumers"].pop(HOSTILE)
    doc["consumers"]["ollama"].update(gpu=[0], gpu_auto=False)
    doc["consumers"]["comfyui"].update(gpu=[0, 1], gpu_auto=False)
    doc["consumers"]["whisper"] = {**doc["consumers"]["ollama"], "gpu": [], "gpu_auto": True,
                                   "loaded": False, "gpu_resident_mib": 0}
    doc["broker"].update(last_reload_error=None,
                         balancer={"phase": "leaving", "box": "box1", "kinds": {}})
    return doc


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_page_lists_the_consumers_of_each_card_and_the_box_phase(browser):
    status = _Canned()
    status.body = json.dumps(_two_card_status()).encode()
    root = Resource()
    root.putChild(b"ui", UiResource())
    v1 = Resource()
    v1.putChild(b"status", status)
    root.putChild(b"v1", v1)
    port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    try:
        await _in_thread(browser.open, f"http://127.0.0.1:{port.getHost().port}/ui/")
        await _in_thread(browser.wait_for, "document.body.dataset.state === 'live' && "
                         "document.querySelectorAll('.card-consumers').length === 2", "two cards")
        page = await _in_thread(browser.evaluate, """({
            cards: Object.fromEntries([...document.querySelectorAll('.card-consumers')].map(
                ul => [ul.dataset.card, [...ul.querySelectorAll('li')].map(li => li.dataset.consumer)])),
            unplaced: document.querySelector('.card-unplaced')?.textContent,
            phase: document.getElementById('phase').textContent,
            phaseHidden: document.getElementById('phase').hidden,
        })""")
        assert page["cards"] == {"0": ["ollama", "comfyui"], "1": ["comfyui"]}
        assert page["unplaced"] is not None and "whisper" in page["unplaced"]
        assert page["phase"] == "box1 · leaving" and not page["phaseHidden"]
        await _in_thread(browser.screenshot, SCREENSHOT.replace(".png", "-two-cards.png"),
                         1280, 900)

        # One card: no lists under the bar (the legend says it), as before.
        status.body = json.dumps(FUTURE_STATUS).encode()
        await _in_thread(browser.wait_for, "document.querySelectorAll('.gpu').length === 1 && "
                         "document.querySelectorAll('.card-consumers').length === 0", "one card")
        assert await _in_thread(browser.evaluate, "document.getElementById('phase').hidden")
    finally:
        await port.stopListening()
