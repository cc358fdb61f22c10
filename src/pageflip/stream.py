"""The migration stream, sans I/O: bytes (and fds) in, events out; events in, bytes and fds out.

No sockets, threads or timeouts live here (the h11 model): a transport feeds what it
received to a :class:`Decoder` and takes events out with :meth:`Decoder.next_event`; to
send, it asks an :class:`Encoder` (or :func:`encode`) for the bytes of an event and the fds
to attach to their first byte with SCM_RIGHTS.

Every frame is a 12-byte header and a payload, little endian::

     0      4         5      6      8        12
    +------+---------+------+------+--------+---------------------+
    | PFMS | version | type | nfds | length | payload             |
    |      | u8 (=2) | u8   | u16  | u32    | (length bytes)      |
    +------+---------+------+------+--------+---------------------+

``nfds`` fds belong to the frame and arrive with its first byte (only FLIP carries any).
``length`` is at most :data:`MAX_PAYLOAD`, and each frame type bounds it further. Strings
are UTF-8 behind a u16 byte count unless a frame says u8 or u32. A PAGES payload::

    region u16 | round u32 | encoding u8 | flags u8 | nruns u32 | raw_len u64
    | runs: nruns x (first_page u64, count u64) | data (raw_len bytes, or zstd of them)

Runs are numpy arrays of shape (k, 2), dtype uint64: (first page, page count) in a region.

The conversation (the migration state machine decides what is legal when; this codec only
checks that each frame is well formed)::

    source                                          destination
      HELLO(role=SOURCE, features, session) ---->
                                            <---- HELLO(role=DESTINATION, ...)
                                            <---- WELCOME(shared features) or REJECT(reason)
      SETUP(mode, chunk_pages, regions)     ---->
                                            <---- ACCEPTED (room checked, regions ready)
                                                  or REJECT(reason)
    mode PRECOPY (round 1 sends everything, later rounds what the guest dirtied):
      PAGES / ZERO / PULL ...               ---->
      ROUND_END(round, totals)              ---->
                                            <---- ROUND_ACK(round)
    then the guest pauses on the source:
      FLIP(regions, memfds over SCM_RIGHTS) ---->   (mode FLIP)
      PAGES / ZERO / PULL ... (the last round) --->  (mode PRECOPY)
      DISCARD(region, runs)                 ---->   (mode POSTCOPY: pages written after
                                                     they were sent)
      SWITCHOVER(paused_at, digests, state) ---->
                                            <---- PREPARED (everything that can fail is done)
      COMMIT                                ---->   the commit point
                                            <---- RESUMED(resumed_at)
                                            <---- GUEST_PAUSE(seconds or unknown)
    mode POSTCOPY (the destination's pager pulls the missing pages meanwhile):
      POSTCOPY_END(digests)                 ---->
                                            <---- POSTCOPY_PROGRESS(remaining, ...) ...
                                            <---- VERIFIED(ok, message)
    every migration ends with:
      DONE(stats)                           ---->
    ABORT(phase, reason), then the stream ends: either side before COMMIT; after COMMIT only
    the destination, and only if resuming failed before the guest ran there.
    A postcopy whose connection broke after COMMIT goes on over a new connection:
      HELLO(same session) ... WELCOME, RECOVER ---->
                                            <---- ACCEPTED
      POSTCOPY_END, VERIFIED, DONE as above.

A peer's bad frame raises :class:`~pageflip.errors.RemoteProtocolError` with ``frame`` (the
frame's name, or ``"header"``) and ``offset`` (the stream offset of the offending field);
the decoder then stays broken. Asking to encode an event that breaks a rule raises
:class:`~pageflip.errors.LocalProtocolError`.
"""

from __future__ import annotations

import contextlib
import enum
import json
import math
import operator
import struct
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple, TypeAlias, TypeVar

import numpy as np
import numpy.typing as npt
import zstandard

from ._sys.fds import MAX_FDS, close_all
from ._sys.mm import PAGE_SIZE
from .errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    # codec
    "Decoder",
    "Encoder",
    "encode",
    "handshake_check",
    # events
    "Event",
    "Hello",
    "Welcome",
    "Reject",
    "Setup",
    "RegionInfo",
    "Accepted",
    "Prepared",
    "Commit",
    "GuestPause",
    "PostcopyProgress",
    "Recover",
    "Pages",
    "ZeroPages",
    "DiscardPages",
    "PullPages",
    "RoundEnd",
    "RoundAck",
    "Flip",
    "FlipRegion",
    "Switchover",
    "Resumed",
    "Request",
    "PostcopyEnd",
    "Done",
    "Abort",
    "Verified",
    # enums
    "Feature",
    "Mode",
    "Role",
    "Encoding",
    "PageFlags",
    "FrameType",
    "Runs",
    # constants
    "VERSION",
    "MAGIC",
    "HEADER",
    "MAX_PAYLOAD",
    "MAX_RAW",
    "MAX_RUNS",
    "MAX_REGIONS",
    "MAX_REGION_SIZE",
    "MAX_FDS",
    "MAX_GUEST_KIND",
    "MAX_NAME",
    "MAX_TEXT",
    "MAX_STATE",
    "MAX_STATS",
    "MIN_PAGE_SIZE",
    "MAX_PAGE_SIZE",
]

MAGIC: Final = b"PFMS"
VERSION: Final = 2
HEADER: Final = struct.Struct("<4sBBHI")
#: Largest payload accepted: a PAGES frame of MAX_RAW bytes and up to 64 KiB of the rest.
MAX_PAYLOAD: Final = (64 << 20) + (64 << 10)
#: Most page bytes (before compression) one PAGES frame carries.
MAX_RAW: Final = 64 << 20
#: Most runs in one PAGES, ZERO or PULL frame while the codec does not know the region sizes.
MAX_RUNS: Final = 1 << 20
MAX_REGIONS: Final = 1024
#: Largest region (16 TiB); no run may reach past this many bytes into a region.
MAX_REGION_SIZE: Final = 1 << 44
MAX_GUEST_KIND: Final = 64
MAX_NAME: Final = 255
MAX_TEXT: Final = 4096
#: Largest guest state in a SWITCHOVER frame.
MAX_STATE: Final = 1 << 20
#: Largest DONE frame's JSON text.
MAX_STATS: Final = 64 << 10
#: Page sizes the codec accepts: powers of two in this range.
MIN_PAGE_SIZE: Final = 1 << 12
MAX_PAGE_SIZE: Final = 1 << 21

# Where the header's fields are, from the start of a frame.
_VERSION_AT = 4
_TYPE_AT = 5
_NFDS_AT = 6
_LENGTH_AT = 8

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_F64 = struct.Struct("<d")
_RUN_SIZE = 16
_SESSION_SIZE = 16
_U64_MAX = np.uint64(2**64 - 1)
#: RAW PAGES data at least this big is handed out as a view of the decoder's buffer
#: (which the decoder then lets go of) instead of being copied.
_HANDOVER_MIN = 1 << 16


class FrameType(enum.IntEnum):
    """The type byte of a frame header; its name is the ``frame`` of protocol errors."""

    HELLO = 1
    WELCOME = 2
    REJECT = 3
    SETUP = 4
    ACCEPTED = 5
    PAGES = 6
    ZERO = 7
    PULL = 8
    ROUND_END = 9
    ROUND_ACK = 10
    FLIP = 11
    SWITCHOVER = 12
    RESUMED = 13
    REQUEST = 14
    POSTCOPY_END = 15
    DONE = 16
    ABORT = 17
    VERIFIED = 18
    DISCARD = 19
    PREPARED = 20
    COMMIT = 21
    GUEST_PAUSE = 22
    RECOVER = 23
    POSTCOPY_PROGRESS = 24


class Feature(enum.IntFlag):
    """What a side can do, offered in HELLO; WELCOME carries those both sides share."""

    NONE = 0
    #: Hand memfds over (SCM_RIGHTS): movable regions move instead of being copied.
    FLIP = 1
    #: The destination reads pages from the source's memory with process_vm_readv
    #: (same host only), so PULL frames stand in for PAGES.
    PULL = 2
    #: PAGES data may be zstd-compressed.
    ZSTD = 4
    #: Resume on the destination early and fetch missing pages on demand.
    POSTCOPY = 8
    #: Region digests are xxh3.
    XXH3 = 16


