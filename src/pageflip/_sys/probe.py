"""Check each kernel feature pageflip uses, once, by really using it.

Each check returns a short detail when it works and raises OSError when it does not; the
errno then says why in words (kernel too old, no permission, feature off).
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass

from ..errors import FeatureUnavailable
from . import fds as _fds
from . import huge as _huge
from . import io as _io
from . import mm as _mm
from . import pagemap as _pagemap
from . import uffd as _uffd
from .flags import (
    Madv,
    Map,
    PageCategory,
    PmScan,
    Prot,
    Seal,
    Splice,
    UffdFeature,
    UffdRegister,
    UffdWpMode,
)
from .procfs import sysctl

PAGE = _mm.PAGE_SIZE


@dataclass(frozen=True)
class Feature:
    """One kernel feature: whether it works here, and what was found (or why not)."""

    name: str
    available: bool
    detail: str
    #: What pageflip uses it for.
    purpose: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def explain(err: OSError) -> str:
    """Why a feature is missing, in words, from the errno its check raised."""
    if isinstance(err, FeatureUnavailable) and err.reason:
        return err.reason  # already in words, with the setting that would enable it
    code = err.errno or 0
    if code == errno.ENOSYS:
        why = "kernel too old (syscall not implemented)"
    elif code in (errno.EPERM, errno.EACCES):
        why = "no permission"
    elif code in (errno.EINVAL, errno.ENOTTY, errno.EOPNOTSUPP):
        why = "kernel too old or feature off"
    elif code == errno.ENOENT:
        why = "not present on this system"
    else:
        why = "failed"
    return f"{why}: {err.strerror or err}"


class _Scratch:
    """Anonymous pages for a check, unmapped afterwards whatever happens."""

    def __init__(self, pages: int = 2) -> None:
        self.size = pages * PAGE
        self.addr = _mm.mmap(None, self.size, Prot.READ | Prot.WRITE, Map.PRIVATE | Map.ANONYMOUS)

    def __enter__(self) -> _Scratch:
        return self

    def __exit__(self, *exc: object) -> None:
        _mm.munmap(self.addr, self.size)

    def poke(self, offset: int = 0, value: int = 0x5A) -> None:
        ctypes.c_ubyte.from_address(self.addr + offset).value = value

    def peek(self, offset: int = 0) -> int:
        return ctypes.c_ubyte.from_address(self.addr + offset).value


def _check_memfd() -> str:
    fd = _mm.memfd_create("pageflip-probe")
    try:
        _mm.ftruncate(fd, PAGE)
        _mm.add_seals(fd, Seal.SHRINK | Seal.GROW)
        seals = _mm.get_seals(fd)
        if not seals & Seal.SHRINK:
            raise OSError(errno.EINVAL, "F_SEAL_SHRINK did not stick")
        return f"seals {seals.name}"
    finally:
        os.close(fd)


def _check_mmap_fixed() -> str:
    fd = _mm.memfd_create("pageflip-probe")
    base = _mm.reserve(2 * PAGE)
    try:
        _mm.ftruncate(fd, PAGE)
        _mm.mmap(base + PAGE, PAGE, Prot.READ | Prot.WRITE, Map.SHARED | Map.FIXED, fd)
        ctypes.c_ubyte.from_address(base + PAGE).value = 7
        if os.pread(fd, 1, 0) != b"\x07":
            raise OSError(errno.EIO, "MAP_FIXED mapping does not show the memfd")
        return "memfd mapped over a reserved range"
    finally:
        _mm.munmap(base, 2 * PAGE)
        os.close(fd)


def _check_scm_rights() -> str:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    got: list[int] = []
    try:
        _fds.sendmsg(a, b"x", [r])
        _, got = _fds.recvmsg_into(b, memoryview(bytearray(1)))
        if len(got) != 1:
            raise OSError(errno.EIO, "no fd arrived")
        return "fds pass over Unix sockets"
    finally:
        _fds.close_all(got)
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


def _check_vmsplice() -> str:
    r, w = _io.pipe()
    try:
        with _Scratch(1) as s:
            s.poke(0, 42)
            n = _io.vmsplice(w, _io.iovecs([(s.addr, PAGE)]), Splice.GIFT | Splice.MOVE)
            dest = bytearray(PAGE)
            got = os.readv(r, [dest])
            if n != PAGE or got != PAGE or dest[0] != 42:
                raise OSError(errno.EIO, "vmsplice gift did not deliver the page")
        return "gift into a pipe, readv out (1 copy)"
    finally:
        os.close(r)
        os.close(w)


def _check_splice() -> str:
    r1, w1 = _io.pipe()
    r2, w2 = _io.pipe()
    try:
        os.write(w1, b"pageflip")
        n = _io.splice(r1, w2, 8)
        if n != 8 or os.read(r2, 8) != b"pageflip":
            raise OSError(errno.EIO, "splice lost data")
        return "pipe to pipe"
    finally:
        for fd in (r1, w1, r2, w2):
            os.close(fd)


def _check_tee() -> str:
    r1, w1 = _io.pipe()
    r2, w2 = _io.pipe()
    try:
        os.write(w1, b"pageflip")
        n = _io.tee(r1, w2, 8)
        if n != 8 or os.read(r2, 8) != b"pageflip" or os.read(r1, 8) != b"pageflip":
            raise OSError(errno.EIO, "tee lost data")
        return "pipe duplicated"
    finally:
        for fd in (r1, w1, r2, w2):
            os.close(fd)


def _ptrace_note() -> str:
    scope = sysctl("kernel.yama.ptrace_scope")
    if scope is None:
        return "no Yama: same-uid peers may read each other"
    return f"Yama ptrace_scope={scope}" + (
        " (pageflip sets PR_SET_PTRACER for its peer)" if scope == "1" else ""
    )


def _check_pvm(write: bool) -> Callable[[], str]:
    def check() -> str:
        with _Scratch(2) as s:
            s.poke(0, 9)
            local = _io.iovecs([(s.addr + PAGE, PAGE)])
            remote = _io.iovecs([(s.addr, PAGE)])
            if write:
                n = _io.process_vm_writev(os.getpid(), remote, local)
            else:
                n = _io.process_vm_readv(os.getpid(), local, remote)
            if n != PAGE or s.peek(PAGE) != 9:
                raise OSError(errno.EIO, "short or wrong copy")
        return _ptrace_note()

    return check


def _new_uffd() -> int:
    """A uffd for a check, got the way pageflip's uses get one (user-mode faults will do)."""
    return _uffd.userfaultfd(user_mode_ok=True)


