"""gpumgr's own small calls to services (probes, loads, unloads, render
polls), over treq: the drivers' `ControlHttp`.

The data path does not use this: treq adds a cookie jar and gzip decoding,
which is fine for control calls and wrong for a byte-transparent proxy.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from gpumgr import __version__
from gpumgr.drivers.base import HttpReply

#: Replies to these calls are small; anything bigger is cut off rather than read.
_REPLY_BODY_LIMIT = 64 * 1024



#: On gpumgr's own calls (probes, loads, unloads, render polls), so that a
#: service's log tells them from the clients' requests gpumgr relays.
USER_AGENT = f"gpumgr/{__version__}"

class _BoundedReader(Protocol):
    def __init__(self, limit: int) -> None:
        self.done: defer.Deferred[bytes] = defer.Deferred()
        self._limit = limit
        self._chunks: list[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        if self._size < self._limit:
            self._chunks.append(data[: self._limit - self._size])
        self._size += len(data)
        if self._size > self._limit:
            self.transport.stopProducing()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        body = b"".join(self._chunks)
        if reason.check(ResponseDone, PotentialDataLoss) or self._size > self._limit:
            self.done.callback(body)
        else:
            self.done.errback(reason)


def read_bounded(response: Any, limit: int = _REPLY_BODY_LIMIT) -> defer.Deferred[bytes]:
    reader = _BoundedReader(limit)
    response.deliverBody(reader)
    return reader.done


class ServiceCalls:
    """`ControlHttp` over treq: probes, loads, unloads and render polls.

    Every reply body is read bounded; callers put their own deadlines on the
    returned Deferreds (cancelling one aborts the call).
    """

    def __init__(self, http: Any) -> None:
        """`http` is a `treq.client.HTTPClient` (or `treq.testing.StubTreq`)."""
        self._http = http

    def request(self, method: str, url: str, body: bytes | None = None,
                content_type: str | None = None) -> defer.Deferred[HttpReply]:
        return defer.ensureDeferred(self._request(method, url, body, content_type))

    async def _request(self, method: str, url: str, body: bytes | None,
                       content_type: str | None) -> HttpReply:
        headers = {"User-Agent": [USER_AGENT]}
        if content_type:
            headers["Content-Type"] = [content_type]
        response = await self._http.request(method, url, data=body, headers=headers,
                                            unbuffered=True)
        data = await read_bounded(response)
        return HttpReply(response.code, data)
