"""The destination side of a migration: builds the guest from the stream and runs it.

It never resumes a guest whose pages it has not verified: with copies, every page's xxh3
digest is kept as pages arrive and the region digests must equal the source's at
switchover; with flip, each memfd must be the very one the source named (inode, size,
seals) and a sample of its pages must hash alike. After it resumed the guest it says so
(RESUMED): from then on the guest is ours. If the source then explicitly takes it back
(ABORT), we stop it; if the source merely goes away, it either committed or died, and the
guest keeps running here.
"""

from __future__ import annotations

import contextlib
import gc
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
from typing import Any

import numpy as np

from .. import features, stream
from .._sys import io, mm, uffd
from .._sys.fds import close_all
from .._sys.flags import Madv, Seal, UffdFeature, UffdRegister
from .._sys.mm import PAGE_SIZE
from ..dirty import Runs
from ..errors import (
    DigestMismatch,
    MigrationError,
    PageflipError,
    PeerAborted,
    PeerClosed,
    RemoteProtocolError,
)
from ..guests import Guest, guest_class
from ..memory import Memfd, Region
from ..transport import Address, Listener
from ._gil import responsive
from .digests import PageDigests, sample_digest
from .events import (
    DoneEvent,
    FailedEvent,
    MigrationEvent,
    PostcopyEvent,
    ResumedEvent,
    SetupEvent,
)
from .link import Link
from .pager import PagerLink
from .phases import DESTINATION_TRANSITIONS, DestinationPhase, PhaseMachine

log = logging.getLogger("pageflip.migration")


