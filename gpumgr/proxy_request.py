"""What goes out to the consumer: the connection and the request body.

The request body was spooled by twisted.web (memory under 100 kB, a temp
file above); it is streamed out with FileBodyProducer, never read whole, and
kept for an out-of-memory replay.
"""

from __future__ import annotations

import io
from typing import IO, Any

from zope.interface import implementer

from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IConsumer, IStreamClientEndpoint
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import Cooperator
from twisted.web.client import URI, FileBodyProducer
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer

_READ_SIZE = 256 * 1024

#: Bodies twisted.web kept in memory (it does so below 100 kB) are written in
#: one go rather than through a Cooperator, which costs a reactor turn.
_SMALL_BODY_BYTES = 1024 * 1024


@implementer(IBodyProducer)
class _BytesProducer:
    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> defer.Deferred[None]:
        consumer.write(self._body)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def body_producer(content: Any, method: bytes,
                  cooperator: Cooperator) -> IBodyProducer | None:
    """The request body as an IBodyProducer; None for a body-less GET/HEAD."""
    if isinstance(content, io.BytesIO) and len(content.getbuffer()) <= _SMALL_BODY_BYTES:
        body = content.getvalue()
        if not body and method in (b"GET", b"HEAD"):
            return None
        return _BytesProducer(body)
    view = _ReplayableBody(content)
    view.seek(0)
    return SpooledBodyProducer(view, cooperator=cooperator, readSize=_READ_SIZE)  # type: ignore[no-untyped-call]


class SpooledBodyProducer(FileBodyProducer):
    """FileBodyProducer that knows whether it is still sending.

    A consumer may answer before it has read the whole body (nginx's `return`
    does). The exchange then ends, twisted.web closes the spooled file, and
    Agent would keep this producer reading it; the exchange stops it instead.
    """

    sending = False

    def startProducing(self, consumer: IConsumer) -> defer.Deferred[None]:
        self.sending = True
        d: defer.Deferred[None] = super().startProducing(consumer)  # type: ignore[no-untyped-call]

        def done(result: object) -> object:
            self.sending = False
            return result

        return d.addBoth(done)


class _ReplayableBody:
    """The spooled request body for FileBodyProducer, which closes its file
    at EOF; the body must survive for an out-of-memory replay."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f

    def read(self, size: int = -1) -> bytes:
        return self._f.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def close(self) -> None:
        pass  # twisted.web closes the real file with the request


@implementer(IAgentEndpointFactory)
class CachedEndpoints:
    """One endpoint per consumer origin, made once.

    Agent's default factory builds a new HostnameEndpoint for every request,
    which was 7.5% of gpumgr's CPU on small requests. Consumers are a handful
    of fixed origins, so the cache is bounded by the config.
    """

    def __init__(self, reactor: Any, connect_timeout_s: float) -> None:
        self._reactor = reactor
        self._timeout = connect_timeout_s
        self._cache: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._cache.get(key)
        if endpoint is None:
            host = uri.host.decode("idna") if isinstance(uri.host, bytes) else uri.host
            endpoint = HostnameEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
            if uri.scheme == b"https":
                endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
            self._cache[key] = endpoint
        return endpoint
