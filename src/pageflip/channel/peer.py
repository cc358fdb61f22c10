"""A peer's memory: the only code that maps a peer's memfds or copies out of its process.

Every path by which pageflip takes memory from another process comes through here: the
channel's moves and copies, a migration's flip and precopy rounds, and the postcopy pager.

* :func:`check_peer_memfd` decides whether an fd a peer sent may be mapped (the rules are
  in its docstring), and :func:`map_peer_memfds` maps pieces of such fds as one region.
* :func:`pull_from` copies ranges of a peer process into ours with process_vm_readv (in
  parallel when large), :func:`read_from` does one bounded read for a caller that handles
  a short one itself (the pager), and :func:`allow_peer_read` is the other side: under
  Yama's ptrace_scope 1 it lets the peer read us (PR_SET_PTRACER), which
  :func:`forbid_peer_read` undoes.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import stat
from collections.abc import Sequence

from .._sys import huge, io, mm
from .._sys.flags import Seal
from .._sys.mm import PAGE_SIZE
from .._sys.procfs import sysctl
from ..errors import PeerClosed, RemoteProtocolError
from ..memory import Memfd, Region

__all__ = [
    "allow_peer_read",
    "check_peer_memfd",
    "check_same_memfds",
    "forbid_peer_read",
    "map_checked_memfds",
    "map_peer_memfds",
    "memfd_page_size",
    "pull_from",
    "read_from",
]

#: Seals that forbid the writable shared mapping a receiver makes of a peer's memfd.
_NO_WRITES = int(Seal.WRITE | Seal.FUTURE_WRITE)
_SHRINK = int(Seal.SHRINK)


@functools.cache
def _memfd_device() -> int:
    """The device of the kernel's internal shmem mount, where every (non-hugetlb) memfd lives.

    Probed once from a memfd of our own: one mount for the whole system, in every namespace.
    """
    fd = mm.memfd_create("pageflip:probe")
    try:
        return os.fstat(fd).st_dev
    finally:
        os.close(fd)


@functools.cache
def _hugetlb_devices() -> dict[int, int]:
    """Device -> page size of the kernel's internal hugetlbfs mounts, where hugetlb memfds
    live (one per page size), probed once from memfds of our own (made without a page)."""
    devices: dict[int, int] = {}
    for page_size in huge.hugetlb_sizes():
        try:
            fd = mm.memfd_create("pageflip:probe", huge.memfd_flags(page_size))
        except OSError:
            continue
        try:
            devices[os.fstat(fd).st_dev] = page_size
        finally:
            os.close(fd)
    return devices


def memfd_page_size(st: os.stat_result) -> int:
    """The page size of a memfd that passed :func:`check_peer_memfd`, from its stat: a
    hugetlb memfd's huge page size, else 4 KiB."""
    return _hugetlb_devices().get(st.st_dev, PAGE_SIZE)


