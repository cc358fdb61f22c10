"""The phases of a migration and their legal transitions, as data (one table per side).

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
    POSTCOPY = "postcopy"  # the destination runs; pages still flow to it
    COMMITTED = "committed"  # the destination runs the guest; ours is released
    DONE = "done"
    FAILED = "failed"  # before the commit: the guest runs here again, intact


class DestinationPhase(enum.Enum):
    LISTENING = "listening"
    SETUP = "setup"
    RECEIVING = "receiving"
    VERIFYING = "verifying"  # the state arrived; digests checked before anything runs
    POSTCOPY = "postcopy"  # running, with missing pages fetched on demand
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"  # nothing ran here
    STOPPED = "stopped"  # the source took the guest back after we had resumed


_S = SourcePhase
SOURCE_TRANSITIONS: Mapping[SourcePhase, frozenset[SourcePhase]] = {
    _S.IDLE: frozenset({_S.SETUP, _S.FAILED}),
    _S.SETUP: frozenset({_S.PRECOPY, _S.SWITCHOVER, _S.FAILED}),
    _S.PRECOPY: frozenset({_S.SWITCHOVER, _S.FAILED}),
    _S.SWITCHOVER: frozenset({_S.POSTCOPY, _S.COMMITTED, _S.FAILED}),
    _S.POSTCOPY: frozenset({_S.DONE, _S.FAILED}),
    _S.COMMITTED: frozenset({_S.DONE}),
    _S.DONE: frozenset(),
    _S.FAILED: frozenset(),
}

_D = DestinationPhase
DESTINATION_TRANSITIONS: Mapping[DestinationPhase, frozenset[DestinationPhase]] = {
    _D.LISTENING: frozenset({_D.SETUP, _D.FAILED}),
    _D.SETUP: frozenset({_D.RECEIVING, _D.FAILED}),
    _D.RECEIVING: frozenset({_D.VERIFYING, _D.FAILED}),
    _D.VERIFYING: frozenset({_D.RUNNING, _D.POSTCOPY, _D.FAILED}),
    _D.POSTCOPY: frozenset({_D.RUNNING, _D.STOPPED}),
    _D.RUNNING: frozenset({_D.DONE, _D.STOPPED}),
    _D.DONE: frozenset(),
    _D.FAILED: frozenset(),
    _D.STOPPED: frozenset(),
}


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