_KNOWN_FEATURES: Final = int(
    Feature.FLIP | Feature.PULL | Feature.ZSTD | Feature.POSTCOPY | Feature.XXH3
)


class Mode(enum.IntEnum):
    """How a migration moves memory (SETUP)."""

    #: Pause, hand every region's memfd over, ship the state, resume: local only.
    FLIP = 1
    #: Rounds of dirty pages while the guest runs, then stop-and-copy what is left.
    PRECOPY = 2
    #: Resume on the destination at once; its pager pulls the pages it misses.
    POSTCOPY = 3
    #: Precopy rounds first; the switchover may then go postcopy (a fallback, or rounds
    #: before a postcopy): the destination gets its pager ready, not its memory registered.
    PRECOPY_POSTCOPY = 4


class Role(enum.IntEnum):
    """Which end of a migration a HELLO comes from."""

    SOURCE = 1
    DESTINATION = 2


class Encoding(enum.IntEnum):
    """How the data of a PAGES frame is encoded on the wire."""

    RAW = 0
    ZSTD = 1


class PageFlags(enum.IntFlag):
    """Flags of a PAGES frame."""

    NONE = 0
    #: Postcopy: these pages answer a REQUEST (a guest thread waits for them).
    URGENT = 1


_KNOWN_PAGE_FLAGS: Final = int(PageFlags.URGENT)
_MOVABLE = 1

#: Page runs: shape (k, 2), dtype uint64, columns (first_page, count).
Runs: TypeAlias = npt.NDArray[np.uint64]


def _no_runs() -> Runs:
    return np.empty((0, 2), dtype=np.uint64)


def _same_runs(a: Runs, b: Runs) -> bool:
    return bool(np.array_equal(np.asarray(a), np.asarray(b)))


# ---------------------------------------------------------------------------------- events


@dataclass(slots=True)
class Hello:
    """HELLO, the first frame each way: protocol version, page size, features, role.

    Both sides send one and check the other's with :func:`handshake_check`; the decoder
    does not judge ``version`` or ``page_size`` itself, so that the mismatch is reported
    as a handshake failure. Feature bits this side does not know are dropped on decoding.
    """

    role: Role
    page_size: int
    features: Feature
    #: 16 bytes naming the migration, the same in both HELLOs of one session.
    session: bytes
    #: What is being migrated ("workload", "kvm", ...); "" when it does not matter.
    guest_kind: str = ""
    version: int = VERSION


@dataclass(slots=True)
class Welcome:
    """WELCOME: the destination accepts the HELLO; ``features`` are those both sides share."""

    features: Feature


@dataclass(slots=True)
class Reject:
    """REJECT: the destination refuses the HELLO (or the SETUP) and says why."""

    reason: str


@dataclass(slots=True)
class RegionInfo:
    """One region of a SETUP: where it is in the source and whether it can move."""

    name: str
    size: int
    src_address: int
    movable: bool


@dataclass(slots=True)
class Setup:
    """SETUP: the source describes the migration: mode, digest chunk, its pid, its regions.

    A :class:`Decoder` or :class:`Encoder` that sees a SETUP learns the region sizes and
    checks every later frame's region index and page runs against them.
    """

    mode: Mode
    #: Digest granularity, in pages (> 0).
    chunk_pages: int
    #: The source's pid, for process_vm_readv (PULL) on the same host.
    src_pid: int
    regions: list[RegionInfo]


@dataclass(slots=True)
class Accepted:
    """ACCEPTED: the destination took the SETUP (or a RECOVER): it checked that it has room
    for the regions and has them ready to receive pages."""


@dataclass(slots=True)
class Prepared:
    """PREPARED: the destination did everything that can fail (memory mapped and checked,
    the guest's state loaded, its threads and control socket ready) and waits for COMMIT;
    all that is left for it is resuming the guest."""


@dataclass(slots=True)
class Commit:
    """COMMIT: the source lets go of the guest (the commit point): the destination resumes
    it. The source never resumes its own copy after sending this."""


@dataclass(slots=True)
class GuestPause:
    """GUEST_PAUSE: the pause the guest itself observed around the switchover (seconds, by
    its own clock), or None where the guest cannot tell."""

    seconds: float | None


@dataclass(slots=True)
class PostcopyProgress:
    """POSTCOPY_PROGRESS: the destination's pager at work: pages still missing, pages swept
    in, and faults served; sent a few times a second, it also says the destination lives."""

    remaining: int
    pushed: int
    requested: int


@dataclass(slots=True)
class Recover:
    """RECOVER: on a new connection with the same session, the source takes up a postcopy
    whose connection was lost after the commit point."""


@dataclass(slots=True, eq=False)
class Pages:
    """PAGES: the contents of ``runs`` of a region. Decoded events always hold raw data.

    ``data`` is ``sum(count) * page_size`` bytes, the runs' pages one after another. A
    decoded RAW frame's data may be a read-only memoryview that owns its own buffer.
    """

    region: int
    round: int
    runs: Runs
    data: bytes | bytearray | memoryview
    flags: PageFlags = PageFlags.NONE

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Pages):
            return NotImplemented
        return (
            (self.region, self.round, int(self.flags))
            == (other.region, other.round, int(other.flags))
            and _same_runs(self.runs, other.runs)
            and memoryview(self.data).cast("B") == memoryview(other.data).cast("B")
        )


@dataclass(slots=True, eq=False)
class _RunsFrame:
    """A frame naming runs of pages of one region, in one round."""

    region: int
    round: int
    runs: Runs

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, _RunsFrame)
        return (self.region, self.round) == (other.region, other.round) and _same_runs(
            self.runs, other.runs
        )


@dataclass(slots=True, eq=False)
class ZeroPages(_RunsFrame):
    """ZERO: these pages of a region are all zeros (nothing else is sent for them)."""


@dataclass(slots=True, eq=False)
class DiscardPages(_RunsFrame):
    """DISCARD: postcopy: the destination's copies of these pages are stale (written after
    they were sent); it drops them, so that the guest's first touch fetches them anew."""


@dataclass(slots=True, eq=False)
class PullPages(_RunsFrame):
    """PULL: the destination reads these pages itself, with process_vm_readv, at
    ``src_address + first * page_size`` in the source process (same host only)."""


@dataclass(slots=True)
class RoundEnd:
    """ROUND_END: the source finished a precopy round; totals of what the round sent."""

    round: int
    pages: int
    bytes: int
    #: Pages the guest dirtied during the round (what the next round has to send).
    dirty_pages: int
    seconds: float


@dataclass(slots=True)
class RoundAck:
    """ROUND_ACK: the destination has applied every frame of a round."""

    round: int


@dataclass(slots=True)
class FlipRegion:
    """One region of a FLIP: which memfd (by index into the frame's fds) holds it, where."""

    index: int
    fd_index: int
    offset: int
    size: int
    #: The memfd's inode, so the destination can check it got the file it was meant to.
    inode: int
    #: 0 (was a digest of sampled pages; the memfd is checked by identity instead).
    sample_digest: int


@dataclass(slots=True)
class Flip:
    """FLIP: the source hands its regions' memfds over (the fds travel with the frame).

    A decoded Flip's ``fds`` belong to whoever took the event: close them when done.
    """

    regions: list[FlipRegion]
    fds: list[int] = field(default_factory=list)


@dataclass(slots=True)
class Switchover:
    """SWITCHOVER: the guest is paused on the source; its state, and a digest per region.

    In postcopy mode ``digests`` may be empty: POSTCOPY_END carries them.
    """

    #: When the guest was paused (seconds, the source's clock).
    paused_at: float
    digests: list[int]
    state: bytes


@dataclass(slots=True)
class Resumed:
    """RESUMED: the guest runs on the destination."""

    resumed_at: float


@dataclass(slots=True)
class Request:
    """REQUEST: postcopy, the destination faulted on pages it does not have yet."""

    region: int
    first_page: int
    count: int


@dataclass(slots=True)
class PostcopyEnd:
    """POSTCOPY_END: every page has been sent; a digest per region to check them."""

    digests: list[int]


@dataclass(slots=True)
class Done:
    """DONE: the migration is over; ``stats`` is a JSON object of its totals."""

    stats: dict[str, Any]


@dataclass(slots=True)
class Abort:
    """ABORT: either side gives up; ``phase`` says where it was. The stream ends after it."""

    phase: str
    reason: str


