"""The admin API is not a web page's (issue 14, point 8).

A page open in a browser on the box can send a cross-site form or a
text/plain fetch to gpumgr's loopback port, and through DNS rebinding can
even read the answers (its Host is then the page's name). Admin and
control routes refuse a foreign Origin, a Host that is not loopback or
configured, and (admin routes) a body that is not JSON.
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from gpumgr.config import ConfigError, parse_config
from gpumgr.testing import world_config, world_config_raw
from tests.helpers import PASS, RawClient, file_broker, raw_exchange


async def admin_broker(world, start_broker, **sections):
    config = world_config(world, consumers=PASS, health={"interval_s": 30}, **sections)
    service, url = await start_broker(config)
    await service.health.probe_all_now()
    return service, url


def _headers(**named: str) -> bytes:
    return b"".join(f"{k.replace('_', '-')}: {v}\r\n".encode() for k, v in named.items())


async def post(url, target, body=b"", content_type=None, host=None, **headers):
    """A raw POST: `host` replaces gpumgr's own Host, `content_type` None sends none."""
    port = url.rsplit(":", 1)[1]
    client = RawClient()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", int(port)), client)
    head = (b"POST " + target + b" HTTP/1.1\r\nHost: " + (host or f"127.0.0.1:{port}").encode()
            + b"\r\nConnection: close\r\n"
            + (f"Content-Type: {content_type}\r\n".encode() if content_type else b"")
            + _headers(**headers) + b"Content-Length: " + str(len(body)).encode()
            + b"\r\n\r\n")
    client.transport.write(head + body)
    await client.closed
    status_line, _, rest = client.data.partition(b"\r\n\r\n")
    code = int(status_line.split(b" ", 2)[1])
    return code, (json.loads(rest) if rest.startswith(b"{") else rest)


@pytest_twisted.ensureDeferred
async def test_the_issues_curl_cannot_reload(world, start_broker, tmp_path):
    # curl -X POST :8770/v1/admin/reload -H 'Origin: http://evil.example'
    #      -H 'Content-Type: text/plain' -d x
    service, url = await file_broker(world, start_broker, tmp_path / "gpumgr.yaml")
    attempts = service.broker.reload_attempts
    code, body = await post(url, b"/v1/admin/reload", b"x", "text/plain",
                            Origin="http://evil.example")
    assert code == 403 and body["error"]["code"] == "forbidden"
    assert "Origin" in body["error"]["message"]
    assert service.broker.reload_attempts == attempts  # today: 200, reloaded
    # Without the Origin, text/plain is still not JSON.
    code, body = await post(url, b"/v1/admin/reload", b"x", "text/plain")
    assert code == 415 and body["error"]["code"] == "unsupported_media_type"
    assert service.broker.reload_attempts == attempts
    # The operator's way still works.
    code, body = await post(url, b"/v1/admin/reload", b"", "application/json")
    assert code == 200 and body["reloaded"] is True


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("content_type,body", [
    ("application/x-www-form-urlencoded", b"a=1"),
    ("multipart/form-data; boundary=x", b"--x\r\n\r\n--x--\r\n"),
    ("text/plain", b"{}"),
    (None, b"{}"),  # a body says what it is
])
async def test_a_form_cannot_unload_a_consumer(world, start_broker, content_type, body):
    service, url = await admin_broker(world, start_broker)
    mvoice = world["mvoice"]
    unloads = mvoice.unloads
    code, answer = await post(url, b"/v1/consumers/mvoice/unload", body, content_type)
    assert code == 415 and answer["error"]["code"] == "unsupported_media_type"
    assert mvoice.unloads == unloads  # today: 200, unloaded


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("content_type,body", [
    ("application/json", b""), ("application/json; charset=utf-8", b"{}"), (None, b""),
])
async def test_json_or_no_body_unloads(world, start_broker, content_type, body):
    service, url = await admin_broker(world, start_broker)
    code, answer = await post(url, b"/v1/consumers/mvoice/unload", body, content_type)
    assert code == 200 and answer["action"] == "unload"


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("host", [
    "evil.example", "evil.example:8770", "127.0.0.1.evil.example", "localhost.evil.example",
    "[::2]:1", "10.0.0.1", "127.0.0.1 evil",
])
async def test_a_foreign_host_is_refused(world, start_broker, host):
    service, url = await admin_broker(world, start_broker)
    mvoice = world["mvoice"]
    unloads = mvoice.unloads
    code, answer = await post(url, b"/v1/consumers/mvoice/unload", b"", "application/json",
                              host=host)
    assert code == 403 and answer["error"]["code"] == "forbidden", host
    assert mvoice.unloads == unloads


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("host", [
    "127.0.0.1", "localhost", "LOCALHOST:8770", "127.1:80", "[::1]:8770", "2130706433",
    "127.0.0.2", "gpumgr.localhost", "box.lan:8770", "[::ffff:127.0.0.1]",
])
async def test_loopback_hosts_and_allowed_hosts_are_accepted(world, start_broker, host):
    service, url = await admin_broker(world, start_broker, allowed_hosts=["Box.LAN"])
    code, answer = await post(url, b"/v1/consumers/mvoice/unload", b"", "application/json",
                              host=host)
    assert code == 200, (host, answer)


