"""The phases of a migration and their legal transitions, as data (one table per side).

A migration hands the guest over at one *commit point*, in two phases::

    source                                   destination
    ------                                   -----------
    SETUP      connect, HELLO, SETUP  ---->  SETUP      room checked (memory, fds, threads);
                                                        regions made; postcopy: pager up
    PRECOPY    rounds of pages        ---->  RECEIVING  pages hashed as they arrive
    SWITCHOVER guest paused; last pages,
               FLIP, SWITCHOVER       ---->  VERIFYING  digests or memfd identity checked,
                                                        state loaded, guest restored paused,
                                                        its threads started (parked), its
                                                        control socket bound; postcopy:
                                                        memory registered with the pager
                                     <----   PREPARED   everything that can fail is done
    ======================== COMMIT ====>  ====================== the commit point
    COMMITTED  waits for RESUMED             RUNNING    resume: the only step left
                                     <----              RESUMED, GUEST_PAUSE
    POSTCOPY   pages still pulled            POSTCOPY   missing pages fetched on fault
    DONE       memory released               DONE

Before COMMIT any failure on either side (a process killed, the socket closed, a bad frame,
a digest mismatch, a timeout, a cancel) leaves the guest running on the source with all its
data: FAILED. The source sends COMMIT only after PREPARED; a COMMIT that cannot be sent never
reached the destination, which resumes only on COMMIT, so the source still resumes its copy.
After COMMIT the source never resumes its copy: if the destination then says it could not
resume (ABORT before the guest ran), the guest runs on the source again (FAILED); if the
destination vanishes instead, the guest is LOST and reported so, never as a success.

A destination that was PREPARED and loses a local source that died (not one that is merely
silent) holds the only complete copy of the guest: it resumes it rather than throw it away.

A call made in the wrong phase raises :class:`~pageflip.errors.StateError` naming the phase
it was in and the ones it needed.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Mapping
from typing import Generic, TypeVar

from ..errors import StateError


class SourcePhase(enum.Enum):
    IDLE = "idle"
    SETUP = "setup"  # connected: handshake and region layout
    PRECOPY = "precopy"  # rounds of dirty pages while the guest runs
    SWITCHOVER = "switchover"  # the guest is paused here; the last pages and the state go
    COMMITTED = "committed"  # COMMIT sent: the guest is the destination's; awaiting RESUMED
    POSTCOPY = "postcopy"  # the destination runs; it still pulls pages from here
    RECOVERING = "recovering"  # postcopy's connection broke: waiting for a new one
    DONE = "done"
    FAILED = "failed"  # before the commit: the guest runs here again, intact
    LOST = "lost"  # after the commit the destination failed: the guest is lost


class DestinationPhase(enum.Enum):
    LISTENING = "listening"
    SETUP = "setup"
    RECEIVING = "receiving"
    VERIFYING = "verifying"  # the state arrived: check, restore, prepare; nothing runs yet
    PREPARED = "prepared"  # everything that can fail is done: waiting for COMMIT
    POSTCOPY = "postcopy"  # running, with missing pages fetched on demand
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"  # nothing ran here
    LOST = "lost"  # the guest ran here, then pages it needs could not come: stopped


_S = SourcePhase
SOURCE_TRANSITIONS: Mapping[SourcePhase, frozenset[SourcePhase]] = {
    _S.IDLE: frozenset({_S.SETUP, _S.FAILED}),
    _S.SETUP: frozenset({_S.PRECOPY, _S.SWITCHOVER, _S.FAILED}),
    _S.PRECOPY: frozenset({_S.SWITCHOVER, _S.FAILED}),
    _S.SWITCHOVER: frozenset({_S.COMMITTED, _S.FAILED}),
    _S.COMMITTED: frozenset({_S.POSTCOPY, _S.DONE, _S.FAILED, _S.LOST}),
    _S.POSTCOPY: frozenset({_S.RECOVERING, _S.DONE, _S.LOST}),
    _S.RECOVERING: frozenset({_S.POSTCOPY, _S.LOST}),
    _S.DONE: frozenset(),
    _S.FAILED: frozenset(),
    _S.LOST: frozenset(),
}

_D = DestinationPhase
DESTINATION_TRANSITIONS: Mapping[DestinationPhase, frozenset[DestinationPhase]] = {
    _D.LISTENING: frozenset({_D.SETUP, _D.FAILED}),
    _D.SETUP: frozenset({_D.RECEIVING, _D.FAILED}),
    _D.RECEIVING: frozenset({_D.VERIFYING, _D.FAILED}),
    _D.VERIFYING: frozenset({_D.PREPARED, _D.FAILED}),
    _D.PREPARED: frozenset({_D.RUNNING, _D.POSTCOPY, _D.FAILED}),
    _D.POSTCOPY: frozenset({_D.RUNNING, _D.LOST}),
    _D.RUNNING: frozenset({_D.DONE}),
    _D.DONE: frozenset(),
    _D.FAILED: frozenset(),
    _D.LOST: frozenset(),
}

#: Source phases after the commit point: the guest is no longer the source's to resume.
COMMITTED_PHASES = frozenset({_S.COMMITTED, _S.POSTCOPY, _S.RECOVERING, _S.DONE, _S.LOST})


P = TypeVar("P", bound=enum.Enum)


class PhaseMachine(Generic[P]):
    """The current phase of one side, moved only along its table."""

    def __init__(self, table: Mapping[P, frozenset[P]], start: P) -> None:
        self._table: Mapping[P, frozenset[P]] = table
        self._phase: P = start
        self._lock = threading.Lock()
        self.history: list[P] = [start]

    @property
    def phase(self) -> P:
        return self._phase

    def advance(self, to: P) -> None:
        with self._lock:
            allowed = self._table[self._phase]
            if to not in allowed:
                raise StateError(
                    f"cannot go from phase {self._phase.value} to {to.value}",
                    phase=self._phase.value,
                    needed=" or ".join(sorted(p.value for p in self._table if to in self._table[p]))
                    or "none",
                )
            self._phase = to
            self.history.append(to)

    def require(self, *phases: P) -> None:
        """Raise StateError unless the machine is in one of ``phases``."""
        if self._phase not in phases:
            raise StateError(
                f"this needs phase {' or '.join(p.value for p in phases)}, "
                f"the migration is in {self._phase.value}",
                phase=self._phase.value,
                needed=" or ".join(p.value for p in phases),
            )
