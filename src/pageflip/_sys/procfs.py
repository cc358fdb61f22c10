"""Every path into /proc goes through here, so that tests can point it elsewhere."""

from __future__ import annotations

import os

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
