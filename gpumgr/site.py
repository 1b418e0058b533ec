"""The HTTP layer below the Resource tree: the Site, its channel and its Request.

The channel lives in gpumgr.site_channel, the Request in gpumgr.site_request;
both are re-exported here.

What must hold before any Resource runs lives here, so that no client,
however slow, silent or malformed, can starve the others or `/healthz`:

- connections: at most `limits.max_connections`; at the cap, an idle or
  head-dawdling connection is shed for the newcomer, else it gets 503;
  `limits.reserved_connections` of them only serve /healthz, /v1/status,
  /metrics and admin, so tunnels and uploads never take the last one;
- time: a deadline for the whole request head, for an idle kept-alive
  connection, and for a request body that stalls, trickles or simply takes
  longer than `limits.max_upload_s` (408);
- size: request line (414), header count and bytes (431), the body (413)
  and all bodies spooled at once (507);
- hygiene: one Host header on HTTP/1.1, a printable request target (400),
  HEAD answered wherever GET is.

Every refusal is a JSON error (`errors.raw_error_response`) written straight
to the socket, then the connection is closed; nothing refused reaches a
Resource. twisted.web's own idle timeout (`Site.timeOut`) is switched off:
it restarts on every byte, so a client sending one byte a second is never
timed out, and it is off while a request is handled. The deadlines below
replace it, and while a request is handled there is none, so long streamed
responses are never cut (the proxy's client_stall_timeout_s covers those).
"""

from __future__ import annotations

import collections
import resource as _resource
from typing import Any, Callable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web import server
from twisted.web.resource import Resource

from gpumgr.config import LimitsConfig
from gpumgr.limits import ConnectionTable, SpoolLedger, plan_fds
from gpumgr.site_channel import GpumgrChannel, request_line_problem
from gpumgr.site_request import LimitedRequest

__all__ = [
    "GpumgrChannel",
    "GpumgrSite",
    "LimitedRequest",
    "RlimitGetter",
    "RlimitSetter",
    "request_line_problem",
]

log = Logger()


RlimitGetter = Callable[[int], tuple[int, int]]
RlimitSetter = Callable[[int, tuple[int, int]], None]


class GpumgrSite(server.Site):
    requestFactory = LimitedRequest
    protocol = GpumgrChannel  # type: ignore[assignment]

    def __init__(
        self,
        resource: Resource,
        clock: IReactorTime,
        limits: LimitsConfig,
        getrlimit: RlimitGetter = _resource.getrlimit,
        setrlimit: RlimitSetter = _resource.setrlimit,
    ) -> None:
        # parsePOSTFormSubmission: twisted.web would otherwise read a whole form
        # or multipart body into memory to fill request.args (and answer 400
        # itself when it is malformed). A proxy forwards bodies; never parses.
        super().__init__(resource, reactor=clock, parsePOSTFormSubmission=False)  # type: ignore[no-untyped-call]
        self.timeOut = None  # the channel's own deadlines replace it (module docstring)
        self.clock = clock
        self.limits = limits
        self.max_body_bytes = limits.max_body_bytes
        self.spool = SpoolLedger(limits.max_spool_bytes)
        self.connections: ConnectionTable[GpumgrChannel] = ConnectionTable(
            limits.max_connections, limits.reserved_connections)
        #: error code (or "shed") -> how many times; for status and tests.
        self.refusals: collections.Counter[str] = collections.Counter()
        self.displayTracebacks = False
        self._getrlimit = getrlimit
        self._setrlimit = setrlimit

    def startFactory(self) -> None:
        super().startFactory()
        self._fit_fd_limit()

    def _fit_fd_limit(self) -> None:
        """Keep the connection cap below the descriptor limit (see limits.plan_fds)."""
        kind = _resource.RLIMIT_NOFILE
        soft, hard = self._getrlimit(kind)
        configured = self.limits.max_connections
        plan = plan_fds(configured, soft, hard)
        if plan.raise_soft_to is not None:
            try:
                self._setrlimit(kind, (plan.raise_soft_to, hard))
                soft = plan.raise_soft_to
            except (ValueError, OSError) as e:
                log.warn("could not raise the open-file limit from {soft} to {want}: {e}",
                         soft=soft, want=plan.raise_soft_to, e=e)
                plan = plan_fds(configured, soft, soft)
        if plan.max_connections < configured:
            log.warn(
                "limits.max_connections {configured} does not fit the open-file limit "
                "{soft} (systemd: LimitNOFILE); serving at most {cap} connections",
                configured=configured, soft=soft, cap=plan.max_connections)
        self.connections.max_connections = plan.max_connections

    def log(self, request: Any) -> None:
        # twisted.web's access line is off: gpumgr writes its own, one per
        # proxied request with its consumer, wait and GPU time (gpumgr.accounting).
        pass