def check_peer_memfd(
    fd: int, *, offset: int, length: int, what: str, frame: str, inode: int | None = None
) -> os.stat_result:
    """Refuse, with a RemoteProtocolError, an fd a peer sent unless we may map bytes
    ``[offset, offset+length)`` of it writable and shared, now and for as long as we like.

    The one place that decides it, for the channel's OFFER and the migration's FLIP alike
    (both map through :func:`map_peer_memfds`).
    ``what`` names the fd's role in the message ("memfd 0 of the offer"), ``frame`` goes to
    the error. The rules, each named in the message that refuses it:

    * *not a memfd*: F_GET_SEALS fails (a pipe, socket, directory, a file on disk), or the
      file is not a regular file on the kernel's internal shmem mount or on one of its
      internal hugetlbfs mounts (a tmpfs or hugetlbfs file opened by path is refused);
    * *not the memfd announced*: ``inode`` is given and differs (the device needs no field
      of its own: the rule above already fixed it to the memfd mount);
    * *not sealed against shrinking*: the peer could truncate it under our mapping, and
      touching the lost pages would be a SIGBUS;
    * *sealed against writes* (F_SEAL_WRITE or F_SEAL_FUTURE_WRITE): we map it writable;
    * *offset not page-aligned*, or *an empty range*: mmap cannot map that;
    * *too short*: its size is less than ``offset + length``.

    Seals are only ever added, never removed, so a memfd that passed carries SHRINK for
    good: from the moment the seals were read, its size can never go down again (the
    kernel refuses an ftruncate to a smaller size with EPERM, whoever holds the fd). That
    is why the size is read after the seals: the returned stat (fstat after F_GET_SEALS)
    has a size that stays a lower bound forever, and "truncated after the check" cannot
    happen. (A write seal added after the check is harmless too: F_SEAL_WRITE fails with
    EBUSY once we map the memfd writable, and F_SEAL_FUTURE_WRITE spares existing maps.)

    Other errors (EBADF: the fd is not open) are ours, not the peer's: they propagate as
    plain OSError.
    """
    seals, st = _memfd_seals_and_stat(fd, what=what, frame=frame)
    if inode is not None and st.st_ino != inode:
        raise RemoteProtocolError(
            f"{what} is not the memfd announced: inode {st.st_ino}, announced {inode}",
            frame=frame,
        )
    _check_seals(seals, what=what, frame=frame)
    _check_range(st.st_size, offset=offset, length=length, what=what, frame=frame)
    return st


def _memfd_seals_and_stat(fd: int, *, what: str, frame: str) -> tuple[int, os.stat_result]:
    """The seals of ``fd`` and then its stat (in that order: see check_peer_memfd), refused
    unless it is a memfd: F_GET_SEALS works and the file is regular, on the memfd mount."""
    try:
        seals = mm.seal_bits(fd)
    except OSError as err:
        if err.errno != errno.EINVAL:
            raise
        raise RemoteProtocolError(
            f"{what} is not a memfd (F_GET_SEALS: not a shmem file)", frame=frame
        ) from None
    st = os.fstat(fd)
    memfd_mount = st.st_dev == _memfd_device() or st.st_dev in _hugetlb_devices()
    if not stat.S_ISREG(st.st_mode) or not memfd_mount:
        raise RemoteProtocolError(
            f"{what} is not a memfd (a file on device "
            f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}, memfds live on "
            f"{os.major(_memfd_device())}:{os.minor(_memfd_device())})",
            frame=frame,
        )
    return seals, st


def _check_seals(seals: int, *, what: str, frame: str) -> None:
    """Refuse a memfd that could shrink under our mapping or that we may not map writable."""
    if not seals & _SHRINK:
        raise RemoteProtocolError(
            f"{what} is not sealed against shrinking (it could be truncated under our "
            "mapping: SIGBUS)",
            frame=frame,
        )
    if seals & _NO_WRITES:
        which = "F_SEAL_WRITE" if seals & Seal.WRITE else "F_SEAL_FUTURE_WRITE"
        raise RemoteProtocolError(
            f"{what} is sealed against writes ({which}): a receiver maps it writable",
            frame=frame,
        )


def _check_range(size: int, *, offset: int, length: int, what: str, frame: str) -> None:
    """Refuse a range ``[offset, offset+length)`` that mmap cannot map or that runs past
    ``size``, the memfd's size."""
    if offset % PAGE_SIZE or offset < 0:
        raise RemoteProtocolError(
            f"{what}: offset {offset} is not page-aligned (a multiple of {PAGE_SIZE})",
            frame=frame,
        )
    if length <= 0:
        raise RemoteProtocolError(f"{what}: an empty range of {length} bytes", frame=frame)
    if size < offset + length:
        raise RemoteProtocolError(
            f"{what} is too short: {size} bytes, bytes [{offset}, {offset + length}) "
            "were announced",
            frame=frame,
        )


