"""The one gateway through which every foreign call goes.

A :class:`Gate` wraps one C function with declared ``argtypes`` and ``restype``. Calling it
retries ``EINTR`` and turns a failure into an :class:`OSError` whose message names the call
and its key arguments, e.g. ``vmsplice(fd=7, nr_segs=3): Bad address``. ``OSError(errno, msg)``
keeps Python's mapping to ``PermissionError``, ``FileNotFoundError`` and friends.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from collections.abc import Sequence
from typing import Any

libc = ctypes.CDLL(None, use_errno=True)

#: What ``mmap`` returns on failure, as the unsigned value ``c_void_p`` gives back.
MAP_FAILED = ctypes.c_void_p(-1).value

_MACHINE = platform.machine()

# Raw syscall numbers for calls glibc 2.36 does not wrap (or wraps only in newer versions).
_SYSCALL_NUMBERS: dict[str, dict[str, int]] = {
    "x86_64": {"userfaultfd": 323, "pidfd_open": 434, "pidfd_getfd": 438, "process_madvise": 440},
    "aarch64": {"userfaultfd": 282, "pidfd_open": 434, "pidfd_getfd": 438, "process_madvise": 440},
}


def syscall_number(name: str) -> int | None:
    """The syscall number of ``name`` on this machine, or None if pageflip does not know it."""
    return _SYSCALL_NUMBERS.get(_MACHINE, {}).get(name)


def os_error(err: int, call: str) -> OSError:
    """An OSError for ``err`` whose message names ``call``, e.g. ``mmap(len=4096)``."""
    return OSError(err, f"{call}: {os.strerror(err)}")


class Gate:
    """A foreign function with its signature declared and its failures named.

    ``shown`` names the positional arguments that go into the error message (``None`` hides
    one, e.g. a pointer). ``failed`` is the result that means an error (default: ``-1``).
    The success path is one foreign call and one comparison: gates sit on hot paths.
    """

    __slots__ = ("_failed", "_fn", "_name", "_prefix", "_shown")

    def __init__(
        self,
        name: str,
        fn: Any,
        restype: Any,
        argtypes: Sequence[Any],
        shown: Sequence[str | None],
        failed: int | None = -1,
        prefix: tuple[Any, ...] = (),
    ) -> None:
        fn.restype = restype
        fn.argtypes = list(argtypes)
        self._fn = fn
        self._name = name
        self._shown = tuple(shown)
        self._failed = failed
        self._prefix = prefix

    @property
    def raw(self) -> Any:
        """The bare foreign function, for callers that name their own errors."""
        return self._fn

    def describe(self, args: Sequence[Any]) -> str:
        parts = []
        for label, arg in zip(self._shown, args, strict=False):
            if label is None:
                continue
            value = arg.value if isinstance(arg, ctypes._SimpleCData) else arg
            if isinstance(value, int) and label in ("addr", "start", "dst", "src"):
                value = hex(value)
            parts.append(f"{label}={value}")
        return f"{self._name}({', '.join(parts)})"

    def __call__(self, *args: Any) -> Any:
        result = self._fn(*self._prefix, *args)
        if result != self._failed:
            return result
        return self._again(args)

    def _again(self, args: tuple[Any, ...]) -> Any:
        """The call failed: retry it while it is interrupted (EINTR), else raise."""
        while True:
            err = ctypes.get_errno()
            if err != errno.EINTR:
                raise os_error(err, self.describe(args))
            result = self._fn(*self._prefix, *args)
            if result != self._failed:
                return result


def libc_gate(
    name: str,
    restype: Any,
    argtypes: Sequence[Any],
    shown: Sequence[str | None],
    failed: int | None = -1,
    symbol: str | None = None,
) -> Gate:
    """A gate over the libc function ``symbol`` (default: ``name``)."""
    return Gate(name, getattr(libc, symbol or name), restype, argtypes, shown, failed)


def syscall_gate(name: str, argtypes: Sequence[Any], shown: Sequence[str | None]) -> Gate | None:
    """A gate over ``syscall(NR_name, ...)``, or None where the number is unknown here.

    ``libc.syscall`` is variadic: each gate gets its own function pointer with a fixed
    prototype, so that every argument travels with its real width.
    """
    number = syscall_number(name)
    if number is None:
        return None
    proto = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_long, *argtypes, use_errno=True)
    fn = proto(("syscall", libc))
    return Gate(name, fn, ctypes.c_long, [ctypes.c_long, *argtypes], shown, prefix=(number,))


#: ``failed`` for a gate over mmap, whose restype c_void_p gives MAP_FAILED as this value.
map_failed = MAP_FAILED
