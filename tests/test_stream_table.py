"""The frame table is the one place a frame is declared: everything else is made from it.

The codec, :class:`FrameType`, the public names of :mod:`pageflip.stream` and the header
checks all follow the table; a frame declared here, in a test, travels without any other
change, and is gone again once it leaves the table.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Self

import pytest

from pageflip import LocalProtocolError, RemoteProtocolError, stream
from pageflip.stream import HEADER, MAGIC, VERSION, Decoder, Event, FrameType, encode
from pageflip.stream.fields import Reader, Writer
from pageflip.stream.table import FRAMES, Frame, frame
from pageflip.stream.wire import U16, U64

PS = 4096
#: A type byte no frame uses, for the frame the tests declare.
SCRATCH = 250


def test_frame_type_is_the_table() -> None:
    assert {(t.name, int(t)) for t in FrameType} == {(f.name, f.code) for f in FRAMES.values()}
    assert [int(t) for t in FrameType] == sorted(FRAMES)


def test_every_frame_is_an_exported_event_that_knows_its_frame() -> None:
    for code, spec in FRAMES.items():
        assert spec.code == code
        assert issubclass(spec.event, Event)
        assert spec.event.FRAME is spec
        assert getattr(stream, spec.event.__name__) is spec.event
        assert spec.event.__name__ in stream.__all__


def test_what_is_no_frame_is_not_exported_as_one() -> None:
    exported = {getattr(stream, name) for name in stream.__all__}
    events = {v for v in exported if isinstance(v, type) and issubclass(v, Event)}
    assert events - {f.event for f in FRAMES.values()} == {Event}


def test_a_frame_type_byte_and_name_are_taken_once() -> None:
    taken = next(iter(FRAMES.values()))

    @dataclass(slots=True)
    class Twin(Event):
        pass

    with pytest.raises(LocalProtocolError, match="not a free u8"):
        frame(taken.code, "TWIN", 0)(Twin)
    with pytest.raises(LocalProtocolError, match="two frames are named"):
        frame(SCRATCH, taken.name, 0)(Twin)
    with pytest.raises(LocalProtocolError, match="out of order"):
        frame(SCRATCH, "TWIN", 8, 4)(Twin)
    assert SCRATCH not in FRAMES


@dataclass(slots=True)
class Ping(Event):
    """A frame of the tests' own: a nonce (u64) and a label behind a u16 length."""

    nonce: int
    label: str

    def write(self, w: Writer) -> None:
        w.uint(U64, self.nonce, "nonce")
        w.text(U16, self.label, 16, "label")

    @classmethod
    def read(cls, r: Reader) -> Self:
        nonce = r.uint(U64, "nonce")
        label = r.text(U16, 16, "label")
        r.finish()
        return cls(nonce, label)


@pytest.fixture
def ping() -> Iterator[Frame]:
    """PING in the table for one test, and out of it again afterwards."""
    try:
        yield frame(SCRATCH, "PING", 10, 10 + 16)(Ping).FRAME
    finally:
        FRAMES.pop(SCRATCH, None)


def test_a_frame_declared_once_travels_both_ways(ping: Frame) -> None:
    data, fds = encode(Ping(7, "hi"), page_size=PS)
    payload = struct.pack("<QH", 7, 2) + b"hi"
    assert (data, fds) == (HEADER.pack(MAGIC, VERSION, SCRATCH, 0, len(payload)) + payload, [])
    dec = Decoder(PS)
    for i in range(len(data)):
        assert dec.next_event() is None
        dec.feed(data[i : i + 1])
    assert dec.next_event() == Ping(7, "hi")
    assert dec.next_event() is None


def test_a_declared_frame_is_checked_like_every_other(ping: Frame) -> None:
    with pytest.raises(LocalProtocolError, match="cannot encode PING: label is 17 bytes"):
        encode(Ping(7, "x" * 17), page_size=PS)
    dec = Decoder(PS)
    dec.feed(HEADER.pack(MAGIC, VERSION, SCRATCH, 1, 10))
    with pytest.raises(RemoteProtocolError, match="a PING frame carries none") as info:
        dec.next_event()
    assert (info.value.frame, info.value.offset) == ("PING", 6)
    dec = Decoder(PS)
    dec.feed(HEADER.pack(MAGIC, VERSION, SCRATCH, 0, 11) + struct.pack("<QHB", 1, 1, 0xFF))
    with pytest.raises(RemoteProtocolError, match="label is not UTF-8") as info:
        dec.next_event()
    assert (info.value.frame, info.value.offset) == ("PING", HEADER.size + 10)


def test_a_frame_out_of_the_table_is_unknown_again(ping: Frame) -> None:
    data = encode(Ping(1, ""), page_size=PS)[0]
    del FRAMES[SCRATCH]
    with pytest.raises(LocalProtocolError, match="not a stream event"):
        encode(Ping(1, ""), page_size=PS)
    dec = Decoder(PS)
    dec.feed(data)
    with pytest.raises(RemoteProtocolError, match=f"unknown frame type {SCRATCH}") as info:
        dec.next_event()
    assert (info.value.frame, info.value.offset) == ("header", 5)


def test_a_frame_without_a_payload_is_its_header_and_is_read_as_one_like_any_other() -> None:
    """PREPARED and COMMIT cross inside a guest's pause: they are encoded and recognised
    whole by their bytes, with the same outcome as a frame read field by field."""
    for event in (stream.Accepted(), stream.Prepared(), stream.Commit(), stream.Recover()):
        data, fds = encode(event, page_size=PS)
        assert (data, fds) == (HEADER.pack(MAGIC, VERSION, event.FRAME.code, 0, 0), [])
        assert event.FRAME.signal == data
        dec = Decoder(PS)
        for i in range(len(data)):  # a header in pieces is waited for
            assert dec.next_event() is None
            dec.feed(data[i : i + 1])
        assert dec.next_event() == event
        assert dec.next_event() is None and dec.offset == len(data)
    assert stream.Resumed.FRAME.signal is None  # it has a payload
    # Two in one read, then a frame with a payload: each in turn.
    dec = Decoder(PS)
    dec.feed(encode(stream.Prepared())[0] + encode(stream.Commit())[0])
    dec.feed(encode(stream.Resumed(1.5))[0])
    assert [dec.next_event() for _ in range(4)] == [
        stream.Prepared(),
        stream.Commit(),
        stream.Resumed(1.5),
        None,
    ]
    # The header checks still stand where the bytes are not exactly a signal's.
    dec = Decoder(PS)
    dec.feed(HEADER.pack(MAGIC, VERSION, stream.Commit.FRAME.code, 0, 4) + b"\0" * 4)
    with pytest.raises(RemoteProtocolError, match="COMMIT takes 0 bytes"):
        dec.next_event()


def test_a_payloadless_frame_out_of_the_table_is_unknown_again() -> None:
    @dataclass(slots=True)
    class Nudge(Event):
        def write(self, w: Writer) -> None:
            pass

        @classmethod
        def read(cls, r: Reader) -> Self:
            return cls()

    try:
        spec = frame(SCRATCH, "NUDGE", 0)(Nudge).FRAME
        data = encode(Nudge(), page_size=PS)[0]
        assert data == spec.signal
        dec = Decoder(PS)
        dec.feed(data)
        assert dec.next_event() == Nudge()
    finally:
        FRAMES.pop(SCRATCH, None)
    dec = Decoder(PS)
    dec.feed(data)
    with pytest.raises(RemoteProtocolError, match=f"unknown frame type {SCRATCH}"):
        dec.next_event()
