"""Every exception pageflip raises on purpose.

::

    OSError
     └── PageflipError                 base of all; `except OSError` catches it too
          ├── BadArgument              an argument the call cannot take; the message says
          │    │                       what to give instead (also a ValueError)
          │    ├── SpanError           bad offset, length, alignment or buffer
          │    └── WrongType           an argument of a type the call does not take
          │                            (also a TypeError)
          ├── ClosedError              you closed (or gave away) this object already
          ├── BufferInUse              views or arrays still use memory you want to let go
          │                            (also a BufferError)
          ├── FeatureUnavailable       a kernel feature this needs is missing here
          ├── PeerError                about the other side of a channel
          │    ├── PeerClosed          it went away (also a ConnectionError)
          │    ├── PeerRefused         it said no; your data is still yours
          │    ├── PeerAborted         it gave up a migration (ABORT), saying why
          │    ├── PeerTimeout         it did not answer in time (also a TimeoutError)
          │    └── PeerRejected        we said no to it: wrong uid (also a PermissionError)
          ├── ProtocolError
          │    ├── LocalProtocolError  misuse on our side (wrong call for the state)
          │    └── RemoteProtocolError a bad frame or fd from the peer
          ├── StateError               a call in the wrong phase of a state machine
          ├── MigrationError           a migration failed; ``phase`` says where, ``guest``
          │    │                       where the guest runs now ("source": intact there)
          │    ├── DigestMismatch      the destination's pages differ from the source's
          │    └── GuestLost           after the commit point the destination failed or
          │                            vanished: the guest is lost (``guest`` is "lost")
          ├── GuestError               about a guest; ``kind`` names which kind
          │    ├── UnknownGuest        no guest class registered under that kind
          │    │                       (also a LookupError)
          │    ├── BadGuestState       a saved state or received regions that cannot be
          │    │                       restored (also a ValueError); ``field`` says what
          │    └── VmError             about a virtual machine (pageflip.vm)
          │         ├── BadImage       a guest ELF that cannot boot: not PVH, truncated,
          │         │                  too large for the RAM (also a ValueError)
          │         ├── GuestImageError  the VMM's test guest cannot be built: ``missing``
          │         │                  names absent tools (gcc, make), ``output`` is a
          │         │                  failed build's output
          │         └── GuestStopped   the vCPU stopped for good: ``reason`` is the KVM exit,
          │                            ``registers`` the vCPU's registers then
          ├── BenchmarkError           a benchmark's process failed, or a result contradicts
          │    │                       its method (also a RuntimeError)
          │    ├── MigrateBenchmarkError  a run of the migration matrix failed; ``partial``
          │    │                       holds the runs before it
          │    └── VmBenchmarkError    the VM comparison could not go on (a system missing,
          │                            no guest ELF); ``partial`` holds the runs before it
          ├── DemoError                the demo's child process failed or died
          │                            (also a RuntimeError)
          └── LiveError                a live update of a service (pageflip.live) cannot
               │                       go on; the message says why
               ├── UpgradeRunning      another upgrade of this process is under way
               └── UpgradeFailed       the new version failed: it was ended, the old one
                                       serves on; ``reason``, ``stderr`` (its last lines)

Every exception keeps its fields as attributes and pickles with them, because exceptions
cross process boundaries (a worker's error re-raised in its parent).

A class that took the place of a built-in exception keeps that one as a second base
(``BadArgument`` is a ValueError, ``DemoError`` a RuntimeError), so ``except ValueError``
still catches what it caught before. The modules that used to define some of these
(``pageflip.guests``, ``pageflip.demo``, ``pageflip.bench``) import them from here and
still export them. Errors from the kernel stay OSErrors naming the system call. The
``pageflip`` command prints any of these, or any OSError, as one line, ``Type: message``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar


def _rebuild(cls: type[PageflipError], message: str, fields: dict[str, Any]) -> PageflipError:
    return cls(message, **fields)


class PageflipError(OSError):
    """Base of every pageflip error. ``str(err)`` is the message; fields are attributes."""

    #: Subclasses name the keyword fields they carry; each becomes an attribute.
    fields: ClassVar[tuple[str, ...]] = ()
    #: The errno a subclass stands for, so that OSError-aware code can still switch on it.
    default_errno: ClassVar[int | None] = None

    def __init__(self, message: str, **fields: Any) -> None:
        unknown = set(fields) - set(self.fields)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field(s) {sorted(unknown)}")
        if self.default_errno is None:
            super().__init__(message)
        else:
            super().__init__(self.default_errno, message)
        self.message = message
        for name in self.fields:
            setattr(self, name, fields.get(name))

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        values = {name: getattr(self, name, None) for name in self.fields}
        return (_rebuild, (type(self), self.message, values))


class BadArgument(PageflipError, ValueError):
    """An argument the call cannot take (``argument`` names it, if one does); the message
    says what to give instead. Also a ValueError, which is what it was before."""

    fields: ClassVar[tuple[str, ...]] = ("argument",)
    argument: str | None


class SpanError(BadArgument):
    """An offset, length, alignment or buffer that the call cannot take."""

    fields: ClassVar[tuple[str, ...]] = ("offset", "length")
    offset: int | None
    length: int | None


class WrongType(BadArgument, TypeError):
    """An argument of a type the call does not take (also a TypeError, which is what it was
    before); the message names the types it takes."""


class ClosedError(PageflipError):
    """The region, channel or listener was closed (or its pages were gifted) by you."""

    fields: ClassVar[tuple[str, ...]] = ("what",)
    what: str | None


class BufferInUse(PageflipError, BufferError):
    """Memory cannot be unmapped or given away while views or arrays still point into it."""

    fields: ClassVar[tuple[str, ...]] = ("region", "offset", "length", "count")
    region: str | None
    offset: int | None
    length: int | None
    count: int | None


class FeatureUnavailable(PageflipError):
    """A kernel feature is missing here; ``reason`` is what :func:`pageflip.probe` found."""

    fields: ClassVar[tuple[str, ...]] = ("feature", "reason")
    feature: str | None
    reason: str | None


class PeerError(PageflipError):
    """Something about the other side of a channel."""

    fields: ClassVar[tuple[str, ...]] = ("phase",)
    phase: str | None


class PeerClosed(PeerError, ConnectionError):
    """The peer went away (closed, crashed or was killed). ``phase`` says where we were."""

    default_errno = 104  # ECONNRESET


class PeerRefused(PeerError):
    """The peer refused a transfer; ``reason`` is its words. The data stayed with you."""

    fields: ClassVar[tuple[str, ...]] = ("phase", "reason")
    reason: str | None


class PeerAborted(PeerError):
    """The peer abandoned a migration: ``phase`` is where it was, ``reason`` its words."""

    fields: ClassVar[tuple[str, ...]] = ("phase", "reason")
    reason: str | None


class PeerTimeout(PeerError, TimeoutError):
    """The peer did not answer within the timeout. ``phase`` says what we waited for."""

    default_errno = 110  # ETIMEDOUT


class PeerRejected(PeerError, PermissionError):
    """We refused a peer: its credentials (uid) are not ones this listener accepts."""

    fields: ClassVar[tuple[str, ...]] = ("phase", "pid", "uid")
    default_errno = 13  # EACCES
    pid: int | None
    uid: int | None


class ProtocolError(PageflipError):
    """A conversation went wrong."""

    fields: ClassVar[tuple[str, ...]] = ("frame", "offset")
    frame: str | None
    offset: int | None


class LocalProtocolError(ProtocolError):
    """We were asked to do something the protocol does not allow now."""


class RemoteProtocolError(ProtocolError):
    """The peer sent a frame or fd we cannot accept; ``frame`` and ``offset`` say which."""


class StateError(PageflipError):
    """A call in the wrong phase: ``phase`` is where it was, ``needed`` where it had to be."""

    fields: ClassVar[tuple[str, ...]] = ("phase", "needed")
    phase: str | None
    needed: str | None


class MigrationError(PageflipError):
    """A migration failed in ``phase``. ``guest`` says where the guest runs now: "source"
    (resumed there with all its data), "destination", or "lost" (a failure after the commit
    point of postcopy)."""

    fields: ClassVar[tuple[str, ...]] = ("phase", "guest")
    phase: str | None
    guest: str | None


def migration_failure(err: BaseException, phase: str, what: str = "migration") -> MigrationError:
    """``err`` as the MigrationError of a failure before the commit point (the guest is on
    the source): itself if it is one already."""
    if isinstance(err, MigrationError):
        return err
    if isinstance(err, KeyboardInterrupt):
        return MigrationError(f"interrupted in phase {phase}", phase=phase, guest="source")
    return MigrationError(
        f"{what} failed in phase {phase}: {type(err).__name__}: {err}", phase=phase, guest="source"
    )


class DigestMismatch(MigrationError):
    """The destination's copy of a region does not hash like the source's: it does not run."""

    fields: ClassVar[tuple[str, ...]] = ("phase", "guest", "region")
    region: str | None


class GuestLost(MigrationError):
    """After the commit point the destination failed, or could no longer be reached: the
    guest is lost, or its fate is unknown (``phase`` says where). The source's paused copy,
    if it was kept, is stale: the guest may have run on after it."""


class GuestError(PageflipError):
    """Something about a guest; ``kind`` is the guest kind involved (if known)."""

    fields: ClassVar[tuple[str, ...]] = ("kind",)
    kind: str | None


class UnknownGuest(GuestError, LookupError):
    """No guest class is registered under ``kind``; ``known`` lists the kinds there are."""

    fields: ClassVar[tuple[str, ...]] = ("kind", "known")
    known: list[str] | None


class BadGuestState(GuestError, ValueError):
    """A saved state (or the regions given with it) that cannot be restored.

    ``field`` names the state field or region that is wrong.
    """

    fields: ClassVar[tuple[str, ...]] = ("kind", "field")
    field: str | None


class VmError(GuestError):
    """About a virtual machine run by :mod:`pageflip.vm` (``kind`` is "vm")."""


class BadImage(VmError, ValueError):
    """A guest kernel image that cannot be booted; ``path`` is the file."""

    fields: ClassVar[tuple[str, ...]] = ("kind", "path")
    path: str | None


class GuestStopped(VmError):
    """The vCPU stopped for good (a triple fault, an internal error, a halt with interrupts
    off): ``reason`` names the KVM exit, ``registers`` holds the vCPU's registers then."""

    fields: ClassVar[tuple[str, ...]] = ("kind", "reason", "registers")
    reason: str | None
    registers: dict[str, int] | None


