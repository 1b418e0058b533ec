"""The HTTP layer below the Resource tree: the Site and its Request.

Limits that must hold before any Resource runs live here: the request body
limit (refused before it is read), and the bulk read size for uploads.
"""

from __future__ import annotations

import io

from twisted.internet.interfaces import IReactorTime
from twisted.web import server
from twisted.web.resource import Resource

from gpumgr.errors import BodyTooLarge, raw_error_response

#: How long a rejected upload may keep sending before the connection is cut.
_LINGER_S = 2.0
#: Bodies above this (or of unknown length) are read in bigger gulps: Twisted
#: reads 64 KiB per recv(), and a 256 KiB read made a 256 MiB upload ~3x
#: faster in the bench; small requests keep the default, which suits them.
_BULK_BODY_BYTES = 1024 * 1024
_BULK_READ_BYTES = 256 * 1024


class LimitedRequest(server.Request):
    """A Request that refuses bodies over the site's limit without storing them.

    A declared Content-Length over the limit is refused before the body is
    read (and before any `100 Continue`); a chunked body is refused as soon as
    its running size passes the limit. The 413 is written straight to the
    transport, the body received so far is discarded, and the connection is
    closed after a short linger so the client can read the answer.
    """

    _rejected = False
    _received = 0

    def gotLength(self, length):
        limit = self.channel.site.max_body_bytes
        if length is not None and length > limit:
            self.requestHeaders.removeHeader(b"expect")  # no 100 Continue
            self._reject(f"request body of {length} bytes exceeds the {limit}-byte limit")
            return
        if length is None or length > _BULK_BODY_BYTES:
            transport = self.channel.transport
            if hasattr(transport, "bufferSize"):
                transport.bufferSize = _BULK_READ_BYTES
        super().gotLength(length)

    def handleContentChunk(self, data):
        if self._rejected:
            return
        self._received += len(data)
        limit = self.channel.site.max_body_bytes
        if self._received > limit:
            self._reject(f"request body exceeds the {limit}-byte limit")
            return
        super().handleContentChunk(data)

    def requestReceived(self, command, path, version):
        if self._rejected:
            return
        super().requestReceived(command, path, version)

    def _reject(self, message: str) -> None:
        self._rejected = True
        old = getattr(self, "content", None)
        if old is not None:
            old.close()
        self.content = io.BytesIO()
        transport = self.channel.transport
        transport.write(raw_error_response(BodyTooLarge(message)))
        self.channel.persistent = False
        reactor = self.channel.site.clock
        timer = reactor.callLater(_LINGER_S, transport.abortConnection)
        self.notifyFinish().addBoth(lambda _: timer.active() and timer.cancel())
        if hasattr(transport, "loseWriteConnection"):
            transport.loseWriteConnection()
        else:  # pragma: no cover - non-TCP transports
            transport.loseConnection()


class GpumgrSite(server.Site):
    requestFactory = LimitedRequest

    def __init__(self, resource: Resource, clock: IReactorTime, max_body_bytes: int) -> None:
        # parsePOSTFormSubmission: twisted.web would otherwise read a whole form
        # or multipart body into memory to fill request.args (and answer 400
        # itself when it is malformed). A proxy forwards bodies; never parses.
        super().__init__(resource, reactor=clock, parsePOSTFormSubmission=False)
        self.clock = clock
        self.max_body_bytes = max_body_bytes
        self.displayTracebacks = False

    def log(self, request) -> None:
        # Access logging formats a line per request on the hot path; gpumgr
        # logs what matters (errors, health changes) itself.
        pass
