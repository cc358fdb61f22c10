"""How much a destination can take in: memory, file descriptors and huge pages.

A destination checks what a SETUP announces against these before it allocates anything, so
that a source (or anything that speaks the protocol) cannot make it grow past what the host
holds: the memory the kernel says is available (MemAvailable), or less where the process
sits in a cgroup with a memory limit (cgroup v2 ``memory.max`` minus ``memory.current``).
Memory on hugetlb pages comes from the hugetlb pools instead, which must hold all of it
(:func:`huge_pages_shortfall`); memory on transparent huge pages needs the shmem THP
settings that allow them.
"""

from __future__ import annotations

import resource
from collections.abc import Iterable
from dataclasses import dataclass

from .._sys import huge as _huge
from .._sys.procfs import open_fds, proc, procfs_path
from ..stream import PageKind

#: Memory a destination keeps back beyond the guest's own (its Python, digests, buffers).
MEMORY_MARGIN = 64 << 20
#: fds a migration needs besides two per region (sockets, the uffd, the pager's pipes).
FD_MARGIN = 32
_CGROUP_ROOT = "/sys/fs/cgroup"
#: cgroup v1 says "no limit" with a huge number (PAGE_COUNTER_MAX pages) rather than "max".
_NO_LIMIT = 1 << 62


@dataclass(frozen=True, slots=True)
class Room:
    """What this process can still take: ``memory`` bytes (``memory_source`` says which
    limit that is) and ``fds`` more file descriptors."""

    memory: int
    memory_source: str
    fds: int


def _meminfo_available() -> int:
    with open(f"{procfs_path()}/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("no MemAvailable in /proc/meminfo")


def _cgroup_left() -> tuple[int, str] | None:
    """Bytes the process's memory cgroup may still charge, and which cgroup limits it; None
    where no cgroup limits it. cgroup v2 (``memory.max``) and v1 (``memory.limit_in_bytes``
    of the memory hierarchy) alike; a limit anywhere up the tree applies: the tightest."""
    try:
        with open(proc("self", "cgroup")) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    best: tuple[int, str] | None = None
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and not controllers:
            root, files = _CGROUP_ROOT, ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            root, files = (
                f"{_CGROUP_ROOT}/memory",
                ("memory.limit_in_bytes", "memory.usage_in_bytes"),
            )
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):
            group = "/" + "/".join(parts[:depth])
            base = f"{root}{group}".rstrip("/")
            try:
                with open(f"{base}/{files[0]}") as f:
                    limit = f.read().strip()
                with open(f"{base}/{files[1]}") as f:
                    current = int(f.read())
            except (OSError, ValueError):
                continue
            if limit == "max" or int(limit) >= _NO_LIMIT:
                continue
            left = max(int(limit) - current, 0)
            if best is None or left < best[0]:
                best = (left, f"cgroup {group} {files[0]}")
    return best


def room() -> Room:
    """What this process can take in now."""
    memory, source = _meminfo_available(), "MemAvailable"
    limited = _cgroup_left()
    if limited is not None and limited[0] < memory:
        memory, source = limited
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    fds = (soft if soft != resource.RLIM_INFINITY else 1 << 20) - len(open_fds())
    return Room(memory, source, fds)


def shortfall(memory: int, fds: int) -> str | None:
    """Why this process cannot take ``memory`` new bytes and ``fds`` fds (None: it can)."""
    have = room()
    if memory + MEMORY_MARGIN > have.memory:
        return (
            f"it needs {_gib(memory)} of memory and this host has {_gib(have.memory)} "
            f"available ({have.memory_source})"
        )
    if fds + FD_MARGIN > have.fds:
        return (
            f"it needs {fds + FD_MARGIN} file descriptors and {have.fds} are left under "
            "RLIMIT_NOFILE (ulimit -n)"
        )
    return None


def huge_pages_shortfall(regions: Iterable[tuple[PageKind, int]]) -> str | None:
    """Why this host cannot make regions of these kinds and sizes now (None: it can): the
    hugetlb pool of each page size must have free pages for all of them together (each
    region reserves its pages when it is made), and THP needs the shmem settings that
    allow it. The reason names the setting that would do, with its value."""
    hugetlb: dict[int, int] = {}
    thp = False
    for kind, size in regions:
        if kind in (PageKind.HUGETLB, PageKind.HUGETLB_1G):
            hugetlb[kind.page_size] = hugetlb.get(kind.page_size, 0) + size
        thp = thp or kind is PageKind.THP
    for page_size, size in sorted(hugetlb.items()):
        pool = _huge.pool(page_size)
        need = size // page_size
        if need > pool.available:
            name = _huge.size_name(page_size)
            if not pool.exists:
                return f"its {_gib(size)} of {name} hugetlb pages: {pool.describe()}"
            return (
                f"its {_gib(size)} of {name} hugetlb pages need {need} "
                f"page{'' if need == 1 else 's'} and the "
                f"{pool.describe()}; to reserve enough: "
                f"{pool.setting_for(need)}"
            )
    settings = _huge.thp_shmem()
    if thp and not settings.available:
        return (
            f"its memory is on transparent huge pages and shmem THP is {settings.describe()} "
            f"here; to allow them: {settings.setting()}"
        )
    return None


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.0f} MiB"


__all__ = [
    "FD_MARGIN",
    "MEMORY_MARGIN",
    "Room",
    "huge_pages_shortfall",
    "room",
    "shortfall",
]
