"""File descriptors across processes: SCM_RIGHTS, peer credentials, pidfds."""

from __future__ import annotations

import array
import contextlib
import os
import socket
import struct
from ctypes import c_int, c_uint

from ._gate import os_error, syscall_gate

#: Most fds pageflip sends in one message (the kernel's SCM_MAX_FD is 253).
MAX_FDS = 253

_CMSG_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)

_pidfd_open = syscall_gate("pidfd_open", [c_int, c_uint], ("pid", "flags"))
_pidfd_getfd = syscall_gate("pidfd_getfd", [c_int, c_int, c_uint], ("pidfd", "targetfd", "flags"))


class TruncatedFds(OSError):
    """The kernel dropped file descriptors of a message (MSG_CTRUNC)."""


def close_all(fds: list[int]) -> None:
    """Close every fd of ``fds`` and empty the list, ignoring ones already gone."""
    while fds:
        fd = fds.pop()
        with contextlib.suppress(OSError):
            os.close(fd)


def sendmsg(sock: socket.socket, data: bytes | memoryview, fds: list[int] | None = None) -> int:
    """Send ``data`` with ``fds`` attached to its first byte (SCM_RIGHTS)."""
    if fds and len(fds) > MAX_FDS:
        raise ValueError(f"at most {MAX_FDS} fds per message, got {len(fds)}")
    ancillary = (
        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    )
    try:
        return sock.sendmsg([data], ancillary)
    except InterruptedError:  # pragma: no cover - Python retries EINTR itself (PEP 475)
        raise
    except OSError as err:
        if isinstance(err, (BrokenPipeError, ConnectionResetError, TimeoutError)):
            raise
        raise os_error(
            err.errno or 0, f"sendmsg(fd={sock.fileno()}, nfds={len(fds or [])})"
        ) from err


def recvmsg_into(sock: socket.socket, buf: memoryview) -> tuple[int, list[int]]:
    """Receive into ``buf``; returns (bytes, fds). Received fds are close-on-exec.

    If the kernel truncated the ancillary data, every fd that did arrive is closed and
    :class:`TruncatedFds` is raised, so that no fd leaks.
    """
    nbytes, ancdata, flags, _ = sock.recvmsg_into([buf], _CMSG_SPACE, socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds.extend(array.array("i", payload[:usable]))
    if flags & socket.MSG_CTRUNC:
        close_all(fds)
        raise TruncatedFds(0, f"recvmsg(fd={sock.fileno()}): file descriptors were truncated")
    return nbytes, fds


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer of a Unix socket (SO_PEERCRED)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError as err:
        raise os_error(err.errno or 0, f"getsockopt(fd={sock.fileno()}, SO_PEERCRED)") from err
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def pidfd_open(pid: int, flags: int = 0) -> int:
    if _pidfd_open is None:
        raise os_error(38, f"pidfd_open(pid={pid})")
    fd: int = _pidfd_open(pid, flags)
    return fd


def pidfd_getfd(pidfd: int, targetfd: int, flags: int = 0) -> int:
    """A duplicate of fd ``targetfd`` of the process behind ``pidfd`` (needs ptrace access)."""
    if _pidfd_getfd is None:
        raise os_error(38, f"pidfd_getfd(pidfd={pidfd}, targetfd={targetfd})")
    fd: int = _pidfd_getfd(pidfd, targetfd, flags)
    return fd
