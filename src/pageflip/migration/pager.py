"""The postcopy pager: a process of its own that fills the guest's missing pages.

After a postcopy switchover the destination runs the guest before all of its memory has
arrived. Each region is registered with a userfaultfd in MISSING mode: a thread that touches
a page that is not there yet sleeps in the kernel until someone installs the page. That
someone must not need the faulting process's GIL (the faulting thread may hold it), so it
is this separate process, holding the uffd (passed over SCM_RIGHTS), as Firecracker's page
fault handler does.

The pager reads pages straight out of the paused source process (process_vm_readv, same
host) and installs them atomically with UFFDIO_COPY: first the page a fault asks for (and a
few after it), between those the rest in order, until every page is there. It hashes every
page it installs (xxh3), so that the destination can check the whole memory against the
source's digests at the end, and it times each fault it serves.

Its threads start before it says it is ready, so that a process that cannot have them (a
pids limit) fails before the commit point. If the source process dies with pages still
missing, the pager installs :data:`~pageflip.memory.LOST_PAGE` over each of them instead,
so that no page ever reads as zeros and no guest thread stays blocked, and reports the loss.
The pager process is a keeper and a forked worker. The worker does all of the above; the
keeper relays the conversation and holds the uffd and the memfds, so that when a worker dies,
fails or hangs, it starts another on its own, without the destination, whose main thread may
be waiting for the GIL that a faulting guest thread holds. A new worker finds the pages
already in by SEEK_DATA on the memfds and goes on. If the whole pager dies, the destination
(which keeps its own uffd) starts another the same way.

Run as ``python -m pageflip._pager FD`` where FD is one end of a Unix socket pair; the
conversation on it is the channel's framing, one JSON object (with fds) per frame (see
:func:`open_pager_link`). The pager logs to its stderr, which is the destination's.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .. import stream
from .._sys import fds as _fds
from .._sys import huge as _huge
from .._sys import io, mm, pagemap, uffd
from .._sys.flags import Map, Prot, UffdCopyMode
from .._sys.mm import PAGE_SIZE
from .._wire import Note, WireCodec
from ..channel import Endpoint, read_from
from ..errors import PeerClosed, PeerTimeout
from ..memory import LOST_PAGE, bytes_at
from ..transport import UnixConnection
from .digests import hash_pages

log = logging.getLogger("pageflip.pager")

#: Pages installed per background step; a fault waits at most about one step.
STEP_PAGES = 64
#: Pages after a faulting one installed with it (most guests read on).
FAULT_AHEAD = 15
#: Seconds between progress messages.
PROGRESS_EVERY = 0.1
#: Workers the keeper starts after the first, before it gives up (then the destination may
#: start a whole new pager).
WORKER_RESTARTS = 3
#: Seconds a worker with pages to fetch may stay silent before the keeper counts it hung
#: (the destination's own limit for the whole pager is longer).
WORKER_SILENCE = 3.0


def open_pager_link(sock: socket.socket) -> Endpoint:
    """The conversation between a destination and its pager over their socket pair: the
    channel's framing, one :class:`~pageflip._wire.Note` (a JSON object and fds) per
    message, bounded like every frame."""
    return Endpoint(UnixConnection(sock), WireCodec())


def send_note(link: Endpoint, message: dict[str, Any], fds: list[int] | None = None) -> None:
    """Send ``message`` (with ``fds``, which stay the caller's)."""
    link.send(Note(message, list(fds or [])), "pager")


def recv_note(link: Endpoint, timeout: float | None = None) -> tuple[dict[str, Any], list[int]]:
    """The next message and the fds that came with it (now the caller's): PeerClosed at
    EOF, PeerTimeout after ``timeout`` seconds of silence."""
    note = link.expect((Note,), "pager", timeout)
    return note.message, note.fds


@dataclass
class PagerRegion:
    """One registered region, as the pager sees it.

    ``digests`` and ``installed`` are views of memory shared with the destination (see
    :class:`Ledger`): a page's digest and its installed mark are written there before the
    page goes in, so that they outlive this pager.
    """

    guest_address: int  # in the destination (guest) process
    src_address: int  # in the source process
    npages: int
    filled: npt.NDArray[np.bool_]
    digests: npt.NDArray[np.uint64]
    installed: npt.NDArray[np.uint8]
    cursor: int = 0  # next page the background fill looks at
    #: Pages in each unit it faults and is installed in (see fault_unit): claims, copies
    #: and wake-ups go by whole, aligned units.
    unit: int = 1

    @property
    def end(self) -> int:
        return self.guest_address + self.npages * PAGE_SIZE


class Ledger:
    """Per page of every region, in one memfd the destination and its pagers share: the
    digest of the data a pager installed (u64), then whether it installed it (u8).

    A pager writes both before its UFFDIO_COPY: if it dies between the two, the page is
    still missing and the next pager installs (and records) it again from the source, which
    is paused and gives the same bytes. So the record survives any pager, and the digests
    are those of the pages as they arrived, not as the running guest has changed them since.
    """

    def __init__(self, fd: int, counts: list[int]) -> None:
        total = sum(counts)
        self.size = max(mm.page_round_up(total * 9), PAGE_SIZE)
        if mm.fstat_size(fd) < self.size:
            mm.ftruncate(fd, self.size)
        self._map = mmap.mmap(fd, self.size, mmap.MAP_SHARED)
        self._digests = np.frombuffer(self._map, np.uint64, count=total)
        self._installed = np.frombuffer(self._map, np.uint8, count=total, offset=total * 8)
        self._offsets = np.concatenate(([0], np.cumsum(counts))).astype(int).tolist()

    def region(self, index: int) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint8]]:
        """The digests and installed marks of region ``index`` (views)."""
        lo, hi = self._offsets[index], self._offsets[index + 1]
        return self._digests[lo:hi], self._installed[lo:hi]

    def close(self) -> None:
        """Unmap. Every view :meth:`region` gave must be gone by now (a BufferError says
        one is still held)."""
        del self._digests, self._installed
        self._map.close()