@dataclass(slots=True)
class Verified:
    """VERIFIED: the destination checked the region digests."""

    ok: bool
    message: str = ""


Event: TypeAlias = (
    Hello
    | Welcome
    | Reject
    | Setup
    | Accepted
    | Prepared
    | Commit
    | GuestPause
    | PostcopyProgress
    | Recover
    | Pages
    | ZeroPages
    | DiscardPages
    | PullPages
    | RoundEnd
    | RoundAck
    | Flip
    | Switchover
    | Resumed
    | Request
    | PostcopyEnd
    | Done
    | Abort
    | Verified
)

_FRAME_OF: Final[dict[type[Any], FrameType]] = {
    Hello: FrameType.HELLO,
    Welcome: FrameType.WELCOME,
    Reject: FrameType.REJECT,
    Setup: FrameType.SETUP,
    Accepted: FrameType.ACCEPTED,
    Prepared: FrameType.PREPARED,
    Commit: FrameType.COMMIT,
    GuestPause: FrameType.GUEST_PAUSE,
    PostcopyProgress: FrameType.POSTCOPY_PROGRESS,
    Recover: FrameType.RECOVER,
    Pages: FrameType.PAGES,
    ZeroPages: FrameType.ZERO,
    DiscardPages: FrameType.DISCARD,
    PullPages: FrameType.PULL,
    RoundEnd: FrameType.ROUND_END,
    RoundAck: FrameType.ROUND_ACK,
    Flip: FrameType.FLIP,
    Switchover: FrameType.SWITCHOVER,
    Resumed: FrameType.RESUMED,
    Request: FrameType.REQUEST,
    PostcopyEnd: FrameType.POSTCOPY_END,
    Done: FrameType.DONE,
    Abort: FrameType.ABORT,
    Verified: FrameType.VERIFIED,
}


# ------------------------------------------------------------------ payload sizes per frame

_HELLO_FIXED = struct.Struct("<HIIB16sB")
_SETUP_FIXED = struct.Struct("<BIIH")
_REGION_FIXED = struct.Struct("<QQB")
_PAGES_FIXED = struct.Struct("<HIBBIQ")
_RUNS_FIXED = struct.Struct("<HII")
_ROUND_END = struct.Struct("<IQQQd")
_FLIP_REGION = struct.Struct("<HHQQQQ")
_REQUEST = struct.Struct("<HQI")
_PROGRESS = struct.Struct("<QQQ")

#: Stream offsets of HELLO's fields (HELLO is the first frame each way).
_HELLO_AT: Final = {
    "version": HEADER.size,
    "page_size": HEADER.size + 2,
    "role": HEADER.size + 10,
    "guest_kind": HEADER.size + 27,
}


class _Shape(NamedTuple):
    """Bounds of one frame type's payload, checked as soon as its header is in."""

    least: int
    most: int
    takes_fds: bool = False


_SHAPES: Final[dict[FrameType, _Shape]] = {
    FrameType.HELLO: _Shape(_HELLO_FIXED.size, _HELLO_FIXED.size + MAX_GUEST_KIND),
    FrameType.WELCOME: _Shape(4, 4),
    FrameType.REJECT: _Shape(2, 2 + MAX_TEXT),
    FrameType.SETUP: _Shape(
        _SETUP_FIXED.size, _SETUP_FIXED.size + MAX_REGIONS * (_REGION_FIXED.size + 1 + MAX_NAME)
    ),
    FrameType.ACCEPTED: _Shape(0, 0),
    FrameType.PREPARED: _Shape(0, 0),
    FrameType.COMMIT: _Shape(0, 0),
    FrameType.GUEST_PAUSE: _Shape(9, 9),
    FrameType.RECOVER: _Shape(0, 0),
    FrameType.POSTCOPY_PROGRESS: _Shape(_PROGRESS.size, _PROGRESS.size),
    FrameType.PAGES: _Shape(_PAGES_FIXED.size, MAX_PAYLOAD),
    FrameType.ZERO: _Shape(_RUNS_FIXED.size, MAX_PAYLOAD),
    FrameType.PULL: _Shape(_RUNS_FIXED.size, MAX_PAYLOAD),
    FrameType.DISCARD: _Shape(_RUNS_FIXED.size, MAX_PAYLOAD),
    FrameType.ROUND_END: _Shape(_ROUND_END.size, _ROUND_END.size),
    FrameType.ROUND_ACK: _Shape(4, 4),
    FrameType.FLIP: _Shape(2, 2 + MAX_REGIONS * _FLIP_REGION.size, takes_fds=True),
    FrameType.SWITCHOVER: _Shape(8 + 2 + 4, 8 + 2 + 8 * MAX_REGIONS + 4 + MAX_STATE),
    FrameType.RESUMED: _Shape(8, 8),
    FrameType.REQUEST: _Shape(_REQUEST.size, _REQUEST.size),
    FrameType.POSTCOPY_END: _Shape(2, 2 + 8 * MAX_REGIONS),
    FrameType.DONE: _Shape(4, 4 + MAX_STATS),
    FrameType.ABORT: _Shape(4, 4 + MAX_NAME + MAX_TEXT),
    FrameType.VERIFIED: _Shape(3, 3 + MAX_TEXT),
}


# --------------------------------------------------------------------- checks both sides use


def _page_size_problem(page_size: int) -> str | None:
    if not MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE or page_size & (page_size - 1):
        return (
            f"page size {page_size} is not a power of two from {MIN_PAGE_SIZE} to {MAX_PAGE_SIZE}"
        )
    return None


def _region_problem(size: int, address: int, page_size: int) -> str | None:
    if size <= 0 or size % page_size or size > MAX_REGION_SIZE:
        return (
            f"size {size} is not a positive multiple of the page size {page_size} "
            f"up to {MAX_REGION_SIZE}"
        )
    if address % page_size or address + size > 1 << 64:
        return f"address {address:#x} is not page-aligned or the region ends past 2**64"
    return None


def _time_problem(value: float) -> str | None:
    if not math.isfinite(value) or value < 0:
        return f"{value!r} is not a finite time >= 0"
    return None


def _bad_run(runs: Runs, limit: int) -> tuple[int, int, str] | None:
    """(index, column, why) of the first run that breaks a rule, vectorized; or None.

    Rules: count > 0, first + count does not overflow u64, the run ends within ``limit``
    pages. Column 0 is ``first``, 1 is ``count``.
    """
    if not len(runs):
        return None
    first, count = runs[:, 0], runs[:, 1]
    top = np.uint64(limit)
    zero = count == 0
    overflow = count > _U64_MAX - first
    beyond = count > top - np.minimum(first, top)
    bad = zero | overflow | beyond
    if not bad.any():
        return None
    i = int(np.argmax(bad))
    f, c = int(first[i]), int(count[i])
    if zero[i]:
        return i, 1, "count is 0: a run holds at least one page"
    if overflow[i]:
        return i, 0, f"first page {f} + count {c} overflows 64 bits"
    return i, 0, f"pages {f}..{f + c} run past {limit} pages"


def _runs_limit(page_size: int, regions: tuple[int, ...] | None, region: int) -> int:
    """How many pages a run may reach into ``region``."""
    if regions is None:
        return MAX_REGION_SIZE // page_size
    return regions[region] // page_size


def _check_regions(sizes: Sequence[int] | None, page_size: int) -> tuple[int, ...] | None:
    if sizes is None:
        return None
    out = tuple(int(s) for s in sizes)
    if len(out) > MAX_REGIONS:
        raise LocalProtocolError(f"{len(out)} regions, at most {MAX_REGIONS}")
    for i, size in enumerate(out):
        problem = _region_problem(size, 0, page_size)
        if problem:
            raise LocalProtocolError(f"region {i}: {problem}")
    return out


# ----------------------------------------------------------------------------------- encode

_E = TypeVar("_E", bound=enum.IntEnum)


