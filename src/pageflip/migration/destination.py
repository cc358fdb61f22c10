"""The destination side of a migration: builds the guest from the stream and runs it.

It never resumes a guest whose pages it has not verified: with copies, every page's xxh3
digest is kept as pages arrive and the region digests must equal the source's at
switchover; with flip, each memfd must pass :func:`~pageflip.channel.check_peer_memfd` as the
very one the source named (device, inode, seals, size). Everything that can fail happens
before it answers PREPARED (the commit point is drawn in :mod:`.phases`): room for the guest
(memory, fds, the huge pages its regions sit on) is checked at SETUP and its regions are
made on the source's kind of pages, the guest is restored paused, the caller's ``prepare``
runs, a postcopy's pager takes the memory. Then it resumes the guest only on COMMIT.

After the commit point a postcopy guest is kept whatever the source does: its pager pulls
the missing pages without the source's connection, a broken connection may be taken up
again (RECOVER), and a guest whose every page arrived finishes on its own, saying whether
the final digest check could run. If pages can no longer come (the source died), the guest
is stopped: the missing pages are marked, never left to read as zeros.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import queue
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .. import features, stream
from .._sys import mm, uffd
from .._sys.fds import close_all
from .._sys.flags import Madv, UffdFeature, UffdRegister
from .._sys.mm import PAGE_SIZE
from ..channel import Endpoint, ProcessWatch, check_same_memfds, map_peer_memfds, pull_from
from ..errors import (
    DigestMismatch,
    GuestLost,
    MigrationError,
    PageflipError,
    PeerAborted,
    PeerClosed,
    PeerRejected,
    PeerTimeout,
    RemoteProtocolError,
)
from ..guests import Guest, guest_class, guest_kinds
from ..memory import Region
from ..runs import Runs, cut_runs, widen_runs
from ..transport import Address, Connection, Listener, TcpAuth
from . import room
from ._gil import responsive
from .codec import frame_name, open_link
from .digests import PageDigests, region_digest
from .engine import Side
from .events import (
    DoneEvent,
    FailedEvent,
    MigrationEvent,
    PostcopyEvent,
    RecoveringEvent,
    ResumedEvent,
    SetupEvent,
)
from .pager import (
    Ledger,
    fault_unit,
    held_pages,
    open_pager_link,
    postcopy_problem,
    recv_note,
    send_note,
)
from .phases import DESTINATION_TRANSITIONS, DestinationPhase

log = logging.getLogger("pageflip.migration")


#: Seconds a flip destination polls for the source's switchover before sleeping.
FLIP_SPIN = 0.25
#: Seconds to wait for the guest's own figure of its pause after resuming it.
GUEST_PAUSE_WAIT = 0.5
#: Seconds a source whose connection closed has to count as exited (a process being killed
#: closes its sockets before its exit shows) before we take it for alive.
SOURCE_EXIT_GRACE = 1.0
#: New pagers started when one dies or hangs after the commit point, before giving up.
PAGER_RESTARTS = 3
#: Environment variables that size the thread pools of numpy's BLAS.
_BLAS_THREADS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
#: Seconds of silence after which a pager that has pages to bring counts as hung.
PAGER_SILENCE = 5.0
#: Seconds between the postcopy progress frames sent to the source.
PROGRESS_EVERY = 0.25
#: Tries of MADV_COLLAPSE per THP region after postcopy (it fails with EAGAIN while the
#: running guest holds a page), and the seconds between them.
COLLAPSE_TRIES = 50
COLLAPSE_PAUSE = 0.01
#: Zeros to write over the parts of transparent huge pages a ZERO run cuts.
_ZEROS = memoryview(bytes(2 << 20))


class Hasher:
    """Hash arrived pages on a thread of its own, in arrival order, while the next pull runs.

    The pulls (process_vm_readv) run without the GIL, the hashing with it: on two CPUs the
    two overlap. Jobs run first in, first out, so a page's last digest is always of its
    last copy. :meth:`drain` waits until every job is done (before digests are compared).
    """

    def __init__(self) -> None:
        self._jobs: queue.Queue[tuple[PageDigests, Runs, bool] | None] = queue.Queue(maxsize=64)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, digests: PageDigests, runs: Runs, zero: bool = False) -> None:
        if self._error is not None:
            raise self._error
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="pageflip-hasher", daemon=True)
            self._thread.start()
        self._jobs.put((digests, runs, zero))

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            digests, runs, zero = job
            try:
                if self._error is None:
                    if zero:
                        digests.set_zero(runs)
                    else:
                        digests.update(runs)
            except BaseException as err:  # handed to the receiving thread by drain()
                self._error = err
            finally:
                self._jobs.task_done()
        self._jobs.task_done()

    def drain(self) -> None:
        """Wait for every submitted page to be hashed; raise what hashing raised."""
        if self._thread is not None:
            self._jobs.join()
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._jobs.put(None)
            thread.join()


class Prefault:
    """Allocate the pages of fresh regions ahead of the copy, on threads of their own.

    A copy into pages that do not exist yet allocates them one fault at a time, inside the
    copy; MADV_POPULATE_WRITE allocates them in bulk, while the copy runs. On this kind of
    VM first touches wait on the host more than they use the CPU, so several threads go
    faster even on two CPUs: 4 GiB populated in 1.2-1.7 s with four threads, 4-6 s with one.
    Only for memory that may be filled: a precopy's, or a flip's lent memory (there it fills
    our page tables, the pages are the source's; ``idle``: at the idle scheduling class, so
    that the guest still running on the source wins the CPU at once). A postcopy destination
    must leave missing pages missing.
    """

    STEP = 32 << 20
    THREADS = 4

    def __init__(self, regions: list[Region], threads: int = THREADS, idle: bool = False) -> None:
        self._idle = idle
        self._steps = iter(
            [
                (r.address + offset, min(self.STEP, r.size - offset))
                for r in regions
                for offset in range(0, r.size, self.STEP)
            ]
        )
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, name=f"pageflip-prefault-{i}", daemon=True)
            for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        if self._idle:  # this thread only
            with contextlib.suppress(OSError):
                os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        while not self._stop.is_set():
            with self._lock:
                step = next(self._steps, None)
            if step is None:
                return
            try:
                mm.madvise(step[0], step[1], Madv.POPULATE_WRITE)
            except OSError as err:  # an old kernel (before 5.14) or no memory: copy anyway
                log.debug("prefault stopped: %s", err)
                return

    def join(self) -> None:
        """Wait until every step is done (or the first error stopped it)."""
        for thread in self._threads:
            thread.join()

    def stop(self) -> None:
        self._stop.set()
        self.join()


class Destination(Side[DestinationPhase]):
    """Accept one migration on ``listen`` and run the guest it brings.

    ``listen``: an address to listen on (``/path``, ``@name``, ``tcp:host:port``) or a
    listener already bound (then it stays the caller's, and can serve further attempts).
    ``prepare(guest)`` runs once the guest is restored, paused, before PREPARED: anything
    the caller must set up for it that can fail (a control socket, say) belongs there, so
    that its failure leaves the guest on the source. ``timeout`` bounds every wait for the
    source; ``accept_timeout`` the wait for it to connect. ``on_resumed(guest)`` is told at
    once when the guest runs here (it must not fail: to serve it, say). ``auth`` says how TCP peers
    must authenticate (see :class:`~pageflip.transport.TcpAuth`; a listener given here
    brings its own).

    :meth:`run` returns the running guest once the migration is over (for postcopy, once
    every page arrived); :attr:`guest` is the guest as soon as it runs here.
    """

    side = "destination"

    def __init__(
        self,
        listen: str | Address | Listener,
        *,
        on_event: Callable[[MigrationEvent], None] | None = None,
        timeout: float | None = 60.0,
        accept_timeout: float | None = None,
        prepare: Callable[[Guest], None] | None = None,
        on_resumed: Callable[[Guest], None] | None = None,
        auth: TcpAuth | None = None,
    ) -> None:
        super().__init__(
            DESTINATION_TRANSITIONS,
            DestinationPhase.LISTENING,
            DestinationPhase.FAILED,
            on_event,
            "incoming migration",
        )
        if isinstance(listen, (str, Address)):
            address = listen if isinstance(listen, Address) else Address.parse(listen)
            self._listener: Listener = address.listen(auth=auth)
            self._own_listener = True
        else:
            self._listener = listen
            self._own_listener = False
        self.timeout = timeout
        self.accept_timeout = accept_timeout
        self._prepare = prepare
        self._on_resumed = on_resumed
        # One-time costs now, not while a source waits: the kernel features this side
        # offers (each probed once per process) and each guest kind's first use.
        for name in ("process_vm_readv", "uffd_missing_shmem"):
            features.has(name)
        for kind in guest_kinds():
            guest_class(kind).warm_up()
        self._session = b""
        self._regions: list[Region] = []
        self._setup: stream.Setup | None = None
        self._guest_class: type[Guest] | None = None
        self._guest: Guest | None = None
        self._pager: Endpoint | None = None
        self._pager_proc: subprocess.Popen[bytes] | None = None
        self.pager_exits: list[int] = []  # each pager's exit status (negative: a signal)
        #: Why the pager replaced a worker of its own, each time (see migration.pager).
        self.pager_restarts: list[str] = []
        self._pager_starts = 0
        self._prefault: Prefault | None = None
        self._hasher = Hasher()
        self._uffd = -1
        #: Per region, the pages present when the pager took over (hashed by us).
        self._initial: list[npt.NDArray[np.bool_]] = []
        self._remaining: int | None = None
        self._kept_digests: list[npt.NDArray[np.uint64]] = []
        #: Postcopy: what the pagers installed, shared with them (see pager.Ledger).
        self._ledger: Ledger | None = None
        self._ledger_fd = -1
        self._downtime = 0.0
        self._pause: float | None = None
        #: Our pause budget, as the resumed event tells it (see _destination_steps).
        self._resumed_steps: list[dict[str, Any]] = []
        self.done: dict[str, object] | None = None
        #: The pager's report after a postcopy (fault times, pages, digests).
        self.postcopy: dict[str, Any] | None = None

    @property
    def guest(self) -> Guest | None:
        """The guest, once it runs here (None before the commit point and after a failure
        before it)."""
        return self._guest if self.phase not in _NOT_RUNNING else None

    @property
    def postcopy_remaining(self) -> int | None:
        """Postcopy: pages still at the source (None outside postcopy)."""
        return self._remaining if self.phase is DestinationPhase.POSTCOPY else None

    @property
    def address(self) -> str:
        """Where it listens, with the port really bound for ``tcp:HOST:0``."""
        return self._listener.path

    def _accept(self) -> Connection:
        """The source's connection; peers refused (wrong uid, failed authentication) are
        logged and the wait goes on, within ``accept_timeout``."""
        deadline = None if self.accept_timeout is None else time.monotonic() + self.accept_timeout
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"nobody connected to {self.address} in {self.accept_timeout} s")
            try:
                return self._listener.accept(left)
            except PeerRejected as err:
                log.warning("%s", err)

    def close(self) -> None:
        """Stop listening (and remove the socket file) if the listener is ours. Idempotent."""
        if self._own_listener:
            self._listener.close()

    # -- the run --------------------------------------------------------------------------

    def run(self) -> Guest:
        """Receive one guest and run it; returns it once the migration is over.

        Before the commit point a failure raises MigrationError and nothing ran here (the
        guest runs on the source). After it, a postcopy whose missing pages can no longer
        come raises GuestLost: the guest is stopped, its missing pages marked, never zeros.
        """
        try:
            conn = self._accept()
            self._start = time.monotonic()
            self._link = open_link(conn)
            if self._link.local:
                self._peer = ProcessWatch.of(self._link.peer_pid())
            with responsive():
                try:
                    self._phases.advance(DestinationPhase.SETUP)
                    self._handshake()
                    self._phases.advance(DestinationPhase.RECEIVING)
                    switchover = self._receive()
                    self._phases.advance(DestinationPhase.VERIFYING)
                    guest = self._verify_and_prepare(switchover)
                    self._phases.advance(DestinationPhase.PREPARED)
                    self.link.send(stream.Prepared(), "prepared")
                    self._step("PREPARED sent")
                    committed = self._await_commit()
                    self._step("COMMIT read")
                    self._resume(guest, switchover, committed)
                except BaseException as err:
                    raise self._failed(err) from err
                if self.phase is DestinationPhase.POSTCOPY:
                    self._postcopy(guest)
                self._await_done()
            return guest
        finally:
            self._drop_peer()
            self.close()

    def _undo(self, err: BaseException, phase: str) -> None:
        """Before the guest ran here: drop what arrived, then tell the source (ABORT),
        unless it told us or went away."""
        self._gc.resume()
        self._stop_prefault()
        self._hasher.stop()
        self._stop_pager()
        self._release_digests()
        guest, self._guest = self._guest, None
        if guest is not None:
            with contextlib.suppress(Exception):
                guest.close()  # flip regions borrow the source's pages: close never punches
        for region in self._regions:
            with contextlib.suppress(Exception):
                region.close()
        self._regions = []
        self._abort_link(err, phase, tell=not isinstance(err, (PeerClosed, PeerAborted)))

    # -- setup ----------------------------------------------------------------------------

    def _our_features(self) -> stream.Feature:
        f = stream.Feature.XXH3 | stream.Feature.ZSTD | stream.Feature.HUGE
        if self.link.local:
            f |= stream.Feature.FLIP | stream.Feature.LEND | stream.Feature.AHEAD
            if features.has("process_vm_readv"):
                f |= stream.Feature.PULL
                if features.has("uffd_missing_shmem"):
                    # The pager serves faults with pages it pulls out of the source.
                    f |= stream.Feature.POSTCOPY
        return f

    def _welcome(self, hello: stream.Hello) -> stream.Feature:
        """Answer a HELLO: WELCOME with the shared features, or REJECT and raise."""
        ours = stream.Hello(
            version=stream.VERSION,
            page_size=PAGE_SIZE,
            features=self._our_features(),
            role=stream.Role.DESTINATION,
            session=hello.session,
            guest_kind=hello.guest_kind,
        )
        try:
            shared = stream.handshake_check(ours, hello)
            self._guest_class = guest_class(hello.guest_kind)
            self._guest_class.migration_coming()
        except PageflipError as err:
            with contextlib.suppress(Exception):
                self.link.send(stream.Reject(reason=str(err)), "setup")
            raise
        self.link.send(stream.Welcome(features=shared), "setup")
        return shared

    def _refuse(self, reason: str) -> MigrationError:
        with contextlib.suppress(Exception):
            self.link.send(stream.Reject(reason=reason), "setup")
        return MigrationError(f"refused the migration: {reason}", phase="setup", guest="source")

    def _handshake(self) -> None:
        link = self.link
        hello = link.expect((stream.Hello,), "setup", min(self.timeout or 5.0, 5.0))
        self._session = hello.session
        shared = self._welcome(hello)
        setup = link.expect((stream.Setup,), "setup", self.timeout)
        self._setup = setup
        mode = stream.Mode(setup.mode)
        total = sum(r.size for r in setup.regions)
        kinds = [(stream.PageKind(r.pages), r.size) for r in setup.regions]
        if stream.Feature.HUGE not in shared and any(k for k, _ in kinds):
            raise RemoteProtocolError(
                "SETUP announces huge pages, but the HUGE feature is not shared", frame="SETUP"
            )
        why = postcopy_problem(mode, setup.regions)
        if why is not None:
            raise self._refuse(why)
        copies = mode is not stream.Mode.FLIP
        # Memory on hugetlb pages comes from the pools, not from what MemAvailable counts.
        pooled = (stream.PageKind.HUGETLB, stream.PageKind.HUGETLB_1G)
        ordinary = sum(size for kind, size in kinds if kind not in pooled)
        why = room.shortfall(ordinary if copies else 0, 2 * len(setup.regions))
        if why is not None:
            raise self._refuse(f"no room for a guest of {total} bytes here: {why}")
        why = room.huge_pages_shortfall(kinds) if copies else None
        if why is not None:
            raise self._refuse(f"cannot make the guest's memory on its pages here: {why}")
        pulls = mode is not stream.Mode.FLIP and stream.Feature.PULL in shared
        if pulls and setup.src_pid != link.peer_pid():
            raise RemoteProtocolError(
                f"SETUP names pid {setup.src_pid}, the socket's peer is {link.peer_pid()}",
                frame="SETUP",
            )
        postcopy = mode in (stream.Mode.POSTCOPY, stream.Mode.PRECOPY_POSTCOPY)
        if postcopy:
            if stream.Feature.POSTCOPY not in shared:
                raise self._refuse("postcopy needs userfaultfd here and the source on this host")
            self._start_pager()
        if mode is stream.Mode.FLIP and stream.Feature.LEND in shared:
            self._take_lend(link.expect((stream.Lend,), "setup", self.timeout))
            if stream.Feature.AHEAD in shared:
                self._restore_ahead(link.expect((stream.Preview,), "setup", self.timeout))
        if copies:
            for info in setup.regions:
                # The pages the source's region sits on (4 KiB unless HUGE is shared): a
                # hugetlb region reserves all its pages from the pool here, so that no later
                # touch can fail (memory.py); FeatureUnavailable if the pool emptied since
                # the check above.
                huge = stream.PageKind(info.pages).huge
                region = Region.movable(info.size, info.name, huge=huge)
                self._regions.append(region)
                self._digests.append(
                    PageDigests(region.address, region.size // PAGE_SIZE, region.view())
                )
            if mode is stream.Mode.PRECOPY:
                self._prefault = Prefault(self._regions)
            elif mode is stream.Mode.POSTCOPY:  # no rounds: the memory goes to the pager now
                self._hand_to_pager(self._regions, [d.digests for d in self._digests], go=False)
        # Told before ACCEPTED: a flip's source pauses the guest as soon as it has it, and
        # an observer of ours (a display) must not take a CPU from the pause.
        self._emit(
            SetupEvent(
                self._t(),
                mode=_MODE_NAMES[mode],
                transport="unix" if link.local else "tcp",
                regions=[
                    {
                        "name": r.name,
                        "size": r.size,
                        "movable": r.movable,
                        "pages": stream.PageKind(r.pages).describe(),
                    }
                    for r in setup.regions
                ],
                total_bytes=total,
                features=[f.name for f in stream.Feature if f in shared and f.name],
                downtime_limit=0.0,
            )
        )
        link.send(stream.Accepted(), "setup")

    # -- receiving ------------------------------------------------------------------------

    def _receive(self) -> stream.Switchover:
        link = self.link
        assert self._setup is not None
        # A flip's source pauses the guest right after our ACCEPTED: wait for its FLIP
        # and SWITCHOVER awake, so that waking up does not add to the downtime.
        spin = FLIP_SPIN if stream.Mode(self._setup.mode) is stream.Mode.FLIP else 0.0
        while True:
            event = link.recv("receiving", self.timeout, spin=spin)
            if isinstance(event, stream.PullPages):
                self._copy_in(event)
            elif isinstance(event, stream.Pages):
                self._write(event)
            elif isinstance(event, stream.ZeroPages):
                self._zero(event)
            elif isinstance(event, stream.DiscardPages):
                self._discard(event)
            elif isinstance(event, stream.RoundEnd):
                link.send(stream.RoundAck(event.round), "receiving")
            elif isinstance(event, stream.Flip):
                self._take_flip(event)
                self._step("FLIP checked")
            elif isinstance(event, stream.Switchover):
                self._step("SWITCHOVER read")
                return event
            elif isinstance(event, stream.Abort):
                raise PeerAborted(
                    f"the source gave up in {event.phase}: {event.reason}",
                    phase=event.phase,
                    reason=event.reason,
                )
            else:
                raise RemoteProtocolError(
                    f"unexpected {frame_name(event)} while receiving",
                    frame=frame_name(event),
                )

    def _region(self, index: int) -> tuple[Region, PageDigests]:
        if not 0 <= index < len(self._regions):
            raise RemoteProtocolError(f"region {index} does not exist", frame="PAGES")
        return self._regions[index], self._digests[index]

    def _check_runs(self, region: Region, runs: np.ndarray) -> None:
        npages = region.size // PAGE_SIZE
        if len(runs) and int((runs[:, 0] + runs[:, 1]).max()) > npages:
            raise RemoteProtocolError(
                f"pages past the end of region {region.name!r} ({npages} pages)", frame="PAGES"
            )

    def _copy_in(self, event: stream.PullPages) -> None:
        """PULL_PAGES: copy these pages out of the source process (the channel's peer read)."""
        region, digests = self._region(event.region)
        self._check_runs(region, event.runs)
        assert self._setup is not None
        src = self._setup.regions[event.region].src_address
        offsets = event.runs[:, 0].astype(np.uint64) * np.uint64(PAGE_SIZE)
        lengths = event.runs[:, 1].astype(np.uint64) * np.uint64(PAGE_SIZE)
        local = np.ascontiguousarray(np.stack([offsets + np.uint64(region.address), lengths], 1))
        remote = np.ascontiguousarray(np.stack([offsets + np.uint64(src), lengths], 1))
        pull_from(self._setup.src_pid, local, remote, phase="receiving")
        self._hasher.submit(digests, event.runs)

    def _write(self, event: stream.Pages) -> None:
        region, digests = self._region(event.region)
        self._check_runs(region, event.runs)
        data = memoryview(event.data)
        view = digests.view
        pos = 0
        for first, count in event.runs.tolist():
            n = count * PAGE_SIZE
            view[first * PAGE_SIZE : first * PAGE_SIZE + n] = data[pos : pos + n]
            pos += n
        self._hasher.submit(digests, event.runs)

    def _zero(self, event: stream.ZeroPages) -> None:
        region, digests = self._region(event.region)
        self._check_runs(region, event.runs)
        if region.huge == "thp":
            # Punching part of a transparent huge page splits it into 4 KiB pages: only the
            # whole ones go, the rest is written over with zeros.
            whole, parts = cut_runs(event.runs, region.page_size // PAGE_SIZE)
            self._punch(region, whole)
            view = digests.view
            for first, count in parts.tolist():
                view[first * PAGE_SIZE : (first + count) * PAGE_SIZE] = _ZEROS[: count * PAGE_SIZE]
        else:
            self._punch(region, event.runs)  # hugetlb: the kernel zeroes what cuts a page
        self._hasher.submit(digests, event.runs, zero=True)

    def _discard(self, event: stream.DiscardPages) -> None:
        """Postcopy: these pages changed after they were sent; drop ours (the pager fetches
        them again when they are touched or in its sweep).

        The hasher must be done with them first: reading a hole of a memfd allocates a zero
        page there, which would then count as present, so that the pager never fetched the
        page and the guest read zeros (the final digest check caught it). A hugetlb page is
        missing only as a whole: the stale pages' huge pages are dropped whole (the paused
        source gives them again, the same bytes)."""
        self._hasher.drain()
        region, _ = self._region(event.region)
        self._check_runs(region, event.runs)
        unit = fault_unit(region.page_size, region.huge) // PAGE_SIZE
        self._punch(region, widen_runs(event.runs, unit, region.size // PAGE_SIZE))

    @staticmethod
    def _punch(region: Region, runs: Runs) -> None:
        """Free the pages of ``runs`` in ``region``: they read as zeros again (a hugetlb
        region's freed pages are reserved again at once: see Memfd.punch)."""
        (extent,) = region.extents()
        assert extent.memfd is not None
        for first, count in runs.tolist():
            extent.memfd.punch(extent.fd_offset + first * PAGE_SIZE, count * PAGE_SIZE)

    def _take_lend(self, event: stream.Lend) -> None:
        """LEND: map the source's memfds now, while the guest still runs there, fill our
        page tables for them (a guest that writes through a mapping whose page tables are
        empty pays a fault per page, for seconds after the resume) and let the guest kind
        prepare its memory. Nothing is written to them: until COMMIT they are the source's."""
        self._regions = self._map_flip(event, "LEND")
        # Seconds of work for a large guest, on CPUs that the running guest needs too: one
        # thread of the idle scheduling class, which yields to any other thread at once.
        Prefault(self._regions, threads=1, idle=True).join()
        assert self._guest_class is not None
        self._guest_class.prepare_regions(self._regions)

    def _restore_ahead(self, event: stream.Preview) -> None:
        """PREVIEW (AHEAD): restore the guest now, paused, from the state it had a moment
        ago, and start its threads (parked): in the pause only what changed is loaded
        (:meth:`Guest.finish_restore`). An empty preview: this kind has none, the guest is
        restored in the pause as without AHEAD."""
        if not event.state:
            return
        assert self._guest_class is not None
        guest = self._guest_class.restore_ahead(list(self._regions), event.state)
        self._guest, self._regions = guest, []  # the guest owns them now

    def _take_flip(self, event: stream.Flip) -> None:
        """The source's memfds become the guest's regions here (checked and mapped by the
        channel's rules for a peer's memory); after a LEND, FLIP must name the very memfds
        that were lent, which are mapped already."""
        # The guest is paused from here until it resumes: no garbage collection meanwhile.
        self._gc.pause()
        lent = self._guest.regions if self._guest is not None else self._regions
        if not lent:
            self._regions = self._map_flip(event, "FLIP")
            return
        fds, event.fds = list(event.fds), []
        try:
            by_index = {fr.index: fr for fr in event.regions}
            if sorted(by_index) != list(range(len(lent))) or any(
                fr.size != lent[fr.index].size for fr in event.regions
            ):
                raise RemoteProtocolError(
                    "FLIP names other memfds than the LEND before it", frame="FLIP"
                )
            named = [(by_index[i].fd_index, by_index[i].inode) for i in range(len(by_index))]
            check_same_memfds(fds, named, lent, frame="FLIP")
        finally:
            close_all(fds)

    def _map_flip(self, event: stream.Flip, frame: str) -> list[Region]:
        """Check and map the memfds of a FLIP or LEND as the guest's regions."""
        assert self._setup is not None
        infos = self._setup.regions
        fds, event.fds = list(event.fds), []
        regions: list[Region] = []
        try:
            if sorted(r.index for r in event.regions) != list(range(len(infos))):
                raise RemoteProtocolError(f"{frame} does not name every region once", frame=frame)
            for fr in sorted(event.regions, key=lambda r: r.index):
                info = infos[fr.index]
                if fr.size != info.size:
                    raise RemoteProtocolError(
                        f"{frame} gives region {info.name!r} {fr.size} bytes, the setup "
                        f"announced {info.size}",
                        frame=frame,
                    )
                # Not "shared": until the source lets go, both map the same range, and
                # closing ours (on failure) must leave the source's pages alone.
                region = map_peer_memfds(
                    fds,
                    [(fr.fd_index, fr.offset, fr.size)],
                    info.name,
                    frame=frame,
                    what=[f"memfd of region {info.name!r}"],
                    inodes=[fr.inode],
                    shared=False,
                )
                regions.append(region)
        except BaseException:
            for region in regions:
                region.close()
            raise
        finally:
            close_all(fds)
        return regions

    # -- switchover: everything that can fail, then PREPARED -----------------------------

    def _settle(self) -> None:
        """Every page that arrived is hashed, and nothing allocates behind our back."""
        self._stop_prefault()
        self._hasher.drain()
        self._hasher.stop()

    def _stop_prefault(self) -> None:
        prefault, self._prefault = self._prefault, None
        if prefault is not None:
            prefault.stop()

    def _verify_and_prepare(self, switchover: stream.Switchover) -> Guest:
        """Check the pages, restore the guest (paused), get everything ready to resume it."""
        assert self._setup is not None and self._guest_class is not None
        self._gc.pause()
        self._settle()
        self._step("pages settled")
        postcopy = self._pager is not None and not switchover.digests
        if self._pager is not None and not postcopy:
            self._stop_pager()  # the precopy converged: no postcopy after all
        if not postcopy:
            self._check_digests(switchover)
            self._step("digests checked")
        for digests in self._digests:
            digests.release()
        digests_kept = [d.digests for d in self._digests]
        self._digests = []
        if self._guest is not None:  # restored ahead (PREVIEW), its threads parked
            guest = self._guest
            guest.finish_restore(switchover.state)
            self._step("state restored")
        else:
            guest = self._guest_class.restore(list(self._regions), switchover.state)
            self._regions = []  # the guest owns them now
            self._guest = guest
            self._step("state restored")
            guest.prepare_resume()
            self._step("guest prepared")
        if postcopy and self._uffd >= 0:  # handed over at SETUP: the source is paused now
            assert self._pager is not None
            send_note(self._pager, {"go": True})
        elif postcopy:
            self._hand_to_pager(guest.regions, digests_kept, go=True)
        if self._prepare is not None:
            self._prepare(guest)
        return guest

    def _check_digests(self, switchover: stream.Switchover) -> None:
        """Copies: every region's digest must be the source's. (A flip's memfds were checked
        by identity as they came: they are the very files the source maps.)"""
        if stream.Mode(self._setup.mode) is stream.Mode.FLIP:  # type: ignore[union-attr]
            return
        if len(switchover.digests) != len(self._regions):
            raise RemoteProtocolError(
                "SWITCHOVER digests do not match the regions", frame="SWITCHOVER"
            )
        for index, region in enumerate(self._regions):
            ours = self._digests[index].region_digest()
            if ours != switchover.digests[index]:
                raise DigestMismatch(
                    f"region {region.name!r}: our pages hash to {ours:#018x}, the source's to "
                    f"{switchover.digests[index]:#018x}",
                    phase="verifying",
                    guest="source",
                    region=region.name,
                )

    def _await_commit(self) -> bool:
        """PREPARED went: wait for COMMIT. Returns True on COMMIT; False when the source
        died without a word, leaving us the only complete copy (then we take it over)."""
        try:
            self.link.expect((stream.Commit,), "prepared", self.timeout, FLIP_SPIN)
            return True
        except PeerClosed as err:
            if self._peer is None or self._peer.alive(grace=SOURCE_EXIT_GRACE):
                raise  # it may have resumed the guest itself: ours is not the guest
            # A source resumes its copy only after saying ABORT: one that died without a
            # word never ran the guest after its pause. What we hold is the guest.
            if self._pager is not None and not self._pager_complete():
                raise MigrationError(
                    "the source died before the commit point with pages still missing here",
                    phase="prepared",
                    guest="lost",
                ) from err
            log.warning("the source died after SWITCHOVER, before COMMIT: taking the guest over")
            return False

    def _pager_complete(self) -> bool:
        """Postcopy before COMMIT, the source dead: wait for the pager's verdict."""
        assert self._pager is not None
        deadline = time.monotonic() + (self.timeout or 60.0)
        while time.monotonic() < deadline:
            message = self._pager_message(max(deadline - time.monotonic(), 0.001))
            if message is None:
                return False
            if "complete" in message:
                self.postcopy = dict(message["complete"])
                return True
            if "lost" in message or "error" in message:
                return False
        return False

    def _resume(self, guest: Guest, switchover: stream.Switchover, committed: bool) -> None:
        """After COMMIT: resume the guest. If that fails before it ran, say so (ABORT): the
        source still holds it and takes it back."""
        try:
            resumed_at = guest.resume()
            self._step("resumed", resumed_at)
        except BaseException as err:
            raise MigrationError(
                f"resuming the guest failed, before it ran here: {type(err).__name__}: {err}",
                phase="prepared",
                guest="source",
            ) from err
        finally:
            self._gc.resume()
        postcopy = self._uffd >= 0
        self._phases.advance(DestinationPhase.POSTCOPY if postcopy else DestinationPhase.RUNNING)
        if self._on_resumed is not None:
            try:
                self._on_resumed(guest)
            except Exception:  # the guest runs here now, whatever an observer does
                log.exception("on_resumed failed")
        downtime = resumed_at - switchover.paused_at
        if committed:
            with contextlib.suppress(PageflipError, OSError):
                self.link.send(stream.Resumed(resumed_at=resumed_at), "resumed")
        try:  # from here on nothing may fail: the guest runs here
            pause = guest.observed_pause(GUEST_PAUSE_WAIT)
        except Exception:
            log.exception("the guest could not say how long it was paused")
            pause = None
        if committed:
            with contextlib.suppress(PageflipError, OSError):
                self.link.send(stream.GuestPause(pause), "resumed")
        else:
            self.link.close()
        self._downtime, self._pause = downtime, pause
        self._resumed_steps = self._destination_steps(switchover)
        t = resumed_at - self._start  # told after the guest's figure came: dated by resume
        self._emit(
            ResumedEvent(
                t,
                downtime=downtime,
                guest_pause=pause,
                at=resumed_at,
                pause_steps=self._resumed_steps,
            )
        )

    def _destination_steps(self, switchover: stream.Switchover) -> list[dict[str, Any]]:
        """Our pause budget: after the source's pause on one host (the same clock); over
        TCP (another host's clock), after we read SWITCHOVER."""
        if self.link.local:
            return self._pause_steps(switchover.paused_at)
        read = next((at for name, at in self._steps if name == "SWITCHOVER read"), 0.0)
        return self._pause_steps(read)

    def _await_done(self) -> None:
        """The guest runs here: wait (bounded) for the source's DONE with its figures. A late
        POSTCOPY_END (from a source that was stalled) is passed over: we answered already.
        Without the source's DONE (it left, or stayed silent), the report is our own."""
        link = self.link
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        stats: dict[str, Any] | None = None
        while not link.closed:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.001)
            try:
                event = link.recv("running", left)
            except (PageflipError, OSError) as err:
                log.info("the source left after RESUMED (%s); the guest keeps running here", err)
                break
            if isinstance(event, stream.Done):
                stats = self.done = dict(event.stats)
                break
        link.close()
        self._emit(self._done_event(stats))
        if self.phase is DestinationPhase.POSTCOPY:
            self._phases.advance(DestinationPhase.RUNNING)
        self._phases.advance(DestinationPhase.DONE)

    def _done_event(self, stats: dict[str, Any] | None) -> DoneEvent:
        """The report: the source's figures, with what we checked ourselves."""
        assert self._setup is not None
        mode = stream.Mode(self._setup.mode)
        if self.postcopy is not None:
            digest = str(self.postcopy.get("digests", "verified"))
        else:
            digest = "identity" if mode is stream.Mode.FLIP else "verified"
        if stats is None:
            stats = {
                "mode": "postcopy" if self.postcopy is not None else _MODE_NAMES[mode],
                "total_seconds": self._t(),
                "downtime": self._downtime,
                "details": {"source": "left before its DONE: these are the destination's figures"},
            }
        steps = self._resumed_steps
        if self.link.local:  # the source's steps are on our clock: one budget
            steps = sorted([*stats.get("pause_steps", []), *steps], key=lambda s: s["at"])
        return _done_event(
            self._t(),
            {**stats, "digest": digest, "guest_pause": self._pause, "pause_steps": steps},
        )

    # -- postcopy -------------------------------------------------------------------------

    def _start_pager(self) -> None:
        """Start a pager process; it answers once its threads run (a pids limit shows here)."""
        self._pager_starts += 1
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._pager_proc = subprocess.Popen(
                [sys.executable, "-m", "pageflip._pager", str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                # The pager does no linear algebra: no BLAS thread pools (one thread each
                # per CPU otherwise), so that its own threads are all it needs.
                env={**os.environ, **dict.fromkeys(_BLAS_THREADS, "1")},
            )
        except OSError as err:
            ours.close()
            raise MigrationError(
                f"the postcopy pager could not start: {err}", phase=self.phase.value, guest="source"
            ) from err
        finally:
            theirs.close()
        self._pager = open_pager_link(ours)
        message = self._pager_message(self.timeout)
        if message is None or not message.get("ready"):
            why = _pager_silence(message, self.timeout)
            raise MigrationError(
                f"the postcopy pager did not start: {why}",
                phase=self.phase.value,
                guest="source",
            )

    def _pager_message(self, timeout: float | None) -> dict[str, Any] | None:
        """The pager's next message (its fds closed): {} if none came within ``timeout``
        seconds, None if the pager went away."""
        assert self._pager is not None
        try:
            message, fds = recv_note(self._pager, timeout)
        except PeerTimeout:
            return {}
        except (PeerClosed, RemoteProtocolError, OSError):
            return None
        close_all(fds)
        return message

    def _stop_pager(self, *, keep_uffd: bool = False) -> None:
        pager, self._pager = self._pager, None
        proc, self._pager_proc = self._pager_proc, None
        if pager is not None:
            with contextlib.suppress(Exception):
                send_note(pager, {"exit": True})
            pager.close()
        if proc is not None:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            self.pager_exits.append(proc.returncode)
            if proc.returncode != 0:
                log.warning("the postcopy pager exited with status %s", proc.returncode)
        if self._uffd >= 0 and not keep_uffd:
            os.close(self._uffd)
            self._uffd = -1
            self._close_ledger()

    def _hand_to_pager(
        self, regions: list[Region], digests: list[npt.NDArray[np.uint64]], *, go: bool
    ) -> None:
        """Register the guest's memory for missing-page faults and give it to the pager,
        which starts pulling at once (``go``) or on the word "go" (a pure postcopy hands its
        memory over at SETUP, before the source pauses, and says go at the switchover)."""
        assert self._pager is not None
        # A guest's own loads and stores are all a user-mode-only uffd must serve (what a
        # normal user gets on a stock kernel); a syscall into a page not there yet would
        # fail with EFAULT instead of waiting (see _sys/uffd.py). A guest whose memory is
        # touched from inside the kernel (a VM: KVM faults the pages in) needs more.
        kernel_faults = self._guest_class is not None and self._guest_class.kernel_faults
        fd, way = uffd.open_userfaultfd(user_mode_ok=not kernel_faults)
        self._uffd = fd
        if not way.kernel_faults:
            log.info("postcopy: userfaultfd for user-mode faults only (%s=0)", uffd.SYSCTL)
        wanted = UffdFeature.MISSING_SHMEM
        if any(r.huge == "hugetlb" for r in regions):
            wanted |= UffdFeature.MISSING_HUGETLBFS  # installed in whole huge pages
        uffd.api(fd, wanted)
        self._kept_digests = digests
        self._initial = []
        self._ledger_fd = mm.memfd_create("pageflip:postcopy-ledger")
        self._ledger = Ledger(self._ledger_fd, [r.size // PAGE_SIZE for r in regions])
        for region in regions:
            uffd.register(fd, region.address, region.size, UffdRegister.MISSING)
            (extent,) = region.extents()
            assert extent.memfd is not None
            unit = fault_unit(region.page_size, region.huge)
            self._initial.append(
                held_pages(
                    extent.memfd.fd,
                    region.size // PAGE_SIZE,
                    extent.fd_offset,
                    unit=unit,
                    address=region.address,
                )
            )
        self._send_start(regions, go=go)

    def _send_start(self, regions: list[Region], *, go: bool = True) -> None:
        """Give the uffd and the memory to the (new) pager; wait until it took them."""
        assert self._pager is not None and self._setup is not None
        memfds = []
        layout = []
        for region, info in zip(regions, self._setup.regions, strict=True):
            (extent,) = region.extents()
            assert extent.memfd is not None
            memfds.append(extent.memfd.fd)
            layout.append(
                {
                    "guest_address": region.address,
                    "size": region.size,
                    "src_address": info.src_address,
                    "fd_offset": extent.fd_offset,
                    "fault_unit": fault_unit(region.page_size, region.huge),
                }
            )
        send_note(
            self._pager,
            {
                "start": {
                    "src_pid": self._setup.src_pid,
                    "guest_pid": os.getpid(),
                    "regions": layout,
                    "go": go,
                }
            },
            [self._uffd, self._ledger_fd, *memfds],
        )
        message = self._pager_message(self.timeout)
        if message is None or "started" not in message:
            why = _pager_silence(message, self.timeout)
            raise MigrationError(
                f"the postcopy pager did not take the guest's memory: {why}",
                phase=self.phase.value,
                guest="source",
            )

    def _restart_pager(self, guest: Guest, why: str) -> None:
        """The pager died or hung after the commit point: a new one takes the same uffd."""
        log.error("postcopy pager: %s; starting a new one", why)
        if self._pager_proc is not None and self._pager_proc.poll() is None:
            self._pager_proc.kill()  # hung: it would not hear "exit"
        self._stop_pager(keep_uffd=True)
        if self._pager_starts > PAGER_RESTARTS:
            raise self._lost(guest, f"the postcopy pager failed {self._pager_starts} times: {why}")
        try:
            self._start_pager()
            self._send_start(guest.regions)
        except (PageflipError, OSError) as err:
            raise self._lost(guest, f"the postcopy pager failed ({why}) and {err}") from err

    def _postcopy(self, guest: Guest) -> None:
        """Running: follow the pager until every page is here, then check the digests.

        The source's connection may break meanwhile: a local pager needs none to pull pages,
        so we go on, and take the source back if it reconnects (RECOVER) within the timeout.
        A guest whose every page arrived is kept whatever the source does afterwards.
        """
        st = _Followed(report=self.postcopy, silent_since=time.monotonic())
        while st.report is None or not self._postcopy_over(st):
            link = None if self._link is None or self._link.closed else self._link
            ready = self._wait_postcopy(link)
            pager = self._pager
            if pager is not None and (pager.pending or pager.fileno() in ready):
                st.pager_heard = time.monotonic()
                self._from_pager(guest, st, link)
            elif st.report is None and time.monotonic() - st.pager_heard > PAGER_SILENCE:
                self._restart_pager(guest, f"it said nothing for {PAGER_SILENCE:g} s (hung?)")
                st.pager_heard = time.monotonic()
            if link is not None and (link.pending or link.fileno() in ready):
                self._from_source(st, link)
            elif link is None and self._listener.fileno() in ready and self._take_recovery():
                st.lost_link_at = None
                st.silent_since = time.monotonic()
        self._finish_postcopy(guest, st.report, st.theirs)

    def _wait_postcopy(self, link: Endpoint | None) -> set[int]:
        """Wait (a quarter second at most) for the pager, the source, or a reconnection."""
        fds = [self._pager.fileno()] if self._pager is not None else []
        if link is not None:
            fds.append(link.fileno())
        elif not self._listener.closed:
            fds.append(self._listener.fileno())
        buffered = (self._pager is not None and self._pager.pending) or (
            link is not None and link.pending
        )
        ready, _, _ = select.select(fds, [], [], 0 if buffered else 0.25)
        return set(ready)

    def _from_pager(self, guest: Guest, st: _Followed, link: Endpoint | None) -> None:
        message = self._pager_message(0)
        if message is None:
            self._restart_pager(guest, "it went away")
        elif not message:
            return  # only part of a message is in
        elif "progress" in message:
            progress = message["progress"]
            self._remaining = int(progress["remaining"])
            pushed, requested = int(progress["pushed"]), int(progress["requested"])
            self._emit(PostcopyEvent(self._t(), pushed, requested, self._remaining))
            now = time.monotonic()
            if link is not None and now - st.last_forward >= PROGRESS_EVERY:
                st.last_forward = now
                with contextlib.suppress(PageflipError, OSError):
                    link.send(
                        stream.PostcopyProgress(self._remaining, pushed, requested), "postcopy"
                    )
        elif "complete" in message:
            st.report = dict(message["complete"])
            self._remaining = 0
            st.silent_since = time.monotonic()
        elif "lost" in message:
            raise self._lost(guest, str(message["lost"]))
        elif "error" in message:
            self._restart_pager(guest, f"it failed: {message['error']}")
        elif "restarted" in message:
            self.pager_restarts.append(str(message["restarted"]))
            log.warning("postcopy pager: %s", message["restarted"])

    def _from_source(self, st: _Followed, link: Endpoint) -> None:
        try:
            event = link.poll("postcopy")
        except (PeerClosed, RemoteProtocolError, OSError) as err:
            st.lost_link_at = self._link_lost(err)
            return
        if isinstance(event, stream.PostcopyEnd):
            st.theirs = list(event.digests)
            st.silent_since = time.monotonic()
        elif isinstance(event, stream.Abort):
            st.lost_link_at = self._link_lost(
                PeerAborted(f"the source gave up after the commit point: {event.reason}")
            )
        elif event is not None:
            st.lost_link_at = self._link_lost(
                RemoteProtocolError(
                    f"unexpected {frame_name(event)} in postcopy",
                    frame=frame_name(event),
                )
            )

    def _postcopy_over(self, st: _Followed) -> bool:
        """Every page is here: whether to stop waiting for the source's digests now."""
        if st.theirs is not None:
            return True
        now = time.monotonic()
        if self._link is None or self._link.closed:
            # The connection broke: wait for a live source to come back.
            if st.lost_link_at is None or not self._source_alive():
                return True
            waited = now - st.lost_link_at
        else:
            waited = now - st.silent_since
        if self.timeout is None or waited <= self.timeout:
            return False
        log.warning(
            "postcopy: every page is here but the source sent no digests for %g s: "
            "finishing without the final check",
            self.timeout,
        )
        return True

    def _source_alive(self) -> bool:
        return self._peer is None or self._peer.alive(grace=SOURCE_EXIT_GRACE)

    def _link_lost(self, err: BaseException) -> float:
        """The source's connection broke after the commit point: go on without it."""
        if self._link is not None:
            self._link.close()
        alive = self._source_alive()
        log.warning(
            "postcopy: the source's connection broke (%s); %s",
            err,
            "it lives: waiting for it to come back (pageflip migrate --resume)"
            if alive
            else "the source process is gone",
        )
        self._emit(RecoveringEvent(self._t(), reason=str(err), timeout=self.timeout))
        return time.monotonic()

    def _take_recovery(self) -> bool:
        """A connection while the source's was broken: take it if it continues our session."""
        try:
            conn = self._listener.accept(1.0)
        except (PageflipError, OSError) as err:
            log.warning("postcopy: refused a connection: %s", err)
            return False
        link = open_link(conn)
        self._link = link
        try:
            hello = link.expect((stream.Hello,), "recovering", 5.0)
            if hello.session != self._session:
                link.send(
                    stream.Reject(reason="busy: this destination is finishing a postcopy"),
                    "recovering",
                )
                raise RemoteProtocolError("a HELLO from another session", frame="HELLO")
            self._welcome(hello)
            link.expect((stream.Recover,), "recovering", 5.0)
            link.send(stream.Accepted(), "recovering")
        except (PageflipError, OSError) as err:
            log.warning("postcopy: a connection that did not recover the migration: %s", err)
            link.close()
            return False
        log.warning("postcopy: the source came back")
        return True

    def _finish_postcopy(
        self, guest: Guest, report: dict[str, Any] | None, theirs: list[int] | None
    ) -> None:
        """Every page is here: check the digests where the source sent them; report."""
        assert report is not None and self._setup is not None
        if theirs is not None:
            ours = self._merged_digests(guest)
            bad = [
                self._setup.regions[i].name
                for i, (a, b) in enumerate(zip(ours, theirs, strict=True))
                if a != b
            ]
            report["digests"] = "mismatch in " + ", ".join(bad) if bad else "verified"
        else:
            bad = []
            report["digests"] = "unchecked: the source did not send its digests"
        self._stop_pager()
        self.postcopy = report
        if self._link is not None and not self._link.closed:
            with contextlib.suppress(PageflipError, OSError):
                self._link.send(stream.Verified(ok=not bad, message=json.dumps(report)), "postcopy")
        if bad:
            raise self._lost(guest, f"after postcopy the pages of {', '.join(bad)} differ")
        if theirs is None:
            log.warning("postcopy complete; the final check could not run (no digests)")
        self._collapse_thp(guest, report)

    @staticmethod
    def _collapse_thp(guest: Guest, report: dict[str, Any]) -> None:
        """After postcopy, put regions on transparent huge pages back on them.

        UFFDIO_COPY into shmem makes 4 KiB pages, whatever its length (kernel.md, "Huge
        pages"): the pager left such a region on small pages. With every page in and the
        uffd closed, MADV_COLLAPSE makes 2 MiB pages of them again, copying each one
        (about 1.8 ms per 2 MiB here), while the guest runs. A kernel that cannot leaves
        the region on 4 KiB pages, which works the same, and says so in the log."""
        thp = [r for r in guest.regions if r.huge == "thp"]
        if not thp:
            return
        started = time.monotonic()
        retries = 0
        for region in thp:
            for attempt in range(COLLAPSE_TRIES):
                try:
                    mm.madvise(region.address, region.size, Madv.COLLAPSE)
                    break
                except OSError as err:
                    # EAGAIN: a page the running guest held at that moment (a transient
                    # reference, a page off its LRU list). The kernel says to try again;
                    # the pages made huge already are skipped at once.
                    if err.errno == errno.EAGAIN and attempt + 1 < COLLAPSE_TRIES:
                        retries += 1
                        time.sleep(COLLAPSE_PAUSE)
                        continue
                    log.warning(
                        "region %r stays partly on 4 KiB pages after postcopy: %s",
                        region.name,
                        err,
                    )
                    break
        report["thp_collapse_seconds"] = time.monotonic() - started
        report["thp_collapse_retries"] = retries

    def _merged_digests(self, guest: Guest) -> list[int]:
        """Region digests: ours for the pages that came in rounds, the pagers' (from the
        ledger) for the rest."""
        assert self._ledger is not None
        out = []
        for index, initial in enumerate(self._initial):
            digests, installed = self._ledger.region(index)
            unknown = int(np.count_nonzero(~initial & (installed == 0)))
            if unknown:
                raise self._lost(guest, f"{unknown} pages of region {index} have no digest")
            merged = np.where(initial, self._kept_digests[index], digests)
            out.append(region_digest(merged))
            del digests, installed
        return out

    def _close_ledger(self) -> None:
        ledger, self._ledger = self._ledger, None
        if ledger is not None:
            ledger.close()
        if self._ledger_fd >= 0:
            os.close(self._ledger_fd)
            self._ledger_fd = -1

    def _lost(self, guest: Guest, why: str) -> GuestLost:
        """After the commit point the guest cannot be completed here: stop it, for good.

        The pager fills the pages that never came with a marker (never zeros), so that no
        thread of the guest stays blocked on them; then the guest is stopped and its threads
        joined. Only then is the uffd closed: closing it earlier would let a missing page
        read as zeros. Its memory stays mapped until the guest is closed, for inspection.
        """
        self._phases.advance(DestinationPhase.LOST)
        log.error("postcopy: the guest is lost: %s", why)
        self._emit(
            FailedEvent(
                self._t(),
                phase="postcopy",
                error=f"the guest is lost: {why}",
                error_type="GuestLost",
                guest="lost",
            )
        )
        marked = self._pager is not None
        if marked:  # no page is missing any more: every thread can reach its pause
            with contextlib.suppress(Exception):
                guest.pause()
        else:  # pages may be missing with nobody to mark them: never close the uffd
            threading.Thread(target=guest.pause, name="pageflip-stop-lost", daemon=True).start()
        self._stop_pager(keep_uffd=not marked)
        if self._link is not None:
            self._link.close()
        return GuestLost(
            f"postcopy could not complete: {why}; the guest was stopped",
            phase="postcopy",
            guest="lost",
        )


def _pager_silence(message: dict[str, Any] | None, timeout: float | None) -> str:
    """Why the pager did not say what we waited for."""
    if message is None:
        return "it exited (its log is on this process's stderr)"
    if not message:
        return f"it said nothing for {timeout:g} s" if timeout else "it said nothing"
    return str(message.get("error", f"it said {message!r}"))


#: What each SETUP mode is called in events.
_MODE_NAMES = {
    stream.Mode.FLIP: "flip",
    stream.Mode.PRECOPY: "precopy",
    stream.Mode.POSTCOPY: "postcopy",
    stream.Mode.PRECOPY_POSTCOPY: "precopy",
}


@dataclass
class _Followed:
    """What a postcopy destination has seen so far (see Destination._postcopy)."""

    #: The pager's report once every page is in.
    report: dict[str, Any] | None
    #: When the source last said something that matters (its digests, our last wait).
    silent_since: float
    #: The source's region digests (POSTCOPY_END), once they came.
    theirs: list[int] | None = None
    #: When the source's connection broke (None while it holds).
    lost_link_at: float | None = None
    #: When the last progress frame went to the source.
    last_forward: float = 0.0
    #: When the pager last said something (it reports progress ten times a second).
    pager_heard: float = dataclasses.field(default_factory=time.monotonic)


_NOT_RUNNING = frozenset(
    {
        DestinationPhase.LISTENING,
        DestinationPhase.SETUP,
        DestinationPhase.RECEIVING,
        DestinationPhase.VERIFYING,
        DestinationPhase.PREPARED,
        DestinationPhase.FAILED,
    }
)


def _done_event(t: float, stats: dict[str, Any]) -> DoneEvent:
    """The source's DONE figures as our own event."""
    return DoneEvent(
        t,
        mode=str(stats.get("mode", "")),
        total_seconds=float(stats.get("total_seconds", 0.0)),
        downtime=float(stats.get("downtime", 0.0)),
        bytes_on_wire=int(stats.get("bytes_on_wire", 0)),
        pages_moved=int(stats.get("pages_moved", 0)),
        pages_copied=int(stats.get("pages_copied", 0)),
        pages_zero=int(stats.get("pages_zero", 0)),
        pages_requested=int(stats.get("pages_requested", 0)),
        rounds=int(stats.get("rounds", 0)),
        digest=str(stats.get("digest", "")),
        details=dict(stats.get("details", {})),
        guest_pause=stats.get("guest_pause"),
        regions=list(stats.get("regions", [])),
        pause_steps=list(stats.get("pause_steps", [])),
    )
