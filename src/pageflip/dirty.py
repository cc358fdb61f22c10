"""Which pages were written since the last look: userfaultfd write-protect (async) + PAGEMAP_SCAN.

The recipe (docs/kernel.md): a userfaultfd with WP_ASYNC registers each range in write-protect
mode and protects it; a write then resolves in the kernel without waking anyone (nothing
blocks, so the writer may hold the GIL), and marks the page written. ``PAGEMAP_SCAN`` on
/proc/self/pagemap returns the written page ranges and write-protects them again in the same
walk, atomically per page, so that a write racing with the scan is either in this answer or
in the next one, never lost.

The tracker works in the process that owns the memory (a uffd belongs to the address space
that created it). It works for a normal user: where the kernel refuses a full userfaultfd
(``vm.unprivileged_userfaultfd = 0``, the default), it takes one for user-mode faults only,
which loses nothing here, because the kernel resolves an async write-protect fault before it
asks who raised it: writes made by syscalls (``read()`` into the memory, a peer's
``process_vm_writev``) are found like the guest's own stores (see :mod:`pageflip._sys.uffd`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from . import features
from ._sys import pagemap, uffd
from ._sys.flags import PageCategory, PmScan, UffdFeature, UffdRegister, UffdWpMode
from ._sys.mm import PAGE_SIZE
from .errors import ClosedError, SpanError, StateError
from .memory import Region
from .runs import Runs

_FEATURES = UffdFeature.WP_ASYNC | UffdFeature.WP_UNPOPULATED | UffdFeature.WP_HUGETLBFS_SHMEM
_SCAN = PmScan.WP_MATCHING | PmScan.CHECK_WPASYNC

__all__ = ["DirtyTracker"]


@dataclass(frozen=True, slots=True)
class _Range:
    address: int
    length: int


class DirtyTracker:
    """Track writes to some regions (or raw page-aligned ranges) of this process.

    ``start()`` protects everything: from then on :meth:`collect` returns, per range, the runs
    of pages written since the previous collect (or since start) and protects them again.
    """

    def __init__(self, ranges: Sequence[Region | tuple[int, int]]) -> None:
        self._ranges: list[_Range] = []
        for item in ranges:
            address, length = (item.address, item.size) if isinstance(item, Region) else item
            if address % PAGE_SIZE or length % PAGE_SIZE or length <= 0:
                raise SpanError(
                    f"a tracked range must be whole pages, got {length} bytes at {address:#x}",
                    offset=address,
                    length=length,
                )
            self._ranges.append(_Range(address, length))
        self._uffd = -1
        self._pagemap = -1
        self._registered: list[_Range] = []
        self._closed = False

    @property
    def active(self) -> bool:
        return self._uffd >= 0

    def start(self, *, lazily: bool = False) -> None:
        """Register every range for write-protect tracking and protect it all (also when
        asked to go ``lazily``: protecting a range here costs the guest nothing)."""
        if self._closed:
            raise ClosedError("the dirty tracker is closed", what="dirty tracker")
        if self.active:
            raise StateError("the dirty tracker is already started", phase="active", needed="idle")
        features.require("pagemap_scan")
        try:
            # User-mode-only is as good as a full uffd for async write-protect tracking.
            self._uffd = uffd.userfaultfd(user_mode_ok=True)
            uffd.api(self._uffd, _FEATURES)
            self._pagemap = pagemap.open_pagemap()
            for r in self._ranges:
                uffd.register(self._uffd, r.address, r.length, UffdRegister.WP)
                self._registered.append(r)
                uffd.writeprotect(self._uffd, r.address, r.length, UffdWpMode.WP)
        except BaseException:
            self.stop()
            raise

    def arm(self, region: int, first: int, count: int) -> None:
        """Nothing to do: :meth:`start` protected everything."""
        self._check_active()

    def collect(self) -> list[Runs]:
        """Per range, the runs of pages written since the last call; protects them again."""
        self._check_active()
        return [self._scan(r) for r in self._ranges]

    def _scan(self, r: _Range) -> Runs:
        found = pagemap.scan(
            self._pagemap,
            r.address,
            r.address + r.length,
            flags=_SCAN,
            category_mask=PageCategory.WRITTEN,
            return_mask=PageCategory.WRITTEN,
        )
        if not len(found):
            return np.empty((0, 2), np.uint64)
        first = (found["start"] - np.uint64(r.address)) // np.uint64(PAGE_SIZE)
        count = (found["end"] - found["start"]) // np.uint64(PAGE_SIZE)
        return np.stack([first, count], axis=1).astype(np.uint64)

    def _check_active(self) -> None:
        if self._closed:
            raise ClosedError("the dirty tracker is closed", what="dirty tracker")
        if not self.active:
            raise StateError("the dirty tracker is not started", phase="idle", needed="active")

    def stop(self) -> None:
        """Stop tracking: unregister the ranges (writes are free again) and close the fds."""
        fd, self._uffd = self._uffd, -1
        pm, self._pagemap = self._pagemap, -1
        registered, self._registered = self._registered, []
        try:
            for r in registered:
                # The range may be gone already (unmapped or moved away): nothing to undo.
                with contextlib.suppress(OSError):
                    uffd.unregister(fd, r.address, r.length)
        finally:
            for handle in (fd, pm):
                if handle >= 0:
                    os.close(handle)

    def close(self) -> None:
        self.stop()
        self._closed = True

    def __enter__(self) -> DirtyTracker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_uffd", -1) >= 0:
            self.stop()
