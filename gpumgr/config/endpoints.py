"""Listen endpoints: their port and interface, and which consumer URLs loop back to them.

Pure and without DNS: a consumer URL that would make gpumgr proxy to itself
(and wait for its own GPU lock) is refused at load, in any spelling of a
loopback or unspecified address that the resolver accepts.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from typing import Mapping
from urllib.parse import urlsplit

import attrs

from gpumgr.config.schema import ConsumerConfig

DEFAULT_LISTEN = "tcp:8770:interface=127.0.0.1"


@attrs.frozen
class ListenAddress:
    """Where a tcp/tcp6 listen endpoint accepts connections."""

    port: int
    #: "" (tcp) or "::" (tcp6) for every interface.
    interface: str
    ipv6: bool


def _split_endpoint(description: str) -> list[str]:
    """Split a Twisted endpoint description on unescaped ':' (as serverFromString does)."""
    parts, current, escaped = [], [], False
    for ch in description:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def listen_address(description: str) -> ListenAddress | None:
    """The port and interface of a tcp or tcp6 endpoint; None for other kinds (pure).

    Raises ValueError when a tcp port is not a number from 0 to 65535.
    """
    kind, *args = _split_endpoint(description)
    if kind not in ("tcp", "tcp6"):
        return None
    positional = [a for a in args if "=" not in a]
    named = dict(a.split("=", 1) for a in args if "=" in a)
    port_text = named.get("port", positional[0] if positional else None)
    if port_text is None:
        raise ValueError("has no port")
    if not port_text.strip().isdigit() or int(port_text) > 65535:
        raise ValueError(f"port must be a number from 0 to 65535, got {port_text!r}")
    default_interface = "::" if kind == "tcp6" else ""
    interface = named.get("interface", positional[1] if len(positional) > 1 else default_interface)
    return ListenAddress(port=int(port_text), interface=interface, ipv6=kind == "tcp6")


def listen_problem(description: str) -> str | None:
    """What is wrong with a listen endpoint that can be told without a reactor (pure)."""
    try:
        listen_address(description)
    except ValueError as e:
        return f"invalid endpoint {description!r}: {e}"
    return None


#: What inet_aton may read as an IPv4 address: 1 to 4 parts, decimal, octal
#: (leading 0) or hex (0x). Checked first, since inet_aton ignores anything
#: after a space.
_LEGACY_IPV4_RE = re.compile(r"\A(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}\Z", re.I)


def literal_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a literal host names, as the resolver reads it; None for a name (pure).

    getaddrinfo takes every inet_aton spelling of IPv4 (`2130706433`,
    `127.1`, `0x7f.1`, `0177.0.0.1`, `0`), so they are normalised the same
    way; an IPv4-mapped IPv6 address is its IPv4 address.
    """
    text = host.strip("[]").split("%", 1)[0]
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(text)
    except ValueError:
        if not _LEGACY_IPV4_RE.match(text):
            return None
        try:
            address = ipaddress.IPv4Address(socket.inet_aton(text))
        except OSError:
            return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def url_reaches_listener(url: str, listen: ListenAddress) -> bool:
    """Whether a consumer URL would connect back to gpumgr's own listener (pure).

    Only what can be told without DNS: a loopback, unspecified or `localhost`
    host against an every-interface listener, or the listener's own address.
    """
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return False
    if listen.port == 0 or port != listen.port or parts.hostname is None:
        return False
    host = parts.hostname.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        candidates = [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    else:
        address = literal_address(host)
        if address is None:
            return False  # a name: resolving it here would make loading depend on DNS
        candidates = [address]
    interface = literal_address(listen.interface) if listen.interface else None
    if listen.interface == "" or (interface is not None and interface.is_unspecified):
        # tcp6 on "::" is dual-stack: it takes IPv4 connections too.
        families = (4, 6) if listen.ipv6 else (4,)
        return any(a.version in families and (a.is_loopback or a.is_unspecified)
                   for a in candidates)
    if interface is None:
        return host == listen.interface.lower().rstrip(".")
    # Connecting to 0.0.0.0 or :: reaches the local host on any address.
    return any(a == interface or (a.is_unspecified and a.version == interface.version)
               for a in candidates)


def find_self_reference(listen: str, consumers: Mapping[str, ConsumerConfig]) -> str | None:
    """The first consumer whose URL is gpumgr's own listen address, if any (pure)."""
    try:
        address = listen_address(listen)
    except ValueError:
        return None
    if address is None:
        return None
    for name, consumer in consumers.items():
        if url_reaches_listener(consumer.url, address):
            return name
    return None

