"""Processes the migration tests start: a source that hosts a workload, a destination.

Each reports through a multiprocessing queue. Fault injection happens inside the child, at
a named point, by really dying (SIGKILL), closing the socket, or corrupting what it sends.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import time
from multiprocessing.connection import Connection
from typing import Any

import pageflip as pf
from pageflip import stream
from pageflip._sys import huge, mm
from pageflip._sys.flags import Madv
from pageflip.channel import Endpoint as Link
from pageflip.guests import Workload
from pageflip.memory import Memfd
from pageflip.migration.destination import Destination
from pageflip.migration.source import MigrationOptions, Source


def mapped_memfds(pid: int | str = "self") -> list[str]:
    with open(f"/proc/{pid}/maps") as f:
        return [
            line.split()[-2] if "(deleted)" in line else line.split()[-1]
            for line in f
            if "/memfd:pageflip" in line
        ]


def region_pages(guest: Any) -> list[dict[str, Any]]:
    """Per region of a guest: what pageflip says its pages are, and what the kernel says
    (/proc/self/smaps: the page size of the mapping, and the bytes shmem maps in 2 MiB)."""
    fields: dict[int, dict[str, int]] = {}
    current: dict[str, int] | None = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(" ", 1)[0]
            if "-" in head and not line.rstrip().endswith(" kB") and ":" not in head:
                current = fields.setdefault(int(head.split("-")[0], 16), {})
            elif current is not None and line.rstrip().endswith(" kB"):
                name, value = line.split(":")
                current[name] = int(value.split()[0])
    out = []
    for region in guest.regions:
        kernel = fields.get(region.address, {})
        out.append(
            {
                "name": region.name,
                "page_size": region.page_size,
                "huge": region.huge,
                "kernel_page_kb": kernel.get("KernelPageSize"),
                "pmd_mapped_kb": kernel.get("ShmemPmdMapped"),
                "size_kb": region.size >> 10,
            }
        )
    return out


def take_free_huge_pages() -> pf.Region | None:
    """Another party takes every 2 MiB page the hugetlb pool can still give (the pages are
    touched: they are gone from the pool until the region is closed)."""
    free = huge.pool(huge.HUGE_2M).available
    if not free:
        return None
    return pf.Region.movable(free * huge.HUGE_2M, name="thief", huge="hugetlb", populate=True)


def frames_sample(guest: Any) -> list[int] | None:
    """PFNs of the first pages of each region (root only)."""
    if os.geteuid() != 0:
        return None
    out: list[int] = []
    for region in guest.regions:
        span = region[0 : min(max(16 * pf.PAGE_SIZE, region.page_size), region.size)]
        out.extend(int(x) for x in pf.physical_frames(span))
    return out


def await_hangup(link: Link) -> None:
    """Until the peer has closed its end of ``link`` (what it sent before may wait unread)."""
    poller = select.poll()
    poller.register(link.fileno(), select.POLLRDHUP)
    assert poller.poll(30_000), "the peer did not close"


def source(
    to: str,
    size: int,
    rate: int,
    options: dict[str, Any],
    results: Connection,
    fault: str = "",
) -> None:
    """Host a workload, migrate it to ``to``; on failure check it still runs here, intact."""
    guest = Workload.create(size, dirty_rate=rate, threads=2, huge=options.pop("huge", False))
    time.sleep(0.2)
    frames = frames_sample(guest)
    events: list[dict[str, Any]] = []
    migration = Source(
        guest, to, MigrationOptions(**options), on_event=lambda e: events.append(e.as_dict())
    )
    if fault == "cancel-after-round":

        def on_event(event: Any) -> None:
            events.append(event.as_dict())
            if event.kind == "round":
                migration.cancel()

        migration._on_event = on_event
    if fault == "corrupt-page-data":
        original = Link.send

        def corrupting(self: Link, event: Any, phase: str) -> int:
            if type(event).__name__ == "Pages" and not getattr(self, "_corrupted", False):
                data = bytearray(event.data)
                data[len(data) // 2] ^= 0xFF
                event.data = bytes(data)
                self._corrupted = True  # type: ignore[attr-defined]
            return original(self, event, phase)

        Link.send = corrupting  # type: ignore[method-assign]
    if fault == "kill-after-commit":
        sending = Link.send

        def dying(self: Link, event: Any, phase: str) -> int:
            sent = sending(self, event, phase)
            if type(event).__name__ == "Commit":
                os.kill(os.getpid(), signal.SIGKILL)
            return sent

        Link.send = dying  # type: ignore[method-assign]
    if fault == "warm-up-fails":

        def failing() -> None:
            raise OSError(5, "the warm-up broke")

        guest.about_to_pause = failing  # type: ignore[method-assign]
    if fault == "swap-memfd-after-lend":
        lending = Link.send

        def swapping(self: Link, event: Any, phase: str) -> int:
            sent = lending(self, event, phase)
            if type(event).__name__ == "Preview":
                # The heartbeat region, lent a moment ago, goes onto another memfd holding
                # the same bytes: the guest runs on, the destination maps the old file.
                region = guest.regions[2]
                fd = os.memfd_create("pageflip-swapped")
                os.ftruncate(fd, region.size)
                os.pwrite(fd, bytes(region.view()), 0)
                region.replace(0, Memfd(fd), 0, region.size)
            return sent

        Link.send = swapping  # type: ignore[method-assign]
    if fault == "preview-after-the-destination-left":
        # The destination refuses at the LEND and closes before our PREVIEW goes out (a
        # busy host's order of things, made certain): wait for its hangup, then send.
        previewing = Link.send

        def late(self: Link, event: Any, phase: str) -> int:
            if type(event).__name__ == "Preview":
                await_hangup(self)
            return previewing(self, event, phase)

        Link.send = late  # type: ignore[method-assign]
    if fault == "next-send-after-the-destination-left":
        # After its first PULL_PAGES the source's next frame goes out only once the
        # destination has hung up: a send that fails, with the destination's word unread.
        pulling = Link.send
        pulled = [False]

        def after_hangup(self: Link, event: Any, phase: str) -> int:
            if pulled[0]:
                await_hangup(self)
            pulled[0] = pulled[0] or type(event).__name__ == "PullPages"
            return pulling(self, event, phase)

        Link.send = after_hangup  # type: ignore[method-assign]
    stolen: list[pf.Region | None] = []
    theft: dict[str, int] = {}
    if fault == "take-the-pool-after-setup":
        # Once the destination said ACCEPTED (its regions made), every free huge page goes.
        def on_setup(event: Any) -> None:
            events.append(event.as_dict())
            if event.kind == "setup":
                stolen.append(take_free_huge_pages())
                theft["pages"] = stolen[0].size // huge.HUGE_2M if stolen[0] else 0
                theft["left"] = huge.pool(huge.HUGE_2M).available

        migration._on_event = on_setup
    if fault == "corrupt-frame-header":
        original_send = Link.send

        def garbling(self: Link, event: Any, phase: str) -> int:
            if type(event).__name__ == "RoundEnd":
                self.conn.send(b"XXXXXXXXXXXXXXXX", None, phase)
                return 16
            return original_send(self, event, phase)

        Link.send = garbling  # type: ignore[method-assign]
    try:
        done = migration.run()
    except pf.MigrationError as err:
        time.sleep(0.3)  # it keeps running here: more writes on top of the old ones
        writes = guest.total_writes
        time.sleep(0.2)
        report = guest.verify()
        results.send(
            {
                "ok": False,
                "error": str(err),
                "type": type(err).__name__,
                "phase": err.phase,
                "guest": err.guest,
                "verify": report.ok,
                "problems": report.problems,
                "still_writing": guest.total_writes > writes or rate == 0,
                "paused": guest.paused,
                "events": events,
            }
        )
        guest.close()
        return
    results.send(
        {
            "ok": True,
            "done": done.as_dict(),
            "events": events,
            "frames": frames,
            "memfds_left": mapped_memfds(),
            "theft": theft,
        }
    )
    for region in stolen:
        if region is not None:
            region.close()


def destination(listen: str, results: Connection, fault: str = "") -> None:
    """Receive one guest; check it; report. ``fault`` makes it fail at a named point."""
    from pageflip.migration import destination as dest_module

    events: list[dict[str, Any]] = []
    dest = Destination(listen, timeout=30, on_event=lambda e: events.append(e.as_dict()))
    if fault == "kill-at-setup":
        original_handshake = dest_module.Destination._handshake

        def die_in_handshake(self: Destination) -> None:
            os.kill(os.getpid(), signal.SIGKILL)

        dest_module.Destination._handshake = die_in_handshake  # type: ignore[method-assign]
        del original_handshake
    if fault in ("kill-mid-round", "close-mid-round", "fail-mid-round"):
        original_pull = dest_module.Destination._copy_in

        def fail_in_pull(self: Destination, event: Any) -> None:
            if fault == "kill-mid-round":
                os.kill(os.getpid(), signal.SIGKILL)
            if fault == "fail-mid-round":  # says ABORT, closes, reads nothing more
                raise pf.PageflipError("the pages could not land (on purpose)")
            self.link.conn.close()
            raise pf.PeerClosed("closed on purpose", phase="receiving")

        dest_module.Destination._copy_in = fail_in_pull  # type: ignore[method-assign]
        del original_pull
    if fault == "without-huge":
        # A destination from before the HUGE feature: it makes 4 KiB pages whatever the
        # source's are.
        offered = dest_module.Destination._our_features

        def old_features(self: Destination) -> Any:
            return offered(self) & ~stream.Feature.HUGE

        dest_module.Destination._our_features = old_features  # type: ignore[method-assign]
    if fault == "fail-at-the-lend":

        def no_thread(self: Destination, event: Any) -> None:
            for fd in event.fds:
                os.close(fd)
            raise pf.PageflipError("can't start new thread (a pids limit, on purpose)")

        dest_module.Destination._take_lend = no_thread  # type: ignore[method-assign]
    if fault == "collapse-busy-twice":
        # The running guest holds a page as MADV_COLLAPSE looks at it (EAGAIN, which a
        # writer thread makes now and then): twice, then the kernel's own answer.
        advise = mm.madvise
        busy = [2]

        def held(addr: int, length: int, advice: Any) -> None:
            if advice == Madv.COLLAPSE and busy[0]:
                busy[0] -= 1
                raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))
            advise(addr, length, advice)

        mm.madvise = held  # type: ignore[assignment]
    thief: list[pf.Region | None] = []
    if fault == "take-the-pool-after-a-punch":
        # The moment a huge page is punched out (stale pages dropped at a postcopy's
        # switchover), another party takes every free huge page, the punched one too.
        punch = mm.punch_hole

        def punch_and_steal(fd: int, offset: int, length: int) -> None:
            punch(fd, offset, length)
            if not thief and os.fstat(fd).st_blksize > pf.PAGE_SIZE:
                thief.append(take_free_huge_pages())

        mm.punch_hole = punch_and_steal  # type: ignore[assignment]
    if fault == "kill-at-switchover":

        def die_at_switchover(self: Destination, switchover: Any) -> Any:
            os.kill(os.getpid(), signal.SIGKILL)

        dest_module.Destination._verify_and_prepare = die_at_switchover  # type: ignore[method-assign]
    try:
        guest = dest.run()
    except pf.MigrationError as err:
        results.send(
            {
                "ok": False,
                "error": str(err),
                "type": type(err).__name__,
                "phase": err.phase,
                "stolen": [r.size if r else 0 for r in thief],
            }
        )
        for region in thief:
            if region is not None:
                region.close()
        return
    time.sleep(0.3)
    report = guest.verify()
    results.send(
        {
            "ok": True,
            "verify": report.ok,
            "problems": report.problems,
            "status": guest.status(),
            "frames": frames_sample(guest),
            "done": dest.done,
            "pager_exits": dest.pager_exits,
            "postcopy": dest.postcopy,
            "pages": region_pages(guest),
            "events": events,
        }
    )
    guest.close()
