"""userfaultfd: open, negotiate features, register ranges, resolve faults, read events.

Getting a userfaultfd
---------------------
:func:`open_userfaultfd` tries, in this order, and stops at the first that works:

1. ``userfaultfd(flags)``: allowed with CAP_SYS_PTRACE, or for anyone while the sysctl
   ``vm.unprivileged_userfaultfd`` is 1 (it is 0 by default since Linux 5.11).
2. ``/dev/userfaultfd`` (Linux 6.1+), ioctl USERFAULTFD_IOC_NEW: allowed to whoever may
   open the device for reading and writing (root only, as shipped). What it gives is the
   same as 1.
3. ``userfaultfd(flags | UFFD_USER_MODE_ONLY)`` (Linux 5.11+): always allowed, but only
   where the caller passed ``user_mode_ok=True``, because such a uffd takes faults raised
   in user mode only.

A uffd from 1 or 2 is taken before 3 because it can do strictly more: what a user-mode-only
uffd misses, checked on Linux 6.18 (tests/test_unprivileged.py keeps checking it):

* MISSING mode (postcopy): a fault raised by the kernel on the process's behalf, such as
  ``read()`` or ``recv()`` into a page not there yet, or another process's
  ``process_vm_writev`` into it, is not delivered: the syscall fails at once with EFAULT
  (a uffd from 1 or 2 makes it wait, like a user-mode access, until the page is
  installed; tests/test_sys.py checks that). A guest whose threads only load and store
  into their memory runs the same with either; a guest that lets syscalls read into
  memory that may still be missing needs 1 or 2.
* WP mode with UFFD_FEATURE_WP_ASYNC (dirty tracking): nothing is missed. The kernel
  resolves an async write-protect fault itself before it looks at who raised it, so
  writes made by syscalls (``read()`` into the memory, ``process_vm_writev``) are
  recorded as written just like stores from user mode.

Which of our uses accept a user-mode-only uffd: dirty tracking (:mod:`pageflip.dirty`),
always; the postcopy destination, for guests that touch their memory from user mode only,
as the reference Workload does (it has to ask, with ``user_mode_ok=True``). Where no way
works, :class:`~pageflip.errors.FeatureUnavailable` names what would enable one
(:func:`enabling_settings`), with this host's values.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import fcntl
import grp
import os
from ctypes import c_int, c_ulong, c_void_p
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from ..errors import FeatureUnavailable
from ._gate import libc_gate, os_error, syscall_gate
from .flags import (
    UFFD_API,
    UffdCopyMode,
    UffdFeature,
    UffdMoveMode,
    UffdRegister,
    UffdWpMode,
)
from .procfs import sysctl
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

#: The device that hands out userfaultfds to whoever may open it (Linux 6.1+).
DEVICE = "/dev/userfaultfd"
#: ``/dev/userfaultfd``'s USERFAULTFD_IOC_NEW = _IO(0xAA, 0x00).
_USERFAULTFD_IOC_NEW = (0xAA << 8) | 0x00
#: UFFD_USER_MODE_ONLY: handle only faults raised in user mode (allowed without privilege).
USER_MODE_ONLY = 1
#: What pageflip opens its uffds with: close on exec, reads that never block.
DEFAULT_FLAGS = os.O_CLOEXEC | os.O_NONBLOCK
#: The sysctl that lets anyone open a uffd that takes kernel-mode faults too.
SYSCTL = "vm.unprivileged_userfaultfd"


class Way(enum.Enum):
    """How a userfaultfd was obtained; members in the order :func:`open_userfaultfd` tries."""

    #: ``userfaultfd(flags)``: CAP_SYS_PTRACE, or ``vm.unprivileged_userfaultfd = 1``.
    SYSCALL = "syscall"
    #: ``/dev/userfaultfd``: read and write access to the device.
    DEVICE = "/dev/userfaultfd"
    #: ``userfaultfd(flags | UFFD_USER_MODE_ONLY)``: anyone; user-mode faults only.
    USER_MODE_ONLY = "syscall, user-mode faults only"

    @property
    def kernel_faults(self) -> bool:
        """Whether a uffd got this way also takes faults the kernel raises (syscalls)."""
        return self is not Way.USER_MODE_ONLY


class Userfaultfd(NamedTuple):
    """A new userfaultfd (the caller closes ``fd``) and the way it was obtained."""

    fd: int
    way: Way


#: Per way, the errnos that mean "not this way here" (the next way is tried); any other
#: error (EMFILE, ENOMEM, EINVAL for bad flags) is raised as it is.
_REFUSED: dict[Way, frozenset[int]] = {
    Way.SYSCALL: frozenset({errno.EPERM, errno.ENOSYS}),
    Way.DEVICE: frozenset({errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENODEV, errno.ENXIO}),
    # EINVAL: a kernel before 5.11 does not know UFFD_USER_MODE_ONLY.
    Way.USER_MODE_ONLY: frozenset({errno.EPERM, errno.ENOSYS, errno.EINVAL}),
}

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


def attempt(way: Way, flags: int = DEFAULT_FLAGS) -> int:
    """A new uffd got exactly ``way`` (tests try each); raises an OSError naming the call."""
    if way is Way.DEVICE:
        return _from_device(flags)
    if way is Way.USER_MODE_ONLY:
        flags, call = flags | USER_MODE_ONLY, f"userfaultfd(flags={flags:#x}|UFFD_USER_MODE_ONLY)"
    else:
        call = f"userfaultfd(flags={flags:#x})"
    if _userfaultfd is None:
        raise os_error(errno.ENOSYS, call)
    try:
        fd: int = _userfaultfd(flags)
    except OSError as err:
        raise os_error(err.errno or errno.EIO, call) from None
    return fd


def _from_device(flags: int) -> int:
    try:
        dev = os.open(DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        raise os_error(err.errno or errno.EIO, f"open({DEVICE})") from None
    try:
        return int(fcntl.ioctl(dev, _USERFAULTFD_IOC_NEW, flags))
    except OSError as err:
        raise os_error(
            err.errno or errno.EIO, f"ioctl({DEVICE}, USERFAULTFD_IOC_NEW, flags={flags:#x})"
        ) from None
    finally:
        os.close(dev)


def open_userfaultfd(flags: int = DEFAULT_FLAGS, *, user_mode_ok: bool = False) -> Userfaultfd:
    """A new userfaultfd by the first way that works here (see the module docstring).

    ``user_mode_ok``: the caller can do with a uffd that takes user-mode faults only, the
    last resort. Raises :class:`~pageflip.errors.FeatureUnavailable` naming the settings
    that would allow one when every way is refused; other errors (EMFILE, ENOMEM) as they
    are.
    """
    ways = list(Way) if user_mode_ok else [w for w in Way if w.kernel_faults]
    refused: list[OSError] = []
    for way in ways:
        try:
            return Userfaultfd(attempt(way, flags), way)
        except OSError as err:
            if err.errno not in _REFUSED[way]:
                raise
            refused.append(err)
    why = _why(refused, user_mode_ok)
    raise FeatureUnavailable(
        f"userfaultfd is not available here: {why}", feature="userfaultfd", reason=why
    )


def userfaultfd(flags: int = DEFAULT_FLAGS, *, user_mode_ok: bool = False) -> int:
    """A new userfaultfd's fd: :func:`open_userfaultfd` without saying how it was got."""
    return open_userfaultfd(flags, user_mode_ok=user_mode_ok).fd