@pytest_twisted.ensureDeferred
async def test_an_origin_must_be_gpumgrs_own(world, start_broker):
    service, url = await admin_broker(world, start_broker, allowed_hosts=["box.lan"])
    port = url.rsplit(":", 1)[1]
    same = await post(url, b"/v1/consumers/mvoice/unload", b"", "application/json",
                      Origin=f"http://127.0.0.1:{port}")
    assert same[0] == 200
    named = await post(url, b"/v1/consumers/mvoice/unload", b"", "application/json",
                       host=f"box.lan:{port}", Origin=f"http://box.lan:{port}")
    assert named[0] == 200
    for origin in ("http://evil.example", "null", f"http://127.0.0.1:{int(port) + 1}",
                   f"http://localhost:{port}", "http://box.lan", f"ftp://127.0.0.1:{port}"):
        code, answer = await post(url, b"/v1/consumers/mvoice/unload", b"", "application/json",
                                  Origin=origin)
        assert code == 403 and answer["error"]["code"] == "forbidden", origin


@pytest_twisted.ensureDeferred
async def test_control_routes_refuse_pages_too(world, start_broker):
    """No admin_token (loopback only): a page cannot free ComfyUI through
    pass-through, though the service's content type is its own."""
    service, url = await admin_broker(world, start_broker)
    frees = lambda: [r for r in world["comfyui"].requests if r.path == "/free"]  # noqa: E731
    code, _ = await post(url, b"/v1/image/free", b"{}", "text/plain",
                         Origin="http://evil.example")
    assert code == 403
    code, _ = await post(url, b"/v1/image/free", b"{}", "text/plain", host="evil.example")
    assert code == 403
    assert frees() == []
    code, _ = await post(url, b"/v1/image/free", b"{}", "application/json")
    assert code == 200 and len(frees()) == 1


@pytest_twisted.ensureDeferred
async def test_ordinary_routes_keep_answering_any_host(world, start_broker):
    """Only admin and control routes check Host and Origin (docs/configure.md)."""
    service, url = await admin_broker(world, start_broker)
    code, _ = await raw_exchange(url, b"GET", b"/v1/llm/api/tags", headers=b"Origin: http://x\r\n")
    assert code == 200


@pytest.mark.parametrize("value,problem", [
    ("box.lan", "must be a list"),
    (["http://box.lan"], "allowed_hosts[0]"),
    (["box.lan:8770"], "allowed_hosts[0]"),
    (["ok.lan", 3], "allowed_hosts[1]"),
    (["*.lan"], "allowed_hosts[0]"),
])
def test_allowed_hosts_is_validated_with_its_key_path(world, value, problem):
    raw = world_config_raw(world, allowed_hosts=value)
    with pytest.raises(ConfigError) as e:
        parse_config(raw, "/etc/gpumgr.yaml")
    assert "/etc/gpumgr.yaml" in str(e.value) and problem in str(e.value)


def test_allowed_hosts_are_kept_lower_case(world):
    raw = world_config_raw(world, allowed_hosts=["GPU.lan.", "[fe80::1]", "192.168.1.5"])
    assert parse_config(raw, "x").allowed_hosts == {"gpu.lan", "fe80::1", "192.168.1.5"}


