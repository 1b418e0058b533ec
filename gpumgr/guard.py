"""Who may use an admin route, or a service's own control route reached
through pass-through: the page (Host, Origin: not a web page's), what it
sends (JSON or nothing), and the client (the bearer token, or loopback).

Each check is a function of the request that returns the error to answer
with, or None (gpumgr.web raises it)."""

from __future__ import annotations

import hmac
import ipaddress
import re
import socket
from typing import Any, Iterable
from urllib.parse import urlsplit

from gpumgr.config import Config
from gpumgr.errors import Forbidden, GpumgrError, Unauthorized, UnsupportedMediaType


#: Read at most this much of a body (the media check; ollama's unload is told by its body).
_BODY_MAX_BYTES = 32 * 1024 * 1024


def read_body(request: Any) -> bytes | None:
    """The spooled request body; None when over _BODY_MAX_BYTES."""
    content = request.content
    if content is None:
        return b""
    position = content.tell()
    try:
        content.seek(0)
        body = content.read(_BODY_MAX_BYTES + 1)
    finally:
        content.seek(position)
    return None if len(body) > _BODY_MAX_BYTES else bytes(body)


def _is_loopback(request: Any) -> bool:
    """The client is on this host: 127.0.0.0/8, ::1, or IPv4-mapped loopback.

    A dual-stack listener (tcp6 on ::) sees IPv4 clients as ::ffff:127.0.0.1,
    which ipaddress does not call loopback by itself (before Python 3.13).
    """
    host = getattr(request.getClientAddress(), "host", None)
    if not isinstance(host, str):
        return False
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def admin_refusal(request: Any, token: str | None) -> GpumgrError | None:
    """Bearer token when one is configured; otherwise loopback clients only.

    An empty or blank token is never a match, even if one slipped past the
    config check: `Authorization: Bearer ` must not open the door.
    """
    if token is None:
        if _is_loopback(request):
            return None
        return Forbidden("admin endpoints are served to loopback clients only "
                         "unless admin_token is set")
    expected = token.strip().encode("utf-8")
    given = request.getHeader(b"authorization") or b""
    scheme, _, value = given.partition(b" ")
    value = value.strip()
    if (expected and value and scheme.lower() == b"bearer"
            and hmac.compare_digest(value, expected)):
        return None
    return Unauthorized("a valid 'Authorization: Bearer <admin_token>' is required")


def _host_and_port(value: str) -> tuple[str, int | None] | None:
    """`host[:port]` of a Host header (IPv6 in brackets); None if malformed."""
    if value.startswith("["):
        host, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        port_text = rest[1:] if rest else None
    else:
        host, colon, port_text_ = value.partition(":")
        port_text = port_text_ if colon else None
        if ":" in port_text_:
            return None
    if not host:
        return None
    if port_text is None:
        return host.lower().rstrip("."), None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        return None
    return host.lower().rstrip("."), int(port_text)


_IPV4_ANY_SPELLING = re.compile(r"\A[0-9a-fA-FxX.]+\Z")


def is_loopback_name(host: str) -> bool:
    """`localhost`, a `.localhost` name, or a loopback address in any
    spelling (127.1, 2130706433, 0x7f.0.0.1, ::1, ::ffff:127.0.0.1)."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        if _IPV4_ANY_SPELLING.match(host) is None:
            return False
        try:
            return socket.inet_aton(host)[0] == 127
        except OSError:
            return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _header_values(request: Any, name: bytes) -> list[str]:
    return [v.decode("latin-1").strip() for v in request.requestHeaders.getRawHeaders(name) or []]


def page_refusal(request: Any, allowed_hosts: Iterable[str]) -> GpumgrError | None:
    """Refuse what a web page, not an operator, would send (DNS rebinding, a
    cross-site form or fetch): a Host that is neither loopback nor one of
    `allowed_hosts`, and an Origin other than gpumgr's own (same host and
    port as the Host)."""
    hosts = _header_values(request, b"host")
    if len(hosts) > 1:
        return Forbidden("admin routes refuse a request with more than one Host header")
    own: tuple[str, int | None] | None = None
    if hosts:
        host_header = hosts[0]
        own = _host_and_port(host_header)
        if own is None:
            return Forbidden(f"admin routes refuse the malformed Host {host_header!r}")
        if not is_loopback_name(own[0]) and own[0] not in allowed_hosts:
            return Forbidden(f"admin routes answer for loopback addresses, localhost and "
                             f"allowed_hosts only, not for Host {own[0]!r}")
    origins = _header_values(request, b"origin")
    if not origins:
        return None
    if len(origins) > 1 or own is None or not _same_origin(origins[0], own):
        return Forbidden(f"admin routes refuse requests from web pages of other origins "
                         f"(Origin: {', '.join(origins)})")
    return None


def _same_origin(origin: str, own: tuple[str, int | None]) -> bool:
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path \
            or parts.query or parts.fragment:
        return False
    default = 443 if parts.scheme == "https" else 80
    return (parts.hostname.rstrip("."), port or default) == (own[0], own[1] or default)


def media_refusal(request: Any) -> GpumgrError | None:
    """A state change is a JSON request, or has no body: a page can send
    text/plain, forms and multipart across sites without asking first."""
    content_types = _header_values(request, b"content-type")
    if len(content_types) > 1:
        return UnsupportedMediaType("send one Content-Type: application/json")
    if not content_types:
        if read_body(request) == b"":
            return None
        return UnsupportedMediaType("a request body needs Content-Type: application/json")
    media = content_types[0].partition(";")[0].strip().lower()
    if media != "application/json":
        return UnsupportedMediaType(
            f"admin routes accept application/json (or no body), not {media or '(empty)'}")
    return None


def admin_guard(request: Any, config: Config, check_media_type: bool = True) -> GpumgrError | None:
    """Everything an admin or control route checks, in order: who the page
    is (Host, Origin), what it sends (JSON or nothing), who the client is
    (the bearer token, or loopback)."""
    return (page_refusal(request, config.allowed_hosts)
            or (media_refusal(request) if check_media_type else None)
            or admin_refusal(request, config.admin_token))
