"""One set of rules for a peer's memfds: :func:`pageflip.memory.check_peer_memfd`.

``BAD_MEMFDS`` lists fds a peer might send, each breaking one rule, as ``(name, maker)``
pairs; ``maker(tmp_path)`` returns a :class:`PeerFd` (the fd, the range and inode to
announce, and the words the refusal must contain). The fd is the caller's to close. These
tests feed every case to the validator and to a channel reader; the migration destination's
test can be parametrized with the very same list::

    from test_peer_memfd import BAD_MEMFDS

    @pytest.mark.parametrize(("name", "make"), BAD_MEMFDS, ids=[n for n, _ in BAD_MEMFDS])
    def test_flip_refuses(name, make, tmp_path): ...
"""

from __future__ import annotations

import errno
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import pageflip as pf
import peers
from pageflip._sys import mm
from pageflip._sys.flags import Memfd as MemfdFlags
from pageflip._sys.flags import Seal
from pageflip.channel import check_peer_memfd
from pageflip.memory import Memfd

PAGE = pf.PAGE_SIZE


@dataclass
class PeerFd:
    """An fd as a peer would send it: ``[offset, offset+length)`` of it announced, with
    ``inode``; a reader must refuse it with a message containing ``rule``."""

    fd: int
    offset: int
    length: int
    inode: int
    rule: str
    #: Whether an OFFER can carry the fault (it announces no inode; a FLIP does).
    in_offer: bool = True


Maker = Callable[[Path], PeerFd]


def _memfd(size: int, seals: Seal = Seal.NONE) -> int:
    fd = mm.memfd_create("pageflip:peer-memfd-test")
    try:
        mm.ftruncate(fd, size)
        if seals:
            mm.add_seals(fd, seals)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _case(fd: int, rule: str, *, offset: int = 0, length: int = PAGE) -> PeerFd:
    return PeerFd(fd, offset, length, os.fstat(fd).st_ino, rule)


NOT_A_MEMFD = "is not a memfd"


def unsealed_memfd(tmp_path: Path) -> PeerFd:
    """Right size, no seals: it could be truncated after the check."""
    return _case(_memfd(PAGE), "is not sealed against shrinking")


def write_sealed_memfd(tmp_path: Path) -> PeerFd:
    return _case(_memfd(PAGE, Seal.SHRINK | Seal.GROW | Seal.WRITE), "sealed against writes")


def future_write_sealed_memfd(tmp_path: Path) -> PeerFd:
    fd = _memfd(PAGE, Seal.SHRINK | Seal.GROW | Seal.FUTURE_WRITE)
    return _case(fd, "sealed against writes (F_SEAL_FUTURE_WRITE)")


def short_memfd(tmp_path: Path) -> PeerFd:
    """One page, sealed; two announced."""
    return _case(_memfd(PAGE, Seal.SHRINK | Seal.GROW), "is too short", length=2 * PAGE)


def unaligned_offset(tmp_path: Path) -> PeerFd:
    fd = _memfd(3 * PAGE, Seal.SHRINK | Seal.GROW)
    return _case(fd, "offset 100 is not page-aligned", offset=100, length=2 * PAGE)


def wrong_inode(tmp_path: Path) -> PeerFd:
    fd = _memfd(PAGE, Seal.SHRINK | Seal.GROW)
    case = _case(fd, "is not the memfd announced")
    case.inode += 1
    case.in_offer = False
    return case


def regular_file(tmp_path: Path) -> PeerFd:
    path = tmp_path / "not-a-memfd"
    path.write_bytes(bytes(PAGE))
    return _case(os.open(path, os.O_RDWR | os.O_CLOEXEC), NOT_A_MEMFD)


