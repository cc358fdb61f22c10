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

Run as ``python -m pageflip._pager FD`` where FD is one end of a Unix socket pair;
the conversation on it is JSON lines with fds attached (see :class:`PagerLink`).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import select
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .._sys import fds as _fds
from .._sys import io, mm, uffd
from .._sys.flags import Map, Prot, UffdCopyMode
from .._sys.mm import PAGE_SIZE
from ..errors import PeerClosed, RemoteProtocolError
from .digests import hash_pages, region_digest

log = logging.getLogger("pageflip.pager")

#: Pages installed per background step; a fault waits at most about one step.
STEP_PAGES = 64
#: Pages after a faulting one installed with it (most guests read on).
FAULT_AHEAD = 15


class PagerLink:
    """JSON lines with fds over a Unix socket: between the destination and its pager."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray()
        self._fds: list[int] = []

    def send(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        sent = _fds.sendmsg(self.sock, data, fds)
        if sent < len(data):
            self.sock.sendall(data[sent:])

    def recv(self, timeout: float | None = None) -> tuple[dict[str, Any], list[int]]:
        """The next message and the fds that came with it (PeerClosed at EOF)."""
        while b"\n" not in self._buf:
            if timeout is not None:
                ready, _, _ = select.select([self.sock], [], [], timeout)
                if not ready:
                    raise TimeoutError("the pager link was silent")
            view = memoryview(bytearray(1 << 16))
            n, fds = _fds.recvmsg_into(self.sock, view)
            self._fds.extend(fds)
            if n == 0:
                raise PeerClosed("the other end of the pager link went away", phase="postcopy")
            self._buf += view[:n]
        line, _, rest = bytes(self._buf).partition(b"\n")
        self._buf = bytearray(rest)
        message = json.loads(line)
        if not isinstance(message, dict):
            raise RemoteProtocolError("a pager message is not a JSON object", frame="pager")
        fds, self._fds = self._fds, []
        return message, fds

    def buffered(self) -> bool:
        """Whether a whole message is already read and waiting (recv() will not block)."""
        return b"\n" in self._buf

    def close(self) -> None:
        _fds.close_all(self._fds)
        self.sock.close()


@dataclass
class PagerRegion:
    """One registered region, as the pager sees it."""

    guest_address: int  # in the destination (guest) process
    src_address: int  # in the source process
    npages: int
    filled: npt.NDArray[np.bool_]
    digests: npt.NDArray[np.uint64]
    cursor: int = 0  # next page the background fill looks at

    def __post_init__(self) -> None:
        #: The pages that were there before the pager started (precopy rounds).
        self.initial = self.filled.copy()

    @property
    def end(self) -> int:
        return self.guest_address + self.npages * PAGE_SIZE


def present_pages(memfd: int, npages: int) -> npt.NDArray[np.bool_]:
    """Which pages of a memfd hold data (SEEK_DATA / SEEK_HOLE), without touching them."""
    present = np.zeros(npages, np.bool_)
    size = npages * PAGE_SIZE
    pos = 0
    while pos < size:
        try:
            data = os.lseek(memfd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            break
        hole = min(os.lseek(memfd, data, os.SEEK_HOLE), size)
        present[data // PAGE_SIZE : (hole + PAGE_SIZE - 1) // PAGE_SIZE] = True
        pos = hole
    return present


class _Buffer:
    """A page-aligned scratch buffer of one thread: pages land here before UFFDIO_COPY."""

    def __init__(self, pages: int) -> None:
        self.size = pages * PAGE_SIZE
        self.address = mm.mmap(None, self.size, Prot.READ | Prot.WRITE, Map.PRIVATE | Map.ANONYMOUS)
        self.view = memoryview((ctypes.c_char * self.size).from_address(self.address)).cast("B")

    def close(self) -> None:
        self.view.release()
        mm.munmap(self.address, self.size)


class Pager:
    """Fill every missing page of ``regions`` from process ``src_pid``, faults first.

    One thread waits on the uffd and serves faults as they come; ``workers`` threads sweep
    the regions in order meanwhile. A page is *claimed* (under a lock) before it is read, so
    no two threads install the same page; a fault on a page another thread is installing
    is left to that thread's UFFDIO_COPY, which wakes the faulting thread. Several sweeping
    threads help even on two CPUs: installing a page waits on the host more than it works.
    """

    def __init__(
        self, uffd_fd: int, src_pid: int, regions: list[PagerRegion], workers: int = 3
    ) -> None:
        self.uffd = uffd_fd
        self.src_pid = src_pid
        self.regions = regions
        self._lock = threading.Lock()
        self._claimed = [r.filled.copy() for r in regions]
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self.fault_times: list[float] = []
        self.requested = 0
        self.fault_pages = 0
        self.pushed = 0
        self.started = time.monotonic()
        self._faults = threading.Thread(target=self._guard, args=(self._serve_faults,), daemon=True)
        self._sweepers = [
            threading.Thread(target=self._guard, args=(self._sweep,), daemon=True)
            for _ in range(workers)
        ]
        self._faults.start()
        for thread in self._sweepers:
            thread.start()

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
        for thread in (self._faults, *self._sweepers):
            thread.join()

    def _guard(self, body: Any) -> None:
        try:
            body()
        except BaseException as err:  # handed to the main thread by wait()
            self._error = err
            self._stop.set()

    def _region_of(self, address: int) -> tuple[int, int] | None:
        for index, region in enumerate(self.regions):
            if region.guest_address <= address < region.end:
                return index, (address - region.guest_address) // PAGE_SIZE
        return None

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
            stop = min(first + limit, len(claimed))
            taken = np.flatnonzero(claimed[first:stop])
            if len(taken):
                stop = first + int(taken[0])
            claimed[first:stop] = True
            return first, stop - first

    def _install(self, buffer: _Buffer, index: int, first: int, count: int) -> None:
        """Read ``count`` claimed pages from the source and UFFDIO_COPY them in."""
        region = self.regions[index]
        nbytes = count * PAGE_SIZE
        local = io.iovecs([(buffer.address, nbytes)])
        remote = io.iovecs([(region.src_address + first * PAGE_SIZE, nbytes)])
        if io.pull_remote(self.src_pid, local, remote) != nbytes:
            raise PeerClosed(
                "the source process is gone: its pages cannot be read", phase="postcopy"
            )
        region.digests[first : first + count] = hash_pages(buffer.view, range(0, nbytes, PAGE_SIZE))
        dst = region.guest_address + first * PAGE_SIZE
        done = 0
        while done < nbytes:
            try:
                done += uffd.copy(
                    self.uffd, dst + done, buffer.address + done, nbytes - done, UffdCopyMode.NONE
                )
            except FileExistsError:
                done += PAGE_SIZE  # present already (it should not be): skip that page
            except BlockingIOError:
                continue  # EAGAIN: the range is changing (e.g. being unmapped); try again
        region.filled[first : first + count] = True

    def _serve_faults(self) -> None:
        buffer = _Buffer(FAULT_AHEAD + 1)
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
                    run = self._claim_at(index, page, FAULT_AHEAD + 1)
                    if run is None:
                        # Another thread has it: its UFFDIO_COPY wakes the faulting thread;
                        # if it is in already, wake it ourselves.
                        region = self.regions[index]
                        if region.filled[page]:
                            uffd.wake(self.uffd, region.guest_address + page * PAGE_SIZE, PAGE_SIZE)
                        continue
                    self._install(buffer, index, *run)
                    self.requested += 1
                    self.fault_pages += run[1]
                    self.fault_times.append(time.perf_counter() - started)
        finally:
            buffer.close()

    def _claim_at(self, index: int, page: int, limit: int) -> tuple[int, int] | None:
        """Claim ``page`` and the unclaimed pages after it (at most ``limit``), or None if
        ``page`` is claimed already."""
        claimed = self._claimed[index]
        with self._lock:
            if claimed[page]:
                return None
            stop = min(page + limit, len(claimed))
            taken = np.flatnonzero(claimed[page:stop])
            if len(taken):
                stop = page + int(taken[0])
            claimed[page:stop] = True
            return page, stop - page

    def _sweep(self) -> None:
        buffer = _Buffer(STEP_PAGES)
        try:
            for index, region in enumerate(self.regions):
                while not self._stop.is_set():
                    with self._lock:
                        cursor = region.cursor
                    run = self._claim(index, cursor, STEP_PAGES)
                    if run is None and cursor:
                        run = self._claim(index, 0, STEP_PAGES)  # anything left behind
                    if run is None:
                        break
                    with self._lock:
                        region.cursor = max(region.cursor, run[0] + run[1])
                    self._install(buffer, index, *run)
                    with self._lock:
                        self.pushed += run[1]
        finally:
            buffer.close()

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


def run(link: PagerLink) -> None:
    """The pager process: wait for the start message, fill everything, report, exit."""
    link.send({"ready": True, "pid": os.getpid()})
    message, fds = link.recv()
    if "start" not in message:
        _fds.close_all(fds)
        return
    start = message["start"]
    uffd_fd, *memfds = fds
    regions = []
    for info, memfd in zip(start["regions"], memfds, strict=True):
        npages = info["size"] // PAGE_SIZE
        regions.append(
            PagerRegion(
                guest_address=info["guest_address"],
                src_address=info["src_address"],
                npages=npages,
                filled=present_pages(memfd, npages),
                digests=np.zeros(npages, np.uint64),
            )
        )
        os.close(memfd)
    pager = Pager(uffd_fd, start["src_pid"], regions)
    try:
        last = 0.0
        while not pager.wait(0.1):
            now = time.monotonic()
            if now - last >= 0.1:  # at most ten progress messages a second
                last = now
                progress = {
                    "remaining": pager.remaining,
                    "pushed": pager.pushed,
                    "requested": pager.requested,
                }
                link.send({"progress": progress})
        final = {"remaining": 0, "pushed": pager.pushed, "requested": pager.requested}
        link.send({"progress": final})
        report = pager.stats()
        link.send({"complete": report})
        # The destination merges digests: it sends the ones it kept, gets ours back.
        message, fds = link.recv()
        if "digests" in message:
            (digest_fd,) = fds
            merged = _merge_digests(pager, digest_fd)
            link.send({"digests": [f"{d:016x}" for d in merged]})
        else:
            _fds.close_all(fds)
        link.recv(timeout=60)  # "exit"
    except (PeerClosed, TimeoutError):
        pass
    finally:
        pager.close()
        os.close(uffd_fd)


def _merge_digests(pager: Pager, digest_fd: int) -> list[int]:
    """Region digests: ours for the pages we installed, the destination's for the rest."""
    try:
        total = sum(r.npages for r in pager.regions) * 8
        raw = os.pread(digest_fd, total, 0)
    finally:
        os.close(digest_fd)
    theirs = np.frombuffer(raw, np.uint64)
    out = []
    offset = 0
    for region in pager.regions:
        kept = theirs[offset : offset + region.npages]
        merged = np.where(region.initial, kept, region.digests)
        out.append(region_digest(merged))
        offset += region.npages
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    sock = socket.socket(fileno=int(args[0]))
    link = PagerLink(sock)
    try:
        run(link)
    except Exception:
        log.exception("the pager failed")
        with contextlib.suppress(Exception):
            link.send({"error": "the pager failed; see its log"})
        return 1
    finally:
        link.close()
    return 0
