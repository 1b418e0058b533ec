"""gpumgr.testing.websocket: frames, the protocol in memory, and real sockets end to end."""

from __future__ import annotations

import struct

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from gpumgr.testing.websocket import (
    CloseInfo,
    ConnectionClosed,
    FrameDecoder,
    Opcode,
    ProtocolError,
    WebSocketConnection,
    accept_key,
    encode_frame,
)

MASK = b"\x01\x02\x03\x04"


# -- frames -------------------------------------------------------------------------


def test_accept_key_is_the_rfc_example():
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
@pytest.mark.parametrize("masked", [True, False])
def test_frames_round_trip_at_every_length_boundary(size, masked):
    payload = bytes(i % 251 for i in range(size))
    wire = encode_frame(Opcode.BINARY, payload, mask=MASK if masked else None)
    decoder = FrameDecoder(masked=masked)
    # Split awkwardly: a frame must come out whole however the bytes arrive.
    frames = decoder.feed(wire[:1]) + decoder.feed(wire[1:3]) + decoder.feed(wire[3:])
    assert len(frames) == 1
    assert frames[0].payload == payload and frames[0].fin and frames[0].opcode == Opcode.BINARY


def test_a_masked_frame_is_really_masked_on_the_wire():
    wire = encode_frame(Opcode.TEXT, b"hello", mask=MASK)
    assert b"hello" not in wire and wire[1] & 0x80


def test_two_frames_in_one_read_come_out_in_order():
    decoder = FrameDecoder(masked=False)
    frames = decoder.feed(encode_frame(Opcode.TEXT, b"a", fin=False)
                          + encode_frame(Opcode.CONTINUATION, b"b"))
    assert [(f.opcode, f.payload, f.fin) for f in frames] == [(1, b"a", False), (0, b"b", True)]


@pytest.mark.parametrize("masked,wire,code", [
    (True, encode_frame(Opcode.TEXT, b"x"), 1002),                     # server needs a mask
    (False, encode_frame(Opcode.TEXT, b"x", mask=MASK), 1002),         # client refuses one
    (False, encode_frame(Opcode.TEXT, b"x", rsv=4), 1002),             # no extension agreed
    (False, encode_frame(3, b"x"), 1002),                              # reserved opcode
    (False, b"\x82\x7f" + struct.pack("!Q", 1 << 63), 1002),           # 64-bit top bit
    (False, b"\x82\x7f" + struct.pack("!Q", 1 << 30), 1009),           # over the limit
])
def test_decoder_refuses_bad_frames(masked, wire, code):
    with pytest.raises(ProtocolError) as e:
        FrameDecoder(masked=masked, max_frame_bytes=1 << 20).feed(wire)
    assert e.value.code == code


# -- the protocol in memory --------------------------------------------------------------


def _server_side(**kw):
    clock = Clock()
    conn = WebSocketConnection(clock, **kw)
    transport = StringTransport()
    conn.makeConnection(transport)
    return conn, transport, clock


def _frames_written(transport, masked=False):
    return FrameDecoder(masked=masked).feed(transport.value())


def test_ping_is_answered_with_the_same_payload():
    conn, transport, _ = _server_side()
    conn.dataReceived(encode_frame(Opcode.PING, b"are you there", mask=MASK))
    [pong] = _frames_written(transport)
    assert pong.opcode == Opcode.PONG and pong.payload == b"are you there"


def test_fragments_are_joined_and_a_ping_may_come_between_them():
    got = []
    conn, transport, _ = _server_side(on_message=got.append)
    conn.dataReceived(encode_frame(Opcode.TEXT, "hé".encode()[:2], fin=False, mask=MASK)
                      + encode_frame(Opcode.PING, b"p", mask=MASK))
    assert got == []
    conn.dataReceived(encode_frame(Opcode.CONTINUATION, "hé".encode()[2:], mask=MASK))
    assert got == ["hé"]
    assert [f.opcode for f in _frames_written(transport)] == [Opcode.PONG]


@pytest.mark.parametrize("wire,code", [
    (encode_frame(Opcode.TEXT, b"\xff\xfe", mask=MASK), 1007),
    (encode_frame(Opcode.CONTINUATION, b"x", mask=MASK), 1002),
    (encode_frame(Opcode.PING, b"x", fin=False, mask=MASK), 1002),
    (encode_frame(Opcode.CLOSE, b"\x03", mask=MASK), 1002),
    (encode_frame(Opcode.CLOSE, struct.pack("!H", 1005), mask=MASK), 1002),
    (encode_frame(Opcode.TEXT, b"x"), 1002),
])
def test_a_broken_peer_gets_a_close_frame_and_the_tcp_connection_dropped(wire, code):
    closed = []
    conn, transport, _ = _server_side(on_close=closed.append)
    conn.dataReceived(wire)
    [close] = _frames_written(transport)
    assert close.opcode == Opcode.CLOSE and struct.unpack("!H", close.payload[:2])[0] == code
    assert transport.disconnecting and not transport.disconnected  # dropped, not aborted
    conn.connectionLost(None)
    assert closed == [CloseInfo(code, closed[0].reason, clean=False)]


def test_a_peer_that_never_answers_our_close_is_cut_off_after_the_timeout():
    conn, transport, clock = _server_side(close_timeout_s=5)
    closed = conn.close(1001, "going away")
    [frame] = _frames_written(transport)
    assert frame.payload == struct.pack("!H", 1001) + b"going away"
    assert not conn.send_text("too late")  # nothing after our close
    clock.advance(4.9)
    assert not transport.disconnecting and not closed.called
    clock.advance(0.2)
    assert transport.disconnected  # StringTransport.abortConnection sets this
    conn.connectionLost(None)
    assert closed.result == CloseInfo(1006, "", clean=False)


def test_the_server_answers_a_close_and_drops_tcp_first():
    conn, transport, _ = _server_side()
    conn.dataReceived(encode_frame(Opcode.CLOSE, struct.pack("!H", 1000) + b"bye", mask=MASK))
    [echo] = _frames_written(transport)
    assert echo.opcode == Opcode.CLOSE and echo.payload == struct.pack("!H", 1000)
    assert transport.disconnecting
    conn.connectionLost(None)
    assert conn.close_info == CloseInfo(1000, "bye", clean=True)


@pytest_twisted.ensureDeferred
async def test_waiting_for_a_message_fails_when_the_connection_ends():
    conn, _, _ = _server_side()
    waiting = defer.ensureDeferred(conn.next_message())
    conn.connectionLost(None)
    with pytest.raises(ConnectionClosed):
        await waiting
    with pytest.raises(ConnectionClosed):
        await conn.next_message()
