"""What a migration reports while it runs: structured events, each a JSON line.

The source emits them (a destination emits its own few); :meth:`MigrationEvent.as_dict`
gives the JSON object with ``"event"`` naming the kind and ``"t"`` the seconds since the
migration started.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar


def jsonable(value: Any) -> Any:
    """``value`` with floats rounded to microseconds and NaN or infinities as None (JSON has
    neither), through lists and dicts."""
    if isinstance(value, float):
        return round(value, 6) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


@dataclass(frozen=True, slots=True)
class MigrationEvent:
    kind: ClassVar[str] = "event"
    #: Seconds since the migration started.
    t: float
    #: When it happened: CLOCK_MONOTONIC (system-wide), so that the events of the two sides
    #: of a local migration line up. Events held back while a guest is paused keep theirs.
    at: float = field(default_factory=time.monotonic, kw_only=True)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"event": self.kind}
        for f in dataclasses.fields(self):
            out[f.name] = jsonable(getattr(self, f.name))
        return out

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), separators=(",", ":"), allow_nan=False)


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
    expected_downtime: float  # seconds, if we switched over now (None in JSON: unknown)


@dataclass(frozen=True, slots=True)
class SwitchoverEvent(MigrationEvent):
    """The guest is paused; the last pages and its state go now."""

    kind: ClassVar[str] = "switchover"
    round: int
    remaining_pages: int
    expected_downtime: float
    reason: str  # why now: converged, forced, flip, postcopy
    #: A precopy that stopped without converging: why, and what comes of it (postcopy, or a
    #: forced pause, said to be over the downtime limit if it is); "" otherwise.
    why: str = ""


@dataclass(frozen=True, slots=True)
class PreparedEvent(MigrationEvent):
    """The destination did everything that can fail; the source commits now."""

    kind: ClassVar[str] = "prepared"


@dataclass(frozen=True, slots=True)
class CommitEvent(MigrationEvent):
    """The commit point: the source let go; the guest is the destination's from here."""

    kind: ClassVar[str] = "commit"


@dataclass(frozen=True, slots=True)
class ResumedEvent(MigrationEvent):
    """The destination runs the guest. ``downtime`` is the engine's figure (pause to
    resume); ``guest_pause`` the gap the guest saw by its own clock, when it can tell."""

    kind: ClassVar[str] = "resumed"
    downtime: float
    guest_pause: float | None = None
    #: The destination's pause budget (see DoneEvent.pause_steps), on the destination.
    pause_steps: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class RecoveringEvent(MigrationEvent):
    """Postcopy after the commit point: the connection broke while both sides live. Each
    waits up to ``timeout`` seconds for a new connection (``pageflip migrate --resume``);
    the destination's pager goes on pulling pages meanwhile."""

    kind: ClassVar[str] = "recovering"
    reason: str
    timeout: float | None


@dataclass(frozen=True, slots=True)
class PostcopyEvent(MigrationEvent):
    """Postcopy progress: pages pushed in the background and fetched on demand."""

    kind: ClassVar[str] = "postcopy"
    pushed_pages: int
    requested_pages: int
    remaining_pages: int
    #: Fault service times (microseconds), when the pager reported them.
    fault_median_us: float | None = None
    fault_p99_us: float | None = None


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
    digest: str  # "verified" (xxh3 of every page), "identity" for flip, or "unchecked"
    details: dict[str, Any] = field(default_factory=dict)
    #: The pause the guest itself saw (seconds), when it can tell.
    guest_pause: float | None = None
    #: Per region: name, pages, and how many were moved, copied and zero.
    regions: list[dict[str, Any]] = field(default_factory=list)
    #: The pause budget: each step of the switchover on this side as ``{"step", "at"}``,
    #: ``at`` in seconds after the guest paused (negative: before it), in order.
    pause_steps: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class FailedEvent(MigrationEvent):
    """The migration failed in ``phase``; ``guest`` says where the guest is now: "source"
    (it runs there again, intact: a failure before the commit point) or "lost" (after it)."""

    kind: ClassVar[str] = "failed"
    phase: str
    error: str
    error_type: str
    guest: str  # "source" or "lost"
    #: After a loss: whether the source kept its paused, stale copy (--keep-source-on-loss).
    stale_copy: bool = False
