"""Memory: mmap at a chosen address, munmap, mprotect, madvise, memfd with seals, fallocate."""

from __future__ import annotations

import ctypes
import fcntl
import os
from ctypes import c_char_p, c_int, c_long, c_size_t, c_uint, c_void_p

from ._gate import libc_gate, map_failed, os_error
from .flags import Falloc, Fcntl, Madv, Map, Memfd, Prot, Seal

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# Flag combinations built once: IntFlag arithmetic costs a microsecond a time.
_RESERVE = Map.PRIVATE | Map.ANONYMOUS | Map.NORESERVE
_PUNCH = int(Falloc.PUNCH_HOLE | Falloc.KEEP_SIZE)

_mmap = libc_gate(
    "mmap",
    c_void_p,
    [c_void_p, c_size_t, c_int, c_int, c_int, c_long],
    ("addr", "len", "prot", "flags", "fd", "offset"),
    failed=map_failed,
)
_munmap = libc_gate("munmap", c_int, [c_void_p, c_size_t], ("addr", "len"))
_mprotect = libc_gate("mprotect", c_int, [c_void_p, c_size_t, c_int], ("addr", "len", "prot"))
_madvise = libc_gate("madvise", c_int, [c_void_p, c_size_t, c_int], ("addr", "len", "advice"))
_memfd_create = libc_gate("memfd_create", c_int, [c_char_p, c_uint], ("name", "flags"))
_fcntl = libc_gate("fcntl", c_int, [c_int, c_int, c_long], ("fd", "cmd", "arg"))
_ftruncate = libc_gate("ftruncate", c_int, [c_int, c_long], ("fd", "length"))
_fallocate = libc_gate(
    "fallocate", c_int, [c_int, c_int, c_long, c_long], ("fd", "mode", "offset", "len")
)


def mmap(
    addr: int | None, length: int, prot: Prot, flags: Map, fd: int = -1, offset: int = 0
) -> int:
    """Map ``length`` bytes; with ``Map.FIXED`` exactly at ``addr``, replacing what was there."""
    result: int = _mmap(addr, length, int(prot), int(flags), fd, offset)
    return result


def reserve(length: int, align: int = PAGE_SIZE) -> int:
    """Reserve ``length`` bytes of address space: no access, no memory behind it.

    The range starts on a multiple of ``align`` (a power of two): a huge page's mapping
    must, and a shmem mapping whose huge pages should be mapped whole does.
    """
    if align <= PAGE_SIZE:
        return mmap(None, length, Prot.NONE, _RESERVE)
    raw = mmap(None, length + align, Prot.NONE, _RESERVE)
    start = (raw + align - 1) & ~(align - 1)
    if start > raw:
        munmap(raw, start - raw)
    tail = raw + length + align - (start + length)
    if tail:
        munmap(start + length, tail)
    return start


def map_aligned(
    length: int, align: int, prot: Prot, flags: Map, fd: int = -1, offset: int = 0
) -> int:
    """``mmap`` of ``length`` bytes at an address that is a multiple of ``align``."""
    if align <= PAGE_SIZE:
        return mmap(None, length, prot, flags, fd, offset)
    start = reserve(length, align)
    try:
        return mmap(start, length, prot, flags | Map.FIXED, fd, offset)
    except BaseException:
        munmap(start, length)
        raise


def release(addr: int, length: int) -> None:
    """Replace ``[addr, addr+length)`` by an inaccessible reservation, freeing its pages.

    Unlike munmap, the address range stays ours, so no other mapping can land there while
    something may still hold the address.
    """
    mmap(addr, length, Prot.NONE, _RESERVE | Map.FIXED)


def munmap(addr: int, length: int) -> None:
    _munmap(addr, length)


def mprotect(addr: int, length: int, prot: Prot) -> None:
    _mprotect(addr, length, int(prot))


def madvise(addr: int, length: int, advice: Madv) -> None:
    _madvise(addr, length, int(advice))


def memfd_create(name: str, flags: Memfd = Memfd.CLOEXEC | Memfd.ALLOW_SEALING) -> int:
    fd: int = _memfd_create(name.encode()[:249], int(flags))
    return fd


def ftruncate(fd: int, length: int) -> None:
    _ftruncate(fd, length)


def add_seals(fd: int, seals: Seal) -> None:
    _fcntl(fd, int(Fcntl.ADD_SEALS), int(seals))


def seal_bits(fd: int) -> int:
    """The seals of ``fd`` as bits; EINVAL for a file that is not a memfd (or other shmem).

    Through Python's own fcntl (a tenth of a ctypes call's cost: it is on the move path).
    """
    try:
        return fcntl.fcntl(fd, Fcntl.GET_SEALS.value)
    except OSError as err:
        raise os_error(err.errno or 0, f"fcntl(fd={fd}, cmd=F_GET_SEALS)") from None


def get_seals(fd: int) -> Seal:
    """The seals of ``fd``; EINVAL for a file that is not a memfd (or other shmem)."""
    return Seal(seal_bits(fd))


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free the pages of ``[offset, offset+length)`` in a memfd; the size stays."""
    _fallocate(fd, _PUNCH, offset, length)


def set_pipe_size(fd: int, size: int) -> int:
    """Set a pipe's capacity (fcntl F_SETPIPE_SZ); returns the capacity the kernel chose."""
    result: int = _fcntl(fd, int(Fcntl.SETPIPE_SZ), size)
    return result


def fstat_size(fd: int) -> int:
    try:
        return os.fstat(fd).st_size
    except OSError as err:
        raise os_error(err.errno or 0, f"fstat(fd={fd})") from None


def page_round_up(n: int) -> int:
    return (n + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE


def buffer_address(buf: memoryview) -> int:
    """Address of a writable, C-contiguous buffer's first byte."""
    holder = (ctypes.c_char * max(buf.nbytes, 1)).from_buffer(buf)
    address = ctypes.addressof(holder)
    del holder
    return address
