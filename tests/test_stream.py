"""The migration stream's sans-I/O codec: every frame fed whole, byte by byte, with trailing
data and in random chunks; every bound a peer can break, with the frame and offset it is
reported at; fds travelling with FLIP; garbage and corruptions that only ever produce
RemoteProtocolError; misuse on our side as LocalProtocolError; the handshake rules."""

from __future__ import annotations

import math
import os
import pickle
import struct
from collections.abc import Iterator

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from pageflip import LocalProtocolError, RemoteProtocolError
from pageflip.stream import (
    HEADER,
    MAGIC,
    MAX_PAYLOAD,
    MAX_RAW,
    MAX_REGION_SIZE,
    MAX_RUNS,
    MAX_STATE,
    VERSION,
    Abort,
    Accepted,
    Commit,
    Decoder,
    DiscardPages,
    Done,
    Encoder,
    Encoding,
    Event,
    Feature,
    Flip,
    FlipRegion,
    FrameType,
    GuestPause,
    Hello,
    Lend,
    Mode,
    PageFlags,
    PageKind,
    Pages,
    PostcopyEnd,
    PostcopyProgress,
    Prepared,
    Preview,
    PullPages,
    Recover,
    RegionInfo,
    Reject,
    Request,
    Resumed,
    Role,
    RoundAck,
    RoundEnd,
    Runs,
    Setup,
    Switchover,
    Verified,
    Welcome,
    ZeroPages,
    encode,
    handshake_check,
)

#: The codec is told its page size; tests use 4 KiB whatever the machine's is.
PS = 4096
SESSION = bytes(range(16))


def runs(*rows: tuple[int, int]) -> Runs:
    return np.array(rows, dtype=np.uint64).reshape(-1, 2)


def page_bytes(npages: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, npages * PS, dtype=np.uint8).tobytes()


REGIONS = [
    RegionInfo("ram", 64 * PS, 0x7F00_0000_0000, movable=True),
    RegionInfo("vram", 16 * PS, 0, movable=False),
]
MiB = 1 << 20
#: Regions on every kind of huge page (the HUGE feature).
HUGE_REGIONS = [
    RegionInfo("ram", 4 * MiB, 0x7F00_0020_0000, True, PageKind.HUGETLB),
    RegionInfo("gib", 1 << 30, 0x7F00_4000_0000, True, PageKind.HUGETLB_1G),
    RegionInfo("thp", 2 * MiB, 0x7F00_8000_0000, True, PageKind.THP),
    RegionInfo("journal", PS, 0x7F00_9000_0000, True, PageKind.SMALL),
]

#: One event of every frame type (FLIP without fds here; fds have their own tests).
EVENTS: list[Event] = [
    Hello(Role.SOURCE, PS, Feature.FLIP | Feature.ZSTD | Feature.XXH3, SESSION, "workload"),
    Hello(Role.DESTINATION, PS, Feature.NONE, SESSION),
    Welcome(Feature.ZSTD | Feature.POSTCOPY),
    Reject("page size mismatch: é"),
    Setup(Mode.PRECOPY, 64, 4242, REGIONS),
    Accepted(),
    Prepared(),
    Commit(),
    GuestPause(0.0012),
    GuestPause(None),
    PostcopyProgress(100, 20, 3),
    Recover(),
    Pages(0, 1, runs((0, 2), (10, 1)), page_bytes(3)),
    Pages(1, 7, runs((15, 1)), page_bytes(1, seed=1), PageFlags.URGENT),
    Pages(0, 2, runs(), b""),
    ZeroPages(0, 1, runs((3, 5), (20, 44))),
    DiscardPages(0, 3, runs((7, 1), (40, 3))),
    PullPages(1, 2, runs((0, 16))),
    RoundEnd(1, 80, 80 * PS, 12, 0.25),
    RoundAck(1),
    Flip([], []),
    Lend([], []),
    Preview(b'{"kind":"workload"}'),
    Preview(b""),
    Switchover(1700000000.5, [0xFFFF_FFFF_FFFF_FFFF, 7], b"\x00cpu state\xff"),
    Switchover(0.0, [], b""),
    Resumed(1700000000.75),
    Request(0, 63, 1),
    PostcopyEnd([1, 2]),
    Done({"downtime_ms": 12.5, "rounds": 3, "regions": ["ram", "vram"], "ok": True}),
    Abort("precopy", "the guest died"),
    Verified(True, ""),
    Verified(False, "region ram: digest mismatch in chunk 3"),
    # Last: it declares other regions, which a stateful decoder checks later frames against.
    Setup(Mode.POSTCOPY, 1, 4242, HUGE_REGIONS),
]


def test_every_frame_type_is_exercised() -> None:
    kinds = {encode(ev, page_size=PS)[0][5] for ev in EVENTS}  # the header's type byte
    assert kinds == {int(t) for t in FrameType}


def decode_all(dec: Decoder) -> list[Event]:
    out = []
    while (ev := dec.next_event()) is not None:
        out.append(ev)
    return out


def fresh_decoder() -> Decoder:
    """A decoder that has seen the SETUP of EVENTS (as the destination's would have)."""
    dec = Decoder(PS)
    dec.regions = [r.size for r in REGIONS]
    return dec


def frame(kind: int, payload: bytes, nfds: int = 0) -> bytes:
    return HEADER.pack(MAGIC, VERSION, kind, nfds, len(payload)) + payload


# -- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_roundtrip_whole(event: Event) -> None:
    data, fds = encode(event, page_size=PS)
    assert fds == []
    dec = fresh_decoder()
    dec.feed(data)
    assert dec.next_event() == event
    assert dec.next_event() is None
    assert dec.buffered == 0 and dec.offset == len(data)


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_roundtrip_byte_by_byte_then_a_second_frame(event: Event) -> None:
    data = encode(event, page_size=PS)[0]
    follow = encode(RoundAck(99))[0]
    dec = fresh_decoder()
    for i in range(len(data) - 1):
        dec.feed(data[i : i + 1])
        assert dec.next_event() is None
    dec.feed(data[-1:] + follow[:5])  # trailing data: the start of the next frame
    assert dec.next_event() == event
    assert dec.next_event() is None
    assert dec.buffered == 5
    dec.feed(follow[5:])
    assert dec.next_event() == RoundAck(99)


