"""GET /ui: the resource in memory (the page in a real headless Chromium is in
tests/system/test_ui_browser.py).
"""

from __future__ import annotations

import json
import re

import pytest_twisted
from treq.testing import StubTreq
from twisted.web.resource import Resource

from gpumgr.ui import UiResource, packaged_files

#: A guard against a hung browser, not a timing claim: the page polls every 2 s.


# The resource, in memory -----------------------------------------------------


def _stub() -> StubTreq:
    root = Resource()
    root.putChild(b"ui", UiResource())
    return StubTreq(root)


async def _get(stub: StubTreq, path: str, method: str = "GET", headers: dict | None = None):
    response = await stub.request(method, "http://gpumgr" + path, headers=headers,
                                  allow_redirects=False)
    return response, await response.content()


@pytest_twisted.ensureDeferred
async def test_ui_serves_packaged_files_with_their_content_types():
    stub = _stub()
    expected = {"/ui/": ("text/html; charset=utf-8", "index.html"),
                "/ui/app.js": ("text/javascript; charset=utf-8", "app.js"),
                "/ui/style.css": ("text/css; charset=utf-8", "style.css")}
    for path, (content_type, name) in expected.items():
        response, body = await _get(stub, path)
        assert response.code == 200, path
        assert response.headers.getRawHeaders("content-type") == [content_type]
        assert response.headers.getRawHeaders("x-content-type-options") == ["nosniff"]
        assert body == packaged_files()[name]
    response, body = await _get(stub, "/ui/")
    csp = response.headers.getRawHeaders("content-security-policy")[0]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    # Nothing is fetched from outside: no absolute or protocol-relative links anywhere.
    for name, text in packaged_files().items():
        assert not re.search(rb"""(src|href)\s*=\s*["']?(https?:)?//|url\(\s*["']?(https?:)?//"""
                             rb"""|fetch\(\s*["'`](https?:)?//|@import""", text), name


@pytest_twisted.ensureDeferred
async def test_ui_without_slash_redirects_so_relative_links_resolve():
    response, _ = await _get(_stub(), "/ui")
    assert response.code == 301
    assert response.headers.getRawHeaders("location") == ["ui/"]


@pytest_twisted.ensureDeferred
async def test_ui_lists_nothing_and_serves_nothing_else():
    stub = _stub()
    for path in ("/ui/nope.js", "/ui/app.js/x", "/ui/../setup.cfg", "/ui/%2e%2e/tap.py",
                 "/ui/__init__.py", "/ui/ui.py"):
        response, body = await _get(stub, path)
        assert response.code == 404, path
        assert json.loads(body)["error"]["code"] == "unknown_route"


@pytest_twisted.ensureDeferred
async def test_ui_refuses_other_methods_as_json():
    response, body = await _get(_stub(), "/ui/", method="POST")
    assert response.code == 405
    assert response.headers.getRawHeaders("allow") == ["GET, HEAD"]
    assert json.loads(body)["error"]["code"] == "method_not_allowed"


@pytest_twisted.ensureDeferred
async def test_ui_answers_304_to_a_matching_etag():
    stub = _stub()
    response, _ = await _get(stub, "/ui/app.js")
    (etag,) = response.headers.getRawHeaders("etag")
    response, body = await _get(stub, "/ui/app.js", headers={"If-None-Match": etag})
    assert response.code == 304 and body == b""
    response, body = await _get(stub, "/ui/app.js", headers={"If-None-Match": '"other"'})
    assert response.code == 200 and body