def map_peer_memfds(
    fds: Sequence[int],
    pieces: Sequence[tuple[int, int, int]],
    name: str,
    *,
    frame: str,
    what: Sequence[str],
    inodes: Sequence[int | None] | None = None,
    shared: bool = True,
) -> Region:
    """A new region mapping ``pieces`` (fd index, offset, length) of a peer's ``fds`` one
    after the other, each checked by :func:`check_peer_memfd` first (``what[i]`` names
    piece i in a refusal, ``inodes[i]`` is the inode it was announced with, if any).

    The region holds duplicates of the fds: the caller still owns (and closes) ``fds``.
    ``shared`` marks the memfds as held by another process too (so closing the region
    never frees pages the peer may still use).
    """
    for i, (index, offset, length) in enumerate(pieces):
        check_peer_memfd(
            fds[index],
            offset=offset,
            length=length,
            what=what[i],
            frame=frame,
            inode=None if inodes is None else inodes[i],
        )
    return map_checked_memfds(fds, pieces, name, shared=shared)


def check_same_memfds(
    fds: Sequence[int], named: Sequence[tuple[int, int]], held: Sequence[Region], *, frame: str
) -> None:
    """Check that a peer names again the very memfds that ``held`` already map (a FLIP after
    a LEND): ``named[i]`` is (fd index, announced inode) for ``held[i]``; each fd must be that
    region's memfd, by inode, as announced. RemoteProtocolError otherwise."""
    if len(named) != len(held):
        raise RemoteProtocolError(
            f"{frame} names {len(named)} memfds, {len(held)} were lent", frame=frame
        )
    for (index, inode), region in zip(named, held, strict=True):
        (extent,) = region.extents()
        assert extent.memfd is not None
        ours = os.fstat(extent.memfd.fd).st_ino
        if not 0 <= index < len(fds) or inode != ours or os.fstat(fds[index]).st_ino != ours:
            raise RemoteProtocolError(
                f"{frame} names other memfds than the LEND before it", frame=frame
            )


def map_checked_memfds(
    fds: Sequence[int],
    pieces: Sequence[tuple[int, int, int]],
    name: str,
    *,
    shared: bool = True,
    thp: bool = False,
) -> Region:
    """:func:`map_peer_memfds` without the checks, for a caller that has just made them
    itself (each piece passed :func:`check_peer_memfd`): the mapping alone. ``thp``: the
    peer says its shmem memfds hold transparent huge pages."""
    holders: dict[int, Memfd] = {}
    try:
        for index, _, _ in pieces:
            if index not in holders:
                page_size = memfd_page_size(os.fstat(fds[index]))
                holders[index] = Memfd(
                    os.dup(fds[index]),
                    shared=shared,
                    page_size=page_size,
                    thp=thp and page_size == PAGE_SIZE,
                )
        return Region.from_memfds([(holders[i], off, n) for i, off, n in pieces], name)
    except BaseException:
        for holder in holders.values():
            holder.close()
        raise


def pull_from(pid: int, local: io.IovArray, remote: io.IovArray, *, phase: str) -> None:
    """Copy every ``remote`` range of process ``pid`` into ``local`` (process_vm_readv, on
    several threads when large). PeerClosed if the process is gone or a read comes up short;
    PermissionError if we may not read it (see :func:`allow_peer_read`)."""
    try:
        io.pull_remote_parallel(pid, local, remote)
    except ProcessLookupError as err:
        raise PeerClosed(f"the peer process is gone: {err}", phase=phase) from err


def read_from(pid: int, local: io.IovArray, remote: io.IovArray) -> int:
    """Read ``remote`` ranges of process ``pid`` into ``local`` on this thread; returns the
    bytes read (fewer when the process or its memory is gone). OSError as the kernel says."""
    return io.pull_remote(pid, local, remote)


def allow_peer_read(pid: int) -> bool:
    """Under Yama's ptrace_scope 1, let process ``pid`` read our memory (PR_SET_PTRACER).

    True if a grant was made (undo it with :func:`forbid_peer_read`); False where none is
    needed or it could not be made (the peer's read then fails and it asks for a push)."""
    if sysctl("kernel.yama.ptrace_scope") != "1":
        return False
    try:
        io.set_ptracer(pid)
    except OSError:
        return False
    return True


def forbid_peer_read() -> None:
    """Withdraw a grant made by :func:`allow_peer_read` (best effort)."""
    with contextlib.suppress(OSError):
        io.set_ptracer(0)
