"""Flag sets of the kernel interfaces pageflip uses, as documented ``IntFlag`` members.

Values are those of the Linux UAPI headers (``linux/fcntl.h``, ``linux/mman.h``,
``linux/userfaultfd.h``, ``linux/fs.h``); they are the same on x86_64 and aarch64.
"""

from __future__ import annotations

import enum


class Splice(enum.IntFlag):
    """``SPLICE_F_*``: flags of splice, tee and vmsplice."""

    NONE = 0
    #: Ask to move pages instead of copying; ignored by vmsplice on every merged kernel.
    MOVE = 0x01
    #: Do not block on the pipe.
    NONBLOCK = 0x02
    #: More data will follow.
    MORE = 0x04
    #: vmsplice writer: the pages are a gift to the kernel; the writer will not touch them.
    GIFT = 0x08


class Memfd(enum.IntFlag):
    """``MFD_*``: flags of memfd_create."""

    NONE = 0
    CLOEXEC = 0x0001
    ALLOW_SEALING = 0x0002
    #: Back the memfd with hugetlb pages (of the default size unless a HUGE_* size is given).
    HUGETLB = 0x0004
    NOEXEC_SEAL = 0x0008
    EXEC = 0x0010
    #: ``MFD_HUGE_2MB``: with HUGETLB, 2 MiB pages (log2 of the size, shifted by 26).
    HUGE_2MB = 21 << 26
    #: ``MFD_HUGE_1GB``: with HUGETLB, 1 GiB pages.
    HUGE_1GB = 30 << 26


class Seal(enum.IntFlag):
    """``F_SEAL_*``: seals of a memfd (fcntl F_ADD_SEALS / F_GET_SEALS)."""

    NONE = 0
    #: No more seals can be added.
    SEAL = 0x0001
    #: The file cannot shrink: a mapping of it can never SIGBUS for a truncation.
    SHRINK = 0x0002
    #: The file cannot grow.
    GROW = 0x0004
    #: The contents cannot change.
    WRITE = 0x0008
    #: No new writable mappings or writes, existing mappings stay writable.
    FUTURE_WRITE = 0x0010
    EXEC = 0x0020


class Fcntl(enum.IntEnum):
    """fcntl commands Python's ``fcntl`` module may not name on every version."""

    SETPIPE_SZ = 1031
    GETPIPE_SZ = 1032
    ADD_SEALS = 1033
    GET_SEALS = 1034


class Prot(enum.IntFlag):
    """``PROT_*``: page protection."""

    NONE = 0
    READ = 0x1
    WRITE = 0x2
    EXEC = 0x4


class Map(enum.IntFlag):
    """``MAP_*``: flags of mmap."""

    SHARED = 0x01
    PRIVATE = 0x02
    FIXED = 0x10
    ANONYMOUS = 0x20
    NORESERVE = 0x4000
    POPULATE = 0x8000
    HUGETLB = 0x40000
    FIXED_NOREPLACE = 0x100000


class Madv(enum.IntEnum):
    """``MADV_*``: advice of madvise."""

    NORMAL = 0
    DONTNEED = 4
    FREE = 8
    REMOVE = 9
    DONTFORK = 10
    DOFORK = 11
    HUGEPAGE = 14
    NOHUGEPAGE = 15
    POPULATE_READ = 22
    POPULATE_WRITE = 23
    #: Make transparent huge pages of a range now (Linux 6.1+), copying its small pages.
    COLLAPSE = 25


class Falloc(enum.IntFlag):
    """``FALLOC_FL_*``: modes of fallocate."""

    NONE = 0
    KEEP_SIZE = 0x01
    PUNCH_HOLE = 0x02


