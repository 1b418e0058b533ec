"""Decisions behind the connection limits, kept pure so they are tested with numbers.

`site` carries them out: it owns the sockets and the timers, these functions
and small ledgers only say what should happen.
"""

from __future__ import annotations

import enum
import math
from typing import Generic, Hashable, TypeVar

import attrs

#: File descriptors one admitted client connection may hold at worst: its
#: socket, a spooled-body temp file and the upstream connection it is proxied on.
FDS_PER_CONNECTION = 3
#: Descriptors kept for everything else: the listening socket, idle upstream
#: connections in the pools, health probes, nvidia-smi's pipes, logs.
FD_RESERVE = 256
#: A connection still reading its request head becomes sheddable only after
#: this long: in a burst, fresh clients must get the chance to send theirs.
SHED_HEAD_AFTER_S = 1.0


class Phase(enum.Enum):
    """Where a client connection is; each phase has its own deadline."""

    HEAD = "head"  # reading a request line and headers: header_timeout_s from the first byte
    BODY = "body"  # reading a request body: body_idle_timeout_s and min_body_rate_kib_s
    BUSY = "busy"  # a request is being handled: no read deadline; streams may be long
    IDLE = "idle"  # between requests on a kept-alive connection: keepalive_timeout_s
    CLOSING = "closing"  # answered and closing; input is discarded