def fault_unit(page_size: int, huge: str | None) -> int:
    """The bytes a region's missing pages fault and are installed in: a hugetlb region's
    huge page (UFFDIO_COPY takes only whole, aligned ones there), else 4 KiB, also for
    transparent huge pages (on shmem UFFDIO_COPY installs 4 KiB pages, whatever its length:
    kernel.md, "Huge pages")."""
    return page_size if huge == "hugetlb" else PAGE_SIZE


#: The largest fault unit postcopy takes (a 2 MiB hugetlb page): a guest thread that touches
#: a missing page waits for its whole unit to be copied, and each pager thread holds a
#: scratch buffer of one unit. A 1 GiB page would make each fault a gigabyte's copy.
MAX_FAULT_UNIT = 2 << 20
#: The modes that may end in postcopy (a pager fills the guest's missing pages).
POSTCOPY_MODES = frozenset({stream.Mode.POSTCOPY, stream.Mode.PRECOPY_POSTCOPY})


def postcopy_problem(mode: stream.Mode, regions: Iterable[stream.RegionInfo]) -> str | None:
    """Why a migration in ``mode`` of these regions (as a SETUP announces them) cannot go
    postcopy (None: it can, or it never goes postcopy): a region whose pages are larger
    than :data:`MAX_FAULT_UNIT`, since postcopy faults in whole hugetlb pages. Flip and
    precopy move any page size."""
    if mode not in POSTCOPY_MODES:
        return None
    for info in regions:
        kind = stream.PageKind(info.pages)
        if kind.page_size > MAX_FAULT_UNIT:
            return (
                f"postcopy cannot take region {info.name!r} on {kind.describe()} pages: it "
                f"faults in whole pages, and each fault would stall the guest while a whole "
                f"{_huge.size_name(kind.page_size)} is copied; migrate it by flip or by "
                f"precopy (with on-no-convergence force)"
            )
    return None


def held_pages(
    memfd: int,
    npages: int,
    offset: int = 0,
    *,
    unit: int = PAGE_SIZE,
    pid: int | str = "self",
    address: int = 0,
) -> npt.NDArray[np.bool_]:
    """Which pages a region's memfd holds already (they are never installed again).

    A shmem memfd tells (:func:`present_pages`). A hugetlb memfd calls its whole size data,
    so for a region faulted in ``unit`` bytes larger than a page, the page tables of the
    one process that maps it (``pid``, the region at ``address``) tell instead: a hugetlb
    page is in them from its first touch until it is punched out
    (:func:`pagemap.mapped_pages`).
    """
    if unit == PAGE_SIZE:
        return present_pages(memfd, npages, offset)
    return pagemap.mapped_pages(pid, address, npages)