def tmpfs_file(tmp_path: Path) -> PeerFd:
    """A shmem file opened by path: F_GET_SEALS works on it, but it is no memfd."""
    path = Path("/dev/shm") / f"pageflip-test-{uuid.uuid4().hex}"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as err:
        pytest.skip(f"no /dev/shm here: {err}")
    path.unlink()
    try:
        mm.seal_bits(fd)
    except OSError:
        os.close(fd)
        pytest.skip("/dev/shm is not tmpfs here")
    os.ftruncate(fd, PAGE)
    return _case(fd, NOT_A_MEMFD)


def hugetlb_memfd(tmp_path: Path) -> PeerFd:
    """An unsealed hugetlb memfd: a memfd on a hugetlbfs mount of the kernel's own, which a
    reader may map (huge regions move), so the rules of any memfd refuse it."""
    flags = MemfdFlags.CLOEXEC | MemfdFlags.ALLOW_SEALING | MemfdFlags.HUGETLB
    try:
        fd = mm.memfd_create("pageflip:peer-memfd-test", flags)
    except OSError as err:
        pytest.skip(f"no hugetlb memfds here: {err}")
    return _case(fd, "is not sealed against shrinking")


def pipe(tmp_path: Path) -> PeerFd:
    r, w = os.pipe()
    os.close(w)
    return _case(r, NOT_A_MEMFD)


def unix_socket(tmp_path: Path) -> PeerFd:
    return _case(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).detach(), NOT_A_MEMFD)


def directory(tmp_path: Path) -> PeerFd:
    return _case(os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), NOT_A_MEMFD)


BAD_MEMFDS: list[tuple[str, Maker]] = [
    ("unsealed memfd", unsealed_memfd),
    ("write-sealed memfd", write_sealed_memfd),
    ("future-write-sealed memfd", future_write_sealed_memfd),
    ("memfd shorter than announced", short_memfd),
    ("offset not page-aligned", unaligned_offset),
    ("wrong inode", wrong_inode),
    ("regular file", regular_file),
    ("tmpfs file opened by path", tmpfs_file),
    ("unsealed hugetlb memfd", hugetlb_memfd),
    ("pipe", pipe),
    ("unix socket", unix_socket),
    ("directory", directory),
]

IDS = [name for name, _ in BAD_MEMFDS]


# -- the validator --------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "make"), BAD_MEMFDS, ids=IDS)
def test_the_validator_refuses_each_bad_fd_naming_the_rule(
    name: str, make: Maker, tmp_path: Path
) -> None:
    case = make(tmp_path)
    try:
        with pytest.raises(pf.RemoteProtocolError) as info:
            check_peer_memfd(
                case.fd,
                offset=case.offset,
                length=case.length,
                what="memfd of region 'ram'",
                frame="FLIP",
                inode=case.inode,
            )
        message = str(info.value)
        assert message.startswith("memfd of region 'ram'")
        assert case.rule in message
        assert info.value.frame == "FLIP"
    finally:
        os.close(case.fd)


def test_a_checked_memfd_cannot_be_truncated_after_the_check() -> None:
    """SHRINK is for good: once the check saw it, the size it read stays a lower bound."""
    fd = _memfd(2 * PAGE, Seal.SHRINK)
    try:
        st = check_peer_memfd(
            fd, offset=PAGE, length=PAGE, what="memfd", frame="FLIP", inode=os.fstat(fd).st_ino
        )
        assert st.st_size == 2 * PAGE
        for size in (PAGE, 0):
            with pytest.raises(PermissionError):
                mm.ftruncate(fd, size)
        assert os.fstat(fd).st_size == 2 * PAGE
        mm.ftruncate(fd, 3 * PAGE)  # growing is harmless (and allowed: no GROW seal here)
        check_peer_memfd(fd, offset=0, length=3 * PAGE, what="memfd", frame="FLIP")
    finally:
        os.close(fd)


def test_an_unsealed_memfd_is_refused_because_it_could_be_truncated() -> None:
    fd = _memfd(PAGE)
    try:
        with pytest.raises(pf.RemoteProtocolError, match="not sealed against shrinking"):
            check_peer_memfd(fd, offset=0, length=PAGE, what="memfd", frame="OFFER")
        mm.ftruncate(fd, 0)  # what the peer could have done under our mapping
    finally:
        os.close(fd)


