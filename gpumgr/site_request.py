"""The Request: body limits, the upload spool, HEAD answered like GET.

Refusals go through the channel (gpumgr.site_channel), which writes them and
closes the connection; this module only decides when.
"""

from __future__ import annotations

import io
from typing import Any, Protocol

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server

from gpumgr.errors import BodyTooLarge, GpumgrError, MethodNotAllowed, SpoolFull, write_error
from gpumgr.limits import SpoolLedger

#: The namespace of the module this came from: log lines are unchanged.
log = Logger(namespace="gpumgr.site")

#: Bodies above this (or of unknown length) are read in bigger gulps: Twisted
#: reads 64 KiB per recv(), and a 256 KiB read made a 256 MiB upload ~3x
#: faster in the bench; small requests keep the default, which suits them.
_BULK_BODY_BYTES = 1024 * 1024
_BULK_READ_BYTES = 256 * 1024


class SiteLimits(Protocol):
    """What a request reads from its Site: the body limit and the spool."""

    max_body_bytes: int
    spool: SpoolLedger


class RefusingChannel(Protocol):
    """What a request asks of its channel (gpumgr.site_channel.GpumgrChannel)."""

    #: A TCP transport (abortConnection, bufferSize).
    transport: Any

    @property
    def site(self) -> SiteLimits: ...

    def refuse(self, error: GpumgrError) -> None: ...

    def body_progress(self, n: int) -> None: ...


class LimitedRequest(server.Request):
    """A Request that enforces the body limits and answers HEAD like GET.

    A declared Content-Length over `max_body_mib`, or that would take the
    spool past `max_spool_mib`, is refused before the body is read (and
    before any `100 Continue`); a chunked body is refused as soon as its
    running size passes either. The spool reservation is given back when
    the request finishes or its connection drops, whichever comes first.
    """

    #: Always a GpumgrChannel (an HTTPChannel), seen through what a request
    #: needs of it: site_channel imports this module, not the other way.
    channel: RefusingChannel  # type: ignore[assignment]
    content: Any
    #: True for a HEAD request, routed as GET; twisted.web drops the body.
    answering_head = False
    _abandoned = False
    _received = 0
    _reserved = 0
    _spool: SpoolLedger | None = None

    def gotLength(self, length: int | None) -> None:
        channel = self.channel
        site = channel.site
        limit = site.max_body_bytes
        if length is not None and length > limit:
            channel.refuse(BodyTooLarge(
                f"request body of {length} bytes exceeds the {limit}-byte limit"))
            return
        if length and not self._reserve(site.spool, length):
            channel.refuse(SpoolFull(
                f"gpumgr is already holding {site.spool.used_bytes} bytes of uploads; "
                f"{length} more would pass limits.max_spool_mib", retry_after_s=5))
            return
        if length is None or length > _BULK_BODY_BYTES:
            transport = channel.transport
            if hasattr(transport, "bufferSize"):
                transport.bufferSize = _BULK_READ_BYTES
        super().gotLength(length)  # type: ignore[no-untyped-call]

    def handleContentChunk(self, data: bytes) -> None:
        if self._abandoned:
            return
        channel = self.channel
        self._received += len(data)
        channel.body_progress(len(data))
        site = channel.site
        limit = site.max_body_bytes
        if self._received > limit:
            channel.refuse(BodyTooLarge(f"request body exceeds the {limit}-byte limit"))
            return
        more = self._received - self._reserved
        if more > 0 and not self._reserve(site.spool, more):
            channel.refuse(SpoolFull(
                f"gpumgr is already holding {site.spool.used_bytes} bytes of uploads; "
                "this body would pass limits.max_spool_mib", retry_after_s=5))
            return
        super().handleContentChunk(data)  # type: ignore[no-untyped-call]

    def _reserve(self, spool: SpoolLedger, n: int) -> bool:
        if not spool.reserve(n):
            return False
        if self._spool is None:
            self._spool = spool
            self.notifyFinish().addBoth(self._release)
        self._reserved += n
        return True

    def _release(self, _: Any = None) -> None:
        if self._spool is not None and self._reserved:
            self._spool.release(self._reserved)
        self._reserved = 0

    def abandon(self) -> None:
        """The channel refused this request: drop what was spooled, at once."""
        self._abandoned = True
        if self.content is not None:
            self.content.close()
        self.content = io.BytesIO()
        self._release()

    def process(self) -> None:
        if self.method == b"HEAD":
            # Route as GET, so every GET route answers HEAD; the first write
            # turns the method back, and twisted.web then sends headers only.
            self.method = b"GET"
            self.answering_head = True
            self.write = self._write_head  # type: ignore[method-assign]
        super().process()  # type: ignore[no-untyped-call]

    def _write_head(self, data: bytes) -> None:
        del self.write  # back to the class's write
        self.method = b"HEAD"
        self.write(data)  # type: ignore[no-untyped-call]

    def processingFailed(self, reason: Failure) -> None:
        """A Resource raised: log it, and answer JSON rather than twisted.web's HTML page."""
        log.failure("rendering {method} {uri} failed", reason,
                    method=self.method, uri=self.uri)
        if self._disconnected or self.finished:
            return
        if self.startedWriting:
            # Half a response must never look complete.
            self.channel.transport.abortConnection()
            return
        write_error(self, GpumgrError("internal error; see the gpumgr log"))

    def _handleStar(self) -> None:
        if self.method == b"OPTIONS":
            super()._handleStar()  # type: ignore[no-untyped-call]
        else:
            write_error(self, MethodNotAllowed(self.method.decode("ascii", "replace"),
                                               ("OPTIONS",)))