def _uffd_features() -> UffdFeature:
    fd = _new_uffd()
    try:
        features, _ = _uffd.api(fd, UffdFeature.NONE)
        return features
    finally:
        os.close(fd)


def _by(way: _uffd.Way) -> str:
    return f"by {way.value}" if way is _uffd.Way.DEVICE else f"by the {way.value}"


def _check_userfaultfd() -> str:
    """Which way gives a uffd here; where only user-mode faults do, what would give more."""
    fd, way = _uffd.open_userfaultfd(user_mode_ok=True)
    try:
        features, _ = _uffd.api(fd, UffdFeature.NONE)
    finally:
        os.close(fd)
    names = ", ".join(f.name for f in UffdFeature if f and f in features and f.name)
    if way.kernel_faults:
        return f"{_by(way)}, kernel-mode faults too; features: {names}"
    return (
        f"{_by(way)}: enough for dirty tracking, and for postcopy of guests that touch their"
        f" memory from user mode only; features: {names}; kernel-mode faults too would need"
        f" {_uffd.enabling_settings()}"
    )


def _check_kernel_faults() -> str:
    """A uffd that also takes faults raised by the kernel (syscalls into missing pages)."""
    fd, way = _uffd.open_userfaultfd(user_mode_ok=False)
    os.close(fd)
    return _by(way)


def _need_feature(feature: UffdFeature) -> Callable[[], str]:
    def check() -> str:
        if feature not in _uffd_features():
            raise OSError(errno.EOPNOTSUPP, f"UFFD_FEATURE_{feature.name} not offered")
        return f"UFFD_FEATURE_{feature.name}"

    return check


