"""/proc/PID/pagemap: PAGEMAP_SCAN for written pages, and PFNs to prove a move."""

from __future__ import annotations

import ctypes
import os

import numpy as np
import numpy.typing as npt

from ._gate import libc_gate, os_error
from .flags import PageCategory, PmScan
from .mm import PAGE_SIZE
from .procfs import proc
from .structs import PAGEMAP_SCAN, PmScanArg

_ioctl = libc_gate(
    "ioctl", ctypes.c_int, [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p], ("fd", "request", None)
)

PFN_MASK = (1 << 55) - 1
PRESENT = 1 << 63
SWAPPED = 1 << 62
FILE_OR_SHARED = 1 << 61
EXCLUSIVE = 1 << 56

#: A page region as PAGEMAP_SCAN returns it: start, end, categories.
REGION_DTYPE = np.dtype([("start", np.uint64), ("end", np.uint64), ("categories", np.uint64)])


def open_pagemap(pid: int | str = "self") -> int:
    try:
        return os.open(proc(pid, "pagemap"), os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise os_error(err.errno or 0, f"open({proc(pid, 'pagemap')})") from None


def scan(
    pagemap_fd: int,
    start: int,
    end: int,
    *,
    flags: PmScan = PmScan.NONE,
    category_mask: PageCategory = PageCategory.NONE,
    category_inverted: PageCategory = PageCategory.NONE,
    category_anyof_mask: PageCategory = PageCategory.NONE,
    return_mask: PageCategory = PageCategory.NONE,
    max_pages: int = 0,
    vec_len: int = 4096,
) -> npt.NDArray[np.void]:
    """PAGEMAP_SCAN over ``[start, end)``: the matching page ranges, the whole range walked.

    The kernel stops when its output vector is full; the walk resumes from ``walk_end`` until
    it reaches ``end`` (or ``max_pages`` pages were found).
    """
    out: list[npt.NDArray[np.void]] = []
    vec = np.zeros(vec_len, REGION_DTYPE)
    arg = PmScanArg(
        size=ctypes.sizeof(PmScanArg),
        flags=int(flags),
        vec=vec.ctypes.data,
        vec_len=vec_len,
        category_inverted=int(category_inverted),
        category_mask=int(category_mask),
        category_anyof_mask=int(category_anyof_mask),
        return_mask=int(return_mask),
    )
    found = 0
    pos = start
    while pos < end:
        arg.start = pos
        arg.end = end
        arg.walk_end = 0
        arg.max_pages = max_pages - found if max_pages else 0
        while True:
            n = _ioctl.raw(pagemap_fd, PAGEMAP_SCAN, ctypes.addressof(arg))
            if n != -1:
                break
            err = ctypes.get_errno()
            if err != 4:
                raise os_error(
                    err,
                    f"ioctl(fd={pagemap_fd}, PAGEMAP_SCAN, start={pos:#x}, end={end:#x}, "
                    f"flags={PmScan(flags).name})",
                )
        if n:
            chunk = vec[:n].copy()
            out.append(chunk)
            found += int(((chunk["end"] - chunk["start"]) // PAGE_SIZE).sum())
        walk_end = int(arg.walk_end)
        if walk_end <= pos or (max_pages and found >= max_pages):
            break
        pos = walk_end
    if not out:
        return np.empty(0, REGION_DTYPE)
    return np.concatenate(out)


def mapped_pages(pid: int | str, address: int, npages: int) -> npt.NDArray[np.bool_]:
    """Which of the ``npages`` pages at ``address`` in process ``pid`` its page tables map
    (PAGEMAP_SCAN; a page the kernel is migrating counts too: it shows as swapped)."""
    held = PageCategory.PRESENT | PageCategory.SWAPPED
    fd = open_pagemap(pid)
    try:
        found = scan(
            fd, address, address + npages * PAGE_SIZE, category_anyof_mask=held, return_mask=held
        )
    finally:
        os.close(fd)
    mapped = np.zeros(npages, np.bool_)
    for start, end in zip(found["start"].tolist(), found["end"].tolist(), strict=True):
        mapped[(start - address) // PAGE_SIZE : (end - address) // PAGE_SIZE] = True
    return mapped


def entries(address: int, npages: int, pid: int | str = "self") -> npt.NDArray[np.uint64]:
    """Raw 64-bit pagemap entries of ``npages`` pages from ``address``."""
    fd = open_pagemap(pid)
    try:
        want = npages * 8
        data = os.pread(fd, want, address // PAGE_SIZE * 8)
    except OSError as err:
        raise os_error(
            err.errno or 0, f"pread(pagemap, addr={address:#x}, pages={npages})"
        ) from None
    finally:
        os.close(fd)
    if len(data) != want:
        raise os_error(5, f"pread(pagemap, addr={address:#x}, pages={npages}): short read")
    return np.frombuffer(data, np.uint64)


def pfns(address: int, npages: int, pid: int | str = "self") -> npt.NDArray[np.uint64]:
    """Physical frame numbers of ``npages`` pages from ``address``; 0 where not present.

    Without CAP_SYS_ADMIN the kernel reports every PFN as 0.
    """
    raw = entries(address, npages, pid)
    present = (raw & np.uint64(PRESENT)) != 0
    return np.where(present, raw & np.uint64(PFN_MASK), np.uint64(0)).astype(np.uint64)