def test_a_write_seal_cannot_follow_our_mapping() -> None:
    """A peer that adds F_SEAL_WRITE after the check is too late once we map it."""
    fd = _memfd(PAGE, Seal.SHRINK | Seal.GROW)
    try:
        check_peer_memfd(fd, offset=0, length=PAGE, what="memfd", frame="OFFER")
        with pf.Region.from_memfds([(Memfd(os.dup(fd)), 0, PAGE)], "checked") as region:
            with pytest.raises(OSError) as info:
                mm.add_seals(fd, Seal.WRITE)
            assert info.value.errno == errno.EBUSY
            region.view()[:1] = b"\x01"
    finally:
        os.close(fd)


def test_a_movable_regions_memfd_passes() -> None:
    with pf.Region.movable(4 * PAGE, name="ram") as region:
        (extent,) = region.extents(PAGE, 3 * PAGE)
        assert extent.memfd is not None
        st = check_peer_memfd(
            extent.memfd.fd,
            offset=extent.fd_offset,
            length=extent.length,
            what="memfd of region 'ram'",
            frame="FLIP",
            inode=os.fstat(extent.memfd.fd).st_ino,
        )
        assert st.st_size == 4 * PAGE


def test_an_fd_that_is_not_open_is_our_error_not_the_peers() -> None:
    r, w = os.pipe()
    os.close(w)
    os.close(r)
    with pytest.raises(OSError) as info:
        check_peer_memfd(r, offset=0, length=PAGE, what="memfd", frame="OFFER")
    assert not isinstance(info.value, pf.RemoteProtocolError)
    assert info.value.errno == errno.EBADF


# -- the channel ----------------------------------------------------------------------------

OFFER_CASES = [(name, make) for name, make in BAD_MEMFDS if name != "wrong inode"]


@pytest.mark.parametrize(("name", "make"), OFFER_CASES, ids=[n for n, _ in OFFER_CASES])
def test_a_channel_reader_refuses_each_bad_fd_and_keeps_working(
    name: str, make: Maker, tmp_path: Path, spawn: Any
) -> None:
    """A spawned writer gifts the bad fd as a memfd, twice: receive() and receive_into()
    refuse it, the writer gets PeerRefused with the same words, and the channel then
    carries a good gift."""
    case = make(tmp_path)
    assert case.in_offer
    a, b = pf.channel_pair(timeout=30)
    results = spawn.Queue()
    child = spawn.Process(
        target=peers.offer_fd_then_gift,
        args=(b, peers.PassFd(case.fd), case.offset, case.length, results),
    )
    try:
        child.start()
        b.close()
        with pytest.raises(pf.RemoteProtocolError) as info:
            a.receive()
        refusals = [info.value]
        with (
            pf.Region.movable(case.length, name="dest") as dest,
            pytest.raises(pf.RemoteProtocolError) as info,
        ):
            a.receive_into(dest)
        refusals.append(info.value)
        for err in refusals:
            assert str(err).startswith("memfd 0 of the offer")
            assert case.rule in str(err)
            assert err.frame == "OFFER"

        for err in refusals:
            told = results.get(timeout=60)
            assert told == {"refused": str(err), "phase": "offer"}
        expect = results.get(timeout=60)["digest"]
        region, transfer = a.receive()
        with region:
            assert peers.digest(region.view()) == expect
            assert transfer.method == "move"
    finally:
        child.join(30)
        a.close()
        b.close()
        results.close()
        results.join_thread()
        os.close(case.fd)
    assert child.exitcode == 0


# -- the same memfds, handed to a migration destination in a FLIP ---------------------------


