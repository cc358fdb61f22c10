"""The source side of a migration: runs in the process that owns the guest.

flip
    pause, hand every region's memfd to the destination, ship the small state; the
    destination maps the very same pages and resumes. Nothing is copied, so the downtime
    does not depend on the memory size.
precopy
    rounds of pages while the guest runs (all pages, then those written during the previous
    round, found by the guest's :meth:`~pageflip.guests.Guest.dirty_tracker`); once what is
    left would take
    less than the downtime limit at the bandwidth just measured, pause and send the rest.
    Locally the destination pulls the pages straight out of our memory (process_vm_readv);
    over TCP they travel as bytes (optionally zstd). Zero pages travel as markers.
postcopy
    switch over early: the destination resumes at once and a pager process there fetches
    each missing page on first touch while we push the rest in the background.

The handover has one commit point (drawn in :mod:`.phases`): the destination does
everything that can fail and answers PREPARED; only then does the source send COMMIT. Until
then any failure resumes the guest here, with all its data, and raises
:class:`~pageflip.errors.MigrationError` naming the phase. After COMMIT the guest is the
destination's: the source releases its memory once the destination runs it (flip: unmaps
it; the destination holds the only mapping) and reports the figures in a
:class:`~.events.DoneEvent`. If the destination fails after COMMIT, the guest is lost and
:class:`~pageflip.errors.GuestLost` says so; the source's paused copy, stale by then, is
dropped unless ``keep_source_on_loss`` asks to keep it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .. import features, stream
from .._sys.mm import PAGE_SIZE
from ..channel import ProcessWatch, allow_peer_read, forbid_peer_read
from ..errors import (
    DigestMismatch,
    GuestLost,
    MigrationError,
    PageflipError,
    PeerAborted,
    PeerClosed,
    PeerTimeout,
    RemoteProtocolError,
    SpanError,
    StateError,
)
from ..guests import Guest
from ..guests.base import DirtyTracking
from ..memory import Memfd, Region
from ..runs import Runs, coarsen, pages_to_runs, runs_pages, runs_to_pages, union_runs
from ..transport import Address, TcpAuth
from ._gil import responsive
from .codec import open_link
from .digests import PageDigests
from .engine import Side
from .events import (
    CommitEvent,
    DoneEvent,
    FailedEvent,
    MigrationEvent,
    PostcopyEvent,
    PreparedEvent,
    ProgressEvent,
    RecoveringEvent,
    ResumedEvent,
    RoundEvent,
    SetupEvent,
    SwitchoverEvent,
)
from .pager import postcopy_problem
from .phases import COMMITTED_PHASES, SOURCE_TRANSITIONS, SourcePhase
from .policy import Convergence, Decision, RoundFigures

log = logging.getLogger("pageflip.migration")

MODES = ("auto", "flip", "precopy", "postcopy")

#: Pages per PULL or PAGES frame (32 MiB; a PAGES frame must stay under 64 MiB).
CHUNK_PAGES = (32 << 20) // PAGE_SIZE
#: A postcopy switchover asks the destination to drop stale pages range by range (each a
#: syscall inside the downtime); stale pages this close are dropped as one range.
DISCARD_MERGE_GAP = 16
#: Seconds the source waits for a destination that does not listen yet (started a moment
#: before, as in the README's walkthrough) before it says nobody listens.
CONNECT_GRACE = 3.0
#: Seconds a destination has to answer our HELLO: a pageflip destination answers at once,
#: so silence means the address is something else (or busy with another migration).
HANDSHAKE_TIMEOUT = 1.0
#: Seconds the source polls for the destination's PREPARED and RESUMED before sleeping:
#: the guest is paused meanwhile (see Endpoint.recv).
SWITCHOVER_SPIN = 0.25
#: Seconds of a pause after which the events held back during it go out all the same.
HOLD_EVENTS = 0.05
#: Seconds to wait after RESUMED for the pause the guest observed (GUEST_PAUSE).
GUEST_PAUSE_WAIT = 1.0


@dataclass
class MigrationOptions:
    """How to migrate. Sizes in bytes, times in seconds."""

    #: "auto" (flip when local and every region is movable, else precopy), "flip",
    #: "precopy" or "postcopy".
    mode: str = "auto"
    #: The longest pause precopy may cause (QEMU's default). It switches over once the
    #: expected downtime is at most ``SWITCHOVER_HEADROOM`` of it (see :mod:`.policy`): the
    #: estimate's error stays inside the limit.
    downtime_limit: float = 0.3
    #: Cap on the page rate, bytes per second (None: as fast as it goes).
    max_bandwidth: float | None = None
    #: After this many precopy rounds without converging: see ``on_no_convergence``. It
    #: decides sooner once two rounds in a row show that precopy cannot converge within
    #: them (see :mod:`.policy`).
    max_rounds: int = 30
    #: When precopy cannot converge: "force" (switch over anyway, whatever the downtime;
    #: the switchover event's ``why`` and the report say so, and whether the expected pause
    #: is over ``downtime_limit``) or "postcopy".
    on_no_convergence: str = "force"
    #: Precopy rounds before postcopy takes over (postcopy mode; 0: switch over at once,
    #: which keeps the downtime smallest: nothing sent twice, nothing to drop).
    postcopy_after_rounds: int = 0
    #: zstd level for page data over TCP (None: raw).
    compress: int | None = None
    #: Seconds to wait for the destination at each step, and, after the commit point, for a
    #: postcopy's broken connection to be taken up again (None: forever).
    timeout: float | None = 60.0
    #: After the commit point, if the destination fails, keep our paused copy of the guest
    #: (marked stale) instead of dropping it.
    keep_source_on_loss: bool = False
    #: How to authenticate to a TCP destination (None: loopback only; see TcpAuth).
    auth: TcpAuth | None = None
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
        if self.timeout is not None and self.timeout <= 0:
            raise SpanError(f"the timeout must be positive, not {self.timeout}")


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


class Source(Side[SourcePhase]):
    """Migrate ``guest`` to the destination at ``to`` (see the module docstring).

    ``on_event`` receives every :class:`~.events.MigrationEvent` (from the migrating thread).
    :meth:`cancel` (from any thread) gives up before the commit point; :meth:`recover` takes
    up a postcopy whose connection broke after it.
    """

    side = "source"

    def __init__(
        self,
        guest: Guest,
        to: str | Address,
        options: MigrationOptions | None = None,
        on_event: Callable[[MigrationEvent], None] | None = None,
    ) -> None:
        super().__init__(
            SOURCE_TRANSITIONS, SourcePhase.IDLE, SourcePhase.FAILED, on_event, "migration"
        )
        self.guest = guest
        self.address = to if isinstance(to, Address) else Address.parse(to)
        self.options = options or MigrationOptions()
        self.options.check()
        self._cancel = threading.Event()
        self._recover: queue.Queue[Address] = queue.Queue()
        self._session = os.urandom(16)
        self._paused_at: float | None = None
        self._mode = ""
        self._features = stream.Feature(0)
        #: AHEAD: what the LEND gave (see _check_lent); empty otherwise.
        self._lent: list[tuple[Memfd, int, int]] = []
        self._rounds = 0
        self._pages_requested = 0
        self._digest_kind = "verified"
        self._ptracer = False
        self._committed_at: float | None = None
        self._resumed: stream.Resumed | None = None
        self._guest_pause: float | None = None
        self._postcopy = False
        self._sent: list[npt.NDArray[np.bool_]] = []
        #: Per region: pages moved, copied and sent as zero markers.
        self._moved = [0] * len(guest.regions)
        self._copied = [0] * len(guest.regions)
        self._zero = [0] * len(guest.regions)
        self._details: dict[str, Any] = {}
        self._tracker: DirtyTracking | None = None
        #: After a loss with keep_source_on_loss: why our paused copy is stale.
        self.stale: str | None = None

    @property
    def committed(self) -> bool:
        """Whether the migration passed its commit point (the guest is no longer ours)."""
        return self.phase in COMMITTED_PHASES

    def cancel(self) -> None:
        """Give up before the commit point: the guest keeps running here.

        Takes effect within a fraction of a second in any phase before the commit point,
        also while waiting for a stalled destination. After it, raises StateError.
        """
        if self.committed:
            raise StateError(
                "the migration passed its commit point: the guest is the destination's now",
                phase=self.phase.value,
                needed="a phase before the commit point",
            )
        self._cancel.set()

    def recover(self, to: str | Address | None = None) -> None:
        """Take up a postcopy whose connection broke after the commit point: connect to
        ``to`` (default: the destination's address again) and go on from there."""
        if self.phase is not SourcePhase.RECOVERING:
            raise StateError(
                "there is no broken postcopy to take up",
                phase=self.phase.value,
                needed=SourcePhase.RECOVERING.value,
            )
        address = self.address if to is None else to
        self._recover.put(address if isinstance(address, Address) else Address.parse(address))

    # -- the run --------------------------------------------------------------------------

    def run(self) -> DoneEvent:
        """Migrate; returns the final report.

        Before the commit point a failure resumes the guest here and raises MigrationError
        (``guest == "source"``); after it, a failure of the destination raises GuestLost.
        """
        self._start = time.monotonic()
        with responsive():
            try:
                self._phases.advance(SourcePhase.SETUP)
                self._connect()
                mode = self._negotiate()
                if mode == "flip":
                    self._flip()
                else:
                    self._precopy(postcopy=mode == "postcopy")
                self._await_prepared()
                self._commit()
            except GuestLost:
                raise
            except BaseException as err:
                raise self._failed(err) from err
            return self._finish()

    def _waiting(self) -> None:
        """Called while a receive waits: a cancel ends the wait; held events go out once
        the pause has lasted :data:`HOLD_EVENTS`."""
        self._check_cancel()
        self._let_held_go(HOLD_EVENTS)

    def _check_cancel(self) -> None:
        if self._cancel.is_set() and not self.committed:
            raise MigrationError(
                f"cancelled in phase {self.phase.value}", phase=self.phase.value, guest="source"
            )

    # -- setup ----------------------------------------------------------------------------

    def _connect(self) -> None:
        timeout = self.options.timeout
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        while True:
            self._check_cancel()
            try:
                conn = self.address.connect(
                    HANDSHAKE_TIMEOUT if deadline is None else min(HANDSHAKE_TIMEOUT, timeout or 0),
                    auth=self.options.auth,
                )
                break
            except (TimeoutError, BlockingIOError):
                # A full backlog: a destination busy with another migration, or none.
                if deadline is not None and time.monotonic() >= deadline:
                    raise PeerTimeout(
                        f"{self.address} did not take the connection within {timeout:g} s",
                        phase="setup",
                    ) from None
            except (FileNotFoundError, ConnectionRefusedError) as err:
                # Nobody listens (yet): a destination started a moment ago gets a grace.
                if time.monotonic() - started >= CONNECT_GRACE:
                    raise MigrationError(
                        f"nobody listens at {self.address}: start the destination there "
                        f"(pageflip incoming --listen {self.address}) ({err.strerror})",
                        phase="setup",
                        guest="source",
                    ) from None
                time.sleep(0.1)
        self._link = open_link(conn, compress=self.options.compress, interrupt=self._waiting)
        if self._link.local:
            self._peer = ProcessWatch.of(self._link.peer_pid())

    def _our_features(self) -> stream.Feature:
        f = stream.Feature.XXH3 | stream.Feature.HUGE
        if self.options.compress is not None:
            f |= stream.Feature.ZSTD
        if self.address.local:
            if all(_flippable(r) is None for r in self.guest.regions):
                f |= stream.Feature.FLIP | stream.Feature.LEND | stream.Feature.AHEAD
            if self.options.pull and features.has("process_vm_readv"):
                # The destination's pager reads our memory: postcopy needs the pull.
                f |= stream.Feature.PULL | stream.Feature.POSTCOPY
        return f

    def _hello(self) -> stream.Welcome:
        """Say HELLO; the answer must come at once and be pageflip's."""
        link = self.link
        link.send(
            stream.Hello(
                version=stream.VERSION,
                page_size=PAGE_SIZE,
                features=self._our_features(),
                role=stream.Role.SOURCE,
                session=self._session,
                guest_kind=self.guest.kind,
            ),
            "setup",
        )
        limit = HANDSHAKE_TIMEOUT
        if self.options.timeout is not None:
            limit = min(limit, self.options.timeout)
        try:
            answer = link.expect((stream.Welcome, stream.Reject), "setup", limit)
        except PeerTimeout:
            raise MigrationError(
                f"{self.address} did not answer within {limit:g} s: it is not a pageflip "
                "destination (pageflip incoming), or it is busy with another migration",
                phase="setup",
                guest="source",
            ) from None
        except RemoteProtocolError as err:
            if err.offset is not None and err.offset < stream.HEADER.size:
                raise MigrationError(
                    f"{self.address} is not a pageflip destination: it answered {link.head[:24]!r}",
                    phase="setup",
                    guest="source",
                ) from None
            raise
        if isinstance(answer, stream.Reject):
            raise MigrationError(
                f"the destination refused: {answer.reason}", phase="setup", guest="source"
            )
        welcome: stream.Welcome = answer
        return welcome

    def _negotiate(self) -> str:
        link = self.link
        timeout = self.options.timeout
        ours = self._our_features()
        welcome = self._hello()
        self._features = stream.Feature(welcome.features) & ours
        mode = self._choose_mode()
        self._mode = mode
        regions = self.guest.regions
        # Rounds that may end in postcopy ask the destination to get its pager ready; a pure
        # postcopy lets it hand its memory to the pager before the pause, too.
        if mode == "postcopy" and self.options.postcopy_after_rounds == 0:
            wire = stream.Mode.POSTCOPY
        elif mode == "postcopy" or (
            mode == "precopy"
            and self.options.on_no_convergence == "postcopy"
            and stream.Feature.POSTCOPY in self._features
        ):
            wire = stream.Mode.PRECOPY_POSTCOPY
        else:
            wire = stream.Mode[mode.upper()]
        # With HUGE the destination makes each region on the pages ours sits on; a peer
        # without it makes 4 KiB pages, and is told nothing else.
        kinds = [
            stream.PageKind.of(r.huge, r.page_size)
            if stream.Feature.HUGE in self._features
            else stream.PageKind.SMALL
            for r in regions
        ]
        infos = [
            stream.RegionInfo(r.name, r.size, r.address, r.movable, kind)
            for r, kind in zip(regions, kinds, strict=True)
        ]
        # Refused here rather than by the destination's REJECT: the same rule, one step
        # sooner (its reason is the one line the user reads).
        why = postcopy_problem(wire, infos)
        if why is not None:
            raise MigrationError(why, phase="setup", guest="source")
        link.send(
            stream.Setup(mode=wire, chunk_pages=1, src_pid=os.getpid(), regions=infos), "setup"
        )
        if mode == "flip" and stream.Feature.LEND in self._features:
            # Lent now, while the guest runs: the destination maps the memfds and gets them
            # ready before it says ACCEPTED, so that none of it falls in the pause.
            flips, fds = self._flip_regions(regions)
            link.send(stream.Lend(regions=flips, fds=fds), "setup")
            if stream.Feature.AHEAD in self._features:
                # What the pause would otherwise carry again: the memfds (we check ourselves
                # that they stand, see _check_lent) and, where the guest has one, a preview
                # of its state, from which the destination restores it ahead.
                self._lent = self._lent_memfds(regions)
                preview = self.guest.state_preview() or b""
                link.send(stream.Preview(state=preview), "setup")
        answer = link.expect((stream.Accepted, stream.Reject), "setup", timeout)
        if isinstance(answer, stream.Reject):
            raise MigrationError(
                f"the destination refused: {answer.reason}", phase="setup", guest="source"
            )
        self._emit(
            SetupEvent(
                self._t(),
                mode=mode,
                transport=str(self.address),
                regions=[
                    {"name": r.name, "size": r.size, "movable": r.movable, "pages": k.describe()}
                    for r, k in zip(regions, kinds, strict=True)
                ],
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

    def _flip(self) -> None:
        regions = self.guest.regions
        self._phases.advance(SourcePhase.SWITCHOVER)
        self._check_cancel()
        self._hold_events()
        self._emit(SwitchoverEvent(self._t(), 0, 0, 0.0, "flip"))
        # What does not change while the guest runs is gathered before it pauses.
        lent = self._lent
        flip = None if lent else stream.Flip(*self._flip_regions(regions))
        self._gc.pause()  # until the guest runs again (here or there)
        paused_at = self._pause_guest()
        if lent:  # AHEAD: the destination has them mapped and checked since the LEND
            self._check_lent(regions, lent)
        # The destination checks each memfd by identity (device, inode, seals, size): it is
        # this very file, so nothing of its pages needs hashing inside the pause.
        self._send_switchover(paused_at, [], flip)
        self._digest_kind = "identity"
        self._moved = [r.size // PAGE_SIZE for r in regions]

    def _pause_guest(self) -> float:
        """Stop the guest's writers: the pause begins (``_paused_at``, as the guest says,
        which is returned)."""
        try:
            self.guest.about_to_pause()
        except Exception:  # a warm-up only: the pause itself says what is wrong
            log.debug("the guest's warm-up before the pause failed", exc_info=True)
        self._step("pause asked")
        paused_at = self._paused_at = self.guest.pause()
        self._step("paused", paused_at)
        return paused_at

    def _send_switchover(
        self, paused_at: float, digests: list[int], before: stream.Flip | None = None
    ) -> None:
        """The guest paused: save its state, send ``before`` (a flip's FLIP), then SWITCHOVER
        with ``digests`` and the state (the pause budget's "state saved", "frames sent")."""
        state = self.guest.save_state()
        self._step("state saved")
        if before is not None:
            self.link.send(before, "switchover")
        self.link.send(
            stream.Switchover(paused_at=paused_at, digests=digests, state=state), "switchover"
        )
        self._step("frames sent")

    @staticmethod
    def _lent_memfds(regions: list[Region]) -> list[tuple[Memfd, int, int]]:
        """What a LEND gave of each region: its memfd, the offset and the size mapped."""
        lent = []
        for region in regions:
            (extent,) = region.extents()
            assert extent.memfd is not None
            lent.append((extent.memfd, extent.fd_offset, region.size))
        return lent

    @staticmethod
    def _check_lent(regions: list[Region], lent: list[tuple[Memfd, int, int]]) -> None:
        """In the pause, with AHEAD: our regions must still be the very memfds we lent
        (the same open files, offsets and sizes), since no FLIP names them again."""
        now = Source._lent_memfds(regions) if len(regions) == len(lent) else []
        if len(now) != len(lent) or any(
            a[0] is not b[0] or a[0].fd != b[0].fd or a[1:] != b[1:]
            for a, b in zip(now, lent, strict=True)
        ):
            raise MigrationError(
                "the guest's regions are no longer the memfds lent to the destination",
                phase="switchover",
                guest="source",
            )

    @staticmethod
    def _flip_regions(regions: list[Region]) -> tuple[list[stream.FlipRegion], list[int]]:
        """The FLIP (or LEND) entries of ``regions`` and their memfds (still ours)."""
        flips, fds = [], []
        for index, region in enumerate(regions):
            (extent,) = region.extents()
            assert extent.memfd is not None
            flips.append(
                stream.FlipRegion(
                    index=index,
                    fd_index=index,
                    offset=extent.fd_offset,
                    size=region.size,
                    inode=os.fstat(extent.memfd.fd).st_ino,
                    sample_digest=0,
                )
            )
            fds.append(extent.memfd.fd)
        return flips, fds

    # -- precopy --------------------------------------------------------------------------

    def _peer_may_read(self) -> bool:
        if stream.Feature.PULL not in self._features:
            return False
        if not self._ptracer:
            self._ptracer = allow_peer_read(self.link.peer_pid())
        return True

    def _precopy(self, *, postcopy: bool) -> None:
        """Rounds of pages while the guest runs, each followed by the policy's decision
        (:class:`.policy.Convergence`), then the switchover (the copy modes): returns once
        SWITCHOVER went, the guest paused here."""
        opts = self.options
        regions = self.guest.regions
        pull = self._peer_may_read()
        digests = [PageDigests(r.address, r.size // PAGE_SIZE, r.view()) for r in regions]
        self._digests = digests
        self._sent = [np.zeros(d.npages, np.bool_) for d in digests]
        # Unregistering write-protection walks every page table entry (about 8 ms per 256
        # MiB): the tracker stays until the pause is over (closed by _finish or _failed).
        tracker = self._tracker = self.guest.dirty_tracker()
        total_pages = sum(d.npages for d in digests)
        policy = Convergence(
            downtime_limit=opts.downtime_limit,
            max_rounds=opts.max_rounds,
            on_no_convergence=opts.on_no_convergence,
            postcopy_after_rounds=opts.postcopy_after_rounds if postcopy else None,
            postcopy_possible=stream.Feature.POSTCOPY in self._features,
        )
        decision = policy.first()
        if decision is Decision.ANOTHER_ROUND:
            # A pure postcopy sends nothing twice: no tracking. The first round arms the
            # tracker chunk by chunk as it reads them (see _send_round).
            tracker.start(lazily=True)
        self._phases.advance(SourcePhase.PRECOPY)
        todo: list[Runs] = [np.array([[0, d.npages]], np.uint64) for d in digests]
        while decision is Decision.ANOTHER_ROUND:
            self._rounds += 1
            stats, figures, todo = self._precopy_round(todo, digests, pull, total_pages)
            decision = policy.after(figures)
            self._emit(
                RoundEvent(
                    self._t(),
                    round=self._rounds,
                    pages=stats.pages,
                    bytes=stats.bytes,
                    zero_pages=stats.zero_pages,
                    seconds=figures.seconds,
                    bandwidth=policy.bandwidth,
                    dirty_pages=figures.dirty_pages,
                    dirty_rate=figures.dirty_rate,
                    expected_downtime=policy.expected,
                )
            )
            self._check_cancel()
        if policy.why is not None:
            # Said before the pause, in the log and the events, and kept in the report.
            log.warning("%s", policy.why)
            self._details["no_convergence"] = policy.why
        self._precopy_switchover(decision, policy, todo, digests, pull, total_pages)

    def _precopy_round(
        self, todo: list[Runs], digests: list[PageDigests], pull: bool, total_pages: int
    ) -> tuple[_Round, RoundFigures, list[Runs]]:
        """Send round ``self._rounds``, wait for its ROUND_ACK, collect what was written
        meanwhile: the round's figures and the pages of the next one."""
        link = self.link
        started = time.monotonic()
        stats = self._send_round(self._rounds, todo, digests, pull, total_pages)
        link.send(
            stream.RoundEnd(self._rounds, stats.pages, stats.bytes, 0, time.monotonic() - started),
            "precopy",
        )
        link.expect((stream.RoundAck,), "precopy", self.options.timeout)
        seconds = time.monotonic() - started
        scan_started = time.monotonic()
        assert self._tracker is not None
        written = self._tracker.collect()
        scan = time.monotonic() - scan_started
        dirty = sum(runs_pages(r) for r in written)
        return stats, RoundFigures(stats.pages, seconds, dirty, scan), written

    def _precopy_switchover(
        self,
        decision: Decision,
        policy: Convergence,
        todo: list[Runs],
        digests: list[PageDigests],
        pull: bool,
        total_pages: int,
    ) -> None:
        """Pause the guest; send what is left (or, for postcopy, drop what went stale), then
        the state."""
        tracker = self._tracker
        assert tracker is not None
        self._phases.advance(SourcePhase.SWITCHOVER)
        self._check_cancel()
        self._hold_events()
        self._emit(
            SwitchoverEvent(
                self._t(),
                round=self._rounds + 1,
                remaining_pages=sum(runs_pages(r) for r in todo),
                expected_downtime=policy.expected,
                reason=decision.value,
                why=policy.why or "",
            )
        )
        self._gc.pause()  # until the guest runs again (here or there)
        paused_at = self._pause_guest()
        if tracker.active:
            written = tracker.collect()
            final = [
                union_runs(a, b, d.npages) for a, b, d in zip(todo, written, digests, strict=True)
            ]
            self._step("last writes found")
        else:
            final = todo  # nothing was sent yet: everything is still to come
        if decision is Decision.POSTCOPY:
            self._postcopy = True
            self._postcopy_switchover(final)
            return
        self._rounds += 1
        self._send_round(self._rounds, final, digests, pull, total_pages)
        self._step("last round sent")
        self._send_switchover(paused_at, [d.region_digest() for d in digests])

    # -- the commit point -----------------------------------------------------------------

    def _await_prepared(self) -> None:
        """The guest is paused here: wait for the destination to have done all that can fail.

        A flip's destination has little left to do by then (its guest was restored ahead,
        or loads its state on a machine built before the pause), so the source polls
        rather than pay a wake-up. Any other mode sleeps: the destination writes the last
        round and checks every digest meanwhile, and on two CPUs it needs both."""
        spin = SWITCHOVER_SPIN if self._mode == "flip" else 0.0
        self.link.expect((stream.Prepared,), "switchover", self.options.timeout, spin)
        self._step("PREPARED heard")
        self._emit(PreparedEvent(self._t()))
        self._check_cancel()

    def _commit(self) -> None:
        """Send COMMIT (the commit point) and wait for the destination to run the guest."""
        link = self.link
        try:
            link.send(stream.Commit(), "commit")
        except PeerClosed:
            # Nothing of COMMIT reached the destination, which resumes only on COMMIT.
            raise
        self._phases.advance(SourcePhase.COMMITTED)
        self._committed_at = time.monotonic()
        self._step("COMMIT sent", self._committed_at)
        self._emit(CommitEvent(self._t()))
        try:
            self._resumed = link.expect(
                (stream.Resumed,), "commit", self.options.timeout, SWITCHOVER_SPIN
            )
            self._step("RESUMED heard")
        except PeerAborted as err:
            # The destination says it could not resume, before the guest ran there: the
            # guest is ours again, intact.
            raise MigrationError(
                f"the destination could not resume the guest: {err.reason}",
                phase="commit",
                guest="source",
            ) from err
        except (PeerClosed, PeerTimeout, RemoteProtocolError, OSError) as err:
            raise self._lost(err, "commit") from err

    # -- postcopy -------------------------------------------------------------------------

    def _postcopy_switchover(self, stale: list[Runs]) -> None:
        """Paused: drop the destination's stale pages, send the state."""
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
        self._step("stale pages dropped")
        self._send_switchover(self._paused_at or 0.0, [])

    def _postcopy_finish(self) -> None:
        """Committed: hash what the pager reads from us, then wait for its verdict; a broken
        connection waits (bounded) for :meth:`recover`."""
        for index, digests in enumerate(self._digests):
            digests.update_pages(np.flatnonzero(~self._sent[index]))
        end = stream.PostcopyEnd([d.region_digest() for d in self._digests])
        while True:
            try:
                verdict = self._postcopy_verdict(end)
                break
            except (PeerClosed, PeerTimeout, RemoteProtocolError, OSError) as err:
                self._await_recovery(err)
        details: dict[str, Any] = {}
        with contextlib.suppress(ValueError):
            parsed = json.loads(verdict.message) if verdict.message else {}
            details = parsed if isinstance(parsed, dict) else {}
        self._details.update(details)
        self._committed_at = time.monotonic()  # postcopy is complete only now
        fault_pages = int(details.get("fault_pages", 0))
        pushed = int(details.get("pushed", 0))
        self._pages_requested = fault_pages
        self._digest_kind = str(details.get("digests", "verified"))
        for index, sent in enumerate(self._sent):
            self._copied[index] += int(np.count_nonzero(~sent))
        self._emit(
            PostcopyEvent(
                self._t(),
                pushed_pages=pushed,
                requested_pages=int(details.get("requested", 0)),
                remaining_pages=0,
                fault_median_us=details.get("fault_median_us"),
                fault_p99_us=details.get("fault_p99_us"),
            )
        )
        if not verdict.ok:
            raise self._lost(
                DigestMismatch(
                    f"after postcopy the destination's pages differ from ours: {verdict.message}",
                    phase="postcopy",
                    guest="lost",
                    region=None,
                ),
                "postcopy",
            )

    def _postcopy_verdict(self, end: stream.PostcopyEnd) -> stream.Verified:
        """Send our digests, follow the destination's progress, return its VERIFIED.

        A destination that finished on its own (we were silent too long) sent its VERIFIED
        and may have closed the connection since: what it sent is read all the same. Its
        GUEST_PAUSE may come here too, after we stopped waiting for it: a guest stalled on
        missing pages is slow to say how long it was paused.
        """
        link = self.link
        try:
            link.send(end, "postcopy")
        except PeerClosed:
            log.info("postcopy: the destination closed the connection; reading what it said")
        while True:
            event = link.expect(
                (stream.Verified, stream.PostcopyProgress, stream.GuestPause),
                "postcopy",
                self.options.timeout,
            )
            if isinstance(event, stream.Verified):
                return event
            if isinstance(event, stream.GuestPause):
                if self._guest_pause is None:
                    self._guest_pause = event.seconds
                continue
            self._emit(
                PostcopyEvent(
                    self._t(),
                    pushed_pages=event.pushed,
                    requested_pages=event.requested,
                    remaining_pages=event.remaining,
                )
            )

    def _await_recovery(self, err: BaseException) -> None:
        """The postcopy connection broke after the commit point. If the destination still
        lives, wait (bounded) for :meth:`recover`; then reconnect and go on."""
        if self._link is not None:
            self._link.close()
        if self._peer is not None and not self._peer.alive(grace=1.0):
            raise self._lost(
                PeerClosed(f"the destination process died ({err})", phase="postcopy"),
                "postcopy",
            ) from err
        timeout = self.options.timeout
        self._phases.advance(SourcePhase.RECOVERING)
        self._emit(RecoveringEvent(self._t(), reason=str(err), timeout=timeout))
        log.warning("postcopy: connection lost (%s); waiting for a recovery", err)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise self._lost(
                    PeerTimeout(
                        f"the postcopy connection broke ({err}) and was not taken up again "
                        f"within {timeout:g} s (pageflip migrate --resume)",
                        phase="recovering",
                    ),
                    "recovering",
                ) from err
            if self._peer is not None and not self._peer.alive():
                raise self._lost(
                    PeerClosed("the destination process died", phase="recovering"), "recovering"
                ) from err
            try:
                address = self._recover.get(timeout=min(0.2, left) if left is not None else 0.2)
            except queue.Empty:
                continue
            try:
                self._reconnect(address)
            except (PageflipError, OSError) as again:
                log.warning("postcopy recovery through %s failed: %s", address, again)
                self._emit(RecoveringEvent(self._t(), reason=str(again), timeout=left))
                continue
            self._phases.advance(SourcePhase.POSTCOPY)
            return

    def _reconnect(self, address: Address) -> None:
        """A new connection for the same session: HELLO, RECOVER, ACCEPTED."""
        conn = address.connect(self.options.timeout, auth=self.options.auth)
        self._link = open_link(conn, compress=self.options.compress)
        try:
            self._hello()
            self.link.send(stream.Recover(), "recovering")
            answer = self.link.expect(
                (stream.Accepted, stream.Reject), "recovering", self.options.timeout
            )
            if isinstance(answer, stream.Reject):
                raise MigrationError(
                    f"the destination refused the recovery: {answer.reason}",
                    phase="recovering",
                    guest="lost",
                )
        except BaseException:
            self.link.close()
            raise
        self.address = address

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
        tracker = self._tracker if number == 1 and self._tracker is not None else None
        for index, runs in enumerate(runs_per_region):
            every = runs_to_pages(runs)
            for lo in range(0, len(every), CHUNK_PAGES):
                self._check_cancel()
                pages = every[lo : lo + CHUNK_PAGES]
                if tracker is not None and tracker.active:
                    # Round 1 reads every page, chunk by chunk from the first: each chunk is
                    # watched from just before it is read.
                    first = int(pages[0])
                    assert int(pages[-1]) == first + len(pages) - 1  # round 1: every page
                    tracker.arm(index, first, len(pages))
                zero = digests[index].update_pages(pages)
                zeros = int(zero.sum())
                if zeros:
                    zero_runs = pages_to_runs(pages[zero])
                    stats.bytes += link.send(stream.ZeroPages(index, number, zero_runs), "precopy")
                    stats.zero_pages += zeros
                    self._zero[index] += zeros
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
                self._copied[index] += count - zeros
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

    def _finish(self) -> DoneEvent:
        """After RESUMED: the destination runs the guest. Release ours and report."""
        resumed = self._resumed
        assert resumed is not None
        received = time.monotonic()
        paused = self._paused_at or received
        downtime = (resumed.resumed_at if self.address.local else received) - paused
        self._gc.resume()
        self._release_events()
        self._close_tracker()
        self._guest_pause = self._read_guest_pause()
        self._emit(
            ResumedEvent(
                received - self._start,  # dated when RESUMED came, not when the figure did
                downtime=downtime,
                guest_pause=self._guest_pause,
                at=received,
            )
        )
        try:
            if self._postcopy:
                self._phases.advance(SourcePhase.POSTCOPY)
                self._postcopy_finish()
        except GuestLost:
            raise
        except BaseException as err:
            raise self._lost(err, self.phase.value) from err
        finally:
            for digests in self._digests:
                digests.release()
            self._digests = []
        link = self.link
        done = self._done_event(downtime)
        with contextlib.suppress(PageflipError, OSError):
            link.send(stream.Done(stats=done.as_dict()), "done")
        link.close()
        self._release_ptracer()
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

    def _done_event(self, downtime: float) -> DoneEvent:
        """The report: the migration is complete here (the destination runs the guest on
        its own pages)."""
        total = (self._committed_at or time.monotonic()) - self._start
        regions = [
            {
                "name": r.name,
                "pages": r.size // PAGE_SIZE,
                "moved": self._moved[i],
                "copied": self._copied[i],
                "zero": self._zero[i],
            }
            for i, r in enumerate(self.guest.regions)
        ]
        return DoneEvent(
            self._t(),
            mode=self._mode,
            total_seconds=total,
            downtime=downtime,
            bytes_on_wire=self.link.bytes_sent + self.link.bytes_received,
            pages_moved=sum(self._moved),
            pages_copied=sum(self._copied),
            pages_zero=sum(self._zero),
            pages_requested=self._pages_requested,
            rounds=self._rounds,
            digest=self._digest_kind,
            details=self._details,
            guest_pause=self._guest_pause,
            regions=regions,
            pause_steps=self._pause_steps(self._paused_at or 0.0),
        )

    def _read_guest_pause(self) -> float | None:
        """The destination's GUEST_PAUSE, if it comes soon (it follows RESUMED)."""
        try:
            event = self.link.recv("resumed", GUEST_PAUSE_WAIT)
        except (PageflipError, OSError):
            return None  # not worth failing a finished migration for: the figure is missing
        if isinstance(event, stream.GuestPause):
            return event.seconds
        log.debug("expected GUEST_PAUSE after RESUMED, got %s", type(event).__name__)
        return None

    def _close_tracker(self) -> None:
        tracker, self._tracker = self._tracker, None
        if tracker is not None:
            with contextlib.suppress(Exception):
                tracker.close()

    def _release_ptracer(self) -> None:
        """Undo what the run set up for the peer: the ptracer grant and the process watch."""
        self._drop_peer()
        if self._ptracer:
            self._ptracer = False
            forbid_peer_read()

    def _undo(self, err: BaseException, phase: str) -> None:
        """Before the commit point: tell the peer (ABORT), then resume the guest here. In
        that order: a destination that holds a complete copy and sees the source die without
        a word may take the guest over, because a source resumes its copy only after ABORT
        went (see phases)."""
        self._abort_link(err, phase)
        self._gc.resume()
        self._release_events()
        self._release_digests()
        if self._paused_at is not None:
            with contextlib.suppress(Exception):
                self.guest.resume()
        self._close_tracker()
        self._release_ptracer()

    def _failure_text(self, err: BaseException, result: MigrationError) -> str:
        return str(err) if str(err) else str(result)

    def _lost(self, err: BaseException, phase: str) -> GuestLost:
        """After the commit point the destination failed or vanished: the guest is lost.

        Our paused copy is stale (the guest may have run on over there): dropped, unless
        ``keep_source_on_loss`` keeps it, paused and marked stale.
        """
        self._gc.resume()
        self._release_events()
        self._release_digests()
        self._close_tracker()
        if self._link is not None:
            self._link.close()
        self._release_ptracer()
        with contextlib.suppress(Exception):
            self._phases.advance(SourcePhase.LOST)
        why = f"{type(err).__name__}: {err}"
        lost = GuestLost(
            f"after the commit point ({phase}) the destination failed: {why}; the guest is lost",
            phase=phase,
            guest="lost",
        )
        keep = self.options.keep_source_on_loss
        if keep:
            self.stale = (
                f"stale copy: the guest was handed over at the commit point and then lost "
                f"({phase}: {why}); this is its state at the pause"
            )
        else:
            with contextlib.suppress(Exception):
                self.guest.close()
        log.error("%s", lost)
        self._emit(
            FailedEvent(
                self._t(),
                phase=phase,
                error=str(lost),
                error_type=type(err).__name__,
                guest="lost",
                stale_copy=keep,
            )
        )
        return lost


def _gather(digests: PageDigests, runs: Runs) -> bytes:
    """The bytes of the pages in ``runs``, in order (for PAGES frames)."""
    view = digests.view
    return b"".join(
        view[first * PAGE_SIZE : (first + count) * PAGE_SIZE] for first, count in runs.tolist()
    )