def refusing_allowance(max_connections: int) -> int:
    """How many connections refused at the cap may linger to read their 503."""
    return max(16, max_connections // 8)


def fds_needed(max_connections: int) -> int:
    """File descriptors gpumgr needs for `max_connections` busy clients (pure)."""
    return (FDS_PER_CONNECTION * max_connections + refusing_allowance(max_connections)
            + FD_RESERVE)


@attrs.frozen
class FdPlan:
    """What to do about RLIMIT_NOFILE before listening."""

    #: Raise the soft limit to this, or None to leave it.
    raise_soft_to: int | None
    #: The connection cap that fits the (possibly raised) limit.
    max_connections: int


def plan_fds(max_connections: int, soft: int, hard: int) -> FdPlan:
    """Fit the connection cap under the descriptor limit, raising the soft limit if we may.

    A cap above what the limit allows would let connections exhaust the
    descriptors before the cap is reached, and then accept() fails and even
    /healthz stops answering: the cap is lowered instead (pure).
    """
    infinite = hard < 0  # RLIM_INFINITY
    needed = fds_needed(max_connections)
    raise_to = None
    if 0 <= soft < needed:
        raise_to = needed if infinite else min(hard, needed)
        if raise_to <= soft:
            raise_to = None
    effective = raise_to if raise_to is not None else soft
    if effective < 0 or effective >= needed:
        return FdPlan(raise_to, max_connections)
    fitting = min(max_connections, (effective - FD_RESERVE) * 8 // (8 * FDS_PER_CONNECTION + 1))
    while fitting > 1 and fds_needed(fitting) > effective:
        fitting -= 1  # the refusing allowance has a floor; a few steps at most
    return FdPlan(raise_to, max(1, fitting))


def body_deadline(
    started_at: float,
    last_byte_at: float,
    received: int,
    idle_s: float,
    grace_s: float,
    min_rate_bytes_s: float,
    max_total_s: float = math.inf,
) -> tuple[float, str]:
    """When a request body becomes late, and why: "idle", "slow" or "long" (pure).

    Apache's mod_reqtimeout rule: a body may pause for at most `idle_s`, and
    after `grace_s` it must have averaged `min_rate_bytes_s`, i.e. every byte
    received buys 1/rate seconds more. One byte every 29 s passes an idle
    limit of 30 s but not the rate. Whatever the rate, the whole body must
    arrive within `max_total_s`: a client that keeps just above the rate
    would otherwise hold its spool reservation for days.
    """
    candidates = [(last_byte_at + idle_s, "idle")]
    if min_rate_bytes_s > 0:
        candidates.append((started_at + grace_s + received / min_rate_bytes_s, "slow"))
    candidates.append((started_at + max_total_s, "long"))
    return min(candidates, key=lambda c: c[0])


#: Routes served from the reserve: what an operator, a monitor or Grafana
#: needs to see and steer gpumgr when everything else is taken.
RESERVED_PATHS = frozenset({b"/healthz", b"/v1/status", b"/metrics"})
RESERVED_PREFIXES = (b"/v1/admin/", b"/v1/consumers/", b"/v1/ready/")
#: Bodies a reserved route may carry and keep its place in the reserve.
RESERVED_BODY_BYTES = 64 * 1024


def uses_reserve(target: bytes) -> bool:
    """Whether a request for this raw request target may take a reserved slot (pure).

    Only the exact spellings: anything else (percent-encoding, `;`, a
    fragment, an absolute URI) counts against the general cap, so no
    spelling can smuggle a tunnel or an upload into the reserve.
    """
    path = target.split(b"?", 1)[0]
    if b"%" in path or b";" in path or b"#" in path or b"/.." in path:
        return False
    return path in RESERVED_PATHS or path.startswith(RESERVED_PREFIXES)


def reserved_slots(max_connections: int, reserved_connections: int) -> int:
    """Connections kept for the reserved routes: at most half the cap (pure)."""
    return max(0, min(reserved_connections, max_connections // 2))


class SpoolLedger:
    """Bytes of request bodies held at once, across all connections.

    A request reserves its declared length up front (so a 1 GB upload is
    refused before it is sent, not half way), or chunk by chunk when the
    length is unknown, and gives it all back when it finishes or its
    connection drops.
    """

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0

    def reserve(self, n: int) -> bool:
        if n < 0:
            raise ValueError(f"cannot reserve {n} bytes")
        if self.used_bytes + n > self.capacity_bytes:
            return False
        self.used_bytes += n
        return True

    def release(self, n: int) -> None:
        if n < 0 or n > self.used_bytes:
            raise ValueError(f"releasing {n} of {self.used_bytes} reserved bytes")
        self.used_bytes -= n


K = TypeVar("K", bound=Hashable)


class ConnectionTable(Generic[K]):
    """Admitted connections, and which of them may be shed for a newcomer.

    At the cap, a new connection takes the place of the one that has waited
    longest without work: idle between requests, or still reading its request
    head after SHED_HEAD_AFTER_S (a slow or silent client). Only when every
    connection is receiving a body or being answered is a newcomer refused.
    So idle and slowloris sockets filling the cap cannot keep /healthz out.

    Requests other than the reserved routes (see `uses_reserve`), tunnels
    and uploads included, may only hold `general_cap` connections at once:
    a request line that would pass it is refused. So the last `reserved`
    connections can only be idle, dawdling (both sheddable) or serving a
    reserved route, and busy tunnels or slow uploads never keep /healthz out.
    """

    def __init__(self, max_connections: int, reserved_connections: int = 0) -> None:
        self.max_connections = max_connections
        self.reserved_connections = reserved_connections
        self.refusing = 0
        self._open: set[K] = set()
        #: Connections handling a request that is not a reserved route.
        self._general: set[K] = set()
        # insertion-ordered: oldest first, since entries are added as phases start
        self._idle: dict[K, float] = {}
        self._head: dict[K, float] = {}

    def __len__(self) -> int:
        return len(self._open)

    def __contains__(self, conn: object) -> bool:
        return conn in self._open

    @property
    def general_cap(self) -> int:
        return self.max_connections - reserved_slots(self.max_connections,
                                                     self.reserved_connections)

    @property
    def general(self) -> int:
        return len(self._general)

    def claim(self, conn: K, target: bytes) -> bool:
        """A request line for `target` arrived on `conn`: may it be served?"""
        return uses_reserve(target) or self.claim_general(conn)

    def claim_body(self, conn: K, length: int | None) -> bool:
        """The request on `conn` has a body of `length` (None: chunked): may it be read?

        A reserved route gets no upload: a body over RESERVED_BODY_BYTES
        counts against the general cap like any other.
        """
        if length is not None and length <= RESERVED_BODY_BYTES:
            return True
        return self.claim_general(conn)

    def claim_general(self, conn: K) -> bool:
        if conn in self._general:
            return True
        if len(self._general) >= self.general_cap:
            return False
        self._general.add(conn)
        return True

    def admit(self, conn: K, now: float) -> tuple[bool, K | None]:
        """(admitted, connection to shed first). Refused: (False, None)."""
        if len(self._open) < self.max_connections:
            self._open.add(conn)
            return True, None
        victim = self.sheddable(now)
        if victim is None:
            return False, None
        self.forget(victim)
        self._open.add(conn)
        return True, victim

    def sheddable(self, now: float) -> K | None:
        idle = next(iter(self._idle.items()), None)
        head = next(iter(self._head.items()), None)
        if head is not None and now - head[1] < SHED_HEAD_AFTER_S:
            head = None
        candidates = [c for c in (idle, head) if c is not None]
        if not candidates:
            return None
        return min(candidates, key=lambda c: c[1])[0]

    def moved(self, conn: K, phase: Phase, now: float) -> None:
        """Record that `conn` entered `phase` at `now`."""
        self._idle.pop(conn, None)
        self._head.pop(conn, None)
        if phase is not Phase.BODY and phase is not Phase.BUSY:
            self._general.discard(conn)  # its request is over
        if conn not in self._open:
            return
        if phase is Phase.IDLE:
            self._idle[conn] = now
        elif phase is Phase.HEAD:
            self._head[conn] = now

    def forget(self, conn: K) -> None:
        self._open.discard(conn)
        self._general.discard(conn)
        self._idle.pop(conn, None)
        self._head.pop(conn, None)
