"""Huge pages: the hugetlb pools and the shmem THP settings, as sysfs tells them.

Two routes give a memfd huge pages (kernel.md, "Huge pages"):

* **hugetlb**: ``memfd_create(MFD_HUGETLB | MFD_HUGE_<size>)``. Its pages come from a pool
  reserved ahead (``vm.nr_hugepages`` for the default 2 MiB size, or
  ``/sys/kernel/mm/hugepages/hugepages-<kB>kB/nr_hugepages`` for any size); a mapping
  reserves the pages it needs when it is made, so it fails then (ENOMEM), never on a later
  touch. Such a memfd lives on the hugetlbfs mount of its page size, not on the shmem one.
* **shmem THP**: a plain memfd whose mapping is advised ``MADV_HUGEPAGE``. The kernel
  allocates 2 MiB folios for it only when ``hugepages-2048kB/shmem_enabled`` (or, when that
  says ``inherit``, the top-level ``shmem_enabled``) is ``always``, ``within_size`` or
  ``advise``.

Nothing here changes a setting: it reads them, and says in words which one would enable a
missing route. Every path into sysfs goes through :func:`sysfs_path`, so tests can point it
elsewhere.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from .flags import Memfd

_SYSFS = "/sys"

#: Page sizes hugetlb memfds can ask for by flag (``MFD_HUGE_<size>``: log2 of the size,
#: shifted by 26), those pageflip offers.
HUGE_2M = 2 << 20
HUGE_1G = 1 << 30
_SHIFT = 26

#: The shmem THP size pageflip uses: one PMD.
THP_SIZE = HUGE_2M


def set_sysfs_path(path: str) -> None:
    """For tests: read sysfs files from ``path`` instead."""
    global _SYSFS
    _SYSFS = path


def sysfs_path(*names: str) -> str:
    return os.path.join(_SYSFS, *names)


def _read(*names: str) -> str | None:
    try:
        with open(sysfs_path(*names)) as f:
            return f.read().strip()
    except OSError:
        return None


def memfd_flags(page_size: int) -> Memfd:
    """The memfd_create flags of a sealable hugetlb memfd with ``page_size`` pages."""
    size_bits = {HUGE_2M: Memfd.HUGE_2MB, HUGE_1G: Memfd.HUGE_1GB}.get(page_size)
    if size_bits is None:
        size_bits = Memfd((page_size.bit_length() - 1) << _SHIFT)
    return Memfd.CLOEXEC | Memfd.ALLOW_SEALING | Memfd.HUGETLB | size_bits


def size_name(page_size: int) -> str:
    """``2 MiB``, ``1 GiB``, ``4 KiB``."""
    for unit, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if page_size >= unit and page_size % unit == 0:
            return f"{page_size // unit} {name}"
    return f"{page_size} bytes"


def _pool_dir(page_size: int) -> str:
    return f"hugepages-{page_size >> 10}kB"


@dataclass(frozen=True)
class Pool:
    """A hugetlb pool: ``total`` pages of ``page_size``, ``free`` of them not yet used and
    ``reserved`` of those promised to mappings already (so ``free - reserved`` can still be
    had)."""

    page_size: int
    exists: bool
    total: int
    free: int
    reserved: int

    @property
    def available(self) -> int:
        """Pages a new mapping can still reserve."""
        return max(0, self.free - self.reserved)

    def setting_for(self, need: int) -> str:
        """The command that makes the pool large enough for ``need`` pages more than it
        can give now."""
        return self.setting(self.total + need - self.available)

    def setting(self, pages: int) -> str:
        """The command that makes the pool ``pages`` pages large."""
        if self.page_size == default_hugetlb_size():
            return f"`sysctl -w vm.nr_hugepages={pages}`"
        path = sysfs_path("kernel/mm/hugepages", _pool_dir(self.page_size), "nr_hugepages")
        return f"`echo {pages} > {path}`"

    def describe(self) -> str:
        if not self.exists:
            return f"no {size_name(self.page_size)} hugetlb pool on this kernel"
        return f"{size_name(self.page_size)} pool: {self.available} of {self.total} pages free" + (
            f" ({self.reserved} reserved)" if self.reserved else ""
        )


def pool(page_size: int) -> Pool:
    """The hugetlb pool of ``page_size`` pages, as sysfs says now."""
    base = ("kernel/mm/hugepages", _pool_dir(page_size))
    total = _read(*base, "nr_hugepages")
    if total is None:
        return Pool(page_size, False, 0, 0, 0)
    free = _read(*base, "free_hugepages") or "0"
    reserved = _read(*base, "resv_hugepages") or "0"
    return Pool(page_size, True, int(total), int(free), int(reserved))


@functools.cache
def default_hugetlb_size() -> int:
    """The default hugetlb page size (``Hugepagesize`` in /proc/meminfo; 2 MiB on x86_64)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("Hugepagesize:"):
                    return int(line.split()[1]) << 10
    except OSError:
        pass
    return HUGE_2M


@dataclass(frozen=True)
class ThpShmem:
    """Whether shmem mappings advised MADV_HUGEPAGE get 2 MiB folios, and why."""

    #: The value that decides: the per-size control, or the top-level one it inherits.
    mode: str
    #: ``hugepages-2048kB/shmem_enabled`` (None on kernels without per-size controls).
    per_size: str | None
    #: ``shmem_enabled``.
    top: str | None

    @property
    def available(self) -> bool:
        return self.mode in ("always", "within_size", "advise", "force")

    def describe(self) -> str:
        where = (
            f"hugepages-2048kB/shmem_enabled={self.per_size}, shmem_enabled={self.top}"
            if self.per_size is not None
            else f"shmem_enabled={self.top}"
        )
        return f"{'on' if self.available else 'off'}: {where}"

    def setting(self) -> str:
        """The command that lets MADV_HUGEPAGE give shmem 2 MiB pages."""
        if self.per_size is not None:
            path = sysfs_path(
                "kernel/mm/transparent_hugepage", _pool_dir(THP_SIZE), "shmem_enabled"
            )
        else:
            path = sysfs_path("kernel/mm/transparent_hugepage/shmem_enabled")
        return f"`echo advise > {path}`"


def _selected(text: str | None) -> str | None:
    """``always [never] deny`` -> ``never``."""
    if text is None or "[" not in text:
        return None
    return text.split("[", 1)[1].split("]", 1)[0]


def thp_shmem() -> ThpShmem:
    """The shmem THP settings as sysfs says now."""
    top = _selected(_read("kernel/mm/transparent_hugepage/shmem_enabled"))
    per_size = _selected(
        _read("kernel/mm/transparent_hugepage", _pool_dir(THP_SIZE), "shmem_enabled")
    )
    inherits = per_size is None or per_size == "inherit"
    mode = (top or "never") if inherits or per_size is None else per_size
    return ThpShmem(mode, per_size, top)


def hugetlb_sizes() -> list[int]:
    """The hugetlb page sizes this kernel has pools for, smallest first."""
    try:
        names = os.listdir(sysfs_path("kernel/mm/hugepages"))
    except OSError:
        return []
    sizes = []
    for name in names:
        if name.startswith("hugepages-") and name.endswith("kB"):
            sizes.append(int(name[len("hugepages-") : -2]) << 10)
    return sorted(sizes)
