"""KVM's dirty log as a dirty-page tracker for a precopy of a virtual machine's RAM.

A guest writes its RAM through KVM's own mappings (the shadow or nested page tables), which
the VMM's page tables never see, so :class:`~pageflip.dirty.DirtyTracker` cannot find those
writes. KVM logs them per memory slot instead: :meth:`KvmDirtyLog.start` turns
``KVM_MEM_LOG_DIRTY_PAGES`` on for every slot (and :meth:`KvmDirtyLog.close` off again: it
slows the guest down, see :meth:`~.machine.Machine.set_dirty_logging`), reads the log with
``KVM_GET_DIRTY_LOG`` and, where the host offers ``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`` (the
machine enables it with every bit initially set, so turning the log on costs nothing), protects
again exactly the pages it reports with ``KVM_CLEAR_DIRTY_LOG``. A write that races with a collect
is either in this answer or, because its page is protected again only after it was
reported, in the next one: none is lost.

Started ``lazily`` (a precopy), it protects nothing at first: every page counts as written
until :meth:`KvmDirtyLog.arm` protects a chunk, which the first round does just before it
reads that chunk. Protecting the whole RAM at once made every first write of the guest a
slow fault at the same moment (on this host a write to a protected page leaves the guest),
and a guest rewriting 256 MiB/s fell behind for the whole first round.

Writes the VMM itself makes through its own mapping are not logged; the VMM writes guest RAM
only at boot, before any migration.
"""

from __future__ import annotations

import contextlib

import numpy as np

from ..errors import ClosedError, StateError
from ..memory import PAGE_SIZE
from ..runs import Runs, pages_to_runs
from .machine import Machine

__all__ = ["KvmDirtyLog"]


class KvmDirtyLog:
    """Track the guest's writes to each memory slot of ``machine`` (in slot order, which
    is the order of the VM's regions). Same interface as
    :class:`~pageflip.dirty.DirtyTracker`: :meth:`start`, :meth:`collect`, :meth:`close`."""

    def __init__(self, machine: Machine) -> None:
        self._machine = machine
        self._npages = [slot.size // PAGE_SIZE for slot in machine.slots]
        self._bitmaps = [np.zeros((n + 63) // 64, np.uint64) for n in self._npages]
        self._active = False
        self._closed = False
        #: Started lazily: pages are watched only once armed (see arm).
        self._lazy = False
        #: A bitmap of ones, as long as the longest range protected yet.
        self._ones = np.empty(0, np.uint64)

    @property
    def active(self) -> bool:
        return self._active

    def start(self, *, lazily: bool = False) -> None:
        """From now on, :meth:`collect` reports the pages written since the previous call;
        ``lazily`` (with manual protection): of the pages :meth:`arm` watched, every other
        page counting as written."""
        if self._closed:
            raise ClosedError("the dirty log is closed", what="dirty log")
        if self._active:
            raise StateError("the dirty log is already started", phase="active", needed="idle")
        self._machine.set_dirty_logging(True)
        self._lazy = lazily and self._machine.manual_dirty_log
        for slot, npages in enumerate(self._npages):
            self._read(slot)  # drop what was logged before
            if self._machine.manual_dirty_log and not self._lazy:
                self._protect(slot, 0, npages)
        self._active = True

    def arm(self, region: int, first: int, count: int) -> None:
        """Started lazily: watch pages ``[first, first + count)`` of slot ``region`` from
        now on. ``first`` is a multiple of 64, and so is ``count`` unless the range ends the
        slot (KVM's rule: a bitmap word at a time)."""
        if not self._active:
            raise StateError("the dirty log is not started", phase="idle", needed="active")
        if not self._lazy:
            return
        npages = self._npages[region]
        end = first + count
        if first % 64 or (count % 64 and end != npages) or not 0 <= first < end <= npages:
            raise ValueError(
                f"arm({region}, {first}, {count}): pages of slot {region} ({npages}) in whole "
                f"words of 64"
            )
        self._protect(region, first, count)

    def _protect(self, slot: int, first: int, count: int) -> None:
        ones = self._ones
        if ones.size * 64 < count:
            ones = self._ones = np.full((count + 63) // 64, np.uint64(0xFFFFFFFFFFFFFFFF))
        self._machine.clear_dirty_log(slot, first, count, ones.ctypes.data)

    def _read(self, slot: int) -> None:
        bitmap = self._bitmaps[slot]
        self._machine.get_dirty_log(slot, bitmap.ctypes.data)

    def collect(self) -> list[Runs]:
        """Per slot, the runs of pages written since the last call; protects them again."""
        if not self._active:
            raise StateError("the dirty log is not started", phase="idle", needed="active")
        found = []
        for slot, npages in enumerate(self._npages):
            self._read(slot)
            bitmap = self._bitmaps[slot]
            if not bitmap.any():
                found.append(np.empty((0, 2), np.uint64))
                continue
            if self._machine.manual_dirty_log:
                self._machine.clear_dirty_log(slot, 0, npages, bitmap.ctypes.data)
            bits = np.unpackbits(bitmap.view(np.uint8), bitorder="little")[:npages]
            found.append(pages_to_runs(np.flatnonzero(bits)))
        return found

    def stop(self) -> None:
        """Stop tracking; KVM's dirty log is turned off again (if the VM still runs)."""
        if self._active:
            self._active = False
            with contextlib.suppress(OSError, StateError):
                if self._machine.vm_fd >= 0:
                    self._machine.set_dirty_logging(False)

    def close(self) -> None:
        self.stop()
        self._closed = True
