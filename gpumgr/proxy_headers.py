"""Which headers cross the proxy, both ways.

Hop-by-hop headers (RFC 9110 7.6.1, those named in `Connection`, and the
proxy-specific ones) are never forwarded; the request gains the client's
address in `X-Forwarded-For`.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

from twisted.web.http_headers import Headers

#: Never forwarded in either direction (RFC 9110 7.6.1 plus proxy-specific ones).
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"expect",
        b"content-length",
    }
)


def _connection_tokens(headers: Headers) -> set[bytes]:
    tokens: set[bytes] = set()
    for value in headers.getRawHeaders(b"connection", []):
        tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return tokens


def _end_to_end(headers: Headers) -> Iterator[tuple[bytes, Sequence[bytes]]]:
    """Yield (name, values) of the headers a proxy may forward."""
    drop = _connection_tokens(headers)
    for name, values in headers.getAllRawHeaders():
        lower = name.lower()
        if lower in _HOP_BY_HOP or lower in drop or lower.startswith(b"proxy-"):
            continue
        yield name, values


def forward_request_headers(headers: Headers, client_ip: str | None) -> Headers:
    """Client request headers as sent upstream: hop-by-hop gone, X-Forwarded-For added."""
    out = Headers()
    for name, values in _end_to_end(headers):
        out.setRawHeaders(name, list(values))
    if client_ip:
        prior = list(headers.getRawHeaders(b"x-forwarded-for", []))
        chain = b", ".join(prior + [client_ip.encode("ascii", "replace")])
        out.setRawHeaders(b"X-Forwarded-For", [chain])
    return out


def copy_response_headers(upstream: Headers, response_headers: Headers) -> None:
    """Upstream response headers onto the client response, hop-by-hop removed."""
    for name, values in _end_to_end(upstream):
        response_headers.setRawHeaders(name, list(values))


def client_ip(request: Any) -> str | None:
    """The client's address, for X-Forwarded-For (None on a non-IP transport)."""
    peer = request.getClientAddress()
    return getattr(peer, "host", None)
