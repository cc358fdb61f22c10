"""userfaultfd: open, negotiate features, register ranges, resolve faults, read events."""

from __future__ import annotations

import ctypes
import fcntl
import os
from ctypes import c_int, c_ulong, c_void_p
from typing import Any

import numpy as np
import numpy.typing as npt

from ._gate import libc_gate, os_error, syscall_gate
from .flags import (
    UFFD_API,
    UffdCopyMode,
    UffdFeature,
    UffdMoveMode,
    UffdRegister,
    UffdWpMode,
)
from .structs import (
    UFFDIO_API,
    UFFDIO_COPY,
    UFFDIO_MOVE,
    UFFDIO_REGISTER,
    UFFDIO_UNREGISTER,
    UFFDIO_WAKE,
    UFFDIO_WRITEPROTECT,
    UFFDIO_ZEROPAGE,
    UffdioApi,
    UffdioCopy,
    UffdioMove,
    UffdioRange,
    UffdioRegister,
    UffdioWriteprotect,
    UffdioZeropage,
    UffdMsg,
)

_userfaultfd = syscall_gate("userfaultfd", [c_int], ("flags",))
_ioctl = libc_gate("ioctl", c_int, [c_int, c_ulong, c_void_p], ("fd", "request", None))

#: ``/dev/userfaultfd``'s USERFAULTFD_IOC_NEW = _IO(0xAA, 0x00).
_USERFAULTFD_IOC_NEW = (0xAA << 8) | 0x00
#: UFFD_USER_MODE_ONLY: handle only user-mode faults (allowed without privilege).
USER_MODE_ONLY = 1

#: numpy view of ``struct uffd_msg`` for a page fault.
MSG_DTYPE = np.dtype(
    [
        ("event", np.uint8),
        ("r1", np.uint8),
        ("r2", np.uint16),
        ("r3", np.uint32),
        ("flags", np.uint64),
        ("address", np.uint64),
        ("ptid", np.uint32),
        ("pad", np.uint32),
    ]
)
assert MSG_DTYPE.itemsize == ctypes.sizeof(UffdMsg)


def _call(fd: int, name: str, request: int, arg: Any, detail: str) -> int:
    """ioctl through the gate, with the error naming the request and its range."""
    while True:
        result = _ioctl.raw(fd, request, ctypes.addressof(arg))
        if result != -1:
            return int(result)
        err = ctypes.get_errno()
        if err != 4:  # EINTR
            raise os_error(err, f"ioctl(fd={fd}, {name}, {detail})")


def userfaultfd(flags: int = os.O_CLOEXEC | os.O_NONBLOCK) -> int:
    """A new userfaultfd, by the syscall or else through /dev/userfaultfd."""
    if _userfaultfd is not None:
        try:
            fd: int = _userfaultfd(flags)
            return fd
        except PermissionError:
            pass
    try:
        dev = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        raise os_error(err.errno or 1, f"userfaultfd(flags={flags:#x})") from None
    try:
        result = fcntl.ioctl(dev, _USERFAULTFD_IOC_NEW, flags)
    except OSError as err:
        raise os_error(err.errno or 1, "ioctl(/dev/userfaultfd, USERFAULTFD_IOC_NEW)") from None
    finally:
        os.close(dev)
    return int(result)


def api(fd: int, features: UffdFeature) -> tuple[UffdFeature, int]:
    """UFFDIO_API: enable ``features``; returns (features the kernel has, ioctls bitmask)."""
    arg = UffdioApi(api=UFFD_API, features=int(features))
    _call(fd, "UFFDIO_API", UFFDIO_API, arg, f"features={int(features):#x}")
    return UffdFeature(arg.features), int(arg.ioctls)


def _span(start: int, length: int) -> str:
    return f"start={start:#x}, len={length}"


def register(fd: int, start: int, length: int, mode: UffdRegister) -> int:
    """UFFDIO_REGISTER a range; returns the ioctls allowed on it (bitmask)."""
    arg = UffdioRegister(range=UffdioRange(start, length), mode=int(mode))
    _call(fd, "UFFDIO_REGISTER", UFFDIO_REGISTER, arg, f"{_span(start, length)}, mode={mode!r}")
    return int(arg.ioctls)


def unregister(fd: int, start: int, length: int) -> None:
    arg = UffdioRange(start, length)
    _call(fd, "UFFDIO_UNREGISTER", UFFDIO_UNREGISTER, arg, _span(start, length))


def wake(fd: int, start: int, length: int) -> None:
    arg = UffdioRange(start, length)
    _call(fd, "UFFDIO_WAKE", UFFDIO_WAKE, arg, _span(start, length))


def writeprotect(fd: int, start: int, length: int, mode: UffdWpMode = UffdWpMode.WP) -> None:
    """UFFDIO_WRITEPROTECT: protect (mode WP) or unprotect (mode NONE) a range."""
    arg = UffdioWriteprotect(range=UffdioRange(start, length), mode=int(mode))
    _call(fd, "UFFDIO_WRITEPROTECT", UFFDIO_WRITEPROTECT, arg, f"{_span(start, length)}")


def copy(fd: int, dst: int, src: int, length: int, mode: UffdCopyMode = UffdCopyMode.NONE) -> int:
    """UFFDIO_COPY: fill missing pages at ``dst`` from ``src``; returns bytes copied."""
    arg = UffdioCopy(dst=dst, src=src, len=length, mode=int(mode))
    _call(fd, "UFFDIO_COPY", UFFDIO_COPY, arg, f"dst={dst:#x}, len={length}")
    return int(arg.copy)


def zeropage(fd: int, start: int, length: int, mode: UffdCopyMode = UffdCopyMode.NONE) -> int:
    """UFFDIO_ZEROPAGE: map zero pages over missing ones; returns bytes done."""
    arg = UffdioZeropage(range=UffdioRange(start, length), mode=int(mode))
    _call(fd, "UFFDIO_ZEROPAGE", UFFDIO_ZEROPAGE, arg, _span(start, length))
    return int(arg.zeropage)


def move(fd: int, dst: int, src: int, length: int, mode: UffdMoveMode = UffdMoveMode.NONE) -> int:
    """UFFDIO_MOVE: move pages inside the uffd's own address space; returns bytes moved."""
    arg = UffdioMove(dst=dst, src=src, len=length, mode=int(mode))
    _call(fd, "UFFDIO_MOVE", UFFDIO_MOVE, arg, f"dst={dst:#x}, src={src:#x}, len={length}")
    return int(arg.move)


def read_messages(fd: int, max_messages: int = 64) -> npt.NDArray[np.void]:
    """Read pending ``uffd_msg``s (empty when none, for a non-blocking uffd)."""
    try:
        data = os.read(fd, MSG_DTYPE.itemsize * max_messages)
    except BlockingIOError:
        return np.empty(0, MSG_DTYPE)
    except OSError as err:
        raise os_error(err.errno or 0, f"read(uffd={fd})") from None
    return np.frombuffer(data, MSG_DTYPE)
