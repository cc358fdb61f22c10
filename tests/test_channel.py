"""The channel's rules: what moves, what copies and why, and what bad input gets.

These tests run both ends in one process (two threads): the mechanism is the same as
between processes (tests/test_processes.py), and failures are easier to stage.
"""

from __future__ import annotations

import functools
import mmap
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import pageflip as pf
from helpers import join, run_thread
from pageflip._sys import mm
from pageflip._sys.flags import Seal
from pageflip._wire import Hello, Offer, OfferFlags, Refuse, SpanRow, encode
from pageflip.transport import UnixConnection

PAGE = pf.PAGE_SIZE


@pytest.fixture
def pair() -> Iterator[tuple[pf.Channel, pf.Channel]]:
    a, b = pf.channel_pair(timeout=30)
    yield a, b
    a.close()
    b.close()


def filled(region: pf.Region, seed: int = 1) -> bytes:
    """Fill a region with bytes that differ page to page; return them."""
    data = np.random.default_rng(seed).integers(0, 256, region.size, dtype=np.uint8)
    region.numpy()[:] = data
    return data.tobytes()


def pattern(n: int, seed: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


# -- moves ----------------------------------------------------------------------------------


def test_gift_of_a_movable_region_moves_and_closes_it(pair: tuple[pf.Channel, pf.Channel]) -> None:
    a, b = pair
    region = pf.Region.movable(8 * PAGE, name="ram")
    data = filled(region)
    thread, out = run_thread(b.receive)
    sent = a.gift(region)
    got, received = join(thread, out)
    try:
        assert region.closed
        assert bytes(got.view()) == data
        assert got.name == "ram" and got.movable
        for t in (sent, received):
            assert (t.nbytes, t.pages_moved, t.pages_copied, t.method, t.reason) == (
                8 * PAGE,
                8,
                0,
                "move",
                None,
            )
            assert t.moved and t.seconds > 0
        assert received.as_dict()["method"] == "move"
        assert "moved 8 pages" in str(sent)
    finally:
        got.close()


def test_gift_of_a_slice_leaves_the_rest_with_the_writer(
    pair: tuple[pf.Channel, pf.Channel],
) -> None:
    a, b = pair
    with pf.Region.movable(4 * PAGE) as region:
        data = filled(region)
        thread, out = run_thread(b.receive)
        sent = a.gift(region[PAGE : 3 * PAGE])
        got, _ = join(thread, out)
        assert sent.moved and sent.pages_moved == 2
        assert bytes(got.view()) == data[PAGE : 3 * PAGE]
        assert bytes(region.view(0, PAGE)) == data[:PAGE]
        assert bytes(region.view(3 * PAGE)) == data[3 * PAGE :]
        with pytest.raises(pf.ClosedError, match="given away"):
            region.view(PAGE, 2 * PAGE)
        # The writer's later writes cannot reach the reader's pages.
        region.view(0, PAGE)[:] = b"\0" * PAGE
        assert bytes(got.view()) == data[PAGE : 3 * PAGE]
        got.close()


def test_gift_of_a_list_arrives_as_one_region(pair: tuple[pf.Channel, pf.Channel]) -> None:
    a, b = pair
    r1, r2 = pf.Region.movable(PAGE, "one"), pf.Region.movable(3 * PAGE, "two")
    d1, d2 = filled(r1, 1), filled(r2, 2)
    thread, out = run_thread(b.receive)
    sent = a.gift([r1, r2])
    got, _ = join(thread, out)
    assert sent.moved and r1.closed and r2.closed
    assert bytes(got.view()) == d1 + d2 and got.size == 4 * PAGE
    got.close()


def test_receive_into_a_region_replaces_its_pages(pair: tuple[pf.Channel, pf.Channel]) -> None:
    a, b = pair
    src = pf.Region.movable(2 * PAGE)
    data = filled(src)
    with pf.Region.movable(4 * PAGE) as dest:
        dest.numpy()[:] = 9
        thread, out = run_thread(lambda: b.receive_into(dest[PAGE : 3 * PAGE]))
        a.gift(src)
        t = join(thread, out)
        assert t.moved and t.method == "move"
        view = bytes(dest.view())
        assert view[PAGE : 3 * PAGE] == data
        assert view[:PAGE] == b"\x09" * PAGE and view[3 * PAGE :] == b"\x09" * PAGE
        assert dest.movable


def test_receive_into_an_array_made_from_a_region(pair: tuple[pf.Channel, pf.Channel]) -> None:
    a, b = pair
    src = pf.Region.movable(2 * PAGE)
    data = filled(src)
    with pf.Region.movable(2 * PAGE) as dest:
        arr = dest.numpy(np.uint8)
        take = functools.partial(b.receive_into, arr)
        thread, out = run_thread(take)
        a.gift(src)
        assert join(thread, out).moved
        assert arr.tobytes() == data  # the array sees the moved pages
        del arr, take


def test_receive_into_foreign_anonymous_memory_moves(pair: tuple[pf.Channel, pf.Channel]) -> None:
    a, b = pair
    src = pf.Region.movable(2 * PAGE)
    data = filled(src)
    dest = mmap.mmap(-1, 2 * PAGE)
    thread, out = run_thread(lambda: b.receive_into(dest))
    a.gift(src)
    t = join(thread, out)
    assert t.moved
    assert dest[:] == data
    dest.close()


# -- each rule broken on purpose -> a copy, with the reason ---------------------------------


def test_anonymous_source_is_copied(pair: tuple[pf.Channel, pf.Channel]) -> None:
    a, b = pair
    region = pf.Region.anonymous(4 * PAGE)
    data = filled(region)
    thread, out = run_thread(b.receive)
    sent = a.gift(region)
    got, received = join(thread, out)
    assert region.closed  # a gift gives the pages up, moved or not
    assert bytes(got.view()) == data
    for t in (sent, received):
        assert t.pages_moved == 0 and t.pages_copied == 4 and not t.moved
        assert t.method == "process_vm_readv"
        assert t.reason == "the source is not movable: private anonymous memory"
    got.close()


def test_send_copies_and_the_writer_keeps_its_data(pair: tuple[pf.Channel, pf.Channel]) -> None:
    a, b = pair
    with pf.Region.movable(4 * PAGE) as region:
        data = filled(region)
        thread, out = run_thread(b.receive)
        sent = a.send(region)
        got, _ = join(thread, out)
        assert not region.closed and bytes(region.view()) == data
        assert bytes(got.view()) == data
        assert sent.pages_copied == 4 and sent.pages_moved == 0
        assert sent.reason == "send() keeps the writer's pages mapped (copy semantics)"
        got.view()[:4] = b"new!"  # a copy: the writer does not see it
        assert bytes(region.view(0, 4)) == data[:4]
        got.close()


def test_misaligned_destination_is_copied(pair: tuple[pf.Channel, pf.Channel]) -> None:
    a, b = pair
    src = pf.Region.movable(2 * PAGE)
    data = filled(src)
    backing = mmap.mmap(-1, 3 * PAGE)
    dest = memoryview(backing)[100 : 100 + 2 * PAGE]
    thread, out = run_thread(lambda: b.receive_into(dest))
    t = a.gift(src)
    received = join(thread, out)
    assert src.closed and bytes(dest) == data
    assert t.method == received.method == "pread"
    assert t.pages_copied == 2 and t.pages_moved == 0
    assert t.reason is not None and "destination at" in t.reason
    assert t.reason.endswith("is not page-aligned")
    dest.release()
    backing.close()


def test_length_not_a_page_multiple_is_copied(pair: tuple[pf.Channel, pf.Channel]) -> None:
    a, b = pair
    src = pf.Region.movable(2 * PAGE)
    data = filled(src)
    first = mmap.mmap(-1, 2 * PAGE)
    rest = bytearray(2 * PAGE - 6000)
    head = memoryview(first)[:6000]  # page-aligned start, 6000 bytes long
    thread, out = run_thread(lambda: b.receive_into([head, rest]))
    t = a.gift(src)
    join(thread, out)
    assert bytes(head) + bytes(rest) == data
    assert t.pages_moved == 0 and t.method == "pread"
    assert t.reason is not None
    assert f"the length 6000 is not a multiple of the page size {PAGE}" in t.reason
    head.release()
    first.close()


def test_file_mapping_destination_is_copied(
    pair: tuple[pf.Channel, pf.Channel], tmp_path: Path
) -> None:
    a, b = pair
    src = pf.Region.movable(PAGE)
    data = filled(src)
    path = tmp_path / "on-disk"
    path.write_bytes(bytes(PAGE))
    with path.open("r+b") as f, mmap.mmap(f.fileno(), PAGE) as dest:
        thread, out = run_thread(lambda: b.receive_into(dest))
        t = a.gift(src)
        join(thread, out)
        assert dest[:] == data
        dest.flush()
    assert path.read_bytes() == data  # still the file's memory
    assert t.reason is not None and "backed by" in t.reason and str(path) in t.reason


def test_unaligned_source_from_a_peer_is_copied() -> None:
    """A foreign writer offers a memfd from an address that is not page-aligned: pread.

    (A memfd offset that is not page-aligned is refused: tests/test_peer_memfd.py.)
    """
    mine, theirs = UnixConnection.pair()
    b = pf.Channel(mine, timeout=30)
    fd = mm.memfd_create("pageflip:foreign")
    try:
        mm.ftruncate(fd, 3 * PAGE)
        mm.add_seals(fd, Seal.SHRINK | Seal.GROW)
        os.pwrite(fd, bytes(pattern(3 * PAGE)), 0)
        spans = [SpanRow(0x10064, 2 * PAGE, 0, PAGE)]
        theirs.send(encode(Hello(PAGE))[0])
        data, fds = encode(Offer(OfferFlags.GIFT, 2 * PAGE, "x", spans, [fd]))
        theirs.send(data, fds)
        with pf.Region.movable(2 * PAGE) as dest:
            t = b.receive_into(dest)
            assert bytes(dest.view()) == bytes(pattern(3 * PAGE)[PAGE:])
        assert t.method == "pread" and t.reason is not None
        assert "the source at 0x10064 is not page-aligned" in t.reason
    finally:
        os.close(fd)
        b.close()
        theirs.close()


def test_move_false_copies(pair: tuple[pf.Channel, pf.Channel]) -> None:
    a, b = pair
    src = pf.Region.movable(2 * PAGE)
    data = filled(src)
    thread, out = run_thread(lambda: b.receive(move=False))
    t = a.gift(src)
    got, _ = join(thread, out)
    assert bytes(got.view()) == data
    assert t.method == "pread" and t.reason == "the reader asked for a copy (move=False)"
    got.close()


@pytest.mark.parametrize("method", ["process_vm_readv", "vmsplice", "stream"])
@pytest.mark.parametrize("how", ["send", "gift-anonymous"])
def test_every_copy_method_delivers_intact_bytes(
    pair: tuple[pf.Channel, pf.Channel], method: str, how: str
) -> None:
    a, b = pair
    n = 3 * PAGE + 1234
    if how == "send":
        src: object = pattern(n)
        expect = bytes(pattern(n))
    else:
        region = pf.Region.anonymous(n)
        expect = filled(region)
        n = region.size
        src = region
    dest = np.zeros(n + 77, np.uint8)
    thread, out = run_thread(lambda: b.receive_into(dest, copy_method=method))  # type: ignore[arg-type]
    sent = a.gift(src) if how != "send" else a.send(src)  # type: ignore[arg-type]
    got = join(thread, out)
    assert dest[:n].tobytes() == expect and not dest[n:].any()
    assert got.method == sent.method == method
    assert got.pages_copied == -(-n // PAGE) and got.nbytes == n


def test_a_mixed_gift_reports_both(pair: tuple[pf.Channel, pf.Channel]) -> None:
    a, b = pair
    r1, r2 = pf.Region.movable(2 * PAGE), pf.Region.anonymous(PAGE)
    d = filled(r1, 1) + filled(r2, 2)
    thread, out = run_thread(b.receive)
    t = a.gift([r1, r2])
    got, _ = join(thread, out)
    assert bytes(got.view()) == d
    assert (t.pages_moved, t.pages_copied, t.method) == (2, 1, "move+process_vm_readv")
    got.close()


# -- bad input ------------------------------------------------------------------------------


def test_gift_of_a_closed_region_says_closed(pair: tuple[pf.Channel, pf.Channel]) -> None:
    a, _ = pair
    region = pf.Region.movable(PAGE)
    region.close()
    with pytest.raises(pf.ClosedError):
        a.gift(region)


def test_gift_of_other_buffers_points_to_send(pair: tuple[pf.Channel, pf.Channel]) -> None:
    a, _ = pair
    with pytest.raises(TypeError, match="use send"):
        a.gift(bytearray(PAGE))  # type: ignore[arg-type]
    with pytest.raises(pf.SpanError, match="empty"):
        a.gift([])


def test_gift_with_a_live_view_is_refused_and_nothing_moves(
    pair: tuple[pf.Channel, pf.Channel],
) -> None:
    a, _ = pair
    with pf.Region.movable(2 * PAGE) as region:
        arr = region.numpy()
        with pytest.raises(pf.BufferInUse, match="gift"):
            a.gift(region[PAGE:])
        del arr


def test_gift_of_overlapping_spans_is_refused(pair: tuple[pf.Channel, pf.Channel]) -> None:
    a, _ = pair
    with pf.Region.movable(2 * PAGE) as region, pytest.raises(pf.SpanError, match="twice"):
        a.gift([region[0:PAGE], region])


def test_read_only_and_scattered_destinations_are_refused(
    pair: tuple[pf.Channel, pf.Channel],
) -> None:
    _, b = pair
    with pytest.raises(pf.SpanError, match="read-only"):
        b.receive_into(bytes(PAGE))
    with pytest.raises(pf.SpanError, match="not contiguous"):
        b.receive_into(np.zeros((4, 4))[:, 0])
    with pytest.raises(pf.SpanError, match="not a buffer"):
        b.receive_into(object())
    with pytest.raises(ValueError, match="copy_method"):
        b.receive_into(bytearray(4), copy_method="teleport")  # type: ignore[arg-type]


def test_too_small_destination_is_refused_and_the_writer_keeps_its_data(
    pair: tuple[pf.Channel, pf.Channel],
) -> None:
    a, b = pair
    with pf.Region.movable(2 * PAGE) as region:
        data = filled(region)
        thread, out = run_thread(lambda: a.gift(region))
        with pytest.raises(pf.SpanError, match="holds 4096 bytes"):
            b.receive_into(bytearray(PAGE))
        with pytest.raises(pf.PeerRefused, match="holds 4096 bytes") as info:
            join(thread, out)
        assert info.value.phase == "offer"
        assert not region.closed and bytes(region.view()) == data
        # Both ends are still in step: the next transfer works.
        thread, out = run_thread(b.receive)
        a.send(region)
        got, _ = join(thread, out)
        assert bytes(got.view()) == data
        got.close()


def test_reader_closing_mid_gift_leaves_the_data_with_the_writer(
    pair: tuple[pf.Channel, pf.Channel],
) -> None:
    a, b = pair
    with pf.Region.movable(2 * PAGE) as region:
        data = filled(region)
        thread, out = run_thread(lambda: a.gift(region))
        raw = b""
        while raw.count(b"PFCH") < 2:  # wait until the hello and the offer arrived
            raw = b._conn.sock.recv(1 << 16, socket.MSG_PEEK)
        b.close()  # the reader goes away without answering
        with pytest.raises(pf.PeerClosed) as info:
            join(thread, out)
        assert info.value.phase == "waiting for the reader"
        assert not region.closed and bytes(region.view()) == data


def test_writer_closing_is_peer_closed_for_the_reader(pair: tuple[pf.Channel, pf.Channel]) -> None:
    a, b = pair
    thread, out = run_thread(b.receive)
    a.close()
    with pytest.raises(pf.PeerClosed) as info:
        join(thread, out)
    # Whether our hello or our wait for an offer hit the closed socket first is a race.
    assert info.value.phase in ("handshake", "waiting for an offer")


def test_a_silent_peer_times_out() -> None:
    a, b = pf.channel_pair(timeout=0.2)
    with pytest.raises(pf.PeerTimeout) as info:
        b.receive()
    assert isinstance(info.value, TimeoutError) and info.value.phase == "waiting for an offer"
    a.close()
    b.close()


def test_closed_channel_says_closed(pair: tuple[pf.Channel, pf.Channel]) -> None:
    a, _ = pair
    a.close()
    a.close()
    assert a.closed
    with pf.Region.movable(PAGE) as region, pytest.raises(pf.ClosedError):
        a.gift(region)


# -- a hostile or broken peer ---------------------------------------------------------------
# (The memfds it may send, and what the reader does with bad ones: test_peer_memfd.py.)


@pytest.fixture
def raw_peer() -> Iterator[tuple[pf.Channel, UnixConnection]]:
    mine, theirs = UnixConnection.pair()
    channel = pf.Channel(mine, timeout=30)
    yield channel, theirs
    channel.close()
    theirs.close()


def test_garbage_from_the_peer_is_a_remote_protocol_error(
    raw_peer: tuple[pf.Channel, UnixConnection],
) -> None:
    channel, peer = raw_peer
    peer.send(b"this is not a pageflip peer\n")
    with pytest.raises(pf.RemoteProtocolError) as info:
        channel.receive()
    assert info.value.frame == "header" and info.value.offset == 0
    with pytest.raises(pf.LocalProtocolError, match="unusable"):
        channel.receive()


def test_wrong_page_size_fails_the_handshake(raw_peer: tuple[pf.Channel, UnixConnection]) -> None:
    channel, peer = raw_peer
    peer.send(encode(Hello(page_size=65536))[0])
    with pytest.raises(pf.RemoteProtocolError, match="page size is 65536"):
        channel.receive()


def test_a_send_offer_must_not_carry_fds(raw_peer: tuple[pf.Channel, UnixConnection]) -> None:
    channel, peer = raw_peer
    fd = mm.memfd_create("pageflip:test")
    try:
        mm.ftruncate(fd, PAGE)
        spans = [SpanRow(0x10000, PAGE, 0, 0)]
        peer.send(encode(Hello(PAGE))[0])
        data, fds = encode(Offer(OfferFlags.NONE, PAGE, "x", spans, [fd]))
        peer.send(data, fds)
        with pytest.raises(pf.RemoteProtocolError, match="send"):
            channel.receive()
    finally:
        os.close(fd)


def test_a_frame_out_of_turn_is_a_protocol_error(
    raw_peer: tuple[pf.Channel, UnixConnection],
) -> None:
    channel, peer = raw_peer
    peer.send(encode(Hello(PAGE))[0] + encode(Refuse("what?"))[0])
    with pytest.raises(pf.RemoteProtocolError, match="expected OFFER, got REFUSE"):
        channel.receive()


def test_truncated_frame_then_close_is_peer_closed(
    raw_peer: tuple[pf.Channel, UnixConnection],
) -> None:
    channel, peer = raw_peer
    hello = encode(Hello(PAGE))[0]
    peer.send(hello + encode(Refuse("cut"))[0][:7])
    peer.close()
    with pytest.raises(pf.PeerClosed):
        channel.receive()


# -- the thin vmsplice wrapper --------------------------------------------------------------


def test_vmsplice_wrapper_gifts_pages_into_a_pipe() -> None:
    r, w = os.pipe()
    try:
        page = mmap.mmap(-1, PAGE)
        page[:5] = b"hello"
        n = pf.vmsplice(w, [page], pf.Splice.GIFT | pf.Splice.MOVE)
        assert n == PAGE
        out = bytearray(PAGE)
        assert os.readv(r, [out]) == PAGE and out[:5] == b"hello"
        os.write(w, b"back")
        # On a read end, SPLICE_F_MOVE is ignored: the kernel copies into our buffer.
        dest = bytearray(4)
        assert pf.vmsplice(r, [dest], pf.Splice.MOVE) == 4 and dest == b"back"
        page.close()
    finally:
        os.close(r)
        os.close(w)


def test_vmsplice_wrapper_names_the_call_on_error() -> None:
    with pytest.raises(OSError, match=r"vmsplice\(fd=-1, nr_segs=1, flags=8\): Bad file"):
        pf.vmsplice(-1, [(0x1000, PAGE)], pf.Splice.GIFT)


def test_transfer_is_plain_data() -> None:
    t = pf.Transfer(8192, 2, 0, "move", None, 0.001)
    assert t.moved and t.as_dict() == {
        "nbytes": 8192,
        "pages_moved": 2,
        "pages_copied": 0,
        "method": "move",
        "reason": None,
        "seconds": 0.001,
        "release": 0.0,
        "release_cpu": 0.0,
    }


def test_a_refusal_left_before_our_first_frame_is_told_as_such(tmp_path: Path) -> None:
    """A listener that refuses us and closes before our hello went out: the hello's send
    fails (the peer is gone) with the refusal unread; PeerRejected still says why, not a
    bare PeerClosed (a rejected peer under load used to see that)."""
    from pageflip.transport import tell_refused

    path = str(tmp_path / "refuser.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(path)
        server.listen(1)
        channel = pf.Channel.connect(path, timeout=10)
        try:
            conn, _ = server.accept()
            tell_refused(conn, "uid 65534 is not allowed here")
            conn.close()  # gone before the client said anything
            with pytest.raises(pf.PeerRejected, match="uid 65534 is not allowed here"):
                channel._say_hello()
        finally:
            channel.close()
    finally:
        server.close()