def _why(refused: list[OSError], user_mode_ok: bool) -> str:
    """Why every way failed, each call's own error, and what would make one work."""
    calls = "; ".join(err.strerror or str(err) for err in refused)
    if all(err.errno in (errno.ENOSYS, errno.ENOENT) for err in refused):
        return f"kernel without userfaultfd (CONFIG_USERFAULTFD off or before 4.3): {calls}"
    why = f"no permission: {calls}"
    if user_mode_ok and refused[-1].errno == errno.EPERM:
        why += (
            " (refused even for user-mode faults, which the kernel always allows: a seccomp"
            " filter, such as a container runtime installs, blocks the syscall)"
        )
    elif user_mode_ok and refused[-1].errno == errno.EINVAL:
        why += " (a kernel before 5.11 does not know UFFD_USER_MODE_ONLY)"
    elif not user_mode_ok:
        why += " (this use needs a uffd that takes kernel-mode faults too)"
    return f"{why}. To allow it: {enabling_settings()}"


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def enabling_settings() -> str:
    """What an administrator can set so that this process gets a full uffd (ways 1 or 2).

    Names this host's values: the sysctl's current value, the device's group and the
    process's own group, e.g. ``sysctl -w vm.unprivileged_userfaultfd=1 (now 0); or read
    and write access to /dev/userfaultfd for group users: ...; or CAP_SYS_PTRACE``.
    """
    options = []
    value = sysctl(SYSCTL)
    if value is not None:
        options.append(f"`sysctl -w {SYSCTL}=1` (now {value})")
    try:
        st = os.stat(DEVICE)
    except OSError:
        pass  # no device: a kernel before 6.1
    else:
        ours = os.getegid()
        group = _group_name(ours)
        if st.st_mode & 0o060 == 0o060 and st.st_gid != ours and st.st_gid not in os.getgroups():
            options.append(
                f"membership of group {_group_name(st.st_gid)}, which may read and write {DEVICE}"
            )
        else:
            options.append(
                f"read and write access to {DEVICE} for group {group}: "
                f"`chgrp {group} {DEVICE} && chmod 660 {DEVICE}`, kept across reboots by the "
                f'udev rule `KERNEL=="userfaultfd", GROUP="{group}", MODE="0660"`'
            )
    options.append("CAP_SYS_PTRACE for the process")
    return "; or ".join(options)


def api(fd: int, features: UffdFeature) -> tuple[UffdFeature, int]:
    """UFFDIO_API: enable ``features``; returns (features the kernel has, ioctls bitmask)."""
    arg = UffdioApi(api=UFFD_API, features=int(features))
    _call(fd, "UFFDIO_API", UFFDIO_API, arg, f"features={UffdFeature(features).name}")
    return UffdFeature(arg.features), int(arg.ioctls)


def _span(start: int, length: int) -> str:
    return f"start={start:#x}, len={length}"


def register(fd: int, start: int, length: int, mode: UffdRegister) -> int:
    """UFFDIO_REGISTER a range; returns the ioctls allowed on it (bitmask)."""
    arg = UffdioRegister(range=UffdioRange(start, length), mode=int(mode))
    _call(fd, "UFFDIO_REGISTER", UFFDIO_REGISTER, arg, f"{_span(start, length)}, mode={mode.name}")
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