def test_all_frames_back_to_back_in_one_feed() -> None:
    stream = b"".join(encode(ev, page_size=PS)[0] for ev in EVENTS)
    dec = Decoder(PS)
    dec.feed(stream)
    assert decode_all(dec) == EVENTS
    assert dec.buffered == 0 and dec.offset == len(stream)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 600), min_size=1, max_size=40))
def test_all_frames_in_random_chunks(sizes: list[int]) -> None:
    events = list(EVENTS)
    stream = b"".join(encode(ev, page_size=PS)[0] for ev in events)
    dec = Decoder(PS)
    got: list[Event] = []
    i = 0
    k = 0
    while i < len(stream):
        n = sizes[k % len(sizes)]
        k += 1
        dec.feed(memoryview(stream)[i : i + n])  # any buffer, not only bytes
        i += n
        got.extend(decode_all(dec))
    assert got == events
    assert dec.buffered == 0


def test_decoded_runs_do_not_pin_the_buffer_and_are_native_uint64() -> None:
    dec = Decoder(PS)
    dec.feed(encode(ZeroPages(0, 0, runs((1, 2))), page_size=PS)[0])
    ev = dec.next_event()
    assert isinstance(ev, ZeroPages)
    assert ev.runs.dtype == np.uint64 and ev.runs.shape == (1, 2) and ev.runs.flags.owndata


def test_runs_accept_lists_and_signed_arrays() -> None:
    a = encode(ZeroPages(0, 0, [(1, 2), (5, 1)]), page_size=PS)[0]  # type: ignore[arg-type]
    b = encode(ZeroPages(0, 0, np.array([[1, 2], [5, 1]], dtype=np.int32)), page_size=PS)[0]
    c = encode(ZeroPages(0, 0, runs((1, 2), (5, 1))), page_size=PS)[0]
    assert a == b == c


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, MAX_REGION_SIZE // PS - 9), st.integers(1, 8)),
        max_size=20,
    ),
    st.integers(0, 2**32 - 1),
    st.booleans(),
)
def test_pages_roundtrip_any_runs(rows: list[tuple[int, int]], rnd: int, urgent: bool) -> None:
    arr = runs(*rows)
    npages = sum(c for _, c in rows)
    ev = Pages(3, rnd, arr, page_bytes(npages), PageFlags.URGENT if urgent else PageFlags.NONE)
    dec = Decoder(PS)
    dec.feed(encode(ev, page_size=PS)[0])
    assert dec.next_event() == ev


# -- PAGES data: copies and zstd -----------------------------------------------------------------


def test_big_raw_pages_are_handed_over_without_a_copy_small_ones_are_bytes() -> None:
    big = Pages(0, 0, runs((0, 64)), page_bytes(64))
    small = Pages(0, 0, runs((0, 1)), page_bytes(1))
    dec = Decoder(PS)
    follow = encode(small, page_size=PS)[0]
    dec.feed(encode(big, page_size=PS)[0] + follow[:3])
    got = dec.next_event()
    assert isinstance(got, Pages) and isinstance(got.data, memoryview)
    assert got.data.readonly and got == big
    dec.feed(follow[3:] + b"\x00" * 100)  # the decoder has let go of the buffer the view uses
    assert got == big
    got_small = dec.next_event()
    assert isinstance(got_small, Pages) and isinstance(got_small.data, bytes)
    assert got_small == small


def test_zstd_roundtrip_compresses_what_compresses() -> None:
    compressible = Pages(0, 1, runs((0, 8)), bytes(8 * PS))
    random = Pages(0, 1, runs((0, 8)), page_bytes(8))
    enc = Encoder(PS, compress_level=3)
    packed = enc.encode(compressible)[0]
    kept = enc.encode(random)[0]
    assert packed[HEADER.size + 6] == Encoding.ZSTD and len(packed) < 1000
    assert kept[HEADER.size + 6] == Encoding.RAW  # zstd would not have made it smaller
    dec = Decoder(PS)
    dec.feed(packed + kept)
    first, second = decode_all(dec)
    assert first == compressible and isinstance(first, Pages) and isinstance(first.data, bytes)
    assert second == random
    assert encode(compressible, compress=1, page_size=PS)[0][HEADER.size + 6] == Encoding.ZSTD


