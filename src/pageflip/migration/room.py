"""How much a destination can take in: memory and file descriptors.

A destination checks what a SETUP announces against these before it allocates anything, so
that a source (or anything that speaks the protocol) cannot make it grow past what the host
holds: the memory the kernel says is available (MemAvailable), or less where the process
sits in a cgroup with a memory limit (cgroup v2 ``memory.max`` minus ``memory.current``).
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

from .._sys.procfs import open_fds, proc, procfs_path

#: Memory a destination keeps back beyond the guest's own (its Python, digests, buffers).
MEMORY_MARGIN = 64 << 20
#: fds a migration needs besides two per region (sockets, the uffd, the pager's pipes).
FD_MARGIN = 32
_CGROUP_ROOT = "/sys/fs/cgroup"


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
    """Bytes the process's cgroup v2 may still charge, and the cgroup; None: no limit."""
    try:
        with open(proc("self", "cgroup")) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        hierarchy, _, path = line.partition("::")
        if hierarchy != "0":
            continue
        best: tuple[int, str] | None = None
        # A limit anywhere up the tree applies: take the tightest.
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), 0, -1):
            group = "/" + "/".join(parts[:depth])
            base = f"{_CGROUP_ROOT}{group}"
            try:
                with open(f"{base}/memory.max") as f:
                    limit = f.read().strip()
                with open(f"{base}/memory.current") as f:
                    current = int(f.read())
            except (OSError, ValueError):
                continue
            if limit == "max":
                continue
            left = max(int(limit) - current, 0)
            if best is None or left < best[0]:
                best = (left, f"cgroup {group} memory.max")
        return best
    return None


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


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.0f} MiB"


__all__ = ["FD_MARGIN", "MEMORY_MARGIN", "Room", "room", "shortfall"]