#: Seconds a flip destination polls for the source's switchover before sleeping.
FLIP_SPIN = 0.25


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
    Only for precopy: a postcopy destination must leave missing pages missing.
    """

    STEP = 32 << 20
    THREADS = 4

    def __init__(self, regions: list[Region]) -> None:
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
            for i in range(self.THREADS)
        ]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
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

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


class Destination:
    """Accept one migration on ``listen`` and run the guest it brings.

    ``listen``: an address to listen on (``/path``, ``@name``, ``tcp:host:port``) or a
    listener already bound. :meth:`run` returns the running guest once the source has let
    go of it.
    """

    def __init__(
        self,
        listen: str | Address | Listener,
        *,
        on_event: Callable[[MigrationEvent], None] | None = None,
        timeout: float | None = 60.0,
        accept_timeout: float | None = None,
    ) -> None:
        if isinstance(listen, (str, Address)):
            address = listen if isinstance(listen, Address) else Address.parse(listen)
            self._listener: Listener = address.listen()
            self._own_listener = True
        else:
            self._listener = listen
            self._own_listener = False
        self._on_event = on_event
        self.timeout = timeout
        self.accept_timeout = accept_timeout
        self._phases = PhaseMachine(DESTINATION_TRANSITIONS, DestinationPhase.LISTENING)
        self._link: Link | None = None
        self._regions: list[Region] = []
        self._digests: list[PageDigests] = []
        self._setup: stream.Setup | None = None
        self._guest: Guest | None = None
        self._start = 0.0
        self._pager: PagerLink | None = None
        self._prefault: Prefault | None = None
        self._gc_was_enabled = False
        self._hasher = Hasher()
        self._pager_proc: subprocess.Popen[bytes] | None = None
        self._uffd = -1
        self.done: dict[str, object] | None = None
        #: The pager's report after a postcopy (fault times, pages, digests).
        self.postcopy: dict[str, Any] | None = None

    @property
    def phase(self) -> DestinationPhase:
        return self._phases.phase

    @property
    def link(self) -> Link:
        assert self._link is not None
        return self._link

    def _t(self) -> float:
        return time.monotonic() - self._start

    def _emit(self, event: MigrationEvent) -> None:
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:
                log.exception("migration event handler failed")

    def close(self) -> None:
        """Stop listening (and remove the socket file). Idempotent."""
        if self._own_listener:
            self._listener.close()

    # -- the run --------------------------------------------------------------------------

    def run(self) -> Guest:
        """Receive one guest and run it; returns it once the source let go (or left)."""
        try:
            conn = self._listener.accept(self.accept_timeout)
        finally:
            self.close()
        self._start = time.monotonic()
        self._link = Link(conn)
        with responsive():
            try:
                self._phases.advance(DestinationPhase.SETUP)
                self._handshake()
                self._phases.advance(DestinationPhase.RECEIVING)
                switchover = self._receive()
                self._phases.advance(DestinationPhase.VERIFYING)
                guest = self._verify_and_resume(switchover)
            except BaseException as err:
                raise self._failed(err) from err
            self._after_resume(guest)
        return guest

    def _failed(self, err: BaseException) -> MigrationError:
        """Nothing ran here: drop what arrived, tell the source, report."""
        phase = self.phase.value
        if self._gc_was_enabled:
            gc.enable()
        self._stop_pager()
        self._stop_prefault()
        self._hasher.stop()
        for digests in self._digests:
            with contextlib.suppress(Exception):
                digests.release()
        for region in self._regions:
            with contextlib.suppress(Exception):
                region.close()  # flip regions borrow the source's pages: close never punches them
        self._regions = []
        if self._link is not None:
            if not isinstance(err, (PeerClosed, PeerAborted)):
                with contextlib.suppress(Exception):
                    self._link.send(stream.Abort(phase=phase, reason=str(err)), phase)
            self._link.close()
        with contextlib.suppress(Exception):
            self._phases.advance(DestinationPhase.FAILED)
        self._emit(
            FailedEvent(
                self._t(),
                phase=phase,
                error=str(err),
                error_type=type(err).__name__,
                guest="source",
            )
        )
        if isinstance(err, MigrationError):
            return err
        return MigrationError(
            f"incoming migration failed in phase {phase}: {type(err).__name__}: {err}",
            phase=phase,
            guest="source",
        )

    # -- setup ----------------------------------------------------------------------------

    def _our_features(self) -> stream.Feature:
        f = stream.Feature.XXH3 | stream.Feature.ZSTD
        if self.link.local:
            f |= stream.Feature.FLIP
            if features.has("process_vm_readv"):
                f |= stream.Feature.PULL
                if features.has("uffd_missing_shmem"):
                    # The pager serves faults with pages it pulls out of the source.
                    f |= stream.Feature.POSTCOPY
        return f

    def _handshake(self) -> None:
        link = self.link
        hello = link.expect((stream.Hello,), "setup", self.timeout)
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
        except PageflipError as err:
            with contextlib.suppress(Exception):
                link.send(stream.Reject(reason=str(err)), "setup")
            raise
        link.send(stream.Welcome(features=shared), "setup")
        setup = link.expect((stream.Setup,), "setup", self.timeout)
        self._setup = setup
        mode = stream.Mode(setup.mode)
        if mode is stream.Mode.POSTCOPY:
            if stream.Feature.POSTCOPY not in shared:
                raise MigrationError(
                    "postcopy needs userfaultfd here and the source on this host",
                    phase="setup",
                    guest="source",
                )
            self._start_pager()
        if mode is not stream.Mode.FLIP:
            if stream.Feature.PULL in shared and setup.src_pid != link.peer_pid():
                raise RemoteProtocolError(
                    f"SETUP names pid {setup.src_pid}, the socket's peer is {link.peer_pid()}",
                    frame="SETUP",
                )
            for info in setup.regions:
                region = Region.movable(info.size, info.name)
                self._regions.append(region)
                self._digests.append(
                    PageDigests(region.address, region.size // PAGE_SIZE, region.view())
                )
            if mode is stream.Mode.PRECOPY:
                self._prefault = Prefault(self._regions)
        link.send(stream.Prepared(), "setup")
        self._emit(
            SetupEvent(
                self._t(),
                mode=mode.name.lower(),
                transport="unix" if link.local else "tcp",
                regions=[
                    {"name": r.name, "size": r.size, "movable": r.movable} for r in setup.regions
                ],
                total_bytes=sum(r.size for r in setup.regions),
                features=[f.name for f in stream.Feature if f in shared and f.name],
                downtime_limit=0.0,
            )
        )

    # -- receiving ------------------------------------------------------------------------

    def _receive(self) -> stream.Switchover:
        link = self.link
        assert self._setup is not None
        # A flip's source pauses the guest right after our PREPARED: wait for its FLIP
        # and SWITCHOVER awake, so that waking up does not add to the downtime.
        spin = FLIP_SPIN if stream.Mode(self._setup.mode) is stream.Mode.FLIP else 0.0
        while True:
            event = link.recv("receiving", self.timeout, spin=spin)
            if isinstance(event, stream.PullPages):
                self._pull(event)
            elif isinstance(event, stream.Pages):
                self._write(event)
            elif isinstance(event, stream.ZeroPages):
                self._zero(event)
            elif isinstance(event, stream.DiscardPages):
                self._discard(event)
            elif isinstance(event, stream.RoundEnd):
                link.send(stream.RoundAck(event.round), "receiving")
            elif isinstance(event, stream.Flip):
                self._map_flip(event)
            elif isinstance(event, stream.Switchover):
                return event
            elif isinstance(event, stream.Abort):
                raise PeerAborted(
                    f"the source gave up in {event.phase}: {event.reason}",
                    phase=event.phase,
                    reason=event.reason,
                )
            else:
                raise RemoteProtocolError(
                    f"unexpected {type(event).__name__.upper()} while receiving",
                    frame=type(event).__name__.upper(),
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

    def _pull(self, event: stream.PullPages) -> None:
        region, digests = self._region(event.region)
        self._check_runs(region, event.runs)
        assert self._setup is not None
        src = self._setup.regions[event.region].src_address
        offsets = event.runs[:, 0].astype(np.uint64) * np.uint64(PAGE_SIZE)
        lengths = event.runs[:, 1].astype(np.uint64) * np.uint64(PAGE_SIZE)
        local = np.ascontiguousarray(np.stack([offsets + np.uint64(region.address), lengths], 1))
        remote = np.ascontiguousarray(np.stack([offsets + np.uint64(src), lengths], 1))
        try:
            io.pull_remote_parallel(self._setup.src_pid, local, remote)
        except ProcessLookupError as err:
            raise PeerClosed(f"the source process is gone: {err}", phase="receiving") from err
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
        _, digests = self._punch(event.region, event.runs)
        self._hasher.submit(digests, event.runs, zero=True)

    def _discard(self, event: stream.DiscardPages) -> None:
        """Postcopy: these pages changed after they were sent; drop ours (the pager fetches
        them again when they are touched or in its sweep)."""
        self._punch(event.region, event.runs)

    def _punch(self, index: int, runs: Runs) -> tuple[Region, PageDigests]:
        """Free the pages of ``runs`` in region ``index``: they read as zeros again."""
        region, digests = self._region(index)
        self._check_runs(region, runs)
        (extent,) = region.extents()
        assert extent.memfd is not None
        for first, count in runs.tolist():
            mm.punch_hole(extent.memfd.fd, extent.fd_offset + first * PAGE_SIZE, count * PAGE_SIZE)
        return region, digests

    # -- postcopy -------------------------------------------------------------------------

    def _start_pager(self) -> None:
        """Start the pager process now, so that it is ready long before the switchover."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._pager_proc = subprocess.Popen(
                [sys.executable, "-m", "pageflip._pager", str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
            )
        finally:
            theirs.close()
        self._pager = PagerLink(ours)
        message, fds = self._pager.recv(timeout=self.timeout)
        close_all(fds)
        if not message.get("ready"):
            raise MigrationError("the pager did not start", phase="setup", guest="source")

    def _stop_pager(self) -> None:
        pager, self._pager = self._pager, None
        proc, self._pager_proc = self._pager_proc, None
        if pager is not None:
            with contextlib.suppress(Exception):
                pager.send({"exit": True})
            pager.close()
        if proc is not None:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._uffd >= 0:
            os.close(self._uffd)
            self._uffd = -1

    def _hand_to_pager(self) -> None:
        """Register every region for missing-page faults and give the uffd to the pager."""
        assert self._pager is not None and self._setup is not None
        fd = uffd.userfaultfd()
        self._uffd = fd
        uffd.api(fd, UffdFeature.MISSING_SHMEM)
        memfds = []
        layout = []
        for region, info in zip(self._regions, self._setup.regions, strict=True):
            uffd.register(fd, region.address, region.size, UffdRegister.MISSING)
            (extent,) = region.extents()
            assert extent.memfd is not None
            memfds.append(extent.memfd.fd)
            layout.append(
                {
                    "guest_address": region.address,
                    "size": region.size,
                    "src_address": info.src_address,
                }
            )
        self._pager.send(
            {"start": {"src_pid": self._setup.src_pid, "regions": layout}}, [fd, *memfds]
        )

    def _postcopy_wait(self, guest: Guest) -> None:
        """Running: follow the pager until every page is here, then check every digest."""
        assert self._pager is not None
        link = self.link
        theirs: list[int] | None = None
        report: dict[str, Any] | None = None
        while theirs is None or report is None:
            pager_fd = self._pager.sock.fileno()
            # Messages already read into a buffer do not make a socket readable: look at
            # those first, and only then wait.
            waiting = self._pager.buffered() or link.decoder.buffered
            ready, _, _ = select.select(
                [link.conn.fileno(), pager_fd], [], [], 0 if waiting else 1.0
            )
            if pager_fd in ready or self._pager.buffered():
                message, fds = self._pager.recv()
                close_all(fds)
                if "progress" in message:
                    progress = message["progress"]
                    self._emit(
                        PostcopyEvent(
                            self._t(),
                            pushed_pages=int(progress["pushed"]),
                            requested_pages=int(progress["requested"]),
                            remaining_pages=int(progress["remaining"]),
                        )
                    )
                elif "complete" in message:
                    report = dict(message["complete"])
                elif "error" in message:
                    raise MigrationError(
                        f"the pager failed: {message['error']}", phase="postcopy", guest="lost"
                    )
            if link.conn.fileno() in ready or link.decoder.buffered:
                event = link.poll("postcopy")
                if isinstance(event, stream.PostcopyEnd):
                    theirs = list(event.digests)
                elif isinstance(event, stream.Abort):
                    raise PeerAborted(
                        f"the source gave up in {event.phase}: {event.reason}",
                        phase=event.phase,
                        reason=event.reason,
                    )
                elif event is not None:
                    raise RemoteProtocolError(
                        f"unexpected {type(event).__name__.upper()} in postcopy",
                        frame=type(event).__name__.upper(),
                    )
        ours = self._merged_digests()
        bad = [
            self._setup.regions[i].name  # type: ignore[union-attr]
            for i, (a, b) in enumerate(zip(ours, theirs, strict=True))
            if a != b
        ]
        self._stop_pager()
        report["digests"] = "mismatch in " + ", ".join(bad) if bad else "verified"
        link.send(stream.Verified(ok=not bad, message=json.dumps(report)), "postcopy")
        self.postcopy = report
        if bad:
            log.error("postcopy: pages of %s differ from the source's", ", ".join(bad))

    def _merged_digests(self) -> list[int]:
        """Our digests (pages that came in rounds) merged with the pager's (the rest)."""
        assert self._pager is not None
        memfd = mm.memfd_create("pageflip:digests")
        try:
            arrays = [d.digests for d in self._digests]
            os.pwrite(memfd, b"".join(a.tobytes() for a in arrays), 0)
            self._pager.send({"digests": True}, [memfd])
        finally:
            os.close(memfd)
        message, fds = self._pager.recv(timeout=self.timeout)
        close_all(fds)
        return [int(d, 16) for d in message["digests"]]

    def _map_flip(self, event: stream.Flip) -> None:
        assert self._setup is not None
        # The guest is paused from here until it resumes: no garbage collection meanwhile.
        self._gc_was_enabled = gc.isenabled()
        gc.disable()
        infos = self._setup.regions
        fds = list(event.fds)
        event.fds = []
        holders = [Memfd(fd, shared=True) for fd in fds]
        try:
            if sorted(r.index for r in event.regions) != list(range(len(infos))):
                raise RemoteProtocolError("FLIP does not name every region once", frame="FLIP")
            for fr in sorted(event.regions, key=lambda r: r.index):
                info = infos[fr.index]
                fd = holders[fr.fd_index].fd
                st = os.fstat(fd)
                try:
                    seals = mm.get_seals(fd)
                except OSError:
                    raise RemoteProtocolError(
                        f"fd of region {info.name!r} is not a memfd", frame="FLIP"
                    ) from None
                if not seals & Seal.SHRINK:
                    raise RemoteProtocolError(
                        f"memfd of region {info.name!r} is not sealed against shrinking",
                        frame="FLIP",
                    )
                if (
                    st.st_ino != fr.inode
                    or st.st_size < fr.offset + fr.size
                    or fr.size != info.size
                ):
                    raise RemoteProtocolError(
                        f"memfd of region {info.name!r} is not the one announced", frame="FLIP"
                    )
                # Not "shared": until the source lets go, both map the same range, and
                # closing ours (on failure) must leave the source's pages alone.
                own = Memfd(os.dup(fd))
                try:
                    region = Region.from_memfds([(own, fr.offset, fr.size)], info.name)
                except BaseException:
                    own.close()
                    raise
                self._regions.append(region)
            self._flip_samples = {fr.index: fr for fr in event.regions}
        finally:
            for holder in holders:
                holder.close()

    # -- switchover -----------------------------------------------------------------------

    def _settle(self) -> None:
        """Every page that arrived is hashed, and nothing allocates behind our back."""
        self._stop_prefault()
        self._hasher.drain()
        self._hasher.stop()

    def _stop_prefault(self) -> None:
        prefault, self._prefault = self._prefault, None
        if prefault is not None:
            prefault.stop()

    def _verify_and_resume(self, switchover: stream.Switchover) -> Guest:
        assert self._setup is not None
        gc_was_enabled = gc.isenabled() or self._gc_was_enabled
        gc.disable()
        try:
            return self._verify_and_resume_now(switchover)
        finally:
            if gc_was_enabled:
                gc.enable()

    def _verify_and_resume_now(self, switchover: stream.Switchover) -> Guest:
        assert self._setup is not None
        self._settle()
        if self._pager is not None and not switchover.digests:
            return self._resume_postcopy(switchover)
        if self._pager is not None:
            self._stop_pager()  # the precopy converged: no postcopy after all
        if len(switchover.digests) != len(self._regions):
            raise RemoteProtocolError(
                "SWITCHOVER digests do not match the regions", frame="SWITCHOVER"
            )
        flip = stream.Mode(self._setup.mode) is stream.Mode.FLIP
        for index, region in enumerate(self._regions):
            if flip:
                fr = self._flip_samples[index]
                view = region.view()
                try:
                    ours = sample_digest(view, region.size // PAGE_SIZE, seed=fr.inode)
                finally:
                    view.release()
            else:
                ours = self._digests[index].region_digest()
            if ours != switchover.digests[index]:
                raise DigestMismatch(
                    f"region {region.name!r}: our pages hash to {ours:#018x}, the source's to "
                    f"{switchover.digests[index]:#018x}",
                    phase="verifying",
                    guest="source",
                    region=region.name,
                )
        for digests in self._digests:
            digests.release()
        self._digests = []
        guest = self._guest_class.restore(list(self._regions), switchover.state)
        self._regions = []  # the guest owns them now
        resumed_at = guest.resume()
        self._guest = guest
        self._phases.advance(DestinationPhase.RUNNING)
        with contextlib.suppress(PageflipError, OSError):
            self.link.send(stream.Resumed(resumed_at=resumed_at), "resumed")
        self._emit(ResumedEvent(self._t(), downtime=resumed_at - switchover.paused_at))
        return guest

    def _resume_postcopy(self, switchover: stream.Switchover) -> Guest:
        """Run the guest now; the pager fills its missing pages as it touches them."""
        self._hand_to_pager()
        for digests in self._digests:
            digests.release()
        guest = self._guest_class.restore(list(self._regions), switchover.state)
        self._regions = []
        resumed_at = guest.resume()
        self._guest = guest
        self._phases.advance(DestinationPhase.POSTCOPY)
        self.link.send(stream.Resumed(resumed_at=resumed_at), "resumed")
        self._emit(ResumedEvent(self._t(), downtime=resumed_at - switchover.paused_at))
        return guest

    def _after_resume(self, guest: Guest) -> None:
        """Wait for the source to let go: DONE (normal), ABORT (it took the guest back)."""
        link = self.link
        if self.phase is DestinationPhase.POSTCOPY:
            try:
                self._postcopy_wait(guest)
            except BaseException:
                # The guest runs here on pages that may never come: nothing to take back.
                log.exception("postcopy failed after the guest resumed here")
                self._stop_pager()
                link.close()
                raise
            finally:
                self._digests = []
            self._phases.advance(DestinationPhase.RUNNING)
        try:
            event = link.recv("running", self.timeout)
        except (PeerClosed, OSError, PageflipError) as err:
            log.info("the source left after RESUMED (%s); the guest keeps running here", err)
            link.close()
            self._phases.advance(DestinationPhase.DONE)
            return
        link.close()
        if isinstance(event, stream.Abort):
            log.warning("the source took the guest back (%s): stopping it here", event.reason)
            with contextlib.suppress(Exception):
                guest.pause()
            guest.close()
            self._phases.advance(DestinationPhase.STOPPED)
            raise MigrationError(
                f"the source took the guest back after we resumed: {event.reason}",
                phase="running",
                guest="source",
            )
        if isinstance(event, stream.Done):
            self.done = dict(event.stats)
            stats = event.stats
            self._emit(
                DoneEvent(
                    self._t(),
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
                )
            )
        self._phases.advance(DestinationPhase.DONE)
