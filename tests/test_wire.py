"""The channel's sans-I/O codec: fed whole, byte by byte, with trailing data, and garbage."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pageflip import LocalProtocolError, RemoteProtocolError
from pageflip._wire import (
    HEADER,
    MAGIC,
    SPAN,
    Decoder,
    Done,
    Frame,
    FrameType,
    Hello,
    Offer,
    OfferFlags,
    Pipe,
    Pull,
    PullMethod,
    Refuse,
    SpanRow,
    encode,
)


def spans(*rows: tuple[int, int, int, int]) -> list[SpanRow]:
    return [SpanRow(*row) for row in rows]


FRAMES: list[Frame] = [
    Hello(page_size=4096),
    Offer(OfferFlags.GIFT, 8192, "weights", spans((0x1000, 4096, -1, 0), (0x3000, 4096, -1, 0))),
    Offer(OfferFlags.PEER_READ, 10, "", spans((0x10, 10, -1, 0))),
    Pull(PullMethod.VMSPLICE),
    Pull(PullMethod.STREAM),
    Done(8192, 2, 0, "move", ""),
    Done(5000, 0, 2, "pread", "the destination at 0x10 is not page-aligned"),
    Refuse("no room"),
]


def same(a: Frame, b: Frame) -> bool:
    if isinstance(a, Offer) and isinstance(b, Offer):
        return (a.flags, a.nbytes, a.name, a.spans) == (b.flags, b.nbytes, b.name, b.spans)
    return a == b


@pytest.mark.parametrize("frame", FRAMES, ids=lambda f: type(f).__name__)
def test_roundtrip_whole(frame: Frame) -> None:
    data, fds = encode(frame)
    assert fds == []
    dec = Decoder()
    dec.feed(data)
    got = dec.next_frame()
    assert got is not None and same(got, frame)
    assert dec.next_frame() is None and dec.buffered == 0


def test_all_frames_byte_by_byte_then_trailing_data() -> None:
    stream = b"".join(encode(f)[0] for f in FRAMES)
    dec = Decoder()
    got: list[Frame] = []
    for i in range(len(stream)):
        dec.feed(stream[i : i + 1])
        frame = dec.next_frame()
        if frame is not None:
            got.append(frame)
    assert len(got) == len(FRAMES)
    assert all(same(a, b) for a, b in zip(got, FRAMES, strict=True))
    dec.feed(encode(Pull(PullMethod.STREAM))[0] + b"raw bytes")
    assert dec.next_frame() == Pull(PullMethod.STREAM)
    assert dec.take_raw(100) == b"raw bytes"


def test_fds_travel_with_their_frame_and_unclaimed_ones_are_closed() -> None:
    r, w = os.pipe()
    try:
        data, fds = encode(Pipe([r]))
        assert fds == [r]
        dec = Decoder()
        dec.feed(data, [r])
        frame = dec.next_frame()
        assert isinstance(frame, Pipe) and frame.fds == [r]
        stray = os.dup(w)
        dec.feed(b"", [stray])
        dec.close()
        with pytest.raises(OSError):
            os.fstat(stray)
    finally:
        os.close(r)
        os.close(w)


def header(kind: int, length: int, nfds: int = 0, magic: bytes = MAGIC, version: int = 1) -> bytes:
    return HEADER.pack(magic, version, kind, nfds, length)


@pytest.mark.parametrize(
    ("data", "frame", "offset", "words"),
    [
        (b"GARBAGE!GARBAGE!", "header", 0, "magic"),
        (header(1, 8, version=9), "header", 4, "version"),
        (header(77, 0), "header", 5, "unknown frame type"),
        (header(2, 1 << 31), "OFFER", 8, "at most"),
        (header(1, 3) + b"abc", "HELLO", 12, "expected 8"),
        (header(3, 1) + b"\x09", "PULL", 12, "unknown method"),
        (header(4, 0), "PIPE", 6, "carries 0 fds, expected 1"),
        (header(4, 0, nfds=1), "PIPE", 6, "announces 1 fds, 0 arrived"),
        (header(2, 0, nfds=300), "OFFER", 6, "at most 253"),
    ],
)
def test_bad_frames_name_the_frame_and_offset(
    data: bytes, frame: str, offset: int, words: str
) -> None:
    dec = Decoder()
    dec.feed(data)
    with pytest.raises(RemoteProtocolError, match=words) as info:
        dec.next_frame()
    assert info.value.frame == frame and info.value.offset == offset
    with pytest.raises(RemoteProtocolError):  # a broken stream stays broken
        dec.next_frame()


def test_offset_counts_from_the_start_of_the_stream() -> None:
    dec = Decoder()
    good = encode(Hello(4096))[0]
    dec.feed(good + b"XXXX" + bytes(12))
    assert dec.next_frame() == Hello(4096)
    with pytest.raises(RemoteProtocolError) as info:
        dec.next_frame()
    assert info.value.offset == len(good)


def offer_bytes(rows: list[SpanRow], nbytes: int, nfds: int = 0, flags: int = 1) -> bytes:
    import struct

    body = struct.pack("<BBHIQ", flags, 0, 0, len(rows), nbytes)
    body += b"".join(SPAN.pack(*row) for row in rows)
    return header(FrameType.OFFER, len(body), nfds) + body


@pytest.mark.parametrize(
    ("rows", "nbytes", "words"),
    [
        (spans(), 0, "no spans"),
        (spans((0x1000, 0, -1, 0)), 0, "length 0"),
        (spans((0x1000, 4096, -1, 0)), 8192, "do not add up"),
        (spans((0x1000, 4096, 3, 0)), 4096, "fd index"),
        (spans((2**64 - 4096, 8192, -1, 0)), 8192, "end of the address space"),
        (spans((0, 2**41, -1, 0)), 2**41, "longer than"),
    ],
)
def test_offer_spans_are_checked_before_use(rows: list[SpanRow], nbytes: int, words: str) -> None:
    dec = Decoder()
    dec.feed(offer_bytes(rows, nbytes))
    with pytest.raises(RemoteProtocolError, match=words):
        dec.next_frame()


def test_offer_with_unknown_flags_is_refused() -> None:
    dec = Decoder()
    dec.feed(offer_bytes(spans((0x1000, 4096, -1, 0)), 4096, flags=0x80))
    with pytest.raises(RemoteProtocolError, match="unknown flags"):
        dec.next_frame()


def test_encoding_too_long_text_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        encode(Refuse("x" * 10_000))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(1, 17))
def test_fuzz_garbage_never_crashes_the_decoder(data: bytes, chunk: int) -> None:
    """Any bytes: frames, None, or RemoteProtocolError; nothing else escapes."""
    dec = Decoder()
    try:
        for i in range(0, len(data), chunk):
            dec.feed(data[i : i + chunk])
            while dec.next_frame() is not None:
                pass
    except RemoteProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(FRAMES), st.integers(0, 60), st.binary(min_size=1, max_size=4))
def test_fuzz_one_corrupted_byte_is_caught_or_harmless(frame: Frame, at: int, byte: bytes) -> None:
    data = bytearray(encode(frame)[0])
    at %= len(data)
    data[at] = byte[0]
    dec = Decoder()
    dec.feed(bytes(data))
    try:
        dec.next_frame()
    except RemoteProtocolError as err:
        assert err.frame and err.offset is not None
