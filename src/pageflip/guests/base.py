"""What a migration moves: a *guest*, something that owns regions and can be paused.

A guest is the unit the migration engine works on (docs/design.md, section "Migration"): it
owns a fixed list of :class:`~pageflip.Region` objects (its memory), can stop and restart
every writer to them (:meth:`Guest.pause`, :meth:`Guest.resume`), and can save and load the
small non-memory state that travels during downtime (:meth:`Guest.save_state`,
:meth:`Guest.restore`). A source hands its regions over with :meth:`Guest.release_regions`;
the destination rebuilds the guest on the regions it received with ``restore`` and proves
with :meth:`Guest.verify` that nothing was lost on the way. A guest that keeps its own clock
says how long it saw itself stand still around the switchover
(:meth:`Guest.observed_pause`), to set beside the engine's downtime.

Guest classes register under a short name (:attr:`Guest.kind`) so that a destination can
rebuild whatever kind of guest the source announces: :func:`register`, :func:`guest_class`.

The errors a guest raises on purpose are in :mod:`pageflip.errors` (and importable from
here): :class:`GuestError`, with ``kind`` naming the guest kind; :class:`UnknownGuest`, no
guest class registered under that kind (also a LookupError); :class:`BadGuestState`, a
saved state or received regions that cannot be restored (also a ValueError), ``field``
naming what is wrong.
"""

from __future__ import annotations

import abc
import logging
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Protocol, Self, TypeVar

from ..errors import BadGuestState, GuestError, UnknownGuest
from ..memory import Region
from ..runs import Runs

__all__ = [
    "MAX_STATE_BYTES",
    "BadGuestState",
    "Guest",
    "GuestError",
    "UnknownGuest",
    "VerifyReport",
    "guest_class",
    "guest_kinds",
    "register",
]

logger = logging.getLogger("pageflip.guests")

#: Upper bound for :meth:`Guest.save_state`: the state travels while the guest is paused, so it
#: must stay small whatever the size of the guest's memory.
MAX_STATE_BYTES = 64 << 10


class DirtyTracking(Protocol):
    """Finds the pages a guest wrote: :meth:`start`, then :meth:`collect` per round (per
    region, runs of pages written since the previous call), :meth:`close` at the end.

    ``start(lazily=True)`` may leave the memory unwatched (every page counts as written)
    until :meth:`arm` watches a part of it: a precopy's first round arms each chunk just
    before it reads it, so that the guest does not pay for the protection of its whole
    memory at once. A tracker that protects everything at start ignores both."""

    @property
    def active(self) -> bool: ...

    def start(self, *, lazily: bool = False) -> None: ...

    def arm(self, region: int, first: int, count: int) -> None: ...

    def collect(self) -> list[Runs]: ...

    def close(self) -> None: ...


