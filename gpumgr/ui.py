"""GET /ui: the live status page, served from files shipped in the package.

The page is static (`gpumgr/ui/`: HTML, JS and CSS, no build step) and draws
itself from `/v1/status`. Only the files found there at start-up are served,
by their exact names: no directory listing and no path below them.
"""

from __future__ import annotations

import hashlib
from importlib.resources import files
from typing import Mapping

from twisted.web import http, server
from twisted.web.resource import Resource

from gpumgr.errors import MethodNotAllowed, UnknownRoute, write_error

CONTENT_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".svg": b"image/svg+xml",
    ".png": b"image/png",
}
#: Everything the page needs comes from here; the status it polls is same-origin.
_CSP = (b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def packaged_files() -> dict[str, bytes]:
    """The page's files, by name, as installed with the package."""
    folder = files("gpumgr").joinpath("ui")
    found = {}
    for entry in folder.iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in CONTENT_TYPES:
            found[entry.name] = entry.read_bytes()
    return found


class UiResource(Resource):
    """`/ui` redirects to `/ui/` so that the page's relative links work behind a prefix."""

    isLeaf = True

    def __init__(self, ui_files: Mapping[str, bytes] | None = None) -> None:
        Resource.__init__(self)  # super() would hide it from untyped_calls_exclude
        self._files = dict(packaged_files() if ui_files is None else ui_files)
        self._etags = {name: b'"' + hashlib.sha256(body).hexdigest()[:16].encode() + b'"'
                       for name, body in self._files.items()}

    def render(self, request: server.Request) -> bytes | int:
        if request.method not in (b"GET", b"HEAD"):
            write_error(request, MethodNotAllowed(request.method.decode("ascii", "replace"),
                                                  ("GET", "HEAD")))
            return server.NOT_DONE_YET
        path = request.postpath
        if not path:
            here = request.prepath[-1] if request.prepath else b"ui"
            request.setResponseCode(http.MOVED_PERMANENTLY)
            request.setHeader(b"Location", here + b"/")
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"see " + here + b"/\n"
        name = "index.html" if path == [b""] else path[0].decode("utf-8", "replace")
        if len(path) > 1 or name not in self._files:
            write_error(request, UnknownRoute(f"no route for {request.path.decode('latin-1')}"))
            return server.NOT_DONE_YET
        body = self._files[name]
        request.setHeader(b"Content-Type", CONTENT_TYPES["." + name.rpartition(".")[2]])
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"Referrer-Policy", b"no-referrer")
        request.setHeader(b"Content-Security-Policy", _CSP)
        if request.setETag(self._etags[name]) == http.CACHED:
            return b""
        request.setHeader(b"Content-Length", str(len(body)).encode("ascii"))
        return body
