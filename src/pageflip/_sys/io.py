"""Data paths: iovec arrays, vmsplice, splice, tee, readv, process_vm_readv/writev, pipes."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from ctypes import c_int, c_long, c_size_t, c_uint, c_ulong, c_void_p

import numpy as np
import numpy.typing as npt

from ._gate import libc_gate, os_error
from .flags import PR_SET_PDEATHSIG, PR_SET_PTRACER, Splice
from .mm import PAGE_SIZE, set_pipe_size

#: At most this many iovecs per call (UIO_MAXIOV).
IOV_MAX = 1024

IovArray = npt.NDArray[np.uint64]

_vmsplice = libc_gate(
    "vmsplice", c_long, [c_int, c_void_p, c_size_t, c_uint], ("fd", None, "nr_segs", "flags")
)
_splice = libc_gate(
    "splice",
    c_long,
    [c_int, c_void_p, c_int, c_void_p, c_size_t, c_uint],
    ("fd_in", None, "fd_out", None, "len", "flags"),
)
_tee = libc_gate(
    "tee", c_long, [c_int, c_int, c_size_t, c_uint], ("fd_in", "fd_out", "len", "flags")
)
_readv = libc_gate("readv", c_long, [c_int, c_void_p, c_int], ("fd", None, "iovcnt"))
_writev = libc_gate("writev", c_long, [c_int, c_void_p, c_int], ("fd", None, "iovcnt"))
_preadv = libc_gate(
    "preadv", c_long, [c_int, c_void_p, c_int, c_long], ("fd", None, "iovcnt", "offset")
)
_pvm_readv = libc_gate(
    "process_vm_readv",
    c_long,
    [c_int, c_void_p, c_ulong, c_void_p, c_ulong, c_ulong],
    ("pid", None, "liovcnt", None, "riovcnt", "flags"),
)
_pvm_writev = libc_gate(
    "process_vm_writev",
    c_long,
    [c_int, c_void_p, c_ulong, c_void_p, c_ulong, c_ulong],
    ("pid", None, "liovcnt", None, "riovcnt", "flags"),
)
_prctl = libc_gate(
    "prctl",
    c_int,
    [c_int, c_ulong, c_ulong, c_ulong, c_ulong],
    ("option", "arg2", None, None, None),
)


def iovecs(pairs: Iterable[tuple[int, int]]) -> IovArray:
    """An array of ``struct iovec`` (base, len) from (address, length) pairs."""
    arr = np.array(list(pairs), dtype=np.uint64).reshape(-1, 2)
    return np.ascontiguousarray(arr)


def iov_advance(iov: IovArray, n: int) -> IovArray:
    """What remains of ``iov`` after the first ``n`` bytes were transferred."""
    if n <= 0:
        return iov
    ends = np.cumsum(iov[:, 1])
    k = int(np.searchsorted(ends, n, side="right"))
    rest = iov[k:].copy()
    if len(rest):
        done_before = int(ends[k - 1]) if k else 0
        skip = n - done_before
        rest[0, 0] += np.uint64(skip)
        rest[0, 1] -= np.uint64(skip)
        if rest[0, 1] == 0:
            rest = rest[1:]
    return rest


def _ptr(iov: IovArray) -> int:
    return int(iov.ctypes.data)


def vmsplice(fd: int, iov: IovArray, flags: Splice = Splice.NONE) -> int:
    """vmsplice(2): splice user pages into the pipe ``fd`` (writer) or copy out of it (reader).

    Takes at most IOV_MAX iovecs. Returns the bytes transferred, as the kernel does.
    """
    n = min(len(iov), IOV_MAX)
    result: int = _vmsplice(fd, _ptr(iov), n, int(flags))
    return result


def splice(fd_in: int, fd_out: int, length: int, flags: Splice = Splice.NONE) -> int:
    result: int = _splice(fd_in, None, fd_out, None, length, int(flags))
    return result


def tee(fd_in: int, fd_out: int, length: int, flags: Splice = Splice.NONE) -> int:
    result: int = _tee(fd_in, fd_out, length, int(flags))
    return result


def readv(fd: int, iov: IovArray) -> int:
    result: int = _readv(fd, _ptr(iov), min(len(iov), IOV_MAX))
    return result


def writev(fd: int, iov: IovArray) -> int:
    result: int = _writev(fd, _ptr(iov), min(len(iov), IOV_MAX))
    return result


def preadv(fd: int, iov: IovArray, offset: int) -> int:
    result: int = _preadv(fd, _ptr(iov), min(len(iov), IOV_MAX), offset)
    return result


def process_vm_readv(pid: int, local: IovArray, remote: IovArray) -> int:
    result: int = _pvm_readv(
        pid, _ptr(local), min(len(local), IOV_MAX), _ptr(remote), min(len(remote), IOV_MAX), 0
    )
    return result


def process_vm_writev(pid: int, local: IovArray, remote: IovArray) -> int:
    result: int = _pvm_writev(
        pid, _ptr(local), min(len(local), IOV_MAX), _ptr(remote), min(len(remote), IOV_MAX), 0
    )
    return result


def set_ptracer(pid: int) -> None:
    """prctl(PR_SET_PTRACER, pid): under Yama, let ``pid`` read our memory (0 clears)."""
    _prctl(PR_SET_PTRACER, pid, 0, 0, 0)


def die_with_parent(signal: int, parent: int) -> None:
    """prctl(PR_SET_PDEATHSIG): receive ``signal`` when our parent, process ``parent``,
    exits (at once if it is already gone)."""
    _prctl(PR_SET_PDEATHSIG, signal, 0, 0, 0)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal)


def pipe(size: int = 0) -> tuple[int, int]:
    """A close-on-exec pipe; with ``size``, its capacity raised as far as allowed."""
    try:
        r, w = os.pipe2(os.O_CLOEXEC)
    except OSError as err:
        raise os_error(err.errno or 0, "pipe2(O_CLOEXEC)") from None
    if size:
        try:
            set_pipe_size(w, size)
        except PermissionError:
            with open("/proc/sys/fs/pipe-max-size") as f:
                set_pipe_size(w, min(size, int(f.read())))
    return r, w


def read_all_into(fd: int, iov: IovArray) -> int:
    """readv until every byte of ``iov`` is filled; returns the bytes read (short at EOF)."""
    total = 0
    while len(iov):
        n = readv(fd, iov)
        if n == 0:
            break
        total += n
        iov = iov_advance(iov, n)
    return total


def pull_remote(pid: int, local: IovArray, remote: IovArray) -> int:
    """process_vm_readv until every byte is read; returns the bytes read.

    The kernel stops at the end of whichever side's first IOV_MAX iovecs runs out, and on a
    partial read, so the arrays are advanced by what was done each time.
    """
    total = 0
    want = int(local[:, 1].sum()) if len(local) else 0
    while total < want:
        n = process_vm_readv(pid, local, remote)
        if n <= 0:
            break
        total += n
        local = iov_advance(local, n)
        remote = iov_advance(remote, n)
    return total


#: Copies of at least this many bytes are split over threads by pull_remote_parallel.
PARALLEL_COPY = 32 << 20


def iov_slice(iov: IovArray, start: int, stop: int) -> IovArray:
    """The iovecs covering bytes ``[start, stop)`` of the concatenation of ``iov``."""
    rest = iov_advance(iov, start)
    out = []
    need = stop - start
    for base, length in rest.tolist():
        if need <= 0:
            break
        take = min(int(length), need)
        out.append((int(base), take))
        need -= take
    return iovecs(out)


def pull_remote_parallel(pid: int, local: IovArray, remote: IovArray, threads: int = 2) -> None:
    """Read all of ``remote`` (in process ``pid``) into ``local``, on several threads when large.

    Raises ProcessLookupError when the process is gone or a read comes up short.
    """
    total = int(local[:, 1].sum()) if len(local) else 0
    threads = min(threads, os.cpu_count() or 1)
    if total >= PARALLEL_COPY and threads > 1:
        bounds = [total * i // threads // PAGE_SIZE * PAGE_SIZE for i in range(threads)] + [total]
        parts = [
            (iov_slice(local, lo, hi), iov_slice(remote, lo, hi))
            for lo, hi in itertools.pairwise(bounds)
        ]
        with ThreadPoolExecutor(threads) as pool:
            done = sum(pool.map(lambda part: pull_remote(pid, *part), parts))
    else:
        done = pull_remote(pid, local, remote)
    if done != total:
        raise ProcessLookupError(3, f"process_vm_readv(pid={pid}): read {done} of {total} bytes")