class _Writer:
    """Collects one payload's fields, checking each; errors are LocalProtocolError."""

    __slots__ = ("frame", "parts", "size")

    def __init__(self, frame: str) -> None:
        self.frame = frame
        self.parts: list[bytes | memoryview] = []
        self.size = 0

    def fail(self, message: str) -> LocalProtocolError:
        return LocalProtocolError(f"cannot encode {self.frame}: {message}", frame=self.frame)

    def put(self, part: bytes | memoryview) -> None:
        self.parts.append(part)
        self.size += len(part) if isinstance(part, bytes) else part.nbytes

    def uint(self, st: struct.Struct, value: int, what: str) -> int:
        try:
            number = operator.index(value)
        except TypeError:
            raise self.fail(f"{what} {value!r} is not an integer") from None
        if not 0 <= number < 1 << (8 * st.size):
            raise self.fail(f"{what} {value!r} is not a u{8 * st.size}")
        self.put(st.pack(number))
        return number

    def time(self, value: float, what: str) -> None:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise self.fail(f"{what} {value!r} is not a number") from None
        problem = _time_problem(number)
        if problem:
            raise self.fail(f"{what}: {problem}")
        self.put(_F64.pack(number))

    def enum(self, cls: type[_E], value: int, what: str) -> None:
        try:
            member = cls(value)
        except ValueError:
            raise self.fail(f"{what} {value!r} is not a {cls.__name__}") from None
        self.uint(_U8, member, what)

    def text(self, prefix: struct.Struct, text: str, limit: int, what: str) -> None:
        try:
            raw = text.encode()
        except (AttributeError, UnicodeEncodeError):
            raise self.fail(f"{what} {text!r} is not encodable text") from None
        if len(raw) > limit:
            raise self.fail(f"{what} is {len(raw)} bytes of UTF-8, at most {limit}")
        self.uint(prefix, len(raw), f"{what} length")
        self.put(raw)

    def blob(self, data: bytes | bytearray | memoryview, what: str) -> memoryview:
        try:
            view = memoryview(data).cast("B")
        except TypeError:
            raise self.fail(f"{what} is not a contiguous buffer") from None
        return view


def _as_runs(w: _Writer, runs: object) -> Runs:
    try:
        arr = np.asarray(runs)
    except (TypeError, ValueError) as err:
        raise w.fail(f"runs are not an array: {err}") from None
    if arr.size == 0:
        return _no_runs()
    if arr.ndim != 2 or arr.shape[1] != 2 or arr.dtype.kind not in "ui":
        raise w.fail(f"runs must be integers of shape (k, 2), got {arr.dtype} {arr.shape}")
    if arr.dtype.kind == "i" and bool((arr < 0).any()):
        raise w.fail("runs hold a negative number")
    return arr.astype(np.uint64, copy=False)


