"""What a migration reports while it runs: structured events, each a JSON line.

The source emits them (a destination emits its own few); :meth:`MigrationEvent.as_dict`
gives the JSON object with ``"event"`` naming the kind and ``"t"`` the seconds since the
migration started.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True, slots=True)
class MigrationEvent:
    kind: ClassVar[str] = "event"
    #: Seconds since the migration started.
    t: float

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"event": self.kind}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = round(value, 6) if isinstance(value, float) else value
        return out

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class SetupEvent(MigrationEvent):
    """Connected and agreed: the mode, the regions and what both sides can do."""

    kind: ClassVar[str] = "setup"
    mode: str
    transport: str
    regions: list[dict[str, Any]]
    total_bytes: int
    features: list[str]
    downtime_limit: float


@dataclass(frozen=True, slots=True)
class ProgressEvent(MigrationEvent):
    """Within a round: how much is left. ``remaining_pages`` never goes up within a round."""

    kind: ClassVar[str] = "progress"
    round: int
    sent_pages: int
    remaining_pages: int
    total_pages: int
    rate: float  # bytes per second in this round so far


@dataclass(frozen=True, slots=True)
class RoundEvent(MigrationEvent):
    """One precopy round finished."""

    kind: ClassVar[str] = "round"
    round: int
    pages: int
    bytes: int
    zero_pages: int
    seconds: float
    bandwidth: float  # bytes per second the round achieved, end to end
    dirty_pages: int  # written while the round ran: what the next round must send
    dirty_rate: float  # bytes per second
    expected_downtime: float  # seconds, if we switched over now


@dataclass(frozen=True, slots=True)
class SwitchoverEvent(MigrationEvent):
    """The guest is paused; the last pages and its state go now."""

    kind: ClassVar[str] = "switchover"
    round: int
    remaining_pages: int
    expected_downtime: float
    reason: str  # why now: converged, forced after max rounds, flip, postcopy


@dataclass(frozen=True, slots=True)
class ResumedEvent(MigrationEvent):
    """The destination runs the guest (the commit point)."""

    kind: ClassVar[str] = "resumed"
    downtime: float


@dataclass(frozen=True, slots=True)
class PostcopyEvent(MigrationEvent):
    """Postcopy progress: pages pushed in the background and fetched on demand."""

    kind: ClassVar[str] = "postcopy"
    pushed_pages: int
    requested_pages: int
    remaining_pages: int


@dataclass(frozen=True, slots=True)
class DoneEvent(MigrationEvent):
    """The migration finished: the destination runs the guest, the source holds no copy."""

    kind: ClassVar[str] = "done"
    mode: str
    total_seconds: float
    downtime: float
    bytes_on_wire: int
    pages_moved: int
    pages_copied: int
    pages_zero: int
    pages_requested: int
    rounds: int
    digest: str  # "verified" (xxh3 of every page), or "identity" for flip
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class FailedEvent(MigrationEvent):
    """The migration failed in ``phase``; ``guest`` says where the guest runs now."""

    kind: ClassVar[str] = "failed"
    phase: str
    error: str
    error_type: str
    guest: str  # "source" (resumed, intact) or "lost" (after the commit point)