class BenchmarkError(PageflipError, RuntimeError):
    """A benchmark process failed, or a result contradicts its method (a move that copied,
    a copy that moved, data that arrived wrong)."""


class MigrateBenchmarkError(BenchmarkError):
    """A run of the migration matrix failed (a migration error, a guest that failed its check,
    a process that died). ``partial`` holds the results of the runs before it (JSON-ready)."""

    fields: ClassVar[tuple[str, ...]] = ("partial",)
    partial: Mapping[str, Any] | None

    def __init__(self, message: str, partial: Mapping[str, Any] | None = None) -> None:
        super().__init__(message, partial=partial)


class VmBenchmarkError(BenchmarkError):
    """The VM comparison (``pageflip bench vm``) failed as a whole: a system it needs is
    missing, or a run could not even be recorded. ``partial`` holds the runs before it."""

    fields: ClassVar[tuple[str, ...]] = ("partial",)
    partial: Mapping[str, Any] | None

    def __init__(self, message: str, partial: Mapping[str, Any] | None = None) -> None:
        super().__init__(message, partial=partial)


class DemoError(PageflipError, RuntimeError):
    """The demo's child process failed or died with an error that is not pageflip's."""


class LiveError(PageflipError):
    """A live update (:mod:`pageflip.live`) cannot go on: a region of another size than
    the old version's, a listener the old version does not have, a state blob over the
    limit, a call in the wrong phase."""


