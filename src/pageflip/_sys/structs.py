"""Kernel structures, laid out as in the UAPI headers, and the ioctl numbers built from them."""

from __future__ import annotations

import ctypes

from .flags import UFFD_API, ior, iowr

u64 = ctypes.c_uint64
s64 = ctypes.c_int64


class Iovec(ctypes.Structure):
    """``struct iovec``."""

    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class UffdioApi(ctypes.Structure):
    _fields_ = [("api", u64), ("features", u64), ("ioctls", u64)]


class UffdioRange(ctypes.Structure):
    _fields_ = [("start", u64), ("len", u64)]


class UffdioRegister(ctypes.Structure):
    _fields_ = [("range", UffdioRange), ("mode", u64), ("ioctls", u64)]


class UffdioCopy(ctypes.Structure):
    _fields_ = [("dst", u64), ("src", u64), ("len", u64), ("mode", u64), ("copy", s64)]


class UffdioZeropage(ctypes.Structure):
    _fields_ = [("range", UffdioRange), ("mode", u64), ("zeropage", s64)]


class UffdioMove(ctypes.Structure):
    _fields_ = [("dst", u64), ("src", u64), ("len", u64), ("mode", u64), ("move", s64)]


class UffdioWriteprotect(ctypes.Structure):
    _fields_ = [("range", UffdioRange), ("mode", u64)]


class UffdMsg(ctypes.Structure):
    """``struct uffd_msg`` as read for a page fault (the union's pagefault member)."""

    _fields_ = [
        ("event", ctypes.c_uint8),
        ("reserved1", ctypes.c_uint8),
        ("reserved2", ctypes.c_uint16),
        ("reserved3", ctypes.c_uint32),
        ("flags", u64),
        ("address", u64),
        ("ptid", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


class PmScanArg(ctypes.Structure):
    """``struct pm_scan_arg``: twelve u64 fields."""

    _fields_ = [
        ("size", u64),
        ("flags", u64),
        ("start", u64),
        ("end", u64),
        ("walk_end", u64),
        ("vec", u64),
        ("vec_len", u64),
        ("max_pages", u64),
        ("category_inverted", u64),
        ("category_mask", u64),
        ("category_anyof_mask", u64),
        ("return_mask", u64),
    ]


class PageRegion(ctypes.Structure):
    """``struct page_region``."""

    _fields_ = [("start", u64), ("end", u64), ("categories", u64)]


assert ctypes.sizeof(UffdMsg) == 32
assert ctypes.sizeof(PmScanArg) == 96

UFFDIO = UFFD_API
UFFDIO_API = iowr(UFFDIO, 0x3F, ctypes.sizeof(UffdioApi))
UFFDIO_REGISTER = iowr(UFFDIO, 0x00, ctypes.sizeof(UffdioRegister))
UFFDIO_UNREGISTER = ior(UFFDIO, 0x01, ctypes.sizeof(UffdioRange))
UFFDIO_WAKE = ior(UFFDIO, 0x02, ctypes.sizeof(UffdioRange))
UFFDIO_COPY = iowr(UFFDIO, 0x03, ctypes.sizeof(UffdioCopy))
UFFDIO_ZEROPAGE = iowr(UFFDIO, 0x04, ctypes.sizeof(UffdioZeropage))
UFFDIO_MOVE = iowr(UFFDIO, 0x05, ctypes.sizeof(UffdioMove))
UFFDIO_WRITEPROTECT = iowr(UFFDIO, 0x06, ctypes.sizeof(UffdioWriteprotect))
PAGEMAP_SCAN = iowr(ord("f"), 16, ctypes.sizeof(PmScanArg))