class UffdFeature(enum.IntFlag):
    """``UFFD_FEATURE_*``: what a userfaultfd can do, negotiated with UFFDIO_API."""

    NONE = 0
    PAGEFAULT_FLAG_WP = 1 << 0
    EVENT_FORK = 1 << 1
    EVENT_REMAP = 1 << 2
    EVENT_REMOVE = 1 << 3
    MISSING_HUGETLBFS = 1 << 4
    MISSING_SHMEM = 1 << 5
    EVENT_UNMAP = 1 << 6
    SIGBUS = 1 << 7
    THREAD_ID = 1 << 8
    MINOR_HUGETLBFS = 1 << 9
    MINOR_SHMEM = 1 << 10
    EXACT_ADDRESS = 1 << 11
    WP_HUGETLBFS_SHMEM = 1 << 12
    WP_UNPOPULATED = 1 << 13
    POISON = 1 << 14
    #: Write-protect faults resolve in the kernel; PAGEMAP_SCAN reports the written pages.
    WP_ASYNC = 1 << 15
    #: UFFDIO_MOVE: move pages inside the uffd's own address space.
    MOVE = 1 << 16


class UffdRegister(enum.IntFlag):
    """``UFFDIO_REGISTER_MODE_*``."""

    MISSING = 1 << 0
    WP = 1 << 1
    MINOR = 1 << 2


class UffdCopyMode(enum.IntFlag):
    """``UFFDIO_COPY_MODE_*`` (also used by ZEROPAGE and MOVE for DONTWAKE)."""

    NONE = 0
    DONTWAKE = 1 << 0
    WP = 1 << 1


class UffdWpMode(enum.IntFlag):
    """``UFFDIO_WRITEPROTECT_MODE_*``."""

    NONE = 0
    WP = 1 << 0
    DONTWAKE = 1 << 1


class UffdMoveMode(enum.IntFlag):
    """``UFFDIO_MOVE_MODE_*``."""

    NONE = 0
    DONTWAKE = 1 << 0
    ALLOW_SRC_HOLES = 1 << 1


class UffdEvent(enum.IntEnum):
    """``UFFD_EVENT_*``: the event byte of a ``struct uffd_msg``."""

    PAGEFAULT = 0x12
    FORK = 0x13
    REMAP = 0x14
    REMOVE = 0x15
    UNMAP = 0x16


class UffdFault(enum.IntFlag):
    """``UFFD_PAGEFAULT_FLAG_*``."""

    NONE = 0
    WRITE = 1 << 0
    WP = 1 << 1
    MINOR = 1 << 2


class PmScan(enum.IntFlag):
    """``PM_SCAN_*``: flags of the PAGEMAP_SCAN ioctl."""

    NONE = 0
    #: Write-protect the pages that match, in the same walk.
    WP_MATCHING = 1 << 0
    #: Fail unless the range is registered with uffd-wp async.
    CHECK_WPASYNC = 1 << 1


class PageCategory(enum.IntFlag):
    """``PAGE_IS_*``: page categories PAGEMAP_SCAN matches and reports."""

    NONE = 0
    WPALLOWED = 1 << 0
    WRITTEN = 1 << 1
    FILE = 1 << 2
    PRESENT = 1 << 3
    SWAPPED = 1 << 4
    PFNZERO = 1 << 5
    HUGE = 1 << 6
    SOFT_DIRTY = 1 << 7


#: Flag combinations used on hot paths, built once (IntFlag arithmetic is not free).
PROT_RW = Prot.READ | Prot.WRITE
MAP_SHARED_FIXED = Map.SHARED | Map.FIXED

#: ``prctl(PR_SET_PTRACER, pid)``: let ``pid`` ptrace (and process_vm_readv) us under Yama.
PR_SET_PTRACER = 0x59616D61
#: ``prctl(PR_SET_PDEATHSIG, signal)``: get ``signal`` when the parent thread exits.
PR_SET_PDEATHSIG = 1

UFFD_API = 0xAA


def _ioc(direction: int, kind: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (kind << 8) | nr


def iowr(kind: int, nr: int, size: int) -> int:
    """``_IOWR(kind, nr, size)``."""
    return _ioc(3, kind, nr, size)


def ior(kind: int, nr: int, size: int) -> int:
    """``_IOR(kind, nr, size)``."""
    return _ioc(2, kind, nr, size)
