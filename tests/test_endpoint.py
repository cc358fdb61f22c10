"""The one I/O loop (:class:`pageflip.channel.Endpoint`) and the pager's framing.

Every conversation pageflip holds runs on an endpoint: these tests drive one over a real
socket pair with each codec it serves, and show what a silent, vanished, refusing, giving-up
or misbehaving peer becomes.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from pageflip import stream
from pageflip._wire import HEADER, MAGIC, MAX_PAYLOAD, VERSION, FrameType, Hello, Note, WireCodec
from pageflip.channel import Endpoint
from pageflip.errors import (
    LocalProtocolError,
    PeerAborted,
    PeerClosed,
    PeerRejected,
    PeerTimeout,
    RemoteProtocolError,
)
from pageflip.migration.codec import StreamCodec, open_link
from pageflip.migration.pager import open_pager_link, recv_note, send_note
from pageflip.transport import UnixConnection, tell_refused


@pytest.fixture
def wire() -> Iterator[tuple[Endpoint, Endpoint]]:
    a, b = UnixConnection.pair()
    ends = Endpoint(a, WireCodec()), Endpoint(b, WireCodec())
    yield ends
    for end in ends:
        end.close()


def _open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def test_frames_and_fds_go_both_ways(wire: tuple[Endpoint, Endpoint]) -> None:
    a, b = wire
    r, w = os.pipe()
    try:
        sent = a.send(Note({"start": {"regions": [1, 2]}}, [r]), "test")
        note = b.expect((Note,), "test", timeout=5)
        assert note.message == {"start": {"regions": [1, 2]}}
        assert len(note.fds) == 1
        os.write(w, b"x")
        assert os.read(note.fds[0], 1) == b"x"  # the very pipe
        os.close(note.fds[0])
        assert a.bytes_sent == sent == b.bytes_received
        b.send(Hello(page_size=4096), "test")
        assert a.recv("test", timeout=5) == Hello(page_size=4096)
    finally:
        os.close(r)
        os.close(w)


def test_a_silent_peer_is_a_timeout_and_a_zero_timeout_polls(
    wire: tuple[Endpoint, Endpoint],
) -> None:
    a, b = wire
    with pytest.raises(PeerTimeout, match=r"sent nothing for 0.2 s \(waiting\)"):
        b.recv("waiting", timeout=0.2)
    with pytest.raises(PeerTimeout):
        b.recv("waiting", timeout=0)
    assert b.poll("waiting") is None
    a.send(Note({"n": 1}), "test")
    # A frame already on the socket is taken even with no time left to wait.
    assert b.recv("waiting", timeout=0) == Note({"n": 1})


def test_a_closed_peer_is_peer_closed(wire: tuple[Endpoint, Endpoint]) -> None:
    a, b = wire
    a.send(Note({"last": True}), "test")
    a.close()
    assert b.recv("test", timeout=5) == Note({"last": True})  # what came before the end
    with pytest.raises(PeerClosed, match=r"closed the connection \(after\)"):
        b.recv("after", timeout=5)


def test_a_refusal_marker_is_peer_rejected_with_its_reason() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    end = Endpoint(UnixConnection(b), WireCodec())
    try:
        tell_refused(a, "uid 1000 may not connect here")
        with pytest.raises(PeerRejected, match="uid 1000 may not connect here"):
            end.recv("setup", timeout=5)
    finally:
        a.close()
        end.close()


def test_the_interrupt_is_called_while_waiting_and_can_stop_the_wait() -> None:
    a, b = UnixConnection.pair()
    calls = []

    class Cancelled(Exception):
        pass

    def interrupt() -> None:
        calls.append(1)
        if len(calls) == 3:
            raise Cancelled

    end = Endpoint(b, WireCodec(), interrupt=interrupt)
    try:
        with pytest.raises(Cancelled):
            end.recv("waiting")  # no deadline: only the interrupt ends it
        assert len(calls) == 3
    finally:
        a.close()
        end.close()


def test_abort_is_raised_as_peer_aborted_where_another_frame_was_expected() -> None:
    a, b = UnixConnection.pair()
    src, dst = open_link(a), open_link(b)
    try:
        src.send(stream.Abort(phase="receiving", reason="the guest failed"), "x")
        with pytest.raises(PeerAborted, match="gave up in receiving: the guest failed"):
            dst.expect((stream.Switchover,), "receiving", timeout=5)
    finally:
        src.close()
        dst.close()


def test_an_unexpected_frame_is_a_protocol_error_and_its_fds_are_closed(
    wire: tuple[Endpoint, Endpoint],
) -> None:
    a, b = wire
    r, w = os.pipe()
    a.send(Note({"surprise": True}, [r]), "test")
    os.close(r)
    before = _open_fds()
    with pytest.raises(RemoteProtocolError, match="expected HELLO, got NOTE"):
        b.expect((Hello,), "handshake", timeout=5)
    assert _open_fds() <= before  # the fd that came with NOTE is closed again
    os.close(w)


def test_the_codec_bounds_what_a_peer_may_announce() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    end = Endpoint(UnixConnection(b), WireCodec())
    try:
        a.sendall(HEADER.pack(MAGIC, VERSION, FrameType.NOTE, 0, MAX_PAYLOAD + 1))
        with pytest.raises(RemoteProtocolError, match="at most"):
            end.recv("pager", timeout=5)
    finally:
        a.close()
        end.close()


def test_a_note_must_be_a_json_object() -> None:
    for payload, why in ((b"[1, 2]", "not a JSON object"), (b"{oops", "not JSON")):
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        end = Endpoint(UnixConnection(b), WireCodec())
        try:
            a.sendall(HEADER.pack(MAGIC, VERSION, FrameType.NOTE, 0, len(payload)) + payload)
            with pytest.raises(RemoteProtocolError, match=why):
                end.recv("pager", timeout=5)
        finally:
            a.close()
            end.close()


def test_a_note_too_big_to_send_is_our_error(wire: tuple[Endpoint, Endpoint]) -> None:
    a, _ = wire
    with pytest.raises(LocalProtocolError, match="at most"):
        a.send(Note({"blob": "x" * MAX_PAYLOAD}), "test")


def test_the_pager_link_carries_notes_with_fds() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    dest, pager = open_pager_link(ours), open_pager_link(theirs)
    r, w = os.pipe()
    try:
        send_note(dest, {"start": {"src_pid": 1}}, [r])
        message, fds = recv_note(pager, 5)
        assert message == {"start": {"src_pid": 1}} and len(fds) == 1
        os.close(fds[0])
        send_note(pager, {"progress": {"remaining": 3}})
        assert recv_note(dest, 5) == ({"progress": {"remaining": 3}}, [])
        with pytest.raises(PeerTimeout):
            recv_note(dest, 0.1)
        pager.close()
        with pytest.raises(PeerClosed):
            recv_note(dest, 5)
    finally:
        os.close(r)
        os.close(w)
        dest.close()


def test_the_stream_codec_has_no_raw_bytes() -> None:
    with pytest.raises(LocalProtocolError):
        StreamCodec().take_raw(1)


def test_bytes_split_anywhere_still_make_the_same_frames(wire: tuple[Endpoint, Endpoint]) -> None:
    a, b = wire
    data, _ = WireCodec().encode(Note({"k": list(range(100))}))
    data += WireCodec().encode(Hello(page_size=4096))[0]
    for i in range(0, len(data), 7):
        a.conn.send(data[i : i + 7])
    assert b.recv("t", timeout=5) == Note({"k": list(range(100))})
    assert b.recv("t", timeout=5) == Hello(page_size=4096)
    assert not b.pending


def test_a_migration_link_asks_the_socket_for_what_its_frame_lacks() -> None:
    """Small frames (the pause's SWITCHOVER, PREPARED, COMMIT) are read with a small
    buffer; a frame of page data with one as large as what it still lacks (up to 4 MiB)."""
    a, b = UnixConnection.pair()
    sender, receiver = open_link(a), open_link(b)
    asked: list[int] = []
    recv = receiver.conn.recv

    def recording(size: int = 65536) -> tuple[bytes, list[int]]:
        asked.append(size)
        return recv(size)

    receiver.conn.recv = recording  # type: ignore[method-assign]
    try:
        sender.send(stream.Prepared(), "t")
        assert isinstance(receiver.recv("t", timeout=5), stream.Prepared)
        big = 3 << 20
        regions = [stream.RegionInfo("ram", 4 << 20, 0, False)]
        sender.send(stream.Setup(stream.Mode.PRECOPY, 1, os.getpid(), regions), "t")
        assert isinstance(receiver.recv("t", timeout=5), stream.Setup)
        runs = np.array([(0, big // 4096)], dtype=np.uint64)
        pages = stream.Pages(0, 1, runs, bytes(big))
        sending = threading.Thread(target=sender.send, args=(pages, "t"))
        sending.start()
        assert isinstance(receiver.recv("t", timeout=10), stream.Pages)
        sending.join()
    finally:
        sender.close()
        receiver.close()
    assert asked[0] == 64 << 10
    assert max(asked) > 64 << 10 and max(asked) <= 4 << 20


def _later(seconds: float, *actions: object) -> threading.Thread:
    def run() -> None:
        time.sleep(seconds)
        for action in actions:
            action()  # type: ignore[operator]

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_spinning_receive_takes_frames_in_pieces_with_their_fds(
    wire: tuple[Endpoint, Endpoint],
) -> None:
    """Inside a guest's pause a receive polls without waiting (``spin``): what it reads
    that way is the same as what a waiting receive reads."""
    a, b = wire
    r, w = os.pipe()
    data, _ = WireCodec().encode(Note({"k": list(range(50))}))
    pieces = [data[i : i + 9] for i in range(0, len(data), 9)]
    try:
        thread = _later(
            0.05,
            lambda: a.send(Note({"first": 1}, [r]), "t"),
            *[lambda p=p: (a.conn.send(p), time.sleep(0.001)) for p in pieces],
        )
        note = b.recv("t", timeout=5, spin=5.0)
        assert note.message == {"first": 1} and len(note.fds) == 1
        os.write(w, b"y")
        assert os.read(note.fds[0], 1) == b"y"  # the very pipe
        os.close(note.fds[0])
        assert b.recv("t", timeout=5, spin=5.0) == Note({"k": list(range(50))})
        thread.join()
        assert b.bytes_received == a.bytes_sent + len(data) and not b.pending
        # A spin that ends before the frame comes falls back to waiting for it.
        thread = _later(0.2, lambda: a.send(Hello(page_size=4096), "t"))
        assert b.recv("t", timeout=5, spin=0.01) == Hello(page_size=4096)
        thread.join()
    finally:
        os.close(r)
        os.close(w)


def test_a_spinning_receive_sees_the_end_and_a_refusal() -> None:
    a, b = UnixConnection.pair()
    end = open_link(b)
    try:
        thread = _later(0.05, lambda: a.send(stream.Commit().FRAME.signal or b""), a.close)
        assert end.recv("prepared", timeout=5, spin=5.0) == stream.Commit()
        with pytest.raises(PeerClosed, match=r"closed the connection \(prepared\)"):
            end.recv("prepared", timeout=5, spin=5.0)
        thread.join()
    finally:
        end.close()
    x, y = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    end = Endpoint(UnixConnection(y), WireCodec())
    try:
        thread = _later(0.05, lambda: tell_refused(x, "busy with another migration"))
        with pytest.raises(PeerRejected, match="busy with another migration"):
            end.recv("setup", timeout=5, spin=5.0)
        thread.join()
    finally:
        x.close()
        end.close()
