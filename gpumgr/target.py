"""A request target, parsed once: what gpumgr checks, classifies, logs and forwards.

twisted.web hands over the raw target; twisted's Agent rebuilds the one it
sends with `URI.fromBytes(url).originForm`, which drops a `#fragment`, an
empty `;` parameter of the last segment and an empty `?`. Deciding on one
string and sending another is how `POST /api/generate;` once skipped the
GPU lock. So the target is parsed here into one value, every decision reads
that value, and the forwarded URL is built from it and checked against what
Agent will really send (`forward_url`).

The rules (docs/http-api.md, "Request targets", says the same for users):

- Only origin-form (`/path[?query]`) of visible ASCII; a `#` anywhere is
  refused: a fragment has no business in a request target (RFC 9112 3.2).
- `%xx` escapes must be well formed. Segments are percent-decoded once for
  the decisions (the services decode before routing: gin, aiohttp); the
  original encoding is what is forwarded, byte for byte.
- `;` is an ordinary character of a segment, as ollama's and ComfyUI's
  routers see it (`/api/generate;v=1` is not `/api/generate` to them), and
  the target is forwarded with it. Servers that strip `;params` (Tomcat,
  Jetty) would route it as `/api/generate`, so a request is GPU work or a
  control route when its path says so with or without its parameters
  (`bare_path`). A last segment that ends in its first `;` is
  refused: Agent would drop that `;`, and the service would receive a path
  that was not the one classified.
- Case is kept: the services' routers are case-sensitive, and so is gpumgr.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

import attrs
from twisted.web.client import URI

from gpumgr.errors import BadPath

#: What Agent accepts in a URI (twisted.web.client._VALID_URI), minus `#`.
_TARGET = re.compile(rb"\A/[\x21-\x22\x24-\x7e]*\Z")
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")


@attrs.frozen
class Segment:
    """One path segment: as sent, and percent-decoded."""

    raw: bytes
    text: str

    @classmethod
    def of(cls, raw: bytes) -> Segment:
        return cls(raw, unquote_to_bytes(raw).decode("utf-8", "replace"))

    @property
    def params(self) -> str | None:
        """What follows the first `;`, or None: kept as part of the segment
        (and of its classification); servers that strip parameters see
        the `name` instead."""
        name, sep, params = self.text.partition(";")
        return params if sep else None

    @property
    def name(self) -> str:
        return self.text.partition(";")[0]

    def problem(self) -> str | None:
        """Why a service might resolve this segment elsewhere (pure)."""
        if not self.raw:
            return "empty segments ('//') are not allowed"
        if self.text in (".", "..") or self.name in (".", ".."):
            return "'.' and '..' segments are not allowed (encoded or with ';' parameters too)"
        if "/" in self.text or "\\" in self.text:
            return "encoded separators ('%2f', '\\') are not allowed"
        if "\x00" in self.text:
            return "NUL is not allowed"
        return None


@attrs.frozen
class Target:
    """A parsed origin-form request target (or the part of one after a prefix)."""

    segments: tuple[Segment, ...]
    #: The query as sent, without its `?`; None when there was no `?`.
    query: bytes | None = None

    @property
    def path(self) -> str:
        """The decoded path: what is classified and matched against routes."""
        return "/" + "/".join(s.text for s in self.segments)

    @property
    def bare_path(self) -> str:
        """The decoded path without each segment's `;` parameters: what a
        server that strips them (Tomcat, Jetty, Undertow) routes on. A
        request is GPU work, or a control route, if either path says so."""
        return "/" + "/".join(s.name for s in self.segments)

    @property
    def raw_path(self) -> bytes:
        """The path as sent, and as forwarded."""
        return b"/" + b"/".join(s.raw for s in self.segments)

    def origin_form(self) -> bytes:
        """The forwarded request target. An empty query (a bare `?`) is not
        sent: Agent drops it, and it means nothing to the services."""
        if self.query:
            return self.raw_path + b"?" + self.query
        return self.raw_path

    def after(self, count: int) -> Target | None:
        """The target below its first `count` segments; None when nothing
        (or only a trailing '/') is left."""
        rest = self.segments[count:]
        if len(rest) == 0 or (len(rest) == 1 and not rest[0].raw):
            return None
        return Target(rest, self.query)

    def problem(self) -> str | None:
        """Why this path must not be forwarded to a service (pure)."""
        for segment in self.segments:
            problem = segment.problem()
            if problem is not None:
                return problem
        return None


def parse_target(raw: bytes) -> Target:
    """The request target of a request line, or BadPath (pure)."""
    if b"#" in raw:
        raise BadPath("a request target must not contain '#' (a fragment)")
    if not _TARGET.match(raw):
        raise BadPath("a request target must be an absolute path of visible ASCII "
                      "characters (percent-encode the others)")
    path, question, query = raw.partition(b"?")
    if _BAD_ESCAPE.search(path):
        raise BadPath("a '%' in a path must start a '%xx' escape")
    segments = tuple(Segment.of(s) for s in path[1:].split(b"/"))
    last = segments[-1].raw
    if last.find(b";") == len(last) - 1 and last:
        raise BadPath("a path must not end in an empty ';' parameter: it would not be "
                      "forwarded as sent")
    return Target(segments, query if question else None)


def routed_target(path: str, query: bytes | None) -> Target:
    """A configured route (`consumers.<name>.paths`, checked by the config)
    with the request's query after its own."""
    parsed = parse_target(path.encode("utf-8"))
    queries = [q for q in (parsed.query, query) if q]
    return Target(parsed.segments, b"&".join(queries) if queries else None)


def forward_url(base_url: str, target: Target) -> bytes:
    """`base_url` + the target, checked against what Agent will send.

    Raises BadPath if Agent's `originForm` would not be exactly the base's
    path followed by `target.origin_form()`: gpumgr never forwards a target
    other than the one it classified.
    """
    base = base_url.encode("utf-8")
    url = base + target.origin_form()
    expected = URI.fromBytes(base).path + target.origin_form()
    if URI.fromBytes(url).originForm != expected:
        raise BadPath("this request target cannot be forwarded as sent")
    return url


__all__ = ["Segment", "Target", "forward_url", "parse_target", "routed_target"]
