"""The source side of a migration: runs in the process that owns the guest.

flip
    pause, hand every region's memfd to the destination, ship the small state; the
    destination maps the very same pages and resumes. Nothing is copied, so the downtime
    does not depend on the memory size.
precopy
    rounds of pages while the guest runs (all pages, then those written during the previous
    round, found by :class:`~pageflip.dirty.DirtyTracker`); once what is left would take
    less than the downtime limit at the bandwidth just measured, pause and send the rest.
    Locally the destination pulls the pages straight out of our memory (process_vm_readv);
    over TCP they travel as bytes (optionally zstd). Zero pages travel as markers.
postcopy
    switch over early: the destination resumes at once and a pager process there fetches
    each missing page on first touch while we push the rest in the background.

Until the destination confirms it runs the guest (RESUMED), any failure resumes the guest
here, with all its data, and raises :class:`~pageflip.errors.MigrationError` naming the
phase. After that point the source releases its memory (flip: unmaps it; the destination
holds the only mapping) and reports the figures in a :class:`~.events.DoneEvent`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .. import features, stream
from .._sys import io
from .._sys.mm import PAGE_SIZE
from .._sys.procfs import sysctl
from ..dirty import DirtyTracker, Runs, pages_to_runs, runs_pages, runs_to_pages
from ..errors import DigestMismatch, MigrationError, PageflipError, SpanError
from ..guests import Guest
from ..memory import Region
from ..transport import Address
from ._gil import responsive
from .digests import PageDigests, gc_paused, sample_digest
from .events import (
    DoneEvent,
    FailedEvent,
    MigrationEvent,
    PostcopyEvent,
    ProgressEvent,
    ResumedEvent,
    RoundEvent,
    SetupEvent,
    SwitchoverEvent,
)
from .link import Link
from .phases import SOURCE_TRANSITIONS, PhaseMachine, SourcePhase

log = logging.getLogger("pageflip.migration")

MODES = ("auto", "flip", "precopy", "postcopy")

#: Pages per PULL or PAGES frame (32 MiB; a PAGES frame must stay under 64 MiB).
CHUNK_PAGES = (32 << 20) // PAGE_SIZE
#: A postcopy switchover asks the destination to drop stale pages range by range (each a
#: syscall inside the downtime); stale pages this close are dropped as one range.
DISCARD_MERGE_GAP = 16


@dataclass
class MigrationOptions:
    """How to migrate. Sizes in bytes, times in seconds."""

    #: "auto" (flip when local and every region is movable, else precopy), "flip",
    #: "precopy" or "postcopy".
    mode: str = "auto"
    #: The longest pause precopy may cause (QEMU's default). It switches over once the
    #: expected downtime is at most ``SWITCHOVER_HEADROOM`` of it: the estimate's error stays
    #: inside the limit.
    downtime_limit: float = 0.3
    #: Cap on the page rate, bytes per second (None: as fast as it goes).
    max_bandwidth: float | None = None
    #: After this many precopy rounds without converging: see ``on_no_convergence``.
    max_rounds: int = 30
    #: "force" (switch over anyway, whatever the downtime) or "postcopy".
    on_no_convergence: str = "force"
    #: Precopy rounds before postcopy takes over (postcopy mode; 0: switch over at once,
    #: which keeps the downtime smallest: nothing sent twice, nothing to drop).
    postcopy_after_rounds: int = 0
    #: zstd level for page data over TCP (None: raw).
    compress: int | None = None
    #: Seconds to wait for the destination at each step (None: forever).
    timeout: float | None = 60.0
    #: Locally, let the destination pull pages with process_vm_readv (else bytes on the socket).
    pull: bool = True
    #: Seconds between progress events.
    progress_interval: float = 0.1

    def check(self) -> None:
        if self.mode not in MODES:
            raise SpanError(f"mode must be one of {MODES}, not {self.mode!r}")
        if self.on_no_convergence not in ("force", "postcopy"):
            raise SpanError("on_no_convergence must be 'force' or 'postcopy'")
        if self.downtime_limit <= 0:
            raise SpanError(f"the downtime limit must be positive, not {self.downtime_limit}")
        if self.max_bandwidth is not None and self.max_bandwidth <= 0:
            raise SpanError(f"max_bandwidth must be positive, not {self.max_bandwidth}")
        if self.max_rounds < 1:
            raise SpanError(f"max_rounds must be at least 1, not {self.max_rounds}")


def _flippable(region: Region) -> str | None:
    """Why a region cannot be handed over whole (None: it can)."""
    extents = region.extents()
    if len(extents) != 1 or extents[0].memfd is None or extents[0].gone:
        return f"region {region.name!r} is not one memfd mapping"
    return None


@dataclass
class _Round:
    pages: int = 0
    zero_pages: int = 0
    bytes: int = 0


class Source:
    """Migrate ``guest`` to the destination at ``to`` (see the module docstring).

    ``on_event`` receives every :class:`~.events.MigrationEvent` (from the migrating thread).
    """

    def __init__(
        self,
        guest: Guest,
        to: str | Address,
        options: MigrationOptions | None = None,
        on_event: Callable[[MigrationEvent], None] | None = None,
    ) -> None:
        self.guest = guest
        self.address = to if isinstance(to, Address) else Address.parse(to)
        self.options = options or MigrationOptions()
        self.options.check()
        self._on_event = on_event
        self._phases = PhaseMachine(SOURCE_TRANSITIONS, SourcePhase.IDLE)
        self._cancel = threading.Event()
        self._link: Link | None = None
        self._start = 0.0
        self._paused_at: float | None = None
        self._mode = ""
        self._features = stream.Feature(0)
        self._rounds = 0
        self._pages_copied = 0
        self._pages_zero = 0
        self._pages_moved = 0
        self._pages_requested = 0
        self._digest_kind = "verified"
        self._ptracer = False
        self._committed = False
        self._committed_at: float | None = None
        self._postcopy = False
        self._digests: list[PageDigests] = []
        self._sent: list[npt.NDArray[np.bool_]] = []
        self._details: dict[str, Any] = {}

    @property
    def phase(self) -> SourcePhase:
        return self._phases.phase

    def cancel(self) -> None:
        """Give up before the commit point: the guest keeps running here."""
        self._cancel.set()

    # -- the run --------------------------------------------------------------------------

    def run(self) -> DoneEvent:
        """Migrate; returns the final report. On failure the guest runs here again."""
        self._start = time.monotonic()
        with responsive():
            try:
                self._phases.advance(SourcePhase.SETUP)
                self._connect()
                mode = self._negotiate()
                if mode == "flip":
                    resumed_at = self._flip()
                else:
                    resumed_at = self._precopy(postcopy=mode == "postcopy")
            except BaseException as err:
                raise self._failed(err) from err
            return self._finish(resumed_at)

    def _emit(self, event: MigrationEvent) -> None:
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:  # an observer's bug must not break a migration
                log.exception("migration event handler failed")

    def _t(self) -> float:
        return time.monotonic() - self._start

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise MigrationError(
                f"cancelled in phase {self.phase.value}", phase=self.phase.value, guest="source"
            )

    @property
    def link(self) -> Link:
        assert self._link is not None
        return self._link

    # -- setup ----------------------------------------------------------------------------

    def _connect(self) -> None:
        conn = self.address.connect(self.options.timeout)
        self._link = Link(conn, compress=self.options.compress)

    def _our_features(self) -> stream.Feature:
        f = stream.Feature.XXH3
        if self.options.compress is not None:
            f |= stream.Feature.ZSTD
        if self.address.local:
            if all(_flippable(r) is None for r in self.guest.regions):
                f |= stream.Feature.FLIP
            if self.options.pull and features.has("process_vm_readv"):
                # The destination's pager reads our memory: postcopy needs the pull.
                f |= stream.Feature.PULL | stream.Feature.POSTCOPY
        return f

    def _negotiate(self) -> str:
        link = self.link
        timeout = self.options.timeout
        ours = self._our_features()
        link.send(
            stream.Hello(
                version=stream.VERSION,
                page_size=PAGE_SIZE,
                features=ours,
                role=stream.Role.SOURCE,
                session=os.urandom(16),
                guest_kind=self.guest.kind,
            ),
            "setup",
        )
        answer = link.expect((stream.Welcome, stream.Reject), "setup", timeout)
        if isinstance(answer, stream.Reject):
            raise MigrationError(
                f"the destination refused: {answer.reason}", phase="setup", guest="source"
            )
        self._features = stream.Feature(answer.features) & ours
        mode = self._choose_mode()
        self._mode = mode
        regions = self.guest.regions
        # A precopy that may fall back to postcopy asks the destination to get ready for it.
        may_postcopy = mode == "postcopy" or (
            mode == "precopy"
            and self.options.on_no_convergence == "postcopy"
            and stream.Feature.POSTCOPY in self._features
        )
        link.send(
            stream.Setup(
                mode=stream.Mode.POSTCOPY if may_postcopy else stream.Mode[mode.upper()],
                chunk_pages=1,
                src_pid=os.getpid(),
                regions=[stream.RegionInfo(r.name, r.size, r.address, r.movable) for r in regions],
            ),
            "setup",
        )
        link.expect((stream.Prepared,), "setup", timeout)
        self._emit(
            SetupEvent(
                self._t(),
                mode=mode,
                transport=str(self.address),
                regions=[{"name": r.name, "size": r.size, "movable": r.movable} for r in regions],
                total_bytes=sum(r.size for r in regions),
                features=[f.name for f in stream.Feature if f in self._features and f.name],
                downtime_limit=self.options.downtime_limit,
            )
        )
        return mode

    def _choose_mode(self) -> str:
        want = self.options.mode
        shared = self._features
        if want in ("auto", "flip"):
            if stream.Feature.FLIP in shared:
                return "flip"
            if want == "flip":
                why = (
                    "the destination is not on this host (flip needs a Unix socket)"
                    if not self.address.local
                    else next(
                        (w for r in self.guest.regions if (w := _flippable(r))),
                        "the destination cannot take memfds",
                    )
                )
                raise MigrationError(f"flip is not possible: {why}", phase="setup", guest="source")
            return "precopy"
        if want == "postcopy" and stream.Feature.POSTCOPY not in shared:
            raise MigrationError(
                "postcopy is not possible: it needs the destination on this host, with "
                "userfaultfd, and pulling pages allowed",
                phase="setup",
                guest="source",
            )
        return want

    # -- flip -----------------------------------------------------------------------------

    def _flip(self) -> float:
        link = self.link
        regions = self.guest.regions
        self._phases.advance(SourcePhase.SWITCHOVER)
        self._check_cancel()
        self._emit(SwitchoverEvent(self._t(), 0, 0, 0.0, "flip"))
        # What does not change while the guest runs is gathered before it pauses.
        handles = []
        for region in regions:
            (extent,) = region.extents()
            assert extent.memfd is not None
            inode = os.fstat(extent.memfd.fd).st_ino
            handles.append((region, extent.memfd.fd, extent.fd_offset, inode))
        with gc_paused():
            self._paused_at = self.guest.pause()
            state = self.guest.save_state()
            flips: list[stream.FlipRegion] = []
            samples: list[int] = []
            for index, (region, _, offset, inode) in enumerate(handles):
                view = region.view()
                try:
                    sample = sample_digest(view, region.size // PAGE_SIZE, seed=inode)
                finally:
                    view.release()
                samples.append(sample)
                flips.append(
                    stream.FlipRegion(
                        index=index,
                        fd_index=index,
                        offset=offset,
                        size=region.size,
                        inode=inode,
                        sample_digest=sample,
                    )
                )
            fds = [fd for _, fd, _, _ in handles]
            link.send(stream.Flip(regions=flips, fds=fds), "switchover")
            switchover = stream.Switchover(paused_at=self._paused_at, digests=samples, state=state)
            link.send(switchover, "switchover")
        self._digest_kind = "identity"
        self._pages_moved = sum(r.size for r in regions) // PAGE_SIZE
        resumed = link.expect((stream.Resumed,), "switchover", self.options.timeout)
        self._committed_at = time.monotonic()
        return float(resumed.resumed_at)

    # -- precopy --------------------------------------------------------------------------

    def _pull_allowed(self) -> bool:
        if stream.Feature.PULL not in self._features:
            return False
        if not self._ptracer and sysctl("kernel.yama.ptrace_scope") == "1":
            with contextlib.suppress(OSError):
                io.set_ptracer(self.link.peer_pid())
                self._ptracer = True
        return True

    def _precopy(self, *, postcopy: bool) -> float:
        """Rounds of pages, then a switchover: the copy modes. Returns the resume time."""
        link = self.link
        opts = self.options
        regions = self.guest.regions
        pull = self._pull_allowed()
        digests = [PageDigests(r.address, r.size // PAGE_SIZE, r.view()) for r in regions]
        self._digests = digests
        self._sent = [np.zeros(d.npages, np.bool_) for d in digests]
        tracker = DirtyTracker(regions)
        total_pages = sum(d.npages for d in digests)
        try:
            rounds_before_postcopy = opts.postcopy_after_rounds if postcopy else None
            if rounds_before_postcopy != 0:
                tracker.start()  # a pure postcopy sends nothing twice: no tracking
            self._phases.advance(SourcePhase.PRECOPY)
            todo: list[Runs] = [np.array([[0, d.npages]], np.uint64) for d in digests]
            reason = "converged"
            bandwidth = 0.0
            expected = float("inf")
            while rounds_before_postcopy != 0:
                self._rounds += 1
                started = time.monotonic()
                stats = self._send_round(self._rounds, todo, digests, pull, total_pages)
                link.send(
                    stream.RoundEnd(
                        self._rounds, stats.pages, stats.bytes, 0, time.monotonic() - started
                    ),
                    "precopy",
                )
                link.expect((stream.RoundAck,), "precopy", opts.timeout)
                seconds = time.monotonic() - started
                scan_started = time.monotonic()
                todo = tracker.collect()
                scan = time.monotonic() - scan_started
                dirty = sum(runs_pages(r) for r in todo)
                moved_bytes = stats.pages * PAGE_SIZE
                bandwidth = moved_bytes / seconds if seconds > 0 and moved_bytes else bandwidth
                expected = expected_downtime(dirty * PAGE_SIZE, bandwidth, scan)
                self._emit(
                    RoundEvent(
                        self._t(),
                        round=self._rounds,
                        pages=stats.pages,
                        bytes=stats.bytes,
                        zero_pages=stats.zero_pages,
                        seconds=seconds,
                        bandwidth=bandwidth,
                        dirty_pages=dirty,
                        dirty_rate=dirty * PAGE_SIZE / seconds if seconds else 0.0,
                        expected_downtime=expected,
                    )
                )
                self._check_cancel()
                if postcopy and self._rounds >= opts.postcopy_after_rounds:
                    reason = "postcopy"
                    break
                if expected <= SWITCHOVER_HEADROOM * opts.downtime_limit:
                    break
                if self._rounds >= opts.max_rounds:
                    reason = "postcopy" if opts.on_no_convergence == "postcopy" else "forced"
                    break
            if postcopy and rounds_before_postcopy == 0:
                reason = "postcopy"
            if reason == "postcopy" and stream.Feature.POSTCOPY not in self._features:
                reason = "forced"  # the destination cannot page on demand
            self._phases.advance(SourcePhase.SWITCHOVER)
            self._emit(
                SwitchoverEvent(
                    self._t(),
                    round=self._rounds + 1,
                    remaining_pages=sum(runs_pages(r) for r in todo),
                    expected_downtime=expected,
                    reason=reason,
                )
            )
            with gc_paused():
                self._paused_at = self.guest.pause()
                # Unregistering write-protection walks every page table entry (about 8 ms
                # per 256 MiB): it waits until the destination has all (finally, below).
                if tracker.active:
                    written = tracker.collect()
                    final = [
                        _union(a, b, d.npages)
                        for a, b, d in zip(todo, written, digests, strict=True)
                    ]
                else:
                    final = todo  # nothing was sent yet: everything is still to come
                if reason == "postcopy":
                    self._postcopy = True
                    return self._postcopy_switchover(final)
                self._rounds += 1
                self._send_round(self._rounds, final, digests, pull, total_pages)
                state = self.guest.save_state()
                link.send(
                    stream.Switchover(
                        paused_at=self._paused_at,
                        digests=[d.region_digest() for d in digests],
                        state=state,
                    ),
                    "switchover",
                )
            resumed = link.expect((stream.Resumed,), "switchover", opts.timeout)
            self._committed_at = time.monotonic()
            return float(resumed.resumed_at)
        finally:
            tracker.close()

    # -- postcopy -------------------------------------------------------------------------

    def _postcopy_switchover(self, stale: list[Runs]) -> float:
        """Paused: drop the destination's stale pages, send the state, let it run."""
        link = self.link
        self._mode = "postcopy"
        for index, runs in enumerate(stale):
            sent = self._sent[index]
            if not len(runs) or not sent.any():
                continue  # nothing of it was sent: nothing to drop (a pure postcopy)
            pages = runs_to_pages(runs)
            pages = pages[sent[pages]] if len(pages) else pages
            if not len(pages):
                continue
            ranges = coarsen(pages_to_runs(pages), DISCARD_MERGE_GAP)
            link.send(stream.DiscardPages(index, self._rounds, ranges), "switchover")
            for first, count in ranges.tolist():
                sent[first : first + count] = False  # the destination no longer has them
        state = self.guest.save_state()
        link.send(
            stream.Switchover(paused_at=self._paused_at or 0.0, digests=[], state=state),
            "switchover",
        )
        resumed = link.expect((stream.Resumed,), "switchover", self.options.timeout)
        self._committed_at = time.monotonic()
        return float(resumed.resumed_at)

    def _postcopy_finish(self) -> None:
        """Committed: hash what the pager reads from us, then wait for its verdict."""
        link = self.link
        for index, digests in enumerate(self._digests):
            digests.update_pages(np.flatnonzero(~self._sent[index]))
        link.send(stream.PostcopyEnd([d.region_digest() for d in self._digests]), "postcopy")
        verdict = link.expect((stream.Verified,), "postcopy", None)
        details: dict[str, Any] = {}
        with contextlib.suppress(ValueError):
            parsed = json.loads(verdict.message) if verdict.message else {}
            details = parsed if isinstance(parsed, dict) else {}
        self._details.update(details)
        self._committed_at = time.monotonic()  # postcopy is complete only now
        self._pages_copied += int(details.get("pushed", 0)) + int(details.get("fault_pages", 0))
        self._pages_requested = int(details.get("fault_pages", 0))
        self._emit(
            PostcopyEvent(
                self._t(),
                pushed_pages=int(details.get("pushed", 0)),
                requested_pages=int(details.get("requested", 0)),
                remaining_pages=0,
            )
        )
        if not verdict.ok:
            raise DigestMismatch(
                f"after postcopy the destination's pages differ from ours: {verdict.message}",
                phase="postcopy",
                guest="destination",
                region=None,
            )

    def _send_round(
        self,
        number: int,
        runs_per_region: list[Runs],
        digests: list[PageDigests],
        pull: bool,
        total_pages: int,
    ) -> _Round:
        link = self.link
        opts = self.options
        stats = _Round()
        todo = sum(runs_pages(r) for r in runs_per_region)
        started = time.monotonic()
        last_progress = 0.0
        for index, runs in enumerate(runs_per_region):
            every = runs_to_pages(runs)
            for lo in range(0, len(every), CHUNK_PAGES):
                self._check_cancel()
                pages = every[lo : lo + CHUNK_PAGES]
                zero = digests[index].update_pages(pages)
                zeros = int(zero.sum())
                if zeros:
                    zero_runs = pages_to_runs(pages[zero])
                    stats.bytes += link.send(stream.ZeroPages(index, number, zero_runs), "precopy")
                    stats.zero_pages += zeros
                    self._pages_zero += zeros
                data_runs = pages_to_runs(pages[~zero] if zeros else pages)
                if len(data_runs):
                    if pull:
                        event: stream.Event = stream.PullPages(index, number, data_runs)
                    else:
                        event = stream.Pages(
                            index, number, data_runs, _gather(digests[index], data_runs)
                        )
                    stats.bytes += link.send(event, "precopy")
                self._sent[index][pages] = True
                count = len(pages)
                stats.pages += count
                self._pages_copied += count - zeros
                now = time.monotonic()
                if opts.max_bandwidth:
                    ahead = stats.pages * PAGE_SIZE / opts.max_bandwidth - (now - started)
                    if ahead > 0:
                        time.sleep(ahead)
                        now = time.monotonic()
                if now - last_progress >= opts.progress_interval:
                    last_progress = now
                    elapsed = now - started
                    self._emit(
                        ProgressEvent(
                            self._t(),
                            round=number,
                            sent_pages=stats.pages,
                            remaining_pages=todo - stats.pages,
                            total_pages=total_pages,
                            rate=stats.pages * PAGE_SIZE / elapsed if elapsed else 0.0,
                        )
                    )
        return stats

    # -- the end --------------------------------------------------------------------------

    def _finish(self, resumed_at: float) -> DoneEvent:
        """After RESUMED: the destination runs the guest. Release ours and report."""
        link = self.link
        received = time.monotonic()
        paused = self._paused_at or received
        downtime = (resumed_at if self.address.local else received) - paused
        self._committed = True
        self._emit(ResumedEvent(self._t(), downtime=downtime))
        try:
            if self._postcopy:
                self._phases.advance(SourcePhase.POSTCOPY)
                self._postcopy_finish()
            else:
                self._phases.advance(SourcePhase.COMMITTED)
        except BaseException as err:
            raise self._failed(err) from err
        finally:
            for digests in self._digests:
                digests.release()
            self._digests = []
        # The migration is complete here: the destination runs the guest on its own pages.
        total = (self._committed_at or time.monotonic()) - self._start
        done = DoneEvent(
            self._t(),
            mode=self._mode,
            total_seconds=total,
            downtime=downtime,
            bytes_on_wire=link.bytes_sent + link.bytes_received,
            pages_moved=self._pages_moved,
            pages_copied=self._pages_copied,
            pages_zero=self._pages_zero,
            pages_requested=self._pages_requested,
            rounds=self._rounds,
            digest=self._digest_kind,
            details=self._details,
        )
        with contextlib.suppress(PageflipError, OSError):
            link.send(stream.Done(stats=done.as_dict()), "done")
        link.close()
        # Then let go of our memory: unmapping populated pages costs about 30 ms per GiB,
        # which is reported, but is not part of the migration the guest waited for.
        started = time.monotonic()
        for region in self.guest.release_regions():
            if self._mode == "flip":
                region.give_away(0, region.size)  # the destination maps these pages: no punch
            else:
                region.close()
        self.guest.close()
        self._details["cleanup_seconds"] = time.monotonic() - started
        self._phases.advance(SourcePhase.DONE)
        done = dataclasses.replace(done, t=self._t(), details=self._details)
        self._emit(done)
        return done

    def _failed(self, err: BaseException) -> MigrationError:
        """Before the commit point: resume the guest here, tell the peer, report.

        After it (postcopy), the guest runs on the destination whatever happens here.
        """
        phase = self.phase.value
        where = "destination" if self._committed else "source"
        for digests in self._digests:
            with contextlib.suppress(Exception):
                digests.release()
        self._digests = []
        if self._paused_at is not None and not self._committed:
            with contextlib.suppress(Exception):
                self.guest.resume()
        if self._link is not None:
            with contextlib.suppress(Exception):
                self._link.send(stream.Abort(phase=phase, reason=str(err)), phase)
            self._link.close()
        if self._ptracer:
            with contextlib.suppress(OSError):
                io.set_ptracer(0)
        with contextlib.suppress(Exception):
            self._phases.advance(SourcePhase.FAILED)
        self._emit(
            FailedEvent(
                self._t(),
                phase=phase,
                error=str(err),
                error_type=type(err).__name__,
                guest=where,
            )
        )
        if isinstance(err, MigrationError):
            return err
        return MigrationError(
            f"migration failed in phase {phase}: {type(err).__name__}: {err}",
            phase=phase,
            guest=where,
        )


