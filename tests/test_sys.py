"""The private bindings: each gate works on real pages and names itself when it fails."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import socket
from collections.abc import Iterator

import numpy as np
import pytest

from pageflip._sys import fds, io, mm, pagemap, uffd
from pageflip._sys._gate import Gate
from pageflip._sys.flags import (
    Madv,
    Map,
    PageCategory,
    PmScan,
    Prot,
    Seal,
    Splice,
    UffdEvent,
    UffdFeature,
    UffdRegister,
    UffdWpMode,
)

PAGE = mm.PAGE_SIZE


class Pages:
    """Anonymous pages for one test."""

    def __init__(self, n: int) -> None:
        self.size = n * PAGE
        self.addr = mm.mmap(None, self.size, Prot.READ | Prot.WRITE, Map.PRIVATE | Map.ANONYMOUS)
        self.array = np.ctypeslib.as_array((ctypes.c_uint8 * self.size).from_address(self.addr))

    def close(self) -> None:
        del self.array
        mm.munmap(self.addr, self.size)


@pytest.fixture
def pages() -> Iterator[Pages]:
    p = Pages(8)
    yield p
    p.close()


# -- the gate -------------------------------------------------------------------------------


def test_gate_retries_eintr_then_returns() -> None:
    calls: list[int] = []

    def fake(x: int) -> int:
        calls.append(x)
        if len(calls) == 1:
            ctypes.set_errno(errno.EINTR)
            return -1
        return 5

    gate = Gate("fake", fake, ctypes.c_int, [ctypes.c_int], ("x",))
    assert gate(1) == 5 and calls == [1, 1]


def test_gate_error_names_the_call_and_keeps_the_errno_class() -> None:
    with pytest.raises(OSError, match=r"^\[Errno 22\] munmap\(addr=0x1001, len=4096\): ") as info:
        mm.munmap(0x1001, PAGE)  # an unaligned address
    assert info.value.errno == errno.EINVAL
    with pytest.raises(PermissionError, match=r"ftruncate\(fd=\d+, length=0\)"):
        fd = mm.memfd_create("pageflip:test")
        try:
            mm.ftruncate(fd, PAGE)
            mm.add_seals(fd, Seal.SHRINK)
            mm.ftruncate(fd, 0)
        finally:
            os.close(fd)


def test_mmap_failure_names_its_arguments() -> None:
    with pytest.raises(OSError, match=r"mmap\(addr=None, len=4096, prot=3, flags=1, fd=-1"):
        mm.mmap(None, PAGE, Prot.READ | Prot.WRITE, Map.SHARED, -1)


# -- memory ---------------------------------------------------------------------------------


def test_mmap_fixed_replaces_pages_in_place(pages: Pages) -> None:
    pages.array[:] = 1
    fd = mm.memfd_create("pageflip:test")
    try:
        mm.ftruncate(fd, PAGE)
        os.pwrite(fd, b"\x09" * PAGE, 0)
        mm.mmap(pages.addr + PAGE, PAGE, Prot.READ | Prot.WRITE, Map.SHARED | Map.FIXED, fd)
        assert pages.array[0] == 1 and pages.array[PAGE] == 9 and pages.array[2 * PAGE] == 1
    finally:
        os.close(fd)


def test_release_keeps_the_range_reserved(pages: Pages) -> None:
    pages.array[:] = 1
    mm.release(pages.addr, PAGE)
    # MAP_FIXED_NOREPLACE over it fails: the range is still ours.
    with pytest.raises(FileExistsError):
        mm.mmap(pages.addr, PAGE, Prot.READ, Map.PRIVATE | Map.ANONYMOUS | Map.FIXED_NOREPLACE)


def test_madvise_and_mprotect(pages: Pages) -> None:
    pages.array[:] = 3
    mm.madvise(pages.addr, pages.size, Madv.DONTNEED)
    assert not pages.array.any()  # private anonymous pages come back as zeros
    mm.mprotect(pages.addr, PAGE, Prot.READ)
    mm.mprotect(pages.addr, PAGE, Prot.READ | Prot.WRITE)
    mm.madvise(pages.addr, pages.size, Madv.POPULATE_WRITE)


def test_memfd_seals_and_punch_hole() -> None:
    fd = mm.memfd_create("pageflip:test")
    try:
        mm.ftruncate(fd, 2 * PAGE)
        mm.add_seals(fd, Seal.SHRINK | Seal.GROW)
        assert mm.get_seals(fd) == Seal.SHRINK | Seal.GROW
        os.pwrite(fd, b"\x01" * 2 * PAGE, 0)
        mm.punch_hole(fd, 0, PAGE)
        assert os.pread(fd, 2, PAGE - 1) == b"\x00\x01"
        assert mm.fstat_size(fd) == 2 * PAGE
    finally:
        os.close(fd)
    r, w = os.pipe()
    try:
        with pytest.raises(OSError, match="fcntl"):
            mm.get_seals(r)
    finally:
        os.close(r)
        os.close(w)


# -- data paths -----------------------------------------------------------------------------


def test_iov_advance_walks_partial_transfers() -> None:
    iov = io.iovecs([(0x1000, 10), (0x2000, 20), (0x3000, 5)])
    assert io.iov_advance(iov, 0).tolist() == iov.tolist()
    assert io.iov_advance(iov, 4).tolist() == [[0x1004, 6], [0x2000, 20], [0x3000, 5]]
    assert io.iov_advance(iov, 10).tolist() == [[0x2000, 20], [0x3000, 5]]
    assert io.iov_advance(iov, 31).tolist() == [[0x3001, 4]]
    assert io.iov_advance(iov, 35).tolist() == []


def test_vmsplice_gift_then_readv(pages: Pages) -> None:
    pages.array[:] = np.arange(pages.size, dtype=np.uint64).astype(np.uint8)
    expect = pages.array.copy()
    r, w = io.pipe(1 << 20)
    out = np.zeros(pages.size, np.uint8)
    try:
        n = io.vmsplice(w, io.iovecs([(pages.addr, pages.size)]), Splice.GIFT | Splice.MOVE)
        assert n == pages.size
        got = io.read_all_into(r, io.iovecs([(out.ctypes.data, out.size)]))
        assert got == pages.size and (out == expect).all()
    finally:
        os.close(r)
        os.close(w)


def test_splice_and_tee_between_pipes() -> None:
    r1, w1 = io.pipe()
    r2, w2 = io.pipe()
    r3, w3 = io.pipe()
    try:
        os.write(w1, b"pageflip")
        assert io.tee(r1, w3, 8) == 8
        assert io.splice(r1, w2, 8) == 8
        assert os.read(r2, 8) == b"pageflip" and os.read(r3, 8) == b"pageflip"
    finally:
        for fd in (r1, w1, r2, w2, r3, w3):
            os.close(fd)


def test_process_vm_readv_and_writev_on_a_child() -> None:
    src = np.frombuffer(b"0123456789abcdef" * 512, np.uint8).copy()
    dst = np.zeros_like(src)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child only waits; its memory is a copy of ours
        os.read(r, 1)
        os._exit(0)
    try:
        local = io.iovecs([(dst.ctypes.data, dst.size)])
        remote = io.iovecs([(src.ctypes.data, src.size)])
        assert io.pull_remote(pid, local, remote) == src.size
        assert (dst == src).all()
        dst[:] = 7
        assert io.process_vm_writev(pid, local, remote) == src.size
        back = np.zeros_like(src)
        io.pull_remote(pid, io.iovecs([(back.ctypes.data, back.size)]), remote)
        assert (back == 7).all() and (src != 7).any()  # the child's copy changed, not ours
    finally:
        os.write(w, b"x")
        os.waitpid(pid, 0)
        os.close(r)
        os.close(w)
    with pytest.raises(ProcessLookupError, match=rf"process_vm_readv\(pid={pid}"):
        io.process_vm_readv(pid, local, remote)


def test_scm_rights_and_peer_credentials() -> None:
    a, b = socket.socketpair()
    r, w = os.pipe()
    got: list[int] = []
    try:
        fds.sendmsg(a, b"hi", [r, w])
        n, got = fds.recvmsg_into(b, memoryview(bytearray(8)))
        assert n == 2 and len(got) == 2
        os.write(got[1], b"z")
        assert os.read(r, 1) == b"z"
        assert fds.peer_credentials(b) == (os.getpid(), os.getuid(), os.getgid())
    finally:
        fds.close_all(got)
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


def test_pidfd_open_and_getfd() -> None:
    pidfd = fds.pidfd_open(os.getpid())
    r, w = os.pipe()
    try:
        dup = fds.pidfd_getfd(pidfd, w)
        os.write(dup, b"q")
        os.close(dup)
        assert os.read(r, 1) == b"q"
        with pytest.raises(OSError, match=r"pidfd_getfd\(pidfd=\d+, targetfd=999999"):
            fds.pidfd_getfd(pidfd, 999999)
    finally:
        for fd in (pidfd, r, w):
            os.close(fd)


# -- userfaultfd and PAGEMAP_SCAN -----------------------------------------------------------


@pytest.fixture
def ufd() -> Iterator[int]:
    fd = uffd.userfaultfd()
    yield fd
    os.close(fd)


def test_uffd_copy_zeropage_wake_and_missing_faults(ufd: int, pages: Pages) -> None:
    features, ioctls = uffd.api(ufd, UffdFeature.NONE)
    assert UffdFeature.MISSING_SHMEM in features and ioctls
    src = Pages(1)
    try:
        src.array[:] = 5
        mm.madvise(pages.addr, pages.size, Madv.DONTNEED)
        uffd.register(ufd, pages.addr, pages.size, UffdRegister.MISSING)
        assert uffd.copy(ufd, pages.addr, src.addr, PAGE) == PAGE
        assert uffd.zeropage(ufd, pages.addr + PAGE, PAGE) == PAGE
        with pytest.raises(FileExistsError, match="UFFDIO_COPY"):
            uffd.copy(ufd, pages.addr, src.addr, PAGE)  # already there
        uffd.wake(ufd, pages.addr, pages.size)
        assert len(uffd.read_messages(ufd)) == 0  # nothing faulted
        assert pages.array[0] == 5 and pages.array[PAGE] == 0
        uffd.unregister(ufd, pages.addr, pages.size)
    finally:
        src.close()


def test_uffd_reports_a_missing_fault_from_another_thread(ufd: int, pages: Pages) -> None:
    import threading

    uffd.api(ufd, UffdFeature.NONE)
    mm.madvise(pages.addr, pages.size, Madv.DONTNEED)
    uffd.register(ufd, pages.addr, pages.size, UffdRegister.MISSING)
    seen: list[int] = []
    r, w = os.pipe()

    def touch() -> None:
        # A syscall reads the page, so the fault blocks in the kernel without the GIL
        # (a numpy read would block holding it, and nothing could resolve the fault).
        os.write(w, (ctypes.c_char * 8).from_address(pages.addr + 3 * PAGE + 5))
        seen.append(os.read(r, 8)[0])

    thread = threading.Thread(target=touch)
    thread.start()
    msgs = uffd.read_messages(ufd)
    import select

    while not len(msgs):
        select.select([ufd], [], [], 5)
        msgs = uffd.read_messages(ufd)
    assert msgs[0]["event"] == UffdEvent.PAGEFAULT
    assert int(msgs[0]["address"]) // PAGE * PAGE == pages.addr + 3 * PAGE
    src = Pages(1)
    src.array[:] = 42
    uffd.copy(ufd, pages.addr + 3 * PAGE, src.addr, PAGE)  # wakes the thread
    thread.join(10)
    src.close()
    os.close(r)
    os.close(w)
    assert seen == [42]
    uffd.unregister(ufd, pages.addr, pages.size)


def test_uffd_move_within_one_address_space(ufd: int) -> None:
    uffd.api(ufd, UffdFeature.MOVE)
    dst, src = Pages(1), Pages(1)
    try:
        mm.madvise(dst.addr, PAGE, Madv.DONTNEED)
        src.array[:] = 8
        uffd.register(ufd, dst.addr, PAGE, UffdRegister.MISSING)
        assert uffd.move(ufd, dst.addr, src.addr, PAGE) == PAGE
        assert dst.array[0] == 8 and src.array[0] == 0  # the page left src
        uffd.unregister(ufd, dst.addr, PAGE)
    finally:
        dst.close()
        src.close()


def scan_written(pm: int, p: Pages) -> list[tuple[int, int]]:
    found = pagemap.scan(
        pm,
        p.addr,
        p.addr + p.size,
        flags=PmScan.WP_MATCHING | PmScan.CHECK_WPASYNC,
        category_mask=PageCategory.WRITTEN,
        return_mask=PageCategory.WRITTEN,
    )
    return [(int(r["start"] - p.addr) // PAGE, int(r["end"] - p.addr) // PAGE) for r in found]


@pytest.mark.parametrize("backing", ["anonymous", "memfd"])
def test_pagemap_scan_finds_exactly_the_written_pages(ufd: int, backing: str) -> None:
    uffd.api(
        ufd, UffdFeature.WP_ASYNC | UffdFeature.WP_UNPOPULATED | UffdFeature.WP_HUGETLBFS_SHMEM
    )
    p = Pages(16)
    memfd = -1
    if backing == "memfd":
        memfd = mm.memfd_create("pageflip:test")
        mm.ftruncate(memfd, p.size)
        mm.mmap(p.addr, p.size, Prot.READ | Prot.WRITE, Map.SHARED | Map.FIXED, memfd)
    pm = pagemap.open_pagemap()
    try:
        uffd.register(ufd, p.addr, p.size, UffdRegister.WP)
        uffd.writeprotect(ufd, p.addr, p.size, UffdWpMode.WP)
        assert scan_written(pm, p) == []
        p.array[2 * PAGE] = 1
        p.array[3 * PAGE + 9] = 1
        p.array[10 * PAGE] = 1
        assert scan_written(pm, p) == [(2, 4), (10, 11)]
        assert scan_written(pm, p) == []  # the scan protected them again
        p.array[15 * PAGE] = 1
        assert scan_written(pm, p) == [(15, 16)]
        uffd.unregister(ufd, p.addr, p.size)
    finally:
        os.close(pm)
        p.close()
        if memfd >= 0:
            os.close(memfd)


def test_pagemap_scan_walks_on_when_its_vector_is_full(ufd: int) -> None:
    uffd.api(ufd, UffdFeature.WP_ASYNC | UffdFeature.WP_UNPOPULATED)
    p = Pages(64)
    pm = pagemap.open_pagemap()
    try:
        uffd.register(ufd, p.addr, p.size, UffdRegister.WP)
        uffd.writeprotect(ufd, p.addr, p.size, UffdWpMode.WP)
        p.array[:: 2 * PAGE] = 1  # 32 separate runs
        found = pagemap.scan(
            pm,
            p.addr,
            p.addr + p.size,
            flags=PmScan.WP_MATCHING | PmScan.CHECK_WPASYNC,
            category_mask=PageCategory.WRITTEN,
            return_mask=PageCategory.WRITTEN,
            vec_len=5,
        )
        assert len(found) == 32
        uffd.unregister(ufd, p.addr, p.size)
    finally:
        os.close(pm)
        p.close()


def test_pfns_are_shared_by_two_mappings_of_one_memfd() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (CAP_SYS_ADMIN) for PFNs")
    fd = mm.memfd_create("pageflip:test")
    try:
        mm.ftruncate(fd, 2 * PAGE)
        one = mm.mmap(None, 2 * PAGE, Prot.READ | Prot.WRITE, Map.SHARED | Map.POPULATE, fd)
        two = mm.mmap(None, 2 * PAGE, Prot.READ | Prot.WRITE, Map.SHARED | Map.POPULATE, fd)
        a, b = pagemap.pfns(one, 2), pagemap.pfns(two, 2)
        assert (a == b).all() and (a != 0).all()
        mm.munmap(one, 2 * PAGE)
        mm.munmap(two, 2 * PAGE)
    finally:
        os.close(fd)


def test_mmap_module_buffer_survives_map_fixed_replacement() -> None:
    """docs/kernel.md, "mmap and MAP_FIXED": MAP_FIXED under an mmap.mmap keeps it valid."""
    m = mmap.mmap(-1, PAGE)
    view = np.frombuffer(m, np.uint8)
    address = int(view.ctypes.data)
    fd = mm.memfd_create("pageflip:test")
    try:
        mm.ftruncate(fd, PAGE)
        os.pwrite(fd, b"\x05" * PAGE, 0)
        mm.mmap(address, PAGE, Prot.READ | Prot.WRITE, Map.SHARED | Map.FIXED, fd)
        assert m[0] == 5
        with pytest.raises(BufferError):
            m.close()
        del view
        m.close()
    finally:
        os.close(fd)