def _flip_frame(case: PeerFd) -> bytes:
    """A FLIP naming ``case``'s range, built by hand: the encoder itself refuses some cases
    (an offset that is not page-aligned), and the destination must refuse them all."""
    from pageflip import stream

    entry = stream.FLIP_REGION.pack(0, 0, case.offset, case.length, case.inode, 0)
    payload = (1).to_bytes(2, "little") + entry
    head = stream.HEADER.pack(stream.MAGIC, stream.VERSION, stream.FrameType.FLIP, 1, len(payload))
    return head + payload


@pytest.mark.parametrize(("name", "make"), BAD_MEMFDS, ids=[n for n, _ in BAD_MEMFDS])
def test_a_flip_destination_refuses_them_too(name: str, make: Maker, tmp_path: Path) -> None:
    """The migration destination maps a FLIP's memfds: the same rules, the same refusals."""
    from helpers import join, run_thread
    from pageflip import stream
    from pageflip.migration.destination import Destination
    from pageflip.transport import UnixConnection

    case = make(tmp_path)
    listen = str(tmp_path / "in.sock")
    dest = Destination(listen, timeout=10)
    thread, out = run_thread(dest.run)
    conn = UnixConnection.connect(listen, timeout=10)
    try:
        encoder, decoder = stream.Encoder(), stream.Decoder()
        hello = stream.Hello(stream.Role.SOURCE, PAGE, stream.Feature.FLIP, os.urandom(16))
        hello.guest_kind = "workload"
        conn.send(encoder.encode(hello)[0])
        region = stream.RegionInfo("ram", max(case.length, PAGE), 0x10000, True)
        setup = stream.Setup(stream.Mode.FLIP, 1, os.getpid(), [region])
        conn.send(encoder.encode(setup)[0])
        conn.send(_flip_frame(case), [case.fd])
        answers = peers.answers_until(conn, decoder, stream.Abort)
        abort = next(a for a in answers if isinstance(a, stream.Abort))
        with pytest.raises(pf.MigrationError) as info:
            join(thread, out)
        cause = info.value.__cause__
        assert isinstance(cause, pf.RemoteProtocolError) and cause.frame == "FLIP", cause
        if make is unaligned_offset:  # the stream codec refuses it before the validator
            assert "page-aligned" in str(cause)
        else:
            assert str(cause).startswith("memfd of region 'ram'") and case.rule in str(cause)
        assert str(cause) in abort.reason
        assert info.value.guest == "source"
    finally:
        conn.close()
        decoder.close()
        os.close(case.fd)
        dest.close()


def test_a_flip_must_name_again_the_very_memfds_that_were_lent() -> None:
    """After a LEND the destination maps the source's memfds; the FLIP inside the pause
    only confirms them by identity: the same files (by inode), announced as such, one per
    lent region. Anything else is the peer's protocol error."""
    from pageflip.channel import check_same_memfds
    from pageflip.errors import RemoteProtocolError

    lent = [pf.Region.movable(4 * PAGE, name=f"r{i}") for i in range(2)]
    other = pf.Region.movable(4 * PAGE, name="other")
    try:
        fds = [os.dup(r.extents()[0].memfd.fd) for r in (*lent, other)]  # type: ignore[union-attr]
        inodes = [os.fstat(fd).st_ino for fd in fds]
        try:
            check_same_memfds(fds, [(0, inodes[0]), (1, inodes[1])], lent, frame="FLIP")
            bad = {
                "another memfd": [(0, inodes[0]), (2, inodes[1])],
                "another announced inode": [(0, inodes[0]), (1, inodes[2])],
                "swapped": [(1, inodes[1]), (0, inodes[0])],
                "an fd index out of range": [(0, inodes[0]), (7, inodes[1])],
                "one memfd fewer": [(0, inodes[0])],
            }
            for case, named in bad.items():
                with pytest.raises(RemoteProtocolError, match="FLIP names") as err:
                    check_same_memfds(fds, named, lent, frame="FLIP")
                assert err.value.frame == "FLIP", case
        finally:
            for fd in fds:
                os.close(fd)
    finally:
        for r in (*lent, other):
            r.close()