#: The last round runs while the guest is paused and costs more than its bytes at the last
#: round's bandwidth: a final scan for written pages, the destination hashing the last
#: pages and checking every digest, the restore and resume. Measured here: about 1.15 times
#: the bytes' time plus 30 ms, plus the scan.
SWITCHOVER_SLOWDOWN = 1.15
SWITCHOVER_FIXED = 0.03
#: Precopy switches over when the expected downtime is at most this fraction of the limit.
#: On this noisy VM the paused round ran up to 1.55x longer than estimated from the round
#: before (2 GiB under 256 MiB/s: 219 ms expected, 340 ms measured; 108 runs of
#: ``pageflip bench migrate``). One more round costs a fraction of a second and shrinks what
#: is left by the ratio of dirty rate to bandwidth.
SWITCHOVER_HEADROOM = 0.6


def expected_downtime(remaining_bytes: int, bandwidth: float, scan_seconds: float) -> float:
    """How long a switchover now would keep the guest paused, in seconds."""
    if remaining_bytes == 0:
        return scan_seconds
    if bandwidth <= 0:
        return float("inf")
    return SWITCHOVER_SLOWDOWN * remaining_bytes / bandwidth + SWITCHOVER_FIXED + scan_seconds


def _union(a: Runs, b: Runs, npages: int) -> Runs:
    """Sorted, non-overlapping runs covering the pages of both."""
    if not len(a) and not len(b):
        return a
    mask = np.zeros(npages, np.bool_)
    for runs in (a, b):
        if len(runs):
            mask[runs_to_pages(runs)] = True
    return pages_to_runs(np.flatnonzero(mask))


def coarsen(runs: Runs, max_gap: int) -> Runs:
    """The runs with every gap of at most ``max_gap`` pages between them closed.

    Dropping a range of pages at the destination costs a syscall (about 10 us here) plus
    freeing its pages (under 1 us each): closing small gaps trades a few clean pages, which
    are merely fetched again later, for fewer syscalls inside the downtime.
    """
    if len(runs) < 2:
        return runs
    starts = runs[:, 0].astype(np.int64)
    ends = starts + runs[:, 1].astype(np.int64)
    open_gap = (starts[1:] - ends[:-1]) > max_gap
    firsts = np.flatnonzero(np.concatenate(([True], open_gap)))
    lasts = np.concatenate((firsts[1:] - 1, [len(runs) - 1]))
    return np.stack([starts[firsts], ends[lasts] - starts[firsts]], axis=1).astype(np.uint64)


def _gather(digests: PageDigests, runs: Runs) -> bytes:
    """The bytes of the pages in ``runs``, in order (for PAGES frames)."""
    view = digests.view
    return b"".join(
        view[first * PAGE_SIZE : (first + count) * PAGE_SIZE] for first, count in runs.tolist()
    )
