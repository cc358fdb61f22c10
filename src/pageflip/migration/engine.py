"""What both sides of a migration share: :class:`Side`, the base of Source and Destination.

Each side moves through its own table of phases (:mod:`.phases`: ``SOURCE_TRANSITIONS``,
``DESTINATION_TRANSITIONS``), talks to its peer over one
:class:`~pageflip.channel.Endpoint`, reports :class:`~.events.MigrationEvent` objects to an
observer, and, when it fails before the
commit point, turns the failure into a :class:`~pageflip.errors.MigrationError` naming the
phase it failed in: it undoes its own part (:meth:`Side._undo`), goes to FAILED and says so
in a :class:`~.events.FailedEvent`. What happens after the commit point differs too much
between the two sides to share (``_lost`` on each).
"""

from __future__ import annotations

import abc
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Generic

from .. import stream
from .._sys.fds import close_all
from ..channel import Endpoint, ProcessWatch
from ..errors import MigrationError, PageflipError, PeerAborted, PeerClosed, migration_failure
from .digests import GcPause, PageDigests
from .events import FailedEvent, MigrationEvent
from .phases import P, PhaseMachine

log = logging.getLogger("pageflip.migration")

#: Frames read past, at most, looking for the word a peer left before it closed.
UNREAD_FRAMES = 64


class Side(abc.ABC, Generic[P]):
    """One side of a migration: its phase, its link, its events, its failure.

    ``table`` is the side's table of phases, ``start`` the phase it starts in and ``failed``
    the one a failure before the commit point ends in. ``what`` names the migration in a
    failure's message ("migration failed in phase ...").
    """

    #: "source" or "destination", in the pause budget's steps.
    side: ClassVar[str]

    def __init__(
        self,
        table: Mapping[P, frozenset[P]],
        start: P,
        failed: P,
        on_event: Callable[[MigrationEvent], None] | None,
        what: str,
    ) -> None:
        self._phases = PhaseMachine(table, start)
        self._failed_phase = failed
        self._what = what
        self._on_event = on_event
        self._link: Endpoint | None = None
        #: A local peer's process, watched by pidfd (None over TCP).
        self._peer: ProcessWatch | None = None
        #: When the run began (time.monotonic()): events are dated from it.
        self._start = 0.0
        #: No cyclic garbage collection while the guest is paused.
        self._gc = GcPause()
        self._digests: list[PageDigests] = []
        #: Events held back while the guest is paused (see _hold_events).
        self._held: list[MigrationEvent] | None = None
        self._held_since = 0.0
        #: The pause budget: (step, time.monotonic()) as each step of the switchover ends.
        self._steps: list[tuple[str, float]] = []

    @property
    def phase(self) -> P:
        return self._phases.phase

    @property
    def link(self) -> Endpoint:
        assert self._link is not None
        return self._link

    def _t(self) -> float:
        """Seconds since the run began: the time of an event."""
        return time.monotonic() - self._start

    def _step(self, name: str, at: float | None = None) -> None:
        """Mark the end of one step of the switchover (now, or at ``at``): the pause budget.
        A list append and a clock read, cheap enough for inside the pause."""
        self._steps.append((name, time.monotonic() if at is None else at))

    def _pause_steps(self, paused_at: float) -> list[dict[str, Any]]:
        """The steps marked so far as ``{"step", "at"}``, ``at`` in seconds after the guest
        paused (``paused_at``, time.monotonic(); the same clock on both sides of a migration
        on one host)."""
        return [{"step": name, "side": self.side, "at": at - paused_at} for name, at in self._steps]

    # -- events ---------------------------------------------------------------------------

    def _emit(self, event: MigrationEvent) -> None:
        if self._held is not None:
            self._held.append(event)
            return
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:  # an observer's bug must not break a migration
                log.exception("migration event handler failed")

    def _hold_events(self) -> None:
        """From the switchover until the guest runs again, events wait: an observer woken
        by one (a display that draws it) would take a CPU the pause needs. A pause that
        lasts longer than a while (:meth:`_let_held_go`) lets them go: then being told
        matters more."""
        if self._held is None:
            self._held = []
            self._held_since = time.monotonic()

    def _let_held_go(self, after: float) -> None:
        """Send the held events if they have waited more than ``after`` seconds; later
        events are held still."""
        if self._held and time.monotonic() - self._held_since > after:
            held, self._held = self._held, None
            for event in held:
                self._emit(event)
            self._held = []

    def _release_events(self) -> None:
        """Stop holding events; send those held."""
        held, self._held = self._held, None
        for event in held or ():
            self._emit(event)

    # -- failure before the commit point --------------------------------------------------

    def _failed(self, err: BaseException) -> MigrationError:
        """Before the commit point: undo our part and tell the peer (:meth:`_undo`), go to
        FAILED, report; returns the MigrationError to raise (naming the phase it failed in).
        The guest is the source's, intact."""
        phase = self.phase.value
        err = self._told_why(err)
        self._undo(err, phase)
        with contextlib.suppress(Exception):
            self._phases.advance(self._failed_phase)
        result = migration_failure(err, phase, self._what)
        self._emit(
            FailedEvent(
                self._t(),
                phase=phase,
                error=self._failure_text(err, result),
                error_type=type(err).__name__,
                guest="source",
            )
        )
        return result

    def _told_why(self, err: BaseException) -> BaseException:
        """The peer's own word for a failure that shows here as a closed connection.

        A peer that gives up says why (ABORT; a destination refusing in setup, REJECT) and
        closes, reading nothing more: our next send on the closed socket fails, with its
        word unread behind frames that were on their way (a busy host's order of things).
        It is read here, without waiting, so that the user learns why the peer gave up and
        not only that it closed."""
        link = self._link
        if not isinstance(err, PeerClosed) or isinstance(err, PeerAborted):
            return err
        if link is None or link.closed:
            return err
        with contextlib.suppress(PageflipError, OSError):
            for _ in range(UNREAD_FRAMES):
                frame = link.poll(err.phase or self.phase.value)
                if frame is None:
                    break
                aborted = link.codec.aborted(frame)
                if aborted is not None:
                    return aborted
                if isinstance(frame, stream.Reject):
                    peer = "destination" if self.side == "source" else "source"
                    return MigrationError(
                        f"the {peer} refused: {frame.reason}",
                        phase=self.phase.value,
                        guest="source",
                    )
                close_all(list(getattr(frame, "fds", [])))
        return err

    @abc.abstractmethod
    def _undo(self, err: BaseException, phase: str) -> None:
        """Undo this side's part of a migration that failed in ``phase``; tell the peer."""

    def _failure_text(self, err: BaseException, result: MigrationError) -> str:
        """The error a FailedEvent gives."""
        return str(result)

    def _abort_link(self, err: BaseException, phase: str, *, tell: bool = True) -> None:
        """Say ABORT to the peer (unless not ``tell``), then close the link."""
        if self._link is not None:
            if tell:
                with contextlib.suppress(Exception):
                    self._link.send(stream.Abort(phase=phase, reason=str(err)), phase)
            self._link.close()

    # -- cleanup --------------------------------------------------------------------------

    def _release_digests(self) -> None:
        for digests in self._digests:
            with contextlib.suppress(Exception):
                digests.release()
        self._digests = []

    def _drop_peer(self) -> None:
        peer, self._peer = self._peer, None
        if peer is not None:
            peer.close()
