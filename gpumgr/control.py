"""Control calls to consumers (health probes; later load and unload), over treq.

The data path does not use this: treq adds a cookie jar and gzip decoding,
which is fine for control calls and wrong for a byte-transparent proxy.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from gpumgr.config import HttpCall

#: Control replies are small; anything bigger is cut off rather than read.
_CONTROL_BODY_LIMIT = 64 * 1024


class ControlCallFailed(Exception):
    pass


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
            self.transport.stopProducing()

    def connectionLost(self, reason) -> None:
        body = b"".join(self._chunks)
        if reason.check(ResponseDone, PotentialDataLoss) or self._size > self._limit:
            self.done.callback(body)
        else:
            self.done.errback(reason)


def read_bounded(response: Any, limit: int = _CONTROL_BODY_LIMIT) -> defer.Deferred[bytes]:
    reader = _BoundedReader(limit)
    response.deliverBody(reader)
    return reader.done


class ControlClient:
    def __init__(self, http) -> None:
        """`http` is a `treq.client.HTTPClient` (or `treq.testing.StubTreq`)."""
        self._http = http

    @defer.inlineCallbacks
    def probe(self, url: str):
        """Health probe: GET; any 2xx is healthy."""
        response = yield self._http.get(url, unbuffered=True)
        body = yield read_bounded(response)
        if not 200 <= response.code < 300:
            snippet = body[:200].decode("utf-8", "replace").strip()
            raise ControlCallFailed(f"health check answered HTTP {response.code}: {snippet}")

    @defer.inlineCallbacks
    def call(self, base_url: str, call: HttpCall):
        """A load or unload call; returns the reply body, fails unless 2xx."""
        headers = {"Content-Type": [call.content_type]} if call.content_type else {}
        response = yield self._http.request(
            call.method, base_url + call.path, data=call.body or None,
            headers=headers, unbuffered=True,
        )
        body = yield read_bounded(response)
        if not 200 <= response.code < 300:
            snippet = body[:200].decode("utf-8", "replace").strip()
            raise ControlCallFailed(f"{call.method} {call.path} answered HTTP {response.code}: {snippet}")
        return body