class Encoder:
    """Builds frames: :meth:`encode` returns an event's bytes and the fds to attach to
    their first byte (SCM_RIGHTS).

    ``compress_level`` is the zstd level for PAGES data (None: always RAW). A compressed
    frame is sent only when it is smaller than the raw data; otherwise the frame goes RAW.
    An encoder that encodes a SETUP (or is given ``regions``, their sizes in bytes) checks
    later frames' region indexes and runs against those regions, like the :class:`Decoder`.
    Every rule the decoder enforces is checked here first, as a :class:`LocalProtocolError`.
    """

    def __init__(
        self,
        page_size: int = PAGE_SIZE,
        compress_level: int | None = None,
        *,
        regions: Sequence[int] | None = None,
    ) -> None:
        problem = _page_size_problem(page_size)
        if problem:
            raise LocalProtocolError(problem)
        self._page_size = page_size
        self._level = compress_level
        self._cctx: zstandard.ZstdCompressor | None = None
        if compress_level is not None:
            if not -(1 << 17) <= compress_level <= zstandard.MAX_COMPRESSION_LEVEL:
                raise LocalProtocolError(f"zstd level {compress_level} is out of range")
            self._cctx = zstandard.ZstdCompressor(level=compress_level)
        self._regions = _check_regions(regions, page_size)
        self._builders: dict[FrameType, Callable[[_Writer, Any], list[int]]] = {
            FrameType.HELLO: self._hello,
            FrameType.WELCOME: self._welcome,
            FrameType.REJECT: self._reject,
            FrameType.SETUP: self._setup,
            FrameType.ACCEPTED: self._empty,
            FrameType.PREPARED: self._empty,
            FrameType.COMMIT: self._empty,
            FrameType.GUEST_PAUSE: self._guest_pause,
            FrameType.POSTCOPY_PROGRESS: self._postcopy_progress,
            FrameType.RECOVER: self._empty,
            FrameType.PAGES: self._pages,
            FrameType.ZERO: self._run_frame,
            FrameType.PULL: self._run_frame,
            FrameType.DISCARD: self._run_frame,
            FrameType.ROUND_END: self._round_end,
            FrameType.ROUND_ACK: self._round_ack,
            FrameType.FLIP: self._flip,
            FrameType.SWITCHOVER: self._switchover,
            FrameType.RESUMED: self._resumed,
            FrameType.REQUEST: self._request,
            FrameType.POSTCOPY_END: self._postcopy_end,
            FrameType.DONE: self._done,
            FrameType.ABORT: self._abort,
            FrameType.VERIFIED: self._verified,
        }

    @property
    def page_size(self) -> int:
        return self._page_size

    @property
    def compress_level(self) -> int | None:
        """The zstd level for PAGES data, or None: always RAW."""
        return self._level

    @property
    def regions(self) -> tuple[int, ...] | None:
        """Sizes of the regions (from SETUP), or None while unknown."""
        return self._regions

    @regions.setter
    def regions(self, sizes: Sequence[int] | None) -> None:
        self._regions = _check_regions(sizes, self.page_size)

    def encode(self, event: Event) -> tuple[bytes, list[int]]:
        """The bytes of ``event`` and the fds to attach to their first byte."""
        kind = _FRAME_OF.get(type(event))
        if kind is None:
            raise LocalProtocolError(f"cannot encode {event!r}: not a stream event")
        w = _Writer(kind.name)
        fds = self._builders[kind](w, event)
        if len(fds) > MAX_FDS:
            raise w.fail(f"{len(fds)} fds in one frame, at most {MAX_FDS}")
        shape = _SHAPES[kind]
        if not shape.least <= w.size <= shape.most:
            raise w.fail(f"a payload of {w.size} bytes, at most {shape.most}")
        head = HEADER.pack(MAGIC, VERSION, kind, len(fds), w.size)
        return b"".join([head, *w.parts]), fds

    # Each builder writes one event's payload and returns the fds the frame carries.

    def _region(self, w: _Writer, region: int) -> int:
        index = w.uint(_U16, region, "region")
        if self._regions is not None and index >= len(self._regions):
            raise w.fail(f"region {index}, but there are {len(self._regions)}")
        return index

    def _runs(self, w: _Writer, runs: object, region: int, most: int) -> Runs:
        arr = _as_runs(w, runs)
        if len(arr) > most:
            raise w.fail(f"{len(arr)} runs, at most {most}")
        bad = _bad_run(arr, _runs_limit(self.page_size, self._regions, region))
        if bad:
            raise w.fail(f"run {bad[0]}: {bad[2]}")
        return arr

    def _hello(self, w: _Writer, ev: Hello) -> list[int]:
        w.uint(_U16, ev.version, "version")
        w.uint(_U32, ev.page_size, "page size")
        if w.uint(_U32, ev.features, "features") & ~_KNOWN_FEATURES:
            raise w.fail(f"unknown features {int(ev.features):#x}")
        w.enum(Role, ev.role, "role")
        if not isinstance(ev.session, bytes) or len(ev.session) != _SESSION_SIZE:
            raise w.fail(f"session must be {_SESSION_SIZE} bytes, got {ev.session!r}")
        w.put(ev.session)
        w.text(_U8, ev.guest_kind, MAX_GUEST_KIND, "guest kind")
        return []

    def _welcome(self, w: _Writer, ev: Welcome) -> list[int]:
        if w.uint(_U32, ev.features, "features") & ~_KNOWN_FEATURES:
            raise w.fail(f"unknown features {int(ev.features):#x}")
        return []

    def _reject(self, w: _Writer, ev: Reject) -> list[int]:
        w.text(_U16, ev.reason, MAX_TEXT, "reason")
        return []

    def _setup(self, w: _Writer, ev: Setup) -> list[int]:
        w.enum(Mode, ev.mode, "mode")
        if not w.uint(_U32, ev.chunk_pages, "chunk_pages"):
            raise w.fail("chunk_pages is 0")
        w.uint(_U32, ev.src_pid, "src_pid")
        if len(ev.regions) > MAX_REGIONS:
            raise w.fail(f"{len(ev.regions)} regions, at most {MAX_REGIONS}")
        w.uint(_U16, len(ev.regions), "nregions")
        for i, info in enumerate(ev.regions):
            size = w.uint(_U64, info.size, f"region {i} size")
            address = w.uint(_U64, info.src_address, f"region {i} address")
            problem = _region_problem(size, address, self.page_size)
            if problem:
                raise w.fail(f"region {i} ({info.name!r}): {problem}")
            w.uint(_U8, _MOVABLE if info.movable else 0, f"region {i} flags")
            w.text(_U8, info.name, MAX_NAME, f"region {i} name")
        self._regions = tuple(operator.index(info.size) for info in ev.regions)
        return []

    def _empty(self, w: _Writer, ev: Accepted | Prepared | Commit | Recover) -> list[int]:
        return []

    def _guest_pause(self, w: _Writer, ev: GuestPause) -> list[int]:
        w.uint(_U8, 0 if ev.seconds is None else 1, "known")
        w.time(0.0 if ev.seconds is None else ev.seconds, "seconds")
        return []

    def _postcopy_progress(self, w: _Writer, ev: PostcopyProgress) -> list[int]:
        w.uint(_U64, ev.remaining, "remaining")
        w.uint(_U64, ev.pushed, "pushed")
        w.uint(_U64, ev.requested, "requested")
        return []

    def _pages(self, w: _Writer, ev: Pages) -> list[int]:
        ps = self.page_size
        region = self._region(w, ev.region)
        w.uint(_U32, ev.round, "round")
        if int(ev.flags) & ~_KNOWN_PAGE_FLAGS:
            raise w.fail(f"unknown flags {int(ev.flags):#x}")
        runs = self._runs(w, ev.runs, region, MAX_RAW // ps)
        raw = w.blob(ev.data, "data")
        pages = int(runs[:, 1].sum())
        if raw.nbytes != pages * ps:
            raise w.fail(f"data is {raw.nbytes} bytes, the runs cover {pages * ps}")
        if raw.nbytes > MAX_RAW:
            raise w.fail(f"data is {raw.nbytes} bytes, at most {MAX_RAW}: split the runs")
        encoding, body = Encoding.RAW, raw
        if self._cctx is not None and raw.nbytes:
            packed = self._cctx.compress(raw)
            if len(packed) < raw.nbytes:
                encoding, body = Encoding.ZSTD, memoryview(packed)
        w.uint(_U8, encoding, "encoding")
        w.uint(_U8, ev.flags, "flags")
        w.uint(_U32, len(runs), "nruns")
        w.uint(_U64, raw.nbytes, "raw_len")
        w.put(runs.astype("<u8").tobytes())
        w.put(body)
        return []

    def _run_frame(self, w: _Writer, ev: ZeroPages | PullPages | DiscardPages) -> list[int]:
        region = self._region(w, ev.region)
        w.uint(_U32, ev.round, "round")
        most = MAX_RUNS if self._regions is None else (MAX_PAYLOAD - 10) // _RUN_SIZE
        runs = self._runs(w, ev.runs, region, most)
        w.uint(_U32, len(runs), "nruns")
        w.put(runs.astype("<u8").tobytes())
        return []

    def _round_end(self, w: _Writer, ev: RoundEnd) -> list[int]:
        w.uint(_U32, ev.round, "round")
        w.uint(_U64, ev.pages, "pages")
        w.uint(_U64, ev.bytes, "bytes")
        w.uint(_U64, ev.dirty_pages, "dirty_pages")
        w.time(ev.seconds, "seconds")
        return []

    def _round_ack(self, w: _Writer, ev: RoundAck) -> list[int]:
        w.uint(_U32, ev.round, "round")
        return []

    def _flip(self, w: _Writer, ev: Flip) -> list[int]:
        fds = list(ev.fds)
        if any(not isinstance(fd, int) or fd < 0 for fd in fds):
            raise w.fail(f"fds {fds!r} are not all fds")
        if len(ev.regions) > MAX_REGIONS:
            raise w.fail(f"{len(ev.regions)} regions, at most {MAX_REGIONS}")
        w.uint(_U16, len(ev.regions), "nregions")
        seen: set[int] = set()
        used: set[int] = set()
        for i, r in enumerate(ev.regions):
            index = self._region(w, r.index)
            if index in seen:
                raise w.fail(f"region {index} appears twice")
            seen.add(index)
            fd_index = w.uint(_U16, r.fd_index, "fd_index")
            if fd_index >= len(fds):
                raise w.fail(f"entry {i}: fd_index {fd_index}, the frame has {len(fds)} fds")
            used.add(fd_index)
            offset = w.uint(_U64, r.offset, "offset")
            size = w.uint(_U64, r.size, "size")
            problem = _region_problem(size, offset, self.page_size)
            if problem:
                raise w.fail(f"entry {i}: {problem}")
            if self._regions is not None and size != self._regions[index]:
                raise w.fail(f"entry {i}: size {size}, region {index} is {self._regions[index]}")
            w.uint(_U64, r.inode, "inode")
            w.uint(_U64, r.sample_digest, "sample_digest")
        if used != set(range(len(fds))):
            raise w.fail(f"fds {sorted(set(range(len(fds))) - used)} are not used by any region")
        return fds

    def _digests(self, w: _Writer, digests: list[int], allow_empty: bool) -> None:
        n = len(digests)
        if n > MAX_REGIONS:
            raise w.fail(f"{n} digests, at most {MAX_REGIONS}")
        if self._regions is not None and n != len(self._regions) and not (allow_empty and not n):
            raise w.fail(f"{n} digests for {len(self._regions)} regions")
        w.uint(_U16, n, "nregions")
        for i, digest in enumerate(digests):
            w.uint(_U64, digest, f"digest {i}")

    def _switchover(self, w: _Writer, ev: Switchover) -> list[int]:
        w.time(ev.paused_at, "paused_at")
        self._digests(w, ev.digests, allow_empty=True)
        state = w.blob(ev.state, "state")
        if state.nbytes > MAX_STATE:
            raise w.fail(f"state is {state.nbytes} bytes, at most {MAX_STATE}")
        w.uint(_U32, state.nbytes, "state_len")
        w.put(state)
        return []

    def _resumed(self, w: _Writer, ev: Resumed) -> list[int]:
        w.time(ev.resumed_at, "resumed_at")
        return []

    def _request(self, w: _Writer, ev: Request) -> list[int]:
        region = self._region(w, ev.region)
        first = w.uint(_U64, ev.first_page, "first_page")
        count = w.uint(_U32, ev.count, "count")
        run = np.array([[first, count]], dtype=np.uint64)
        bad = _bad_run(run, _runs_limit(self.page_size, self._regions, region))
        if bad:
            raise w.fail(bad[2])
        return []

    def _postcopy_end(self, w: _Writer, ev: PostcopyEnd) -> list[int]:
        self._digests(w, ev.digests, allow_empty=False)
        return []

    def _done(self, w: _Writer, ev: Done) -> list[int]:
        if not isinstance(ev.stats, dict):
            raise w.fail(f"stats must be a dict, got {type(ev.stats).__name__}")
        try:
            text = json.dumps(ev.stats, allow_nan=False, separators=(",", ":"))
        except (TypeError, ValueError) as err:
            raise w.fail(f"stats are not JSON: {err}") from None
        w.text(_U32, text, MAX_STATS, "stats")
        return []

    def _abort(self, w: _Writer, ev: Abort) -> list[int]:
        w.text(_U16, ev.phase, MAX_NAME, "phase")
        w.text(_U16, ev.reason, MAX_TEXT, "reason")
        return []

    def _verified(self, w: _Writer, ev: Verified) -> list[int]:
        w.uint(_U8, 1 if ev.ok else 0, "ok")
        w.text(_U16, ev.message, MAX_TEXT, "message")
        return []


def encode(
    event: Event, *, compress: int | None = None, page_size: int = PAGE_SIZE
) -> tuple[bytes, list[int]]:
    """The bytes of ``event`` and the fds to attach to their first byte.

    A stateless :class:`Encoder`: ``compress`` is the zstd level for PAGES (None: RAW).
    Region sizes are unknown to it, so runs are bounded by :data:`MAX_RUNS` only.
    """
    return Encoder(page_size, compress).encode(event)


# ----------------------------------------------------------------------------------- decode


class _Invalid(Exception):
    """A field that breaks a rule; ``at`` is its stream offset. Becomes RemoteProtocolError."""

    def __init__(self, message: str, at: int, frame: str = "header") -> None:
        super().__init__(message)
        self.message = message
        self.at = at
        self.frame = frame


class _Payload:
    """A cursor over one frame's payload in the decoder's buffer. Reads past the end of
    the payload, and bytes left after the last field, are errors at their stream offset."""

    __slots__ = ("_base", "_buf", "_end", "_pos", "fds", "start")

    def __init__(
        self, buf: bytearray, pos: int, end: int, base: int, start: int, fds: list[int]
    ) -> None:
        self._buf = buf
        self._pos = pos
        self._end = end
        #: Stream offset of buf[0].
        self._base = base
        #: Stream offset of the frame's first header byte.
        self.start = start
        self.fds = fds

    @property
    def at(self) -> int:
        """Stream offset of the next field."""
        return self._base + self._pos

    @property
    def left(self) -> int:
        return self._end - self._pos

    def take(self, n: int, what: str) -> int:
        """Buffer index of the next ``n`` bytes (field ``what``)."""
        if n > self._end - self._pos:
            raise _Invalid(
                f"{what} needs {n} bytes, the payload has {self._end - self._pos} left", self.at
            )
        pos = self._pos
        self._pos += n
        return pos

    def unpack(self, st: struct.Struct, what: str) -> tuple[Any, ...]:
        return st.unpack_from(self._buf, self.take(st.size, what))

    def uint(self, st: struct.Struct, what: str) -> int:
        value: int = st.unpack_from(self._buf, self.take(st.size, what))[0]
        return value

    def time(self, what: str) -> float:
        at = self.at
        (value,) = self.unpack(_F64, what)
        problem = _time_problem(value)
        if problem:
            raise _Invalid(f"{what}: {problem}", at)
        return float(value)

    def enum(self, cls: type[_E], what: str) -> _E:
        at = self.at
        value = self.uint(_U8, what)
        try:
            return cls(value)
        except ValueError:
            raise _Invalid(f"unknown {what} {value}", at) from None

    def blob(self, n: int, what: str) -> bytes:
        i = self.take(n, what)
        return bytes(memoryview(self._buf)[i : i + n])

    def text(self, prefix: struct.Struct, limit: int, what: str) -> str:
        at = self.at
        n = self.uint(prefix, f"{what} length")
        if n > limit:
            raise _Invalid(f"{what} of {n} bytes, at most {limit}", at)
        at = self.at
        raw = self.blob(n, what)
        try:
            return raw.decode()
        except UnicodeDecodeError as err:
            raise _Invalid(
                f"{what} is not UTF-8 ({err.reason} at its byte {err.start})", at
            ) from None

    def runs(self, n: int) -> Runs:
        if not n:
            return _no_runs()
        i = self.take(n * _RUN_SIZE, f"{n} runs")
        raw = np.frombuffer(self._buf, dtype="<u8", count=2 * n, offset=i)
        return raw.reshape(-1, 2).astype(np.uint64)

    def finish(self) -> None:
        if self._pos != self._end:
            raise _Invalid(f"{self._end - self._pos} bytes after the last field", self.at)


class _QueuedFd(NamedTuple):
    fd: int
    #: Stream offsets of the bytes it arrived with: it belongs to a frame starting there.
    first: int
    limit: int


class Decoder:
    """Feed it bytes and fds as they arrive; take events out with :meth:`next_event`.

    ``page_size`` must be the local page size (PAGES frames are checked against it).
    ``regions`` (sizes in bytes) lets it check region indexes and runs; it also learns them
    from a SETUP frame it decodes. fds that arrive stay owned by the decoder until a frame
    takes them; :meth:`close` closes any that no frame took. After a bad frame every call to
    :meth:`next_event` raises the same :class:`RemoteProtocolError`.
    """

    def __init__(self, page_size: int = PAGE_SIZE, *, regions: Sequence[int] | None = None) -> None:
        problem = _page_size_problem(page_size)
        if problem:
            raise LocalProtocolError(problem)
        self._page_size = page_size
        self._regions = _check_regions(regions, page_size)
        self._buf = bytearray()
        #: Index of the first unread byte in the buffer.
        self._pos = 0
        #: Stream offset of the buffer's first byte.
        self._base = 0
        self._fds: deque[_QueuedFd] = deque()
        self._broken: RemoteProtocolError | None = None
        self._dctx: zstandard.ZstdDecompressor | None = None
        #: Set by a parser that handed a view of the buffer out: replace the buffer.
        self._handover = False
        self._parsers: dict[FrameType, Callable[[_Payload], Event]] = {
            FrameType.HELLO: self._hello,
            FrameType.WELCOME: self._welcome,
            FrameType.REJECT: self._reject,
            FrameType.SETUP: self._setup,
            FrameType.ACCEPTED: lambda p: Accepted(),
            FrameType.PREPARED: lambda p: Prepared(),
            FrameType.COMMIT: lambda p: Commit(),
            FrameType.GUEST_PAUSE: self._guest_pause,
            FrameType.POSTCOPY_PROGRESS: lambda p: PostcopyProgress(
                *p.unpack(_PROGRESS, "progress")
            ),
            FrameType.RECOVER: lambda p: Recover(),
            FrameType.PAGES: self._pages,
            FrameType.ZERO: self._zero,
            FrameType.PULL: self._pull,
            FrameType.DISCARD: self._discard,
            FrameType.ROUND_END: self._round_end,
            FrameType.ROUND_ACK: self._round_ack,
            FrameType.FLIP: self._flip,
            FrameType.SWITCHOVER: self._switchover,
            FrameType.RESUMED: self._resumed,
            FrameType.REQUEST: self._request,
            FrameType.POSTCOPY_END: self._postcopy_end,
            FrameType.DONE: self._done,
            FrameType.ABORT: self._abort,
            FrameType.VERIFIED: self._verified,
        }

    @property
    def page_size(self) -> int:
        return self._page_size

    @property
    def regions(self) -> tuple[int, ...] | None:
        """Sizes of the regions (from SETUP or the constructor), or None while unknown."""
        return self._regions

    @regions.setter
    def regions(self, sizes: Sequence[int] | None) -> None:
        self._regions = _check_regions(sizes, self.page_size)

    @property
    def buffered(self) -> int:
        """Bytes fed that no event has consumed yet."""
        return len(self._buf) - self._pos

    @property
    def offset(self) -> int:
        """Stream offset of the next frame: every byte before it became an event."""
        return self._base + self._pos

    def feed(self, data: bytes | bytearray | memoryview, fds: Sequence[int] | None = None) -> None:
        """Add bytes as they arrived, and the fds that arrived with them (SCM_RIGHTS).

        The decoder owns ``fds`` from now on. They must come with the bytes they arrived
        with: they belong to a frame that starts within ``data`` (or right after it, when
        ``data`` is empty).
        """
        end = self._base + len(self._buf)
        size = data.nbytes if isinstance(data, memoryview) else len(data)
        for fd in fds or ():
            self._fds.append(_QueuedFd(fd, end, end + max(size, 1)))
        if self._broken is None:
            self._buf += data

    def close(self) -> None:
        """Close the fds no event took (and any fed later, on the next call). Idempotent."""
        fds = [queued.fd for queued in self._fds]
        self._fds.clear()
        close_all(fds)

    def __enter__(self) -> Decoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def next_event(self) -> Event | None:
        """The next whole frame's event, or None until more bytes arrive."""
        if self._broken is not None:
            raise self._broken
        try:
            return self._next()
        except _Invalid as bad:
            self._broken = RemoteProtocolError(
                f"bad {bad.frame} frame at stream offset {bad.at}: {bad.message}",
                frame=bad.frame,
                offset=bad.at,
            )
            raise self._broken from None

    def _next(self) -> Event | None:
        buf, start = self._buf, self._pos
        avail = len(buf) - start
        at = self._base + start
        if self._fds and self._fds[0].limit <= at:
            stray = self._fds[0]
            raise _Invalid(
                f"fds arrived with the bytes at {stray.first}..{stray.limit} "
                "but no frame starting there announced them",
                stray.first,
            )
        self._check_header_start(start, avail, at)
        if avail < HEADER.size:
            return None
        _, _, kind, nfds, length = HEADER.unpack_from(buf, start)
        ftype = FrameType(kind)
        name = ftype.name
        shape = _SHAPES[ftype]
        if nfds > MAX_FDS:
            raise _Invalid(f"{nfds} fds, at most {MAX_FDS}", at + _NFDS_AT, name)
        if nfds and not shape.takes_fds:
            raise _Invalid(
                f"announces {nfds} fds, a {name} frame carries none", at + _NFDS_AT, name
            )
        if length > MAX_PAYLOAD:
            raise _Invalid(
                f"a payload of {length} bytes, at most {MAX_PAYLOAD}", at + _LENGTH_AT, name
            )
        if not shape.least <= length <= shape.most:
            sizes = (
                f"{shape.least}" if shape.least == shape.most else f"{shape.least}..{shape.most}"
            )
            raise _Invalid(
                f"a payload of {length} bytes, {name} takes {sizes} bytes",
                at + _LENGTH_AT,
                name,
            )
        end = start + HEADER.size + length
        if len(buf) < end:
            return None
        fds = self._claim(nfds, at, name)
        payload = _Payload(buf, start + HEADER.size, end, self._base, at, fds)
        try:
            event = self._parsers[ftype](payload)
        except _Invalid as bad:
            close_all(fds)
            self._handover = False
            bad.frame = name
            raise
        except BaseException:
            close_all(fds)
            self._handover = False
            raise
        self._consume(end)
        return event

    def _check_header_start(self, start: int, avail: int, at: int) -> None:
        """Refuse a bad magic, version or type as soon as its bytes are in."""
        buf = self._buf
        n = min(avail, len(MAGIC))
        if buf[start : start + n] != MAGIC[:n]:
            raise _Invalid(f"magic {bytes(buf[start : start + n])!r}, expected {MAGIC!r}", at)
        if avail > _VERSION_AT and buf[start + _VERSION_AT] != VERSION:
            version = buf[start + _VERSION_AT]
            raise _Invalid(f"version {version}, expected {VERSION}", at + _VERSION_AT)
        if avail > _TYPE_AT and buf[start + _TYPE_AT] not in _FRAME_TYPES:
            raise _Invalid(f"unknown frame type {buf[start + _TYPE_AT]}", at + _TYPE_AT)

    def _claim(self, nfds: int, at: int, name: str) -> list[int]:
        """The ``nfds`` fds that arrived with the first byte of the frame at ``at``."""
        ready = 0
        for queued in self._fds:
            if ready == nfds or queued.first > at:
                break
            ready += 1
        if ready < nfds:
            raise _Invalid(
                f"announces {nfds} fds, {ready} arrived with its first byte", at + _NFDS_AT, name
            )
        return [self._fds.popleft().fd for _ in range(nfds)]

    def _consume(self, end: int) -> None:
        if self._handover:
            # The event holds a view of the old buffer: start a new one with what follows.
            self._handover = False
            self._buf = self._buf[end:]
            self._base += end
            self._pos = 0
            return
        self._pos = end
        if self._pos == len(self._buf):
            self._base += self._pos
            self._pos = 0
            self._buf.clear()
        elif self._pos >= len(self._buf) - self._pos:
            # Compact once the consumed bytes outnumber the live ones: O(n) overall.
            del self._buf[: self._pos]
            self._base += self._pos
            self._pos = 0

    # Parsers: one per frame type, each reading its payload through a _Payload.

    def _region(self, p: _Payload) -> int:
        at = p.at
        region = p.uint(_U16, "region")
        if self._regions is not None and region >= len(self._regions):
            raise _Invalid(f"region {region}, but there are {len(self._regions)}", at)
        return region

    def _runs(self, p: _Payload, n: int, n_at: int, region: int) -> Runs:
        if self._regions is None and n > MAX_RUNS:
            raise _Invalid(f"{n} runs, at most {MAX_RUNS}", n_at)
        at = p.at
        runs = p.runs(n)
        bad = _bad_run(runs, _runs_limit(self.page_size, self._regions, region))
        if bad:
            i, column, why = bad
            raise _Invalid(f"run {i}: {why}", at + i * _RUN_SIZE + 8 * column)
        return runs

    def _hello(self, p: _Payload) -> Hello:
        version = p.uint(_U16, "version")
        page_size = p.uint(_U32, "page size")
        # Features this side does not know of are dropped: they cannot be shared.
        features = Feature(p.uint(_U32, "features") & _KNOWN_FEATURES)
        role = p.enum(Role, "role")
        session = p.blob(_SESSION_SIZE, "session")
        guest_kind = p.text(_U8, MAX_GUEST_KIND, "guest kind")
        p.finish()
        return Hello(role, page_size, features, session, guest_kind, version)

    def _welcome(self, p: _Payload) -> Welcome:
        at = p.at
        features = p.uint(_U32, "features")
        if features & ~_KNOWN_FEATURES:
            raise _Invalid(f"unknown features {features:#x} cannot be shared", at)
        return Welcome(Feature(features))

    def _reject(self, p: _Payload) -> Reject:
        reason = p.text(_U16, MAX_TEXT, "reason")
        p.finish()
        return Reject(reason)

    def _setup(self, p: _Payload) -> Setup:
        ps = self.page_size
        mode = p.enum(Mode, "mode")
        at = p.at
        chunk_pages = p.uint(_U32, "chunk_pages")
        if not chunk_pages:
            raise _Invalid("chunk_pages is 0", at)
        src_pid = p.uint(_U32, "src_pid")
        at = p.at
        n = p.uint(_U16, "nregions")
        if n > MAX_REGIONS:
            raise _Invalid(f"{n} regions, at most {MAX_REGIONS}", at)
        regions = []
        for i in range(n):
            at = p.at
            size, address, flags = p.unpack(_REGION_FIXED, f"region {i}")
            problem = _region_problem(size, 0, ps)
            if problem:
                raise _Invalid(f"region {i}: {problem}", at)
            problem = _region_problem(size, address, ps)
            if problem:
                raise _Invalid(f"region {i}: {problem}", at + 8)
            if flags & ~_MOVABLE:
                raise _Invalid(f"region {i}: unknown flags {flags:#x}", at + 16)
            name = p.text(_U8, MAX_NAME, f"region {i} name")
            regions.append(RegionInfo(name, size, address, bool(flags & _MOVABLE)))
        p.finish()
        self._regions = tuple(r.size for r in regions)
        return Setup(mode, chunk_pages, src_pid, regions)

    def _guest_pause(self, p: _Payload) -> GuestPause:
        at = p.at
        known = p.uint(_U8, "known")
        if known > 1:
            raise _Invalid(f"known is {known}, not 0 or 1", at)
        seconds = p.time("seconds")
        return GuestPause(seconds if known else None)

    def _pages(self, p: _Payload) -> Pages:
        ps = self.page_size
        region = self._region(p)
        rnd = p.uint(_U32, "round")
        encoding = p.enum(Encoding, "encoding")
        at = p.at
        flags = p.uint(_U8, "flags")
        if flags & ~_KNOWN_PAGE_FLAGS:
            raise _Invalid(f"unknown flags {flags:#x}", at)
        n_at = p.at
        n = p.uint(_U32, "nruns")
        raw_at = p.at
        raw_len = p.uint(_U64, "raw_len")
        if raw_len > MAX_RAW or raw_len % ps:
            raise _Invalid(
                f"raw_len {raw_len} is not a multiple of the page size {ps} up to {MAX_RAW}",
                raw_at,
            )
        if n > raw_len // ps:
            raise _Invalid(f"{n} runs cannot cover {raw_len // ps} pages", n_at)
        runs = self._runs(p, n, n_at, region)
        # n <= 16384 runs of at most 2**32 pages each: the sum cannot overflow.
        covered = int(runs[:, 1].sum())
        if covered * ps != raw_len:
            raise _Invalid(f"the runs cover {covered} pages, raw_len says {raw_len} bytes", raw_at)
        data_at = p.at
        size = p.left
        i = p.take(size, "data")
        if encoding is Encoding.RAW:
            if size != raw_len:
                raise _Invalid(f"{size} bytes of data, raw_len says {raw_len}", data_at)
            data = self._raw(i, size)
        else:
            data = self._inflate(i, size, raw_len, data_at)
        return Pages(region, rnd, runs, data, PageFlags(flags))

    def _raw(self, i: int, size: int) -> bytes | memoryview:
        """RAW data: a view that takes the buffer over when that saves copying much."""
        tail = len(self._buf) - (i + size)
        if size >= _HANDOVER_MIN and tail <= size:
            self._handover = True
            return memoryview(self._buf)[i : i + size].toreadonly()
        return bytes(memoryview(self._buf)[i : i + size])

    def _inflate(self, i: int, size: int, raw_len: int, at: int) -> bytes:
        if not raw_len:
            raise _Invalid("zstd data for 0 raw bytes", at)
        if self._dctx is None:
            self._dctx = zstandard.ZstdDecompressor()
        with memoryview(self._buf) as whole, whole[i : i + size] as src:
            try:
                # A declared content size makes zstd allocate it, whatever the limit.
                declared = zstandard.frame_content_size(src)
                if declared not in (-1, raw_len):
                    raise _Invalid(f"zstd frame of {declared} bytes, raw_len says {raw_len}", at)
                out = self._dctx.decompress(src, max_output_size=raw_len, allow_extra_data=False)
            except zstandard.ZstdError as err:
                raise _Invalid(
                    f"zstd data does not decompress to {raw_len} bytes: {err}", at
                ) from None
        if len(out) != raw_len:
            raise _Invalid(f"zstd data decompresses to {len(out)} bytes, not {raw_len}", at)
        return out

    def _run_frame(self, p: _Payload) -> tuple[int, int, Runs]:
        region = self._region(p)
        rnd = p.uint(_U32, "round")
        n_at = p.at
        n = p.uint(_U32, "nruns")
        runs = self._runs(p, n, n_at, region)
        p.finish()
        return region, rnd, runs

    def _zero(self, p: _Payload) -> ZeroPages:
        return ZeroPages(*self._run_frame(p))

    def _pull(self, p: _Payload) -> PullPages:
        return PullPages(*self._run_frame(p))

    def _discard(self, p: _Payload) -> DiscardPages:
        return DiscardPages(*self._run_frame(p))

    def _round_end(self, p: _Payload) -> RoundEnd:
        rnd = p.uint(_U32, "round")
        pages = p.uint(_U64, "pages")
        nbytes = p.uint(_U64, "bytes")
        dirty = p.uint(_U64, "dirty_pages")
        seconds = p.time("seconds")
        return RoundEnd(rnd, pages, nbytes, dirty, seconds)

    def _round_ack(self, p: _Payload) -> RoundAck:
        return RoundAck(p.uint(_U32, "round"))

    def _flip(self, p: _Payload) -> Flip:
        ps = self.page_size
        nfds = len(p.fds)
        at = p.at
        n = p.uint(_U16, "nregions")
        if n > MAX_REGIONS:
            raise _Invalid(f"{n} regions, at most {MAX_REGIONS}", at)
        regions: list[FlipRegion] = []
        seen: set[int] = set()
        used: set[int] = set()
        for i in range(n):
            at = p.at
            index, fd_index, offset, size, inode, digest = p.unpack(_FLIP_REGION, f"entry {i}")
            if self._regions is not None and index >= len(self._regions):
                raise _Invalid(f"entry {i}: region {index}, there are {len(self._regions)}", at)
            if index in seen:
                raise _Invalid(f"entry {i}: region {index} appears twice", at)
            seen.add(index)
            if fd_index >= nfds:
                raise _Invalid(f"entry {i}: fd_index {fd_index}, the frame has {nfds} fds", at + 2)
            used.add(fd_index)
            problem = _region_problem(size, 0, ps)
            if problem is None and self._regions is not None and size != self._regions[index]:
                problem = f"size {size}, region {index} is {self._regions[index]} bytes"
            if problem:
                raise _Invalid(f"entry {i}: {problem}", at + 12)
            problem = _region_problem(size, offset, ps)
            if problem:
                raise _Invalid(f"entry {i}: {problem}", at + 4)
            regions.append(FlipRegion(index, fd_index, offset, size, inode, digest))
        p.finish()
        if len(used) != nfds:
            unused = sorted(set(range(nfds)) - used)
            raise _Invalid(f"fds {unused} are not used by any region", p.start + _NFDS_AT)
        return Flip(regions, p.fds)

    def _digests(self, p: _Payload, allow_empty: bool) -> list[int]:
        at = p.at
        n = p.uint(_U16, "nregions")
        if n > MAX_REGIONS:
            raise _Invalid(f"{n} digests, at most {MAX_REGIONS}", at)
        known = self._regions
        if known is not None and n != len(known) and not (allow_empty and not n):
            raise _Invalid(f"{n} digests for {len(known)} regions", at)
        return list(p.unpack(struct.Struct(f"<{n}Q"), f"{n} digests"))

    def _switchover(self, p: _Payload) -> Switchover:
        paused_at = p.time("paused_at")
        digests = self._digests(p, allow_empty=True)
        at = p.at
        n = p.uint(_U32, "state_len")
        if n > MAX_STATE:
            raise _Invalid(f"state of {n} bytes, at most {MAX_STATE}", at)
        state = p.blob(n, "state")
        p.finish()
        return Switchover(paused_at, digests, state)

    def _resumed(self, p: _Payload) -> Resumed:
        return Resumed(p.time("resumed_at"))

    def _request(self, p: _Payload) -> Request:
        region = self._region(p)
        at = p.at
        first = p.uint(_U64, "first_page")
        count = p.uint(_U32, "count")
        run = np.array([[first, count]], dtype=np.uint64)
        bad = _bad_run(run, _runs_limit(self.page_size, self._regions, region))
        if bad:
            raise _Invalid(bad[2], at + 8 * bad[1])
        return Request(region, first, count)

    def _postcopy_end(self, p: _Payload) -> PostcopyEnd:
        digests = self._digests(p, allow_empty=False)
        p.finish()
        return PostcopyEnd(digests)

    def _done(self, p: _Payload) -> Done:
        at = p.at + _U32.size
        text = p.text(_U32, MAX_STATS, "stats")
        p.finish()
        try:
            stats = json.loads(text, parse_constant=_refuse_constant)
        except (ValueError, RecursionError) as err:
            raise _Invalid(f"stats are not JSON: {err}", at) from None
        if not isinstance(stats, dict):
            raise _Invalid(f"stats are a JSON {type(stats).__name__}, not an object", at)
        return Done(stats)

    def _abort(self, p: _Payload) -> Abort:
        phase = p.text(_U16, MAX_NAME, "phase")
        reason = p.text(_U16, MAX_TEXT, "reason")
        p.finish()
        return Abort(phase, reason)

    def _verified(self, p: _Payload) -> Verified:
        at = p.at
        ok = p.uint(_U8, "ok")
        if ok > 1:
            raise _Invalid(f"ok is {ok}, not 0 or 1", at)
        message = p.text(_U16, MAX_TEXT, "message")
        p.finish()
        return Verified(bool(ok), message)


_FRAME_TYPES: Final = frozenset(int(t) for t in FrameType)


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


# -------------------------------------------------------------------------------- handshake


def handshake_check(local: Hello, remote: Hello) -> Feature:
    """Check the peer's HELLO against ours; return the features both sides share.

    A mismatch is a :class:`RemoteProtocolError` with ``frame="HELLO"`` whose message
    starts with the phase, "handshake"; ``offset`` is the field's stream offset in the
    peer's stream, where HELLO is the first frame.
    """

    def refuse(message: str, where: str) -> RemoteProtocolError:
        return RemoteProtocolError(
            f"handshake failed: {message}", frame="HELLO", offset=_HELLO_AT[where]
        )

    if remote.version != local.version:
        raise refuse(
            f"the peer speaks version {remote.version}, we speak {local.version}", "version"
        )
    if remote.page_size != local.page_size:
        raise refuse(
            f"the peer's page size is {remote.page_size}, ours is {local.page_size}", "page_size"
        )
    if remote.role == local.role:
        raise refuse(f"both sides are the {Role(local.role).name.lower()}", "role")
    if remote.guest_kind and local.guest_kind and remote.guest_kind != local.guest_kind:
        raise refuse(
            f"the peer migrates a {remote.guest_kind!r}, we a {local.guest_kind!r}", "guest_kind"
        )
    return Feature(int(local.features) & int(remote.features))