def _check_uffd_ops() -> str:
    """Every ioctl pageflip uses, on real pages: REGISTER, COPY, ZEROPAGE, WP, WAKE, ..."""
    fd = _new_uffd()
    try:
        _uffd.api(fd, UffdFeature.NONE)
        with _Scratch(4) as dst, _Scratch(1) as src:
            src.poke(0, 77)
            _uffd.register(fd, dst.addr, dst.size, UffdRegister.MISSING | UffdRegister.WP)
            _uffd.copy(fd, dst.addr, src.addr, PAGE)
            _uffd.zeropage(fd, dst.addr + PAGE, PAGE)
            _uffd.writeprotect(fd, dst.addr, PAGE, UffdWpMode.WP)
            _uffd.writeprotect(fd, dst.addr, PAGE, UffdWpMode.NONE)
            _uffd.wake(fd, dst.addr, dst.size)
            _uffd.unregister(fd, dst.addr, dst.size)
            if dst.peek(0) != 77 or dst.peek(PAGE) != 0:
                raise OSError(errno.EIO, "UFFDIO_COPY/ZEROPAGE gave wrong contents")
        return "REGISTER, COPY, ZEROPAGE, WRITEPROTECT, WAKE, UNREGISTER"
    finally:
        os.close(fd)


def _check_uffd_move() -> str:
    fd = _new_uffd()
    try:
        _uffd.api(fd, UffdFeature.MOVE)
        with _Scratch(1) as dst, _Scratch(1) as src:
            _mm.madvise(dst.addr, PAGE, Madv.DONTNEED)
            src.poke(0, 66)
            _uffd.register(fd, dst.addr, PAGE, UffdRegister.MISSING)
            _uffd.move(fd, dst.addr, src.addr, PAGE)
            _uffd.unregister(fd, dst.addr, PAGE)
            if dst.peek(0) != 66:
                raise OSError(errno.EIO, "UFFDIO_MOVE gave wrong contents")
        return "within one address space only"
    finally:
        os.close(fd)


def _check_pagemap_scan() -> str:
    fd = _new_uffd()
    pm = _pagemap.open_pagemap()
    try:
        _uffd.api(
            fd, UffdFeature.WP_ASYNC | UffdFeature.WP_UNPOPULATED | UffdFeature.WP_HUGETLBFS_SHMEM
        )
        with _Scratch(4) as s:
            _uffd.register(fd, s.addr, s.size, UffdRegister.WP)
            _uffd.writeprotect(fd, s.addr, s.size, UffdWpMode.WP)
            s.poke(2 * PAGE)
            found = _pagemap.scan(
                pm,
                s.addr,
                s.addr + s.size,
                flags=PmScan.WP_MATCHING | PmScan.CHECK_WPASYNC,
                category_mask=PageCategory.WRITTEN,
                return_mask=PageCategory.WRITTEN,
            )
            again = _pagemap.scan(
                pm,
                s.addr,
                s.addr + s.size,
                flags=PmScan.WP_MATCHING | PmScan.CHECK_WPASYNC,
                category_mask=PageCategory.WRITTEN,
                return_mask=PageCategory.WRITTEN,
            )
            _uffd.unregister(fd, s.addr, s.size)
            if len(found) != 1 or int(found[0]["start"]) != s.addr + 2 * PAGE or len(again):
                raise OSError(errno.EIO, f"expected one written page, scan said {found!r}")
        return "uffd-wp async dirty tracking"
    finally:
        os.close(pm)
        os.close(fd)


def _check_pidfd_open() -> str:
    os.close(_fds.pidfd_open(os.getpid()))
    return "process handles"


def _check_pidfd_getfd() -> str:
    pidfd = _fds.pidfd_open(os.getpid())
    try:
        r, w = os.pipe()
        try:
            os.close(_fds.pidfd_getfd(pidfd, r))
        finally:
            os.close(r)
            os.close(w)
    finally:
        os.close(pidfd)
    return "fd duplicated from a process"


def _check_pfn() -> str:
    with _Scratch(1) as s:
        s.poke(0)
        pfn = int(_pagemap.pfns(s.addr, 1)[0])
    if pfn == 0:
        raise OSError(errno.EPERM, "pagemap hides PFNs without CAP_SYS_ADMIN")
    return "PFNs readable"


def _check_thp() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        raise OSError(errno.ENOENT, "no /sys/kernel/mm/transparent_hugepage") from None
    if mode == "never":
        raise OSError(errno.EOPNOTSUPP, "transparent hugepages are set to never")
    return f"anonymous THP: {mode}"