@pytest.mark.slow
def test_largest_pages_frame_roundtrips_raw_and_zstd() -> None:
    data = np.zeros(MAX_RAW, dtype=np.uint8)
    data[:: PS * 3] = 7
    ev = Pages(0, 0, runs((0, MAX_RAW // PS)), data.tobytes())
    for level in (None, 1):
        wire = encode(ev, compress=level, page_size=PS)[0]
        dec = Decoder(PS)
        for i in range(0, len(wire), 1 << 20):  # as a transport would: 1 MiB at a time
            dec.feed(wire[i : i + (1 << 20)])
        assert dec.next_event() == ev


def pages_payload(
    *,
    nruns: int | None = None,
    rows: list[tuple[int, int]] | None = None,
    raw_len: int | None = None,
    data: bytes = b"",
    encoding: int = Encoding.RAW,
    flags: int = 0,
    region: int = 0,
) -> bytes:
    rows = [(0, 1)] if rows is None else rows
    if raw_len is None:
        raw_len = sum(c for _, c in rows) * PS
    head = struct.pack(
        "<HIBBIQ", region, 0, encoding, flags, len(rows) if nruns is None else nruns, raw_len
    )
    return head + b"".join(struct.pack("<QQ", *row) for row in rows) + data


#: Stream offset of a PAGES frame's data, when it carries one run.
DATA_AT = HEADER.size + 20 + 16


@pytest.mark.parametrize(
    ("data", "words"),
    [
        # A zstd bomb: no content size in the frame, decompresses to far more than raw_len.
        (zstandard.ZstdCompressor(write_content_size=False).compress(bytes(1 << 20)), "decompress"),
        # The frame says how big it is: a size other than raw_len is refused before zstd
        # allocates it.
        (zstandard.ZstdCompressor().compress(bytes(1 << 20)), "zstd frame of 1048576 bytes"),
        (zstandard.ZstdCompressor().compress(bytes(PS // 2)), "zstd frame of 2048 bytes"),
        # Short output without a content size.
        (zstandard.ZstdCompressor(write_content_size=False).compress(bytes(PS // 2)), "2048"),
        (zstandard.ZstdCompressor().compress(bytes(PS)) + b"junk", "decompress"),
        (b"not zstd at all", "decompress"),
        (b"", "decompress"),
    ],
    ids=["bomb", "declares-more", "declares-less", "short", "trailing", "garbage", "empty"],
)
def test_zstd_data_that_does_not_give_exactly_raw_len_is_refused(data: bytes, words: str) -> None:
    dec = Decoder(PS)
    dec.feed(frame(FrameType.PAGES, pages_payload(data=data, encoding=Encoding.ZSTD)))
    with pytest.raises(RemoteProtocolError, match=words) as info:
        dec.next_event()
    assert (info.value.frame, info.value.offset) == ("PAGES", DATA_AT)


def test_zstd_for_zero_bytes_is_refused() -> None:
    dec = Decoder(PS)
    dec.feed(frame(FrameType.PAGES, pages_payload(rows=[], data=b"x", encoding=Encoding.ZSTD)))
    with pytest.raises(RemoteProtocolError, match="0 raw bytes"):
        dec.next_event()


# -- bounds: each one a peer can break, with its frame and offset ----------------------------


def header(
    kind: int, length: int, nfds: int = 0, magic: bytes = MAGIC, version: int = VERSION
) -> bytes:
    return HEADER.pack(magic, version, kind, nfds, length)


def setup_payload(
    size: int = 4 * PS,
    address: int = 0,
    flags: int = 1,
    name: bytes = b"ram",
    mode: int = 2,
    chunk: int = 16,
    nregions: int = 1,
) -> bytes:
    head = struct.pack("<BIIH", mode, chunk, 1, nregions)
    return head + struct.pack("<QQBB", size, address, flags, len(name)) + name


def hello_payload(role: int = 1, kind: bytes = b"", kind_len: int | None = None) -> bytes:
    n = len(kind) if kind_len is None else kind_len
    return struct.pack("<HIIB16sB", 1, PS, 1, role, SESSION, n) + kind


def text16(raw: bytes) -> bytes:
    return struct.pack("<H", len(raw)) + raw


def flip_entry(index: int = 0, fd_index: int = 0, offset: int = 0, size: int = PS) -> bytes:
    return struct.pack("<HHQQQQ", index, fd_index, offset, size, 1, 2)


H = HEADER.size
NAN = struct.pack("<d", math.nan)
BOUNDS = [
    # header: checked as soon as the bytes are in, before the payload is waited for
    pytest.param(b"PFX", "header", 0, "magic", id="magic-early"),
    pytest.param(b"GARBAGE!GARBAGE!", "header", 0, "magic", id="magic"),
    pytest.param(header(1, 8, version=1)[:5], "header", 4, "version", id="version"),
    pytest.param(header(0, 0)[:6], "header", 5, "unknown frame type 0", id="type-0"),
    pytest.param(header(27, 0), "header", 5, "unknown frame type 27", id="type-27"),
    pytest.param(header(11, 2, nfds=254), "FLIP", 6, "at most 253", id="nfds"),
    pytest.param(header(6, 40, nfds=1), "PAGES", 6, "carries none", id="fds-on-pages"),
    pytest.param(header(6, MAX_PAYLOAD + 1), "PAGES", 8, "at most", id="payload-long"),
    pytest.param(header(10, 5), "ROUND_ACK", 8, "ROUND_ACK takes 4 bytes", id="fixed-size"),
    pytest.param(header(5, 1), "ACCEPTED", 8, "ACCEPTED takes 0 bytes", id="accepted"),
    pytest.param(header(20, 1), "PREPARED", 8, "PREPARED takes 0 bytes", id="prepared"),
    pytest.param(header(22, 8), "GUEST_PAUSE", 8, "GUEST_PAUSE takes 9 bytes", id="pause-short"),
    pytest.param(header(1, 10_000), "HELLO", 8, "28..92", id="hello-long"),
    pytest.param(header(12, 4), "SWITCHOVER", 8, "14..", id="switchover-short"),
    pytest.param(header(11, 2, nfds=1) + bytes(2), "FLIP", 6, "0 arrived", id="fds-missing"),
    # HELLO
    pytest.param(frame(1, hello_payload(role=3)), "HELLO", H + 10, "unknown role 3", id="role"),
    pytest.param(
        frame(1, hello_payload(kind=b"x" * 64, kind_len=65)),
        "HELLO",
        H + 27,
        "at most 64",
        id="kind-long",
    ),
    pytest.param(
        frame(1, hello_payload(kind=b"\xff\xfe")), "HELLO", H + 28, "not UTF-8", id="kind-utf8"
    ),
    pytest.param(
        frame(1, hello_payload(kind=b"abc", kind_len=5)), "HELLO", H + 28, "needs 5", id="kind-cut"
    ),
    pytest.param(
        frame(1, hello_payload(kind=b"abc", kind_len=2)),
        "HELLO",
        H + 30,
        "1 bytes after",
        id="kind-extra",
    ),
    # WELCOME, REJECT
    pytest.param(
        frame(2, struct.pack("<I", 1 << 9)), "WELCOME", H, "unknown features", id="welcome"
    ),
    pytest.param(frame(3, struct.pack("<H", 5000)), "REJECT", H, "at most 4096", id="reject-long"),
    pytest.param(
        frame(3, struct.pack("<H", 10) + b"short"), "REJECT", H + 2, "needs 10", id="reject-cut"
    ),
    pytest.param(
        frame(3, text16(b"ok") + b"!"), "REJECT", H + 4, "after the last", id="reject-extra"
    ),
    # SETUP
    pytest.param(frame(4, setup_payload(mode=9)), "SETUP", H, "unknown mode 9", id="mode"),
    pytest.param(frame(4, setup_payload(chunk=0)), "SETUP", H + 1, "chunk_pages is 0", id="chunk"),
    pytest.param(
        frame(4, setup_payload(nregions=1025)), "SETUP", H + 9, "at most 1024", id="nregions"
    ),
    pytest.param(frame(4, setup_payload(size=PS + 1)), "SETUP", H + 11, "multiple", id="size-odd"),
    pytest.param(frame(4, setup_payload(size=0)), "SETUP", H + 11, "positive", id="size-0"),
    pytest.param(
        frame(4, setup_payload(size=MAX_REGION_SIZE + PS)), "SETUP", H + 11, "up to", id="size-big"
    ),
    pytest.param(frame(4, setup_payload(address=123)), "SETUP", H + 19, "aligned", id="address"),
    pytest.param(
        frame(4, setup_payload(address=2**64 - PS, size=2 * PS)),
        "SETUP",
        H + 19,
        "2\\*\\*64",
        id="addr-wrap",
    ),
    pytest.param(
        frame(4, setup_payload(flags=8)), "SETUP", H + 27, "unknown flags", id="region-flags"
    ),
    pytest.param(
        frame(4, setup_payload(flags=3)),
        "SETUP",
        H + 11,
        "size 16384 is not a whole number of 2 MiB hugetlb pages",
        id="region-hugetlb-size",
    ),
    pytest.param(
        frame(4, setup_payload(flags=7)),
        "SETUP",
        H + 11,
        "not a whole number of 2 MiB THP pages",
        id="region-thp-size",
    ),
    pytest.param(
        frame(4, setup_payload(flags=5, size=1 << 21)),
        "SETUP",
        H + 11,
        "not a whole number of 1 GiB hugetlb pages",
        id="region-1g-size",
    ),
    pytest.param(frame(4, setup_payload(name=b"\xc3")), "SETUP", H + 29, "UTF-8", id="name-utf8"),
    pytest.param(
        frame(4, setup_payload(nregions=2)), "SETUP", H + 32, "region 1 needs 17", id="region-cut"
    ),
    # PAGES
    pytest.param(
        frame(6, pages_payload(encoding=2)), "PAGES", H + 6, "unknown encoding 2", id="encoding"
    ),
    pytest.param(
        frame(6, pages_payload(flags=0x80, data=bytes(PS))), "PAGES", H + 7, "flags", id="pflags"
    ),
    pytest.param(frame(6, pages_payload(raw_len=100)), "PAGES", H + 12, "multiple", id="raw-odd"),
    pytest.param(
        frame(6, pages_payload(raw_len=MAX_RAW + PS)), "PAGES", H + 12, "up to", id="raw-big"
    ),
    pytest.param(
        frame(6, pages_payload(rows=[(0, 1), (1, 1)], raw_len=PS)),
        "PAGES",
        H + 8,
        "cannot cover",
        id="nruns",
    ),
    pytest.param(
        frame(6, pages_payload(nruns=3, rows=[(0, 1)], raw_len=3 * PS)),
        "PAGES",
        H + 20,
        "needs 48",
        id="runs-cut",
    ),
    pytest.param(
        frame(6, pages_payload(rows=[(0, 1), (5, 0)], raw_len=2 * PS)),
        "PAGES",
        H + 20 + 24,
        "count is 0",
        id="count-0",
    ),
    pytest.param(
        frame(6, pages_payload(rows=[(2**64 - 1, 1)])), "PAGES", H + 20, "overflows", id="overflow"
    ),
    pytest.param(
        frame(6, pages_payload(rows=[(MAX_REGION_SIZE // PS, 1)])),
        "PAGES",
        H + 20,
        "run past",
        id="beyond",
    ),
    pytest.param(
        frame(6, pages_payload(rows=[(0, 1)], raw_len=2 * PS)),
        "PAGES",
        H + 12,
        "cover 1 pages",
        id="cover",
    ),
    pytest.param(
        frame(6, pages_payload(data=bytes(PS - 1))), "PAGES", DATA_AT, "4095 bytes", id="data-short"
    ),
    pytest.param(
        frame(6, pages_payload(data=bytes(PS + 1))), "PAGES", DATA_AT, "4097 bytes", id="data-long"
    ),
    # ZERO, PULL
    pytest.param(
        frame(7, struct.pack("<HII", 0, 0, MAX_RUNS + 1)),
        "ZERO",
        H + 6,
        "at most 1048576",
        id="zero-nruns",
    ),
    pytest.param(
        frame(8, struct.pack("<HII", 0, 0, 2) + struct.pack("<QQ", 0, 1)),
        "PULL",
        H + 10,
        "needs 32",
        id="pull-cut",
    ),
    # ROUND_END, RESUMED, SWITCHOVER: times
    pytest.param(
        frame(9, struct.pack("<IQQQ", 1, 2, 3, 4) + NAN), "ROUND_END", H + 28, "finite", id="nan"
    ),
    pytest.param(
        frame(9, struct.pack("<IQQQd", 1, 2, 3, 4, -1.0)),
        "ROUND_END",
        H + 28,
        ">= 0",
        id="negative",
    ),
    pytest.param(frame(13, struct.pack("<d", math.inf)), "RESUMED", H, "finite", id="inf"),
    pytest.param(
        frame(12, NAN + struct.pack("<HI", 0, 0)), "SWITCHOVER", H, "paused_at", id="paused-nan"
    ),
    pytest.param(
        frame(12, struct.pack("<dHI", 1.0, 0, MAX_STATE + 1)),
        "SWITCHOVER",
        H + 10,
        "at most",
        id="state-big",
    ),
    pytest.param(
        frame(26, struct.pack("<I", MAX_STATE + 1)), "PREVIEW", H, "at most", id="preview-big"
    ),
    pytest.param(
        frame(26, struct.pack("<I", 5) + b"ab"), "PREVIEW", H + 4, "needs 5", id="preview-cut"
    ),
    pytest.param(
        frame(12, struct.pack("<dHI", 1.0, 0, 5) + b"abc"),
        "SWITCHOVER",
        H + 14,
        "needs 5",
        id="state-cut",
    ),
    pytest.param(
        frame(12, struct.pack("<dHI", 1.0, 1025, 0)),
        "SWITCHOVER",
        H + 8,
        "at most 1024",
        id="digests",
    ),
    # FLIP
    pytest.param(
        frame(11, struct.pack("<H", 1) + flip_entry()), "FLIP", H + 4, "fd_index 0", id="flip-nofd"
    ),
    pytest.param(frame(11, struct.pack("<H", 1025)), "FLIP", H, "at most 1024", id="flip-n"),
    # REQUEST
    pytest.param(
        frame(14, struct.pack("<HQI", 0, 5, 0)), "REQUEST", H + 10, "count is 0", id="req-0"
    ),
    pytest.param(
        frame(14, struct.pack("<HQI", 0, 2**64 - 2, 9)),
        "REQUEST",
        H + 2,
        "overflows",
        id="req-overflow",
    ),
    # POSTCOPY_END
    pytest.param(
        frame(15, struct.pack("<HQ", 1, 5) + b"x"), "POSTCOPY_END", H + 10, "after", id="pe-extra"
    ),
    pytest.param(
        frame(15, struct.pack("<H", 2) + bytes(8)), "POSTCOPY_END", H + 2, "needs 16", id="pe-cut"
    ),
    # DONE
    pytest.param(
        frame(16, struct.pack("<I", 3) + b"{x}"), "DONE", H + 4, "not JSON", id="done-json"
    ),
    pytest.param(
        frame(16, struct.pack("<I", 2) + b"[]"), "DONE", H + 4, "not an object", id="done-list"
    ),
    pytest.param(
        frame(16, struct.pack("<I", 9) + b'{"a":NaN}'), "DONE", H + 4, "NaN", id="done-nan"
    ),
    pytest.param(
        frame(16, struct.pack("<I", 2) + b"\xff}"), "DONE", H + 4, "UTF-8", id="done-utf8"
    ),
    pytest.param(frame(16, struct.pack("<I", 70_000)), "DONE", H, "at most 65536", id="done-long"),
    pytest.param(
        frame(16, struct.pack("<I", 60_000) + b"[" * 60_000), "DONE", H + 4, "not", id="done-deep"
    ),
    # ABORT, VERIFIED
    pytest.param(
        frame(17, text16(b"p" * 256) + text16(b"")), "ABORT", H, "at most 255", id="phase"
    ),
    pytest.param(
        frame(17, text16(b"p") + b"\x01"), "ABORT", H + 3, "reason length", id="abort-cut"
    ),
    pytest.param(frame(18, b"\x02" + text16(b"")), "VERIFIED", H, "ok is 2", id="ok"),
]


@pytest.mark.parametrize(("data", "frame_name", "offset", "words"), BOUNDS)
def test_bad_frames_name_the_frame_and_offset(
    data: bytes, frame_name: str, offset: int, words: str
) -> None:
    dec = Decoder(PS)
    dec.feed(data)
    with pytest.raises(RemoteProtocolError, match=words) as info:
        dec.next_event()
    err = info.value
    assert (err.frame, err.offset) == (frame_name, offset)
    assert f"stream offset {offset}" in str(err)
    dec.feed(encode(RoundAck(1))[0])  # feeding a broken decoder is harmless...
    with pytest.raises(RemoteProtocolError) as again:  # ...and it stays broken
        dec.next_event()
    assert again.value is err
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.frame, copy.offset, str(copy)) == (err.frame, err.offset, str(err))


def test_offsets_count_from_the_start_of_the_stream() -> None:
    good = encode(RoundAck(1))[0] + encode(Prepared())[0]
    dec = Decoder(PS)
    dec.feed(good + frame(9, struct.pack("<IQQQ", 1, 2, 3, 4) + NAN))
    assert decode_all_until_error(dec) == [RoundAck(1), Prepared()]
    assert dec_error(dec).offset == len(good) + H + 28


def decode_all_until_error(dec: Decoder) -> list[Event]:
    out = []
    try:
        while (ev := dec.next_event()) is not None:
            out.append(ev)
    except RemoteProtocolError:
        pass
    return out


def dec_error(dec: Decoder) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        dec.next_event()
    return info.value


def test_offsets_stay_right_after_the_buffer_is_compacted() -> None:
    """Many frames, fed so that the decoder compacts and replaces its buffer often."""
    frames = [encode(RoundAck(i))[0] for i in range(300)]
    frames.insert(150, encode(Pages(0, 0, runs((0, 32)), page_bytes(32)), page_size=PS)[0])
    stream = b"".join(frames)
    bad = frame(9, struct.pack("<IQQQ", 1, 2, 3, 4) + NAN)
    dec = Decoder(PS)
    for i in range(0, len(stream), 777):
        dec.feed(stream[i : i + 777])
        decode_all(dec)
    dec.feed(bad)
    assert dec_error(dec).offset == len(stream) + H + 28


def test_the_page_size_decides_what_pages_frames_hold() -> None:
    ev = Pages(0, 0, runs((0, 1)), bytes(16384))
    wire = encode(ev, page_size=16384)[0]
    dec = Decoder(16384)
    dec.feed(wire)
    assert dec.next_event() == ev
    dec = Decoder(PS)
    dec.feed(wire)
    with pytest.raises(RemoteProtocolError, match="cover 1 pages") as info:
        dec.next_event()
    assert info.value.offset == H + 12


# -- regions: known from SETUP, or told ---------------------------------------------------------


def test_a_decoder_learns_regions_from_setup_and_checks_later_frames() -> None:
    dec = Decoder(PS)
    before = dec.regions
    dec.feed(encode(Setup(Mode.PRECOPY, 8, 1, REGIONS), page_size=PS)[0])
    assert isinstance(dec.next_event(), Setup)
    assert before is None and dec.regions == (64 * PS, 16 * PS)
    dec.feed(encode(ZeroPages(1, 0, runs((10, 6))), page_size=PS)[0])
    assert isinstance(dec.next_event(), ZeroPages)
    dec.feed(encode(ZeroPages(1, 0, runs((0, 1), (10, 7))), page_size=PS)[0])  # 10 + 7 > 16
    err = dec_error(dec)
    assert (err.frame, err.offset) == ("ZERO", dec.offset + H + 10 + 16)
    assert "run 1: pages 10..17 run past 16 pages" in str(err)


@pytest.mark.parametrize(
    ("event", "frame_name", "offset", "words"),
    [
        (ZeroPages(2, 0, runs((0, 1))), "ZERO", H, "region 2, but there are 2"),
        (Request(1, 16, 1), "REQUEST", H + 2, "run past 16"),
        (PostcopyEnd([1]), "POSTCOPY_END", H, "1 digests for 2 regions"),
        (Switchover(1.0, [1, 2, 3], b""), "SWITCHOVER", H + 8, "3 digests for 2"),
        (
            Flip([FlipRegion(0, 0, 0, PS, 1, 2)], [0]),
            "FLIP",
            H + 2 + 12,
            "region 0 is 262144 bytes",
        ),
    ],
)
def test_known_regions_bound_indexes_runs_and_digests(
    event: Event, frame_name: str, offset: int, words: str
) -> None:
    wire = encode(event, page_size=PS)[0]
    dec = Decoder(PS, regions=[r.size for r in REGIONS])
    if isinstance(event, Flip):
        r, w = os.pipe()
        os.close(w)
        dec.feed(wire, [r])  # the decoder owns r now and closes it when the frame is refused
    else:
        dec.feed(wire)
    with pytest.raises(RemoteProtocolError, match=words) as info:
        dec.next_event()
    assert (info.value.frame, info.value.offset) == (frame_name, offset)
    dec.close()


def test_known_regions_allow_more_runs_than_max_runs() -> None:
    size = 4 * MAX_RUNS * PS  # 16 GiB: every other page zero is 2M runs
    rows = np.stack(
        [np.arange(0, 2 * (MAX_RUNS + 1), 2, dtype=np.uint64), np.ones(MAX_RUNS + 1, np.uint64)],
        axis=1,
    )
    ev = ZeroPages(0, 0, rows)
    with pytest.raises(LocalProtocolError, match="at most 1048576"):
        encode(ev, page_size=PS)
    enc = Encoder(PS, regions=[size])
    wire = enc.encode(ev)[0]
    dec = Decoder(PS, regions=[size])
    dec.feed(wire)
    assert dec.next_event() == ev
    dec = Decoder(PS)
    dec.feed(wire)
    with pytest.raises(RemoteProtocolError, match="at most 1048576"):
        dec.next_event()


# -- fds ----------------------------------------------------------------------------------------


@pytest.fixture
def memfds() -> Iterator[list[int]]:
    """Three memfds; a test that gives them away (to a decoder that closes them) clears
    the list, so that teardown does not close numbers that may have been reused."""
    fds = [os.memfd_create(f"stream-test-{i}") for i in range(3)]
    for fd in fds:
        os.ftruncate(fd, 4 * PS)
    yield fds
    for fd in fds:
        os.close(fd)


def flip_of(fds: list[int]) -> Flip:
    return Flip(
        [
            FlipRegion(i, len(fds) - 1 - i, 0, 4 * PS, os.fstat(fd).st_ino, i)
            for i, fd in enumerate(fds)
        ],
        list(fds),
    )


@pytest.mark.parametrize("bytewise", [False, True])
def test_fds_travel_with_flip(memfds: list[int], bytewise: bool) -> None:
    ev = flip_of(memfds)
    data, fds = encode(ev, page_size=PS)
    assert fds == memfds and data[6] == 3
    dec = Decoder(PS)
    dec.feed(encode(Prepared())[0])  # the FLIP starts in the middle of what was fed
    if bytewise:
        dec.feed(data[:1], fds)  # SCM_RIGHTS arrive with the frame's first byte
        for i in range(1, len(data)):
            assert dec.next_event() in (Prepared(), None)
            dec.feed(data[i : i + 1])
    else:
        dec.feed(data, fds)
    got = decode_all(dec)[-1]
    assert got == ev
    assert isinstance(got, Flip) and got.fds == memfds
    dec.close()  # the event took the fds: close() leaves them alone
    for fd in memfds:
        os.fstat(fd)


def test_close_closes_fds_no_event_took() -> None:
    r, w = os.pipe()
    dec = Decoder(PS)
    dec.feed(encode(Prepared())[0], [r, w])
    assert dec.next_event() == Prepared()  # PREPARED takes no fds
    dec.close()
    dec.close()  # idempotent
    for fd in (r, w):
        with pytest.raises(OSError):
            os.fstat(fd)


def test_a_refused_flip_closes_its_fds(memfds: list[int]) -> None:
    ev = flip_of(memfds)
    data = bytearray(encode(ev, page_size=PS)[0])
    data[H + 4] = 0  # entry 0 and entry 2 now both use fd 0: fd 2 is left unused
    dec = Decoder(PS)
    dec.feed(bytes(data), memfds)
    with pytest.raises(RemoteProtocolError, match="not used") as info:
        dec.next_event()
    assert (info.value.frame, info.value.offset) == ("FLIP", 6)
    for fd in memfds:
        with pytest.raises(OSError):
            os.fstat(fd)
    memfds.clear()


def test_flip_bounds(memfds: list[int]) -> None:
    one = memfds[:1]
    cases = [
        (struct.pack("<H", 2) + flip_entry() + flip_entry(), H + 2 + 36, "region 0 appears twice"),
        (struct.pack("<H", 1) + flip_entry(fd_index=1), H + 4, "fd_index 1, the frame has 1"),
        (struct.pack("<H", 1) + flip_entry(size=PS + 1), H + 14, "multiple"),
        (struct.pack("<H", 1) + flip_entry(offset=7), H + 6, "aligned"),
    ]
    for payload, offset, words in cases:
        fd = os.dup(one[0])
        dec = Decoder(PS)
        dec.feed(frame(FrameType.FLIP, payload, nfds=1), [fd])
        with pytest.raises(RemoteProtocolError, match=words) as info:
            dec.next_event()
        assert (info.value.frame, info.value.offset) == ("FLIP", offset)
        with pytest.raises(OSError):
            os.fstat(fd)


def test_fds_that_arrive_after_their_frame_started_are_refused(memfds: list[int]) -> None:
    data = encode(flip_of(memfds[:1]), page_size=PS)[0]
    dec = Decoder(PS)
    dec.feed(data[:3])
    dec.feed(data[3:], memfds[:1])  # not with the first byte: they belong to a later frame
    with pytest.raises(RemoteProtocolError, match="announces 1 fds, 0 arrived") as info:
        dec.next_event()
    assert (info.value.frame, info.value.offset) == ("FLIP", 6)
    dec.close()
    with pytest.raises(OSError):
        os.fstat(memfds.pop(0))


def test_stray_fds_that_no_frame_announced_are_refused() -> None:
    r, w = os.pipe()
    ack = encode(RoundAck(1))[0]
    dec = Decoder(PS)
    dec.feed(ack, [r, w])
    assert dec.next_event() == RoundAck(1)
    dec.feed(ack)
    with pytest.raises(RemoteProtocolError, match="no frame starting there") as info:
        dec.next_event()
    assert (info.value.frame, info.value.offset) == ("header", 0)
    dec.close()
    with pytest.raises(OSError):
        os.fstat(r)


def test_a_decoder_says_how_much_its_frame_in_progress_lacks() -> None:
    """What a reader should ask of the socket: the rest of the header, then of the payload
    (a migration endpoint reads no more than that, or its small size)."""
    state = bytes(range(200)) * 3
    data = encode(Switchover(1.5, [7, 8], state), page_size=PS)[0]
    payload = len(data) - HEADER.size
    dec = Decoder(PS)
    assert dec.wanted == HEADER.size
    dec.feed(data[:5])
    assert dec.wanted == HEADER.size - 5
    dec.feed(data[5 : HEADER.size + 10])
    assert dec.wanted == payload - 10
    dec.feed(data[HEADER.size + 10 :] + data[:3])  # the whole frame, and the next one's start
    assert dec.wanted == 0
    assert isinstance(dec.next_event(), Switchover)
    assert dec.wanted == HEADER.size - 3
    dec.close()


def test_decoder_is_a_context_manager() -> None:
    r, w = os.pipe()
    os.close(w)
    with Decoder(PS) as dec:
        dec.feed(b"", [r])
    with pytest.raises(OSError):
        os.fstat(r)


# -- fuzz: only RemoteProtocolError escapes -----------------------------------------------------

VALID_STREAM = b"".join(encode(ev, page_size=PS)[0] for ev in EVENTS)
VALID_ZSTD = encode(Pages(0, 1, runs((0, 4)), bytes(4 * PS)), compress=3, page_size=PS)[0]
FRAME_NAMES = {t.name for t in FrameType} | {"header"}


def feed_everything(data: bytes, chunk: int) -> None:
    dec = Decoder(PS)
    try:
        for i in range(0, len(data), chunk):
            dec.feed(data[i : i + chunk])
            decode_all(dec)
    except RemoteProtocolError as err:
        assert err.frame in FRAME_NAMES
        assert err.offset is not None and 0 <= err.offset <= len(data)
    finally:
        dec.close()


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.integers(1, 64))
def test_fuzz_garbage(data: bytes, chunk: int) -> None:
    feed_everything(data, chunk)


@settings(max_examples=400, deadline=None)
@given(
    st.binary(max_size=200), st.sampled_from(sorted(int(t) for t in FrameType)), st.integers(0, 4)
)
def test_fuzz_random_payloads_under_a_valid_header(payload: bytes, kind: int, nfds: int) -> None:
    feed_everything(frame(kind, payload, 0 if kind != FrameType.FLIP else nfds), 7)


@settings(max_examples=600, deadline=None)
@given(
    st.integers(0, len(VALID_STREAM) - 1),
    st.integers(0, 255),
    st.integers(1, 5000),
    st.booleans(),
)
def test_fuzz_one_corrupted_byte_of_a_valid_stream(
    at: int, byte: int, chunk: int, zstd: bool
) -> None:
    data = bytearray(VALID_ZSTD if zstd else VALID_STREAM)
    data[at % len(data)] = byte
    feed_everything(bytes(data), chunk)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(VALID_STREAM)), st.integers(1, 50))
def test_fuzz_truncated_and_spliced_streams(cut: int, skip: int) -> None:
    feed_everything(VALID_STREAM[:cut] + VALID_STREAM[cut + skip :], 64)


# -- misuse on our side --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "words"),
    [
        (Reject("x" * 5000), "at most 4096"),
        (Reject("\udcff"), "not encodable"),
        (Abort("p" * 300, ""), "at most 255"),
        (Hello(Role.SOURCE, PS, Feature.NONE, SESSION, "k" * 65), "at most 64"),
        (Hello(Role.SOURCE, PS, Feature.NONE, b"short"), "16 bytes"),
        (Hello(3, PS, Feature.NONE, SESSION), "not a Role"),  # type: ignore[arg-type]
        (Hello(Role.SOURCE, PS, Feature(256), SESSION), "unknown features"),
        (Welcome(Feature(1 << 20)), "unknown features"),
        (Setup(9, 1, 1, []), "not a Mode"),  # type: ignore[arg-type]
        (Setup(Mode.FLIP, 0, 1, []), "chunk_pages is 0"),
        (Setup(Mode.FLIP, 1, 1, [RegionInfo("r", PS + 1, 0, True)]), "multiple"),
        (Setup(Mode.FLIP, 1, 1, [RegionInfo("r", PS, 5, True)] * 1025), "at most 1024"),
        (Setup(Mode.FLIP, 1, -1, []), "src_pid -1 is not a u32"),
        (
            Setup(Mode.FLIP, 1, 1, [RegionInfo("r", PS, 0, True, PageKind.HUGETLB)]),
            "size 4096 is not a whole number of 2 MiB hugetlb pages",
        ),
        (
            Setup(Mode.FLIP, 1, 1, [RegionInfo("r", PS, 0, True, 4)]),  # type: ignore[arg-type]
            "pages 4 is not a PageKind",
        ),
        (Pages(0, 0, runs((0, 2)), bytes(PS)), "data is 4096 bytes, the runs cover 8192"),
        (Pages(0, 0, runs((0, 1)), "text"), "not a contiguous buffer"),  # type: ignore[arg-type]
        (Pages(0, 0, runs((0, 0)), b""), "count is 0"),
        (Pages(0, 0, runs((0, 1)), bytes(PS), PageFlags(8)), "unknown flags"),
        (Pages(70_000, 0, runs((0, 1)), bytes(PS)), "region 70000 is not a u16"),
        (Pages(0, 0, runs((0, MAX_RAW // PS + 1)), bytes(MAX_RAW + PS)), "at most 67108864"),
        (Pages(0, 0, np.zeros((2, 3), np.uint64), b""), "shape"),
        (Pages(0, 0, np.array([[-1, 1]]), b""), "negative"),
        (Pages(0, 0, np.array([[0.5, 1]]), b""), "integers"),
        (ZeroPages(0, 0, np.ones((MAX_RUNS + 1, 2), np.uint64)), "at most 1048576"),
        (PullPages(0, 0, runs((2**64 - 1, 1))), "overflows"),
        (RoundEnd(1, 1, 1, 1, math.nan), "finite"),
        (RoundEnd(1, 1, 1, 1, "soon"), "not a number"),  # type: ignore[arg-type]
        (RoundAck(2**32), "not a u32"),
        (RoundAck(1.0), "not an integer"),  # type: ignore[arg-type]
        (Resumed(-1.0), ">= 0"),
        (Switchover(1.0, [], bytes(MAX_STATE + 1)), "at most 1048576"),
        (Switchover(1.0, [2**64], b""), "digest 0"),
        (Preview(bytes(MAX_STATE + 1)), "at most 1048576"),
        (Request(0, 1, 0), "count is 0"),
        (Flip([FlipRegion(0, 1, 0, PS, 0, 0)], [5]), "fd_index 1"),
        (Flip([FlipRegion(0, 0, 0, PS, 0, 0)], [5, 6]), "not used"),
        (Flip([FlipRegion(0, 0, 0, PS, 0, 0)] * 2, [5]), "appears twice"),
        (Flip([], [-1]), "not all fds"),
        (Done([1]), "must be a dict"),  # type: ignore[arg-type]
        (Done({"x": math.nan}), "not JSON"),
        (Done({"x": object()}), "not JSON"),
        (Done({"x": "y" * 70_000}), "at most 65536"),
        (Verified(True, "m" * 5000), "at most 4096"),
        (RegionInfo("x", 1, 1, True), "not a stream event"),
    ],
    ids=lambda v: v if isinstance(v, str) else type(v).__name__,
)
def test_encoding_an_invalid_event_is_a_local_error(event: Event, words: str) -> None:
    with pytest.raises(LocalProtocolError, match=words):
        encode(event, page_size=PS)


def test_an_encoder_that_sent_setup_checks_regions() -> None:
    enc = Encoder(PS)
    enc.encode(Setup(Mode.PRECOPY, 8, 1, REGIONS))
    assert enc.regions == (64 * PS, 16 * PS)
    enc.encode(Pages(1, 0, runs((15, 1)), bytes(PS)))
    with pytest.raises(LocalProtocolError, match="run past 16 pages"):
        enc.encode(Pages(1, 0, runs((16, 1)), bytes(PS)))
    with pytest.raises(LocalProtocolError, match="region 2, but there are 2"):
        enc.encode(ZeroPages(2, 0, runs((0, 1))))
    with pytest.raises(LocalProtocolError, match="1 digests for 2 regions"):
        enc.encode(PostcopyEnd([1]))
    enc.regions = None
    enc.encode(ZeroPages(2, 0, runs((0, 1))))


def test_bad_codec_settings_are_local_errors() -> None:
    for page_size in (0, 1000, 3 * 4096, 1 << 22):
        with pytest.raises(LocalProtocolError, match="page size"):
            Decoder(page_size)
        with pytest.raises(LocalProtocolError, match="page size"):
            Encoder(page_size)
    with pytest.raises(LocalProtocolError, match="zstd level"):
        Encoder(PS, compress_level=99)
    with pytest.raises(LocalProtocolError, match="region 0"):
        Decoder(PS, regions=[PS + 1])


# -- handshake ------------------------------------------------------------------------------------


def hello(role: Role = Role.SOURCE, **kw: object) -> Hello:
    fields: dict[str, object] = {
        "page_size": PS,
        "features": Feature.FLIP | Feature.ZSTD,
        "session": SESSION,
        "guest_kind": "workload",
    }
    fields.update(kw)
    return Hello(role, **fields)  # type: ignore[arg-type]


def test_handshake_returns_the_shared_features() -> None:
    src = hello(Role.SOURCE, features=Feature.FLIP | Feature.ZSTD | Feature.XXH3)
    dst = hello(Role.DESTINATION, features=Feature.ZSTD | Feature.XXH3 | Feature.POSTCOPY)
    assert handshake_check(src, dst) == Feature.ZSTD | Feature.XXH3
    assert handshake_check(dst, src) == Feature.ZSTD | Feature.XXH3
    assert (
        handshake_check(src, hello(Role.DESTINATION, guest_kind="")) == Feature.FLIP | Feature.ZSTD
    )


def test_unknown_features_of_a_newer_peer_are_dropped_from_its_hello() -> None:
    wire = bytearray(encode(hello(Role.DESTINATION), page_size=PS)[0])
    struct.pack_into("<I", wire, H + 6, 0xFFFF_FFFF)
    dec = Decoder(PS)
    dec.feed(bytes(wire))
    got = dec.next_event()
    assert isinstance(got, Hello)
    known = Feature.FLIP | Feature.PULL | Feature.ZSTD | Feature.POSTCOPY | Feature.XXH3
    assert got.features == known | Feature.LEND | Feature.AHEAD | Feature.HUGE


@pytest.mark.parametrize(
    ("remote", "offset", "words"),
    [
        (hello(Role.DESTINATION, version=VERSION + 1), H, f"version {VERSION + 1}"),
        (hello(Role.DESTINATION, page_size=16384), H + 2, "page size is 16384"),
        (hello(Role.SOURCE), H + 10, "both sides are the source"),
        (hello(Role.DESTINATION, guest_kind="kvm"), H + 27, "'kvm'"),
    ],
)
def test_handshake_mismatches(remote: Hello, offset: int, words: str) -> None:
    with pytest.raises(RemoteProtocolError, match=words) as info:
        handshake_check(hello(Role.SOURCE), remote)
    err = info.value
    assert (err.frame, err.offset) == ("HELLO", offset)
    assert str(err).startswith("handshake")


def test_a_decoded_hello_feeds_the_handshake() -> None:
    dec = Decoder(PS)
    dec.feed(encode(hello(Role.DESTINATION, version=7), page_size=PS)[0])
    remote = dec.next_event()
    assert isinstance(remote, Hello) and remote.version == 7
    with pytest.raises(RemoteProtocolError, match="version 7"):
        handshake_check(hello(), remote)