def present_pages(memfd: int, npages: int, offset: int = 0) -> npt.NDArray[np.bool_]:
    """Which pages of a memfd (from ``offset``) hold data (SEEK_DATA / SEEK_HOLE), without
    touching them."""
    present = np.zeros(npages, np.bool_)
    end = offset + npages * PAGE_SIZE
    pos = offset
    while pos < end:
        try:
            data = os.lseek(memfd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            break
        if data >= end:
            break
        hole = min(os.lseek(memfd, data, os.SEEK_HOLE), end)
        first = (data - offset) // PAGE_SIZE
        present[first : (hole - offset + PAGE_SIZE - 1) // PAGE_SIZE] = True
        pos = hole
    return present


class _Buffer:
    """A page-aligned scratch buffer of one thread: pages land here before UFFDIO_COPY."""

    def __init__(self, pages: int) -> None:
        self.size = pages * PAGE_SIZE
        self.address = mm.mmap(None, self.size, Prot.READ | Prot.WRITE, Map.PRIVATE | Map.ANONYMOUS)
        self.view = bytes_at(self.address, self.size)

    def close(self) -> None:
        self.view.release()
        mm.munmap(self.address, self.size)


class Pager:
    """Fill every missing page of the regions from the source process, faults first.

    One thread waits on the uffd and serves faults as they come; ``workers`` threads sweep
    the regions in order meanwhile, going on from wherever the latest fault was. All of them
    start with the object and wait for :meth:`start`. A page is *claimed* (under a lock)
    before it is read, so no two threads install the same page; a fault on a page another
    thread is installing is left to that thread's UFFDIO_COPY, which wakes the faulting
    thread. Several sweeping threads help even on two CPUs: installing a page waits on the
    host more than it works.
    """

    def __init__(self, workers: int = 3) -> None:
        self.uffd = -1
        self.src_pid = 0
        self.regions: list[PagerRegion] = []
        self._lock = threading.Lock()
        self._claimed: list[npt.NDArray[np.bool_]] = []
        self._go = threading.Event()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        #: Why the source can no longer give pages (then missing ones get LOST_PAGE).
        self.source_gone: str | None = None
        self.lost_pages = 0
        self.fault_times: list[float] = []
        self.requested = 0
        self.fault_pages = 0
        self.pushed = 0
        self.started = time.monotonic()
        self._faults = threading.Thread(
            target=self._guard, args=(self._serve_faults,), name="pager-faults", daemon=True
        )
        self._sweepers = [
            threading.Thread(
                target=self._guard, args=(self._sweep,), name=f"pager-sweep-{i}", daemon=True
            )
            for i in range(workers)
        ]
        threads = [self._faults, *self._sweepers]
        try:
            for thread in threads:
                thread.start()
        except BaseException:
            self.close()
            raise

    def start(self, uffd_fd: int, src_pid: int, regions: list[PagerRegion]) -> None:
        """Begin: serve faults on ``uffd_fd`` and sweep ``regions`` from process ``src_pid``."""
        self.uffd = uffd_fd
        self.src_pid = src_pid
        self.regions = regions
        self._claimed = [r.filled.copy() for r in regions]
        self.started = time.monotonic()
        self._go.set()

    @property
    def remaining(self) -> int:
        return sum(int(r.npages - np.count_nonzero(r.filled)) for r in self.regions)

    def wait(self, timeout: float) -> bool:
        """Whether every page is in (the sweep ended); raises what a thread raised."""
        for thread in self._sweepers:
            thread.join(timeout)
            if thread.is_alive():
                return False
        if self._error is not None:
            raise self._error
        # The sweep is over; a fault may still be finishing the last pages it claimed.
        if self.remaining:
            time.sleep(min(timeout, 0.001))
            return False
        return True

    def close(self) -> None:
        self._stop.set()
        self._go.set()
        for thread in (self._faults, *self._sweepers):
            if thread.is_alive():
                thread.join()

    def _guard(self, body: Any) -> None:
        self._go.wait()
        if self._stop.is_set():
            return
        try:
            body()
        except BaseException as err:  # handed to the main thread by wait()
            self._error = err
            self._stop.set()

    def _region_of(self, address: int) -> tuple[int, int] | None:
        """(region, first page of the unit) that ``address`` falls in."""
        for index, region in enumerate(self.regions):
            if region.guest_address <= address < region.end:
                page = (address - region.guest_address) // PAGE_SIZE
                return index, page - page % region.unit
        return None

    def _pages(self, index: int, wanted: int) -> int:
        """``wanted`` pages rounded up to whole units of region ``index``."""
        unit = self.regions[index].unit
        return -(-wanted // unit) * unit

    def _claim(self, index: int, start: int, limit: int) -> tuple[int, int] | None:
        """Claim the first run of unclaimed pages at or after ``start``, at most ``limit``."""
        claimed = self._claimed[index]
        with self._lock:
            free = np.flatnonzero(~claimed[start : start + max(limit, 1) * 64])
            if not len(free):
                free = np.flatnonzero(~claimed[start:])
                if not len(free):
                    return None
            first = start + int(free[0])
            return self._take(claimed, first, limit)

    def _claim_at(self, index: int, page: int, limit: int) -> tuple[int, int] | None:
        """Claim ``page`` and the unclaimed pages after it (at most ``limit``), or None if
        ``page`` is claimed already."""
        claimed = self._claimed[index]
        with self._lock:
            if claimed[page]:
                return None
            return self._take(claimed, page, limit)

    @staticmethod
    def _take(claimed: npt.NDArray[np.bool_], first: int, limit: int) -> tuple[int, int]:
        """Claim the run at ``first`` up to ``limit`` pages or the next claimed page."""
        stop = min(first + limit, len(claimed))
        taken = np.flatnonzero(claimed[first:stop])
        if len(taken):
            stop = first + int(taken[0])
        claimed[first:stop] = True
        return first, stop - first

    def _read(self, buffer: _Buffer, region: PagerRegion, first: int, nbytes: int) -> bool:
        """Read pages from the source into ``buffer``; False once the source is gone."""
        if self.source_gone is None:
            local = io.iovecs([(buffer.address, nbytes)])
            remote = io.iovecs([(region.src_address + first * PAGE_SIZE, nbytes)])
            try:
                done = read_from(self.src_pid, local, remote)
            except OSError as err:
                done, why = -1, f"process_vm_readv(pid={self.src_pid}): {err.strerror or err}"
            else:
                why = f"read {done} of {nbytes} bytes from process {self.src_pid}"
            if done == nbytes:
                return True
            with self._lock:
                if self.source_gone is None:
                    self.source_gone = why
                    log.error("the source can no longer give pages (%s): marking them lost", why)
        return False

    def _install(self, buffer: _Buffer, index: int, first: int, count: int) -> None:
        """Read ``count`` claimed pages from the source and UFFDIO_COPY them in (or, with
        the source gone, LOST_PAGE in their place)."""
        region = self.regions[index]
        assert first % region.unit == 0 and count % region.unit == 0, (first, count, region.unit)
        nbytes = count * PAGE_SIZE
        if self._read(buffer, region, first, nbytes):
            # Recorded before the page goes in: see Ledger.
            region.digests[first : first + count] = hash_pages(
                buffer.view, range(0, nbytes, PAGE_SIZE)
            )
            region.installed[first : first + count] = 1
        else:
            for offset in range(0, nbytes, PAGE_SIZE):
                buffer.view[offset : offset + PAGE_SIZE] = LOST_PAGE
            with self._lock:
                self.lost_pages += count
        dst = region.guest_address + first * PAGE_SIZE
        done = 0
        while done < nbytes:
            try:
                done += uffd.copy(
                    self.uffd, dst + done, buffer.address + done, nbytes - done, UffdCopyMode.NONE
                )
            except FileExistsError:
                # Present already (it should not be): skip that page, or its huge page.
                done += region.unit * PAGE_SIZE
            except BlockingIOError:
                continue  # EAGAIN: the range is changing (e.g. being unmapped); try again
        region.filled[first : first + count] = True

    def _largest_unit(self) -> int:
        return max((r.unit for r in self.regions), default=1)

    def _serve_faults(self) -> None:
        buffer = _Buffer(max(FAULT_AHEAD + 1, self._largest_unit()))
        poller = select.poll()
        poller.register(self.uffd, select.POLLIN)
        try:
            while not self._stop.is_set():
                if not poller.poll(50):
                    continue
                for msg in uffd.read_messages(self.uffd, 64):
                    started = time.perf_counter()
                    found = self._region_of(int(msg["address"]))
                    if found is None:
                        continue
                    index, page = found
                    run = self._claim_at(index, page, self._pages(index, FAULT_AHEAD + 1))
                    if run is None:
                        # Another thread has it: its UFFDIO_COPY wakes the faulting thread;
                        # if it is in already, wake it ourselves.
                        region = self.regions[index]
                        if region.filled[page]:
                            uffd.wake(
                                self.uffd,
                                region.guest_address + page * PAGE_SIZE,
                                region.unit * PAGE_SIZE,
                            )
                        continue
                    with self._lock:
                        # The sweep goes on from here, at once: a guest that touched this
                        # page touches the next ones next (a VM rewriting its memory in
                        # order faulted on every page otherwise, each waiting for a round
                        # trip). What the sweep skipped it takes up when it reaches the end.
                        self.regions[index].cursor = run[0] + run[1]
                    self._install(buffer, index, *run)
                    self.requested += 1
                    self.fault_pages += run[1]
                    self.fault_times.append(time.perf_counter() - started)
        finally:
            buffer.close()

    def _sweep(self) -> None:
        buffer = _Buffer(max(STEP_PAGES, self._largest_unit()))
        try:
            for index, region in enumerate(self.regions):
                step = self._pages(index, STEP_PAGES)
                while not self._stop.is_set():
                    with self._lock:
                        cursor = region.cursor
                    run = self._claim(index, cursor, step)
                    if run is None and cursor:
                        run = self._claim(index, 0, step)  # anything left behind
                    if run is None:
                        break
                    with self._lock:
                        region.cursor = max(region.cursor, run[0] + run[1])
                    self._install(buffer, index, *run)
                    with self._lock:
                        self.pushed += run[1]
        finally:
            buffer.close()

    def wake_all(self) -> None:
        """Wake every thread waiting on a fault in the regions (all pages are in by now)."""
        for region in self.regions:
            with contextlib.suppress(OSError):
                uffd.wake(self.uffd, region.guest_address, region.npages * PAGE_SIZE)

    def stats(self) -> dict[str, Any]:
        times = np.array(self.fault_times) * 1e6
        return {
            "seconds": time.monotonic() - self.started,
            "faults": len(self.fault_times),
            "requested": self.requested,
            "fault_pages": self.fault_pages,
            "pushed": self.pushed,
            "fault_median_us": float(np.median(times)) if len(times) else 0.0,
            "fault_p99_us": float(np.percentile(times, 99)) if len(times) else 0.0,
            "fault_max_us": float(times.max()) if len(times) else 0.0,
        }

    def progress(self) -> dict[str, int]:
        return {"remaining": self.remaining, "pushed": self.pushed, "requested": self.requested}


def _regions(start: dict[str, Any], memfds: list[int], ledger: Ledger) -> list[PagerRegion]:
    regions = []
    for index, (info, memfd) in enumerate(zip(start["regions"], memfds, strict=True)):
        npages = int(info["size"]) // PAGE_SIZE
        unit = int(info.get("fault_unit", PAGE_SIZE))
        address = int(info["guest_address"])
        digests, installed = ledger.region(index)
        filled = held_pages(
            memfd,
            npages,
            int(info.get("fd_offset", 0)),
            unit=unit,
            pid=int(start.get("guest_pid", 0)) or "self",
            address=address,
        )
        regions.append(
            PagerRegion(
                guest_address=address,
                src_address=int(info["src_address"]),
                npages=npages,
                filled=filled,
                digests=digests,
                installed=installed,
                unit=unit // PAGE_SIZE,
            )
        )
    return regions


class _Worker:
    """A forked worker process and the socket pair the keeper talks to it on."""

    def __init__(self, close_in_child: list[int]) -> None:
        if threading.active_count() != 1:  # a fork copies one thread: the keeper has one
            raise RuntimeError("the pager's keeper has threads: it cannot fork a worker")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        keeper = os.getpid()
        try:
            self.pid = os.fork()
        except OSError as err:
            ours.close()
            theirs.close()
            raise RuntimeError(
                f"the pager could not fork its worker: {err} (a limit on processes and "
                "threads, such as a pids cgroup?)"
            ) from err
        if self.pid == 0:  # the worker
            code = 1
            try:
                io.die_with_parent(signal.SIGKILL, keeper)  # never outlive the keeper
                ours.close()
                _fds.close_all(list(close_in_child))
                code = _serve(open_pager_link(theirs), _work)
            finally:
                os._exit(code)
        theirs.close()
        self.link = open_pager_link(ours)
        self.heard = time.monotonic()
        self.status: int | None = None  # once reaped

    @property
    def ended(self) -> bool:
        return self.status is not None

    def end(self, *, kill: bool) -> int:
        """Reap the worker (killed first if ``kill``, or if it lingers); its wait status."""
        if self.status is not None:
            return self.status
        if kill:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        self.link.close()
        deadline = time.monotonic() + 10
        while True:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = status
                return status
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                deadline = float("inf")
            time.sleep(0.01)


def _died(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by signal {os.WTERMSIG(status)}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


class _Keeper:
    """The pager process itself: it relays between the destination and a forked worker, and
    replaces a worker that dies or hangs on its own.

    The destination can replace a dead pager too, but only when its main thread gets the GIL,
    and a guest thread that faults on a missing page inside numpy sleeps holding it: then
    only a page can wake the destination, and only a pager brings pages. The keeper needs
    nothing from the destination to start another worker. It holds the uffd, the ledger and
    the memfds of "start", gives them to the new worker, which finds the pages already in
    (SEEK_DATA) and goes on. The keeper never touches guest memory and starts no thread."""

    def __init__(self, link: Endpoint) -> None:
        self.link = link
        self.start: dict[str, Any] | None = None
        self.start_fds: list[int] = []
        self.go = False
        self.reported = False  # the worker said "complete" or "lost": nothing to serve
        #: The destination heard "started" for its "start" (from whichever worker).
        self.acknowledged = False
        self.restarts = 0
        self.worker = self._new_worker()

    def _new_worker(self) -> _Worker:
        worker = _Worker([self.link.fileno(), *self.start_fds])
        message, fds = recv_note(worker.link, WORKER_SILENCE)
        _fds.close_all(fds)
        if "ready" not in message:
            raise RuntimeError(f"a new pager worker said {message} instead of ready")
        return worker

    def run(self) -> None:
        while True:
            ready = self._wait()
            asked = self.link.pending or self.link.fileno() in ready
            if asked and not self._from_destination():
                return
            if self.worker.ended:
                continue  # it reported everything, then went: nothing left to serve
            if self.worker.link.pending or self.worker.link.fileno() in ready:
                self._from_worker()
            elif self.go and not self.reported:
                silent = time.monotonic() - self.worker.heard
                if silent > WORKER_SILENCE:
                    self._replace(f"said nothing for {silent:.1f} s (hung?)", kill=True)

    def close(self) -> None:
        self.worker.end(kill=True)
        _fds.close_all(self.start_fds)
        self.start_fds = []

    def _wait(self) -> set[int]:
        worker = [] if self.worker.ended else [self.worker.link]
        if any(link.pending for link in [self.link, *worker]):
            return set()
        fds = [link.fileno() for link in [self.link, *worker]]
        ready, _, _ = select.select(fds, [], [], 0.1)
        return set(ready)

    def _from_destination(self) -> bool:
        """Pass the destination's word on; False once it said "exit" (or went away)."""
        try:
            note = self.link.poll("pager")
        except (PeerClosed, PeerTimeout):
            return False
        if note is None:
            return True
        message, fds = note.message, list(note.fds)
        if "start" in message:
            self.start, self.start_fds, fds = message, fds, []
            self.go = bool(message["start"].get("go", True))
        self.go = self.go or "go" in message
        if not self.worker.ended:
            with contextlib.suppress(PeerClosed, PeerTimeout, OSError):
                send_note(self.worker.link, message, self.start_fds if "start" in message else fds)
            self.worker.heard = time.monotonic()
        _fds.close_all(fds)
        if "exit" in message:
            self.worker.end(kill=False)
            return False
        return True

    def _from_worker(self) -> None:
        try:
            note = self.worker.link.poll("pager")
        except (PeerClosed, PeerTimeout, OSError):
            status = self.worker.end(kill=False)
            if not self.reported:
                self._replace(_died(status), kill=False)
            return
        if note is None:
            return
        self.worker.heard = time.monotonic()
        _fds.close_all(list(note.fds))
        if "error" in note.message:
            self._replace(f"failed: {note.message['error']}", kill=True)
            return
        self.reported = self.reported or "complete" in note.message or "lost" in note.message
        self.acknowledged = self.acknowledged or "started" in note.message
        send_note(self.link, note.message)

    def _replace(self, why: str, *, kill: bool) -> None:
        """A new worker takes over from one that died, failed or hung."""
        self.worker.end(kill=kill)
        self.restarts += 1
        if self.restarts > WORKER_RESTARTS:
            raise RuntimeError(f"the pager's worker failed {self.restarts} times; last: it {why}")
        log.warning("the pager's worker %s; a new one takes over", why)
        self.worker = self._new_worker()
        if self.start is not None:
            replay = {"start": {**self.start["start"], "go": self.go}}
            send_note(self.worker.link, replay, self.start_fds)
            message, fds = recv_note(self.worker.link, WORKER_SILENCE)
            _fds.close_all(fds)
            if "started" not in message:
                raise RuntimeError(f"a new pager worker said {message} instead of started")
            if not self.acknowledged:
                # The old worker died between "start" and its answer: the destination
                # still waits for one.
                send_note(self.link, message)
                self.acknowledged = True
        send_note(self.link, {"restarted": f"its worker {why}; a new one took over"})


def run(link: Endpoint) -> None:
    """The pager process: a keeper and its worker (see :class:`_Keeper`)."""
    keeper = _Keeper(link)
    try:
        send_note(link, {"ready": True, "pid": os.getpid()})
        keeper.run()
    finally:
        keeper.close()


def _work(link: Endpoint) -> None:
    """The worker: threads up, ready; take the memory; fill it; report; exit."""
    pager = Pager()
    fds: list[int] = []
    ledger: Ledger | None = None
    regions: list[PagerRegion] = []
    try:
        send_note(link, {"ready": True, "pid": os.getpid()})
        message, fds = recv_note(link)
        if "start" not in message:
            return
        start = message["start"]
        uffd_fd, ledger_fd, *memfds = fds
        counts = [int(r["size"]) // PAGE_SIZE for r in start["regions"]]
        ledger = Ledger(ledger_fd, counts)
        regions = _regions(start, memfds, ledger)
        send_note(link, {"started": True})
        if not start.get("go", True) and not _go_asked(link):
            return  # "exit" before "go": the migration ended before its switchover
        pager.start(uffd_fd, int(start["src_pid"]), regions)
        last = 0.0
        while not pager.wait(0.05):
            if _exit_asked(link):
                return
            now = time.monotonic()
            if now - last >= PROGRESS_EVERY:
                last = now
                send_note(link, {"progress": pager.progress()})
        pager.wake_all()
        send_note(link, {"progress": pager.progress()})
        if pager.source_gone is not None:
            send_note(link, {"lost": f"{pager.lost_pages} pages never came: {pager.source_gone}"})
        else:
            send_note(link, {"complete": pager.stats()})
        while not _exit_asked(link, wait=600):
            pass
    except (PeerClosed, PeerTimeout):
        pass  # the destination went away: nothing more to serve
    finally:
        pager.close()
        pager.regions = []
        regions.clear()  # the ledger's views go with them
        if ledger is not None:
            ledger.close()
        _fds.close_all(fds)


def _go_asked(link: Endpoint) -> bool:
    """Wait for the destination's "go" (the source is paused now); False on "exit"."""
    while True:
        message, fds = recv_note(link)
        _fds.close_all(fds)
        if "go" in message:
            return True
        if "exit" in message:
            return False


def _exit_asked(link: Endpoint, wait: float = 0.0) -> bool:
    """Whether the destination said "exit" (waiting up to ``wait`` seconds for a word)."""
    note = link.poll("pager", wait)
    if note is None:
        return False
    fds = getattr(note, "fds", [])
    _fds.close_all(fds)
    return isinstance(note, Note) and "exit" in note.message


def _serve(link: Endpoint, body: Any) -> int:
    """Run ``body(link)``; an exception is logged and told to the other end (exit status 1)."""
    try:
        body(link)
    except Exception as err:
        log.exception("the pager failed")
        with contextlib.suppress(Exception):
            send_note(
                link,
                {
                    "error": f"{type(err).__name__}: {err} (pager pid {os.getpid()}, "
                    "traceback on the destination's stderr)"
                },
            )
        return 1
    finally:
        link.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="pageflip pager[%(process)d]: %(levelname)s: %(message)s",
    )
    return _serve(open_pager_link(socket.socket(fileno=int(args[0]))), run)