def _free_pool(page_size: int) -> _huge.Pool:
    """The hugetlb pool of ``page_size`` pages, where it has a page free; else
    FeatureUnavailable naming the setting that reserves some (128 MiB more, or a page)."""
    pool = _huge.pool(page_size)
    if not pool.exists:
        raise FeatureUnavailable(pool.describe(), reason=f"not present: {pool.describe()}")
    if pool.available == 0:
        more = max(1, (128 << 20) // page_size)
        why = f"the {pool.describe()}; to reserve some: {pool.setting(pool.total + more)}"
        raise FeatureUnavailable(why, reason=why)
    return pool


def _check_hugetlb(page_size: int) -> Callable[[], str]:
    """A hugetlb memfd of ``page_size`` pages, one page mapped (which reserves it from the
    pool) and, for 2 MiB, touched, where the pool has a free page; else the setting that
    reserves one. (Touching a 1 GiB page would zero a GiB: about 0.1 s.)"""

    def check() -> str:
        pool = _free_pool(page_size)
        name = _huge.size_name(page_size)
        fd = _mm.memfd_create("pageflip-probe", _huge.memfd_flags(page_size))
        try:
            _mm.ftruncate(fd, page_size)
            addr = _mm.map_aligned(page_size, page_size, Prot.READ | Prot.WRITE, Map.SHARED, fd)
            try:
                if page_size <= _huge.HUGE_2M:
                    ctypes.c_ubyte.from_address(addr).value = 1
            finally:
                _mm.munmap(addr, page_size)
        finally:
            os.close(fd)
        return f"{name} hugetlb memfds; {pool.describe()}"

    return check


def _check_uffd_hugetlb() -> str:
    """Postcopy's path on a 2 MiB hugetlb memfd: a uffd in MISSING mode (the feature
    MISSING_HUGETLBFS) on one mapped page, one UFFDIO_COPY of the whole page, its bytes
    read back; then PAGEMAP_SCAN (Linux 6.7+) must call that page present, since SEEK_DATA
    calls all of a hugetlb memfd data and the pager tells the pages that are in by the
    page tables. Needs one free page in the 2 MiB pool (else: the setting)."""
    size = _huge.HUGE_2M
    pool = _free_pool(size)
    fd = _mm.memfd_create("pageflip-probe", _huge.memfd_flags(size))
    try:
        _mm.ftruncate(fd, size)
        addr = _mm.map_aligned(size, size, Prot.READ | Prot.WRITE, Map.SHARED, fd)
        try:
            with _Scratch(size // PAGE) as src:
                src.poke(0, 31)
                src.poke(size - 1, 32)
                _copy_whole_huge_page(addr, src.addr, size)
            ends = (ctypes.c_ubyte.from_address(a).value for a in (addr, addr + size - 1))
            if tuple(ends) != (31, 32):
                raise OSError(errno.EIO, "UFFDIO_COPY of a 2 MiB page gave wrong contents")
            # As the pager tells the pages that are in on hugetlb (held_pages).
            mapped = _pagemap.mapped_pages("self", addr, size // PAGE)
            if not mapped.all():
                why = f"{int((~mapped).sum())} of its {len(mapped)} 4 KiB pages unmapped"
                raise OSError(errno.EIO, f"PAGEMAP_SCAN did not see the copied page: {why}")
        finally:
            _mm.munmap(addr, size)
    finally:
        os.close(fd)
    return (
        "MISSING faults and UFFDIO_COPY of whole 2 MiB pages; PAGEMAP_SCAN (Linux 6.7+) "
        f"tells the pages that are in; {pool.describe()}"
    )


def _copy_whole_huge_page(addr: int, src: int, size: int) -> None:
    """Register the hugetlb page at ``addr`` for missing faults and fill it from ``src``
    with one UFFDIO_COPY."""
    fd = _new_uffd()
    try:
        _uffd.api(fd, UffdFeature.MISSING_HUGETLBFS)
        _uffd.register(fd, addr, size, UffdRegister.MISSING)
        _uffd.copy(fd, addr, src, size)
        _uffd.unregister(fd, addr, size)
    finally:
        os.close(fd)


def _check_shmem_thp() -> str:
    """A memfd mapping advised MADV_HUGEPAGE gets a 2 MiB page (PAGEMAP_SCAN says HUGE)."""
    thp = _huge.thp_shmem()
    if not thp.available:
        why = f"shmem THP is {thp.describe()}; to allow it: {thp.setting()}"
        raise FeatureUnavailable(why, reason=why)
    size = _huge.THP_SIZE
    fd = _mm.memfd_create("pageflip-probe")
    pm = _pagemap.open_pagemap()
    try:
        _mm.ftruncate(fd, size)
        addr = _mm.map_aligned(size, size, Prot.READ | Prot.WRITE, Map.SHARED, fd)
        try:
            _mm.madvise(addr, size, Madv.HUGEPAGE)
            _mm.madvise(addr, size, Madv.POPULATE_WRITE)
            found = _pagemap.scan(
                pm,
                addr,
                addr + size,
                category_mask=PageCategory.HUGE,
                return_mask=PageCategory.HUGE,
            )
        finally:
            _mm.munmap(addr, size)
    finally:
        os.close(pm)
        os.close(fd)
    if not len(found):
        raise OSError(errno.ENOMEM, f"{thp.describe()}, yet the kernel gave 4 KiB pages")
    return f"2 MiB pages for MADV_HUGEPAGE memfds ({thp.describe()})"


CHECKS: dict[str, tuple[Callable[[], str], str]] = {
    "memfd_seals": (_check_memfd, "movable regions: memfd sealed against shrink and grow"),
    "mmap_fixed": (_check_mmap_fixed, "the move: map received pages over a chosen range"),
    "scm_rights": (_check_scm_rights, "the move: hand memfds to the peer"),
    "vmsplice": (_check_vmsplice, "copy fallback: gift pages into a pipe"),
    "splice": (_check_splice, "pipe plumbing"),
    "tee": (_check_tee, "pipe plumbing"),
    "process_vm_readv": (_check_pvm(write=False), "copy fallback: one copy between processes"),
    "process_vm_writev": (_check_pvm(write=True), "copy fallback: one copy between processes"),
    "userfaultfd": (_check_userfaultfd, "dirty tracking and postcopy"),
    "uffd_kernel_faults": (
        _check_kernel_faults,
        "postcopy: a syscall into a missing page waits for it (else it fails with EFAULT)",
    ),
    "uffd_ops": (_check_uffd_ops, "postcopy: resolve faults"),
    "uffd_wp_async": (_need_feature(UffdFeature.WP_ASYNC), "dirty tracking"),
    "uffd_missing_shmem": (_need_feature(UffdFeature.MISSING_SHMEM), "postcopy on memfds"),
    "uffd_move": (_check_uffd_move, "moves inside one process"),
    "pagemap_scan": (_check_pagemap_scan, "dirty tracking: written pages in one ioctl"),
    "pidfd_open": (_check_pidfd_open, "watch a peer process"),
    "pidfd_getfd": (_check_pidfd_getfd, "take an fd from a peer"),
    "pagemap_pfn": (_check_pfn, "proof: physical frame numbers"),
    "thp": (_check_thp, "faster first touch of copied memory"),
    "hugetlb_2m": (_check_hugetlb(_huge.HUGE_2M), "movable regions on 2 MiB hugetlb pages"),
    "hugetlb_1g": (_check_hugetlb(_huge.HUGE_1G), "movable regions on 1 GiB hugetlb pages"),
    "shmem_thp": (_check_shmem_thp, "movable regions on transparent huge pages"),
    "uffd_hugetlb": (
        _check_uffd_hugetlb,
        "postcopy on 2 MiB hugetlb pages: install whole pages, tell which are in",
    ),
}

#: Features that depend on how the machine is set up (a pool reserved, a sysfs setting),
#: not on the kernel alone: missing ones name the setting that enables them.
SETTINGS = frozenset({"hugetlb_2m", "hugetlb_1g", "shmem_thp", "uffd_hugetlb"})


def run_check(name: str) -> Feature:
    check, purpose = CHECKS[name]
    try:
        detail = check()
    except OSError as err:
        return Feature(name, False, explain(err), purpose)
    return Feature(name, True, detail, purpose)