@dataclass(slots=True)
class VerifyReport:
    """What :meth:`Guest.verify` found.

    ``pages_checked`` pages were proven right (or wrong: see ``problems``);
    ``pages_skipped`` could not be judged (a write was in progress on them). ``ok`` is True
    only when there is no problem at all. ``seconds`` is how long the check took.
    ``observed_pause`` is :meth:`Guest.observed_pause` at the time of the check (seconds, or
    None when the guest cannot tell): a measurement, never a problem.
    """

    ok: bool
    pages_checked: int
    pages_skipped: int
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    observed_pause: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-able data (for migration events)."""
        return asdict(self)


class Guest(abc.ABC):
    """Something that owns regions and can be migrated.

    Lifecycle: running or paused while it owns its regions; after
    :meth:`release_regions` it owns nothing and stays paused; after :meth:`close` it is
    finished. A guest is a context manager that closes it.
    """

    #: The registry name of this kind of guest (see :func:`register`).
    kind: ClassVar[str]
    #: Whether the guest's memory is touched from inside the kernel (a VM's is, by KVM):
    #: a postcopy destination then needs a userfaultfd that takes kernel-mode faults.
    kernel_faults: ClassVar[bool] = False

    @property
    @abc.abstractmethod
    def regions(self) -> list[Region]:
        """The guest's memory, always in the same order; empty once released or closed.

        For a ``flip`` migration every region must be movable.
        """

    @abc.abstractmethod
    def pause(self) -> float:
        """Stop every write to the regions; block until all writers are parked.

        Returns ``time.monotonic()`` at the moment they all were. Until :meth:`resume`, no
        byte of any region changes. Pausing a paused guest returns the earlier moment.
        """

    @classmethod
    def warm_up(cls) -> None:
        """Do the one-time work this kind of guest needs in a new process (lazy imports,
        tables built on first use) now: a destination calls it when a migration begins, so
        that none of it lands in the guest's pause. The default does nothing."""
        return

    @classmethod
    def prepare_regions(cls, regions: list[Region]) -> None:
        """A flip's destination got the regions early (lent, while the guest still runs on
        the source): do now what :meth:`restore` would do with them that takes time. The
        regions are not yet the guest's and must not be written. The default does nothing."""
        return

    @classmethod
    def migration_coming(cls) -> None:
        """A migration of this kind of guest has begun here (a destination got its HELLO):
        build now, while the source's guest still runs, whatever a restore would otherwise
        build inside the pause. The default does nothing."""
        return

    def state_preview(self) -> bytes | None:
        """The state as it stands while the guest still runs (under :data:`MAX_STATE_BYTES`),
        for a flip's destination to restore the guest *ahead* of the pause
        (:meth:`restore_ahead`) while the guest still runs on the source, and in the pause
        hand the state saved there to :meth:`finish_restore`.
        None (the default): this kind of guest cannot be restored ahead."""
        return None

    @classmethod
    def restore_ahead(cls, regions: list[Region], preview: bytes) -> Self:
        """Restore a guest from a :meth:`state_preview` ahead of the pause: :meth:`restore`
        and :meth:`prepare_resume`, and whatever else this kind can do now so that neither
        the pause nor the first moments after the resume pay for it. The guest owns the
        regions once this returns; if it fails, the guest it made is closed (a flip's
        regions are lent: closing them frees nothing of the source's)."""
        guest = cls.restore(regions, preview)
        try:
            guest.prepare_resume()
        except BaseException:
            guest.close()
            raise
        return guest

    def finish_restore(self, state: bytes) -> None:
        """A guest restored ahead from a :meth:`state_preview`, still paused and never
        resumed, takes the state saved in the pause. Must be quick (it is inside the pause)
        and fail (:class:`BadGuestState`) if ``state`` is not of the same guest. The
        default raises: a kind without a preview is never restored ahead."""
        raise BadGuestState(
            f"a {self.kind} guest cannot be restored ahead of its state",
            kind=self.kind,
            field="state",
        )

    def about_to_pause(self) -> None:
        """A migration pauses the guest next (the guest still runs): warm whatever the
        pause will run, so that it runs fast, and wait, a few milliseconds at most, for a
        moment when a pause costs the guest least (a VM: its next halt). The default does
        nothing."""
        return

    def prepare_resume(self) -> None:
        """Do now whatever :meth:`resume` needs that can fail (start threads, say), so that
        resume() itself cannot fail: a destination calls it before it answers PREPARED.
        The default does nothing."""
        return

    @abc.abstractmethod
    def resume(self) -> float:
        """Let the writers run again; returns ``time.monotonic()`` when they were released."""

    @abc.abstractmethod
    def save_state(self) -> bytes:
        """The guest's small non-memory state (under :data:`MAX_STATE_BYTES`), taken paused."""

    @classmethod
    @abc.abstractmethod
    def restore(cls, regions: list[Region], state: bytes) -> Self:
        """Rebuild a guest (paused) on ``regions`` received from the source, with ``state``.

        The guest owns the regions from then on. Raises :class:`BadGuestState` for a state
        or regions that do not fit together; the regions are then still the caller's.
        """

    @abc.abstractmethod
    def status(self) -> dict[str, object]:
        """A JSON-able summary of what the guest is doing, for progress displays and events."""

    @abc.abstractmethod
    def verify(self) -> VerifyReport:
        """Check the guest's memory (may run while the guest runs, from another thread)."""

    def observed_pause(self, timeout: float = 0.0) -> float | None:
        """How long the guest saw its latest pause last, by its own clock (seconds).

        For a migrated guest: from its last sign of life on the source to its first on the
        destination, or longer if it stalled just after the resume (a postcopy guest waits
        for pages then). Set it beside the engine's downtime, which the engine measures from
        the outside. None when the guest cannot tell: it has not run since a pause, its clock
        cannot be compared across the two hosts, or (this default) it keeps no clock at all.

        Waits up to ``timeout`` seconds for the figure to be final (0: the figure as it
        stands now, which may still grow shortly after a resume).
        """
        return None

    def dirty_tracker(self) -> DirtyTracking:
        """What finds the pages written during a precopy: by default the process's own
        page tables (:class:`~pageflip.dirty.DirtyTracker` over :attr:`regions`). A guest
        whose writes bypass them (a VM writes through KVM's mappings) returns its own."""
        from ..dirty import DirtyTracker

        return DirtyTracker(self.regions)

    @abc.abstractmethod
    def release_regions(self) -> list[Region]:
        """Stop using the regions and give them to the caller (to gift them, say).

        The guest must be paused; afterwards it holds no view of them and stays paused.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Stop the guest's threads and close the regions it still owns. Idempotent."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_registry: dict[str, type[Guest]] = {}

_G = TypeVar("_G", bound=type[Guest])


def register(cls: _G) -> _G:
    """Register a guest class under its :attr:`Guest.kind` (usable as a class decorator)."""
    kind = getattr(cls, "kind", None)
    if not isinstance(kind, str) or not kind:
        raise GuestError(f"{cls.__name__} has no kind to register under", kind=None)
    known = _registry.get(kind)
    if known is not None and known is not cls:
        raise GuestError(
            f"guest kind {kind!r} is already registered for {known.__qualname__}", kind=kind
        )
    _registry[kind] = cls
    logger.debug("registered guest kind %r: %s", kind, cls.__qualname__)
    return cls


def guest_class(kind: str) -> type[Guest]:
    """The guest class registered under ``kind``; :class:`UnknownGuest` if there is none."""
    try:
        return _registry[kind]
    except KeyError as err:
        known = guest_kinds()
        raise UnknownGuest(
            f"no guest kind {kind!r} (known: {', '.join(known) or 'none'})",
            kind=kind,
            known=known,
        ) from err


def guest_kinds() -> list[str]:
    """The registered guest kinds, sorted."""
    return sorted(_registry)
