"""Private ctypes bindings: the only place that knows syscall numbers, ioctls and structs.

Public modules import from here; users never should. Each foreign call goes through one
gate (:mod:`._gate`) that declares its signature, retries EINTR and names itself in errors.
"""

from . import fds, flags, io, mm, pagemap, procfs, uffd
from .mm import PAGE_SIZE

__all__ = ["PAGE_SIZE", "fds", "flags", "io", "mm", "pagemap", "procfs", "uffd"]
