"""The response body, from the consumer back to the client.

Chunks are written through as they come, with the upstream transport
registered as the client's push producer: a slow client pauses the
upstream. The deadlines (upstream idle, client stall) and the decisions are
the exchange's (gpumgr.proxy); these protocols only report to it, through
the `BodySink` it implements.
"""

from __future__ import annotations

from typing import Any, Protocol as TypingProtocol

from zope.interface import implementer

from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse

#: How much of a 5xx body is held back to look for "out of memory".
_OOM_PEEK_BYTES = 64 * 1024


def is_oom(body: bytes) -> bool:
    return b"out of memory" in body.lower()


class BodySink(TypingProtocol):
    """What the relays tell the exchange (gpumgr.proxy._Exchange)."""

    @property
    def client_gone(self) -> bool: ...

    @property
    def finish_upstream(self) -> bool: ...

    def send_head(self, response: IResponse) -> None: ...

    def hold_started(self, transport: Any) -> None: ...

    def hold_data(self) -> None: ...

    def out_of_memory(self, body: bytes) -> None: ...

    def body_started(self, transport: Any) -> None: ...

    def body_data(self, data: bytes) -> None: ...

    def capture(self, data: bytes) -> None: ...

    def client_paused(self) -> None: ...

    def client_resumed(self) -> None: ...

    def body_ended(self, reason: Failure) -> None: ...


@implementer(IPushProducer)
class WatchedProducer:
    """The upstream transport as the client's producer, with a stall deadline.

    twisted.web pauses it when the client stops reading. Paused longer than
    the stall timeout, the exchange gives up rather than hold the GPU forever.
    """

    def __init__(self, transport: Any, exchange: BodySink) -> None:
        self._transport = transport
        self._exchange = exchange

    def pauseProducing(self) -> None:
        self._exchange.client_paused()
        self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._exchange.client_resumed()
        self._transport.resumeProducing()

    def stopProducing(self) -> None:
        if self._exchange.finish_upstream:
            # The client left, but the consumer's answer is still wanted (it
            # names GPU work that goes on): keep reading it, to nobody.
            self._exchange.client_resumed()
            self._transport.resumeProducing()
            return
        self._transport.stopProducing()


class Relay(Protocol):
    """Writes upstream body chunks straight to the client, with backpressure.

    When `holding`, the body is kept back (up to _OOM_PEEK_BYTES) so that an
    out-of-memory answer can be replayed instead of relayed; past the limit,
    or if it is not an OOM, what was held goes out and relaying continues.
    """

    def __init__(self, exchange: BodySink, response: IResponse, holding: bool) -> None:
        self._exchange = exchange
        self._response = response
        self._held: list[bytes] | None = [] if holding else None
        self._held_size = 0

    def connectionMade(self) -> None:
        if self._held is None:
            self._exchange.body_started(self.transport)
        else:
            self._exchange.hold_started(self.transport)

    def dataReceived(self, data: bytes) -> None:
        if self._held is None:
            self._exchange.body_data(data)
            return
        self._held.append(data)
        self._held_size += len(data)
        self._exchange.hold_data()
        if self._held_size > _OOM_PEEK_BYTES:
            self._release()

    def _release(self) -> None:
        held, self._held = self._held, None
        self._exchange.send_head(self._response)
        self._exchange.body_started(self.transport)
        for chunk in held or ():
            self._exchange.body_data(chunk)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._held is not None and self._exchange.client_gone:
            self._held = None  # nobody to release it to
        if self._held is not None:
            body = b"".join(self._held)
            if isinstance(reason.value, (ResponseDone, PotentialDataLoss)) and is_oom(body):
                self._exchange.out_of_memory(body)
                return
            self._release()
        self._exchange.body_ended(reason)


class Drain(Protocol):
    """Reads an answer nobody will receive, keeping its head (see finish_upstream)."""

    def __init__(self, exchange: BodySink) -> None:
        self._exchange = exchange

    def dataReceived(self, data: bytes) -> None:
        self._exchange.capture(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._exchange.body_ended(reason)


class Discard(Protocol):
    """Stops an answer nobody will receive, at once."""

    def connectionMade(self) -> None:
        self.transport.stopProducing()  # type: ignore[union-attr]


def abort_client(request: Any) -> None:
    """Drop the client's connection: a truncated body is never `finish()`ed."""
    transport = getattr(request.channel, "transport", None) if request.channel else None
    if transport is not None:
        transport.abortConnection()
