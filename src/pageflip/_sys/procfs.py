"""Every path into /proc goes through here, so that tests can point it elsewhere."""

from __future__ import annotations

import functools
import os
import uuid

_PROCFS = "/proc"


def procfs_path() -> str:
    return _PROCFS


def set_procfs_path(path: str) -> None:
    """For tests: read /proc files from ``path`` instead."""
    global _PROCFS
    _PROCFS = path


def proc(pid: int | str, *names: str) -> str:
    return os.path.join(_PROCFS, str(pid), *names)


def sysctl(name: str) -> str | None:
    """The value of /proc/sys/``name`` (dots or slashes), or None when it does not exist."""
    try:
        with open(os.path.join(_PROCFS, "sys", name.replace(".", "/"))) as f:
            return f.read().strip()
    except OSError:
        return None


def open_fds(pid: int | str = "self") -> list[int]:
    """The fds open in ``pid`` right now."""
    return sorted(int(name) for name in os.listdir(proc(pid, "fd")))


def mappings(pid: int | str = "self") -> list[tuple[int, int, str, str]]:
    """(start, end, perms, path) for every mapping in /proc/PID/maps."""
    out = []
    with open(proc(pid, "maps")) as f:
        for line in f:
            parts = line.split(None, 5)
            lo, hi = parts[0].split("-")
            path = parts[5].rstrip("\n") if len(parts) > 5 else ""
            out.append((int(lo, 16), int(hi, 16), parts[1], path))
    return out


@functools.cache
def clock_identity() -> tuple[int, int, int]:
    """Which ``CLOCK_MONOTONIC`` this process reads: the boot id (two words) and the inode of
    its time namespace. Zeros for what cannot be read; a zero boot id never compares."""
    text = sysctl("kernel.random.boot_id")
    try:
        boot = uuid.UUID(text).bytes if text else bytes(16)
    except ValueError:
        boot = bytes(16)
    try:
        link = os.readlink(proc("self", "ns", "time"))  # "time:[4026531834]"
        namespace = int(link[link.index("[") + 1 : link.index("]")])
    except (OSError, ValueError):
        namespace = 0
    return (
        int.from_bytes(boot[:8], "little"),
        int.from_bytes(boot[8:], "little"),
        namespace,
    )