class UpgradeRunning(LiveError):
    """An upgrade was asked for while another one runs (``pid`` is its new process)."""

    fields: ClassVar[tuple[str, ...]] = ("pid",)
    pid: int | None


class UpgradeFailed(LiveError):
    """The new version failed and was ended; the old one serves on, untouched. ``reason``
    is why, ``stderr`` the new version's last lines on stderr (if any)."""

    fields: ClassVar[tuple[str, ...]] = ("reason", "stderr")
    reason: str | None
    stderr: list[str] | None


class GuestImageError(VmError):
    """The VMM's test guest (``pageflip.vm.guest_elf``) cannot be built. ``missing`` lists
    the build tools not found (the message says what to install); ``output`` is what a
    failed build printed."""

    fields: ClassVar[tuple[str, ...]] = ("kind", "missing", "output")
    missing: list[str] | None
    output: str | None


def one_line(err: BaseException) -> str:
    """``Type: message`` on one line, for any error: what a command prints and what a
    control socket answers."""
    if isinstance(err, PageflipError):
        text = str(err)
    elif isinstance(err, OSError):
        text = err.strerror or str(err)
        if err.filename is not None:
            text = f"{text}: {err.filename}"
    else:
        text = str(err)
    return f"{type(err).__name__}: {' '.join(text.split()) or type(err).__name__}"


__all__ = [
    "BadArgument",
    "BadImage",
    "GuestStopped",
    "VmError",
    "BadGuestState",
    "BenchmarkError",
    "BufferInUse",
    "ClosedError",
    "DemoError",
    "DigestMismatch",
    "FeatureUnavailable",
    "GuestError",
    "GuestImageError",
    "GuestLost",
    "LiveError",
    "LocalProtocolError",
    "MigrateBenchmarkError",
    "MigrationError",
    "PageflipError",
    "PeerAborted",
    "PeerClosed",
    "PeerError",
    "PeerRefused",
    "PeerRejected",
    "PeerTimeout",
    "ProtocolError",
    "RemoteProtocolError",
    "SpanError",
    "StateError",
    "UnknownGuest",
    "UpgradeFailed",
    "UpgradeRunning",
    "VmBenchmarkError",
    "WrongType",
]
