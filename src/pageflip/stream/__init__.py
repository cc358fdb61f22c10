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
      SETUP(mode, chunk_pages, regions)     ---->   (with HUGE, each region's kind of pages)
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

Each frame type is declared once, below: an :class:`Event` dataclass of its fields that
writes and reads its own payload, decorated with :func:`~pageflip.stream.table.frame`
(type byte, name, payload bounds), which enters it in the frame table. The
:class:`Encoder` and :class:`Decoder` find frames in the table and know none by name;
:class:`FrameType` and ``__all__`` are made from it. Adding a frame is adding one class.
"""

from __future__ import annotations

import json
import operator
import struct
from dataclasses import dataclass, field
from typing import Any, Final, Self

import numpy as np

from .._sys.fds import MAX_FDS
from ..errors import RemoteProtocolError
from .decoder import Decoder
from .encoder import Encoder, encode
from .fields import Invalid, Reader, Writer
from .table import FRAMES, Event, frame, frame_types
from .wire import (
    HEADER,
    KNOWN_FEATURES,
    KNOWN_PAGE_FLAGS,
    MAGIC,
    MAX_GUEST_KIND,
    MAX_NAME,
    MAX_PAGE_SIZE,
    MAX_PAYLOAD,
    MAX_RAW,
    MAX_REGION_SIZE,
    MAX_REGIONS,
    MAX_RUNS,
    MAX_STATE,
    MAX_STATS,
    MAX_TEXT,
    MIN_PAGE_SIZE,
    NFDS_AT,
    RUN_SIZE,
    U8,
    U16,
    U32,
    U64,
    VERSION,
    Encoding,
    Feature,
    Mode,
    PageFlags,
    PageKind,
    Role,
    Runs,
    bad_run,
    region_problem,
    runs_limit,
    same_runs,
)

__all__ = [
    # codec
    "Decoder",
    "Encoder",
    "encode",
    "handshake_check",
    # events: the base, the parts of some; every frame's event is added below
    "Event",
    "RegionInfo",
    "FlipRegion",
    # enums
    "Feature",
    "Mode",
    "Role",
    "Encoding",
    "PageFlags",
    "PageKind",
    "FrameType",
    "Runs",
    # constants
    "VERSION",
    "MAGIC",
    "HEADER",
    "FLIP_REGION",
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

_SESSION_SIZE = 16
#: A region's flags byte in SETUP: bit 0 movable, bits 1-2 its PageKind, the rest zero.
_MOVABLE = 1
_KIND_SHIFT = 1
_KIND_MASK = 3 << _KIND_SHIFT
_REGION_FLAGS = _MOVABLE | _KIND_MASK

# Fixed parts of payloads.
_HELLO_FIXED = struct.Struct("<HIIB16sB")
_SETUP_FIXED = struct.Struct("<BIIH")
_REGION_FIXED = struct.Struct("<QQB")
_PAGES_FIXED = struct.Struct("<HIBBIQ")
_RUNS_FIXED = struct.Struct("<HII")
_ROUND_END = struct.Struct("<IQQQd")
_REQUEST = struct.Struct("<HQI")
_PROGRESS = struct.Struct("<QQQ")
#: One region of a FLIP payload: index, fd_index, offset, size, inode, sample_digest.
FLIP_REGION: Final = struct.Struct("<HHQQQQ")


class _Signal(Event):
    """A frame without a payload: its type byte says it all."""

    __slots__ = ()

    def write(self, w: Writer) -> None:
        pass

    @classmethod
    def read(cls, r: Reader) -> Self:
        return cls()


# ------------------------------------------------------------------------------- handshake


@frame(1, "HELLO", _HELLO_FIXED.size, _HELLO_FIXED.size + MAX_GUEST_KIND)
@dataclass(slots=True)
class Hello(Event):
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

    def write(self, w: Writer) -> None:
        w.uint(U16, self.version, "version")
        w.uint(U32, self.page_size, "page size")
        if w.uint(U32, self.features, "features") & ~KNOWN_FEATURES:
            raise w.fail(f"unknown features {int(self.features):#x}")
        w.enum(Role, self.role, "role")
        if not isinstance(self.session, bytes) or len(self.session) != _SESSION_SIZE:
            raise w.fail(f"session must be {_SESSION_SIZE} bytes, got {self.session!r}")
        w.put(self.session)
        w.text(U8, self.guest_kind, MAX_GUEST_KIND, "guest kind")

    @classmethod
    def read(cls, r: Reader) -> Self:
        version = r.uint(U16, "version")
        page_size = r.uint(U32, "page size")
        # Features this side does not know of are dropped: they cannot be shared.
        features = Feature(r.uint(U32, "features") & KNOWN_FEATURES)
        role = r.enum(Role, "role")
        session = r.blob(_SESSION_SIZE, "session")
        guest_kind = r.text(U8, MAX_GUEST_KIND, "guest kind")
        r.finish()
        return cls(role, page_size, features, session, guest_kind, version)


#: Stream offsets of HELLO's fields (HELLO is the first frame each way).
_HELLO_AT: Final = {
    "version": HEADER.size,
    "page_size": HEADER.size + 2,
    "role": HEADER.size + 10,
    "guest_kind": HEADER.size + 27,
}


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


@frame(2, "WELCOME", 4)
@dataclass(slots=True)
class Welcome(Event):
    """WELCOME: the destination accepts the HELLO; ``features`` are those both sides share."""

    features: Feature

    def write(self, w: Writer) -> None:
        if w.uint(U32, self.features, "features") & ~KNOWN_FEATURES:
            raise w.fail(f"unknown features {int(self.features):#x}")

    @classmethod
    def read(cls, r: Reader) -> Self:
        at = r.at
        features = r.uint(U32, "features")
        if features & ~KNOWN_FEATURES:
            raise Invalid(f"unknown features {features:#x} cannot be shared", at)
        return cls(Feature(features))


@frame(3, "REJECT", 2, 2 + MAX_TEXT)
@dataclass(slots=True)
class Reject(Event):
    """REJECT: the destination refuses the HELLO (or the SETUP) and says why."""

    reason: str

    def write(self, w: Writer) -> None:
        w.text(U16, self.reason, MAX_TEXT, "reason")

    @classmethod
    def read(cls, r: Reader) -> Self:
        reason = r.text(U16, MAX_TEXT, "reason")
        r.finish()
        return cls(reason)


# ----------------------------------------------------------------------------------- setup


@dataclass(slots=True)
class RegionInfo:
    """One region of a SETUP: where it is in the source, whether it can move, and what
    pages it sits on (always SMALL unless both sides share the HUGE feature); its size is a
    whole number of that kind's pages."""

    name: str
    size: int
    src_address: int
    movable: bool
    pages: PageKind = PageKind.SMALL


@frame(
    4,
    "SETUP",
    _SETUP_FIXED.size,
    _SETUP_FIXED.size + MAX_REGIONS * (_REGION_FIXED.size + 1 + MAX_NAME),
)
@dataclass(slots=True)
class Setup(Event):
    """SETUP: the source describes the migration: mode, digest chunk, its pid, its regions
    (name, size, address, movable, and with the HUGE feature the kind of pages each sits on).

    A :class:`Decoder` or :class:`Encoder` that sees a SETUP learns the region sizes and
    checks every later frame's region index and page runs against them.
    """

    mode: Mode
    #: Digest granularity, in pages (> 0).
    chunk_pages: int
    #: The source's pid, for process_vm_readv (PULL) on the same host.
    src_pid: int
    regions: list[RegionInfo]

    def write(self, w: Writer) -> None:
        w.enum(Mode, self.mode, "mode")
        if not w.uint(U32, self.chunk_pages, "chunk_pages"):
            raise w.fail("chunk_pages is 0")
        w.uint(U32, self.src_pid, "src_pid")
        if len(self.regions) > MAX_REGIONS:
            raise w.fail(f"{len(self.regions)} regions, at most {MAX_REGIONS}")
        w.uint(U16, len(self.regions), "nregions")
        for i, info in enumerate(self.regions):
            size = w.uint(U64, info.size, f"region {i} size")
            address = w.uint(U64, info.src_address, f"region {i} address")
            problem = region_problem(size, address, w.page_size)
            if problem:
                raise w.fail(f"region {i} ({info.name!r}): {problem}")
            try:
                kind = PageKind(info.pages)
            except ValueError:
                raise w.fail(f"region {i}: pages {info.pages!r} is not a PageKind") from None
            problem = _kind_problem(size, kind)
            if problem:
                raise w.fail(f"region {i} ({info.name!r}): {problem}")
            flags = (_MOVABLE if info.movable else 0) | kind << _KIND_SHIFT
            w.uint(U8, flags, f"region {i} flags")
            w.text(U8, info.name, MAX_NAME, f"region {i} name")
        w.regions = tuple(operator.index(info.size) for info in self.regions)

    @classmethod
    def read(cls, r: Reader) -> Self:
        mode = r.enum(Mode, "mode")
        at = r.at
        chunk_pages = r.uint(U32, "chunk_pages")
        if not chunk_pages:
            raise Invalid("chunk_pages is 0", at)
        src_pid = r.uint(U32, "src_pid")
        at = r.at
        n = r.uint(U16, "nregions")
        if n > MAX_REGIONS:
            raise Invalid(f"{n} regions, at most {MAX_REGIONS}", at)
        regions = [_read_region(r, i) for i in range(n)]
        r.finish()
        r.regions = tuple(info.size for info in regions)
        return cls(mode, chunk_pages, src_pid, regions)


def _read_region(r: Reader, i: int) -> RegionInfo:
    at = r.at
    size, address, flags = r.unpack(_REGION_FIXED, f"region {i}")
    problem = region_problem(size, 0, r.page_size)
    if problem:
        raise Invalid(f"region {i}: {problem}", at)
    problem = region_problem(size, address, r.page_size)
    if problem:
        raise Invalid(f"region {i}: {problem}", at + 8)
    if flags & ~_REGION_FLAGS:
        raise Invalid(f"region {i}: unknown flags {flags:#x}", at + 16)
    kind = PageKind((flags & _KIND_MASK) >> _KIND_SHIFT)
    problem = _kind_problem(size, kind)
    if problem:
        raise Invalid(f"region {i}: {problem}", at)
    name = r.text(U8, MAX_NAME, f"region {i} name")
    return RegionInfo(name, size, address, bool(flags & _MOVABLE), kind)


def _kind_problem(size: int, kind: PageKind) -> str | None:
    if size % kind.page_size:
        return f"size {size} is not a whole number of {kind.describe()} pages"
    return None


@frame(5, "ACCEPTED", 0)
@dataclass(slots=True)
class Accepted(_Signal):
    """ACCEPTED: the destination took the SETUP (or a RECOVER): it checked that it has room
    for the regions and has them ready to receive pages."""


# ----------------------------------------------------------------------------------- pages


@frame(6, "PAGES", _PAGES_FIXED.size, MAX_PAYLOAD)
@dataclass(slots=True, eq=False)
class Pages(Event):
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
            and same_runs(self.runs, other.runs)
            and memoryview(self.data).cast("B") == memoryview(other.data).cast("B")
        )

    def write(self, w: Writer) -> None:
        ps = w.page_size
        region = w.region(self.region)
        w.uint(U32, self.round, "round")
        if int(self.flags) & ~KNOWN_PAGE_FLAGS:
            raise w.fail(f"unknown flags {int(self.flags):#x}")
        runs = w.runs(self.runs, region, MAX_RAW // ps)
        raw = w.blob(self.data, "data")
        pages = int(runs[:, 1].sum())
        if raw.nbytes != pages * ps:
            raise w.fail(f"data is {raw.nbytes} bytes, the runs cover {pages * ps}")
        if raw.nbytes > MAX_RAW:
            raise w.fail(f"data is {raw.nbytes} bytes, at most {MAX_RAW}: split the runs")
        packed = w.compressed(raw)
        w.uint(U8, Encoding.RAW if packed is None else Encoding.ZSTD, "encoding")
        w.uint(U8, self.flags, "flags")
        w.uint(U32, len(runs), "nruns")
        w.uint(U64, raw.nbytes, "raw_len")
        w.put(runs.astype("<u8").tobytes())
        w.put(raw if packed is None else packed)

    @classmethod
    def read(cls, r: Reader) -> Self:
        ps = r.page_size
        region = r.region()
        rnd = r.uint(U32, "round")
        encoding = r.enum(Encoding, "encoding")
        at = r.at
        flags = r.uint(U8, "flags")
        if flags & ~KNOWN_PAGE_FLAGS:
            raise Invalid(f"unknown flags {flags:#x}", at)
        n_at = r.at
        n = r.uint(U32, "nruns")
        raw_at = r.at
        raw_len = r.uint(U64, "raw_len")
        if raw_len > MAX_RAW or raw_len % ps:
            raise Invalid(
                f"raw_len {raw_len} is not a multiple of the page size {ps} up to {MAX_RAW}",
                raw_at,
            )
        if n > raw_len // ps:
            raise Invalid(f"{n} runs cannot cover {raw_len // ps} pages", n_at)
        runs = r.runs(n, n_at, region)
        # n <= 16384 runs of at most 2**32 pages each: the sum cannot overflow.
        covered = int(runs[:, 1].sum())
        if covered * ps != raw_len:
            raise Invalid(f"the runs cover {covered} pages, raw_len says {raw_len} bytes", raw_at)
        data_at = r.at
        size = r.left
        if encoding is Encoding.ZSTD:
            return cls(region, rnd, runs, r.inflate(size, raw_len, "data"), PageFlags(flags))
        if size != raw_len:
            raise Invalid(f"{size} bytes of data, raw_len says {raw_len}", data_at)
        return cls(region, rnd, runs, r.raw(size, "data"), PageFlags(flags))


@dataclass(slots=True, eq=False)
class _RunsFrame(Event):
    """A frame naming runs of pages of one region, in one round."""

    region: int
    round: int
    runs: Runs

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, _RunsFrame)
        return (self.region, self.round) == (other.region, other.round) and same_runs(
            self.runs, other.runs
        )

    def write(self, w: Writer) -> None:
        region = w.region(self.region)
        w.uint(U32, self.round, "round")
        most = MAX_RUNS if w.regions is None else (MAX_PAYLOAD - 10) // RUN_SIZE
        runs = w.runs(self.runs, region, most)
        w.uint(U32, len(runs), "nruns")
        w.put(runs.astype("<u8").tobytes())

    @classmethod
    def read(cls, r: Reader) -> Self:
        region = r.region()
        rnd = r.uint(U32, "round")
        n_at = r.at
        n = r.uint(U32, "nruns")
        runs = r.runs(n, n_at, region)
        r.finish()
        return cls(region, rnd, runs)


@frame(7, "ZERO", _RUNS_FIXED.size, MAX_PAYLOAD)
@dataclass(slots=True, eq=False)
class ZeroPages(_RunsFrame):
    """ZERO: these pages of a region are all zeros (nothing else is sent for them)."""


@frame(8, "PULL", _RUNS_FIXED.size, MAX_PAYLOAD)
@dataclass(slots=True, eq=False)
class PullPages(_RunsFrame):
    """PULL: the destination reads these pages itself, with process_vm_readv, at
    ``src_address + first * page_size`` in the source process (same host only)."""


@frame(19, "DISCARD", _RUNS_FIXED.size, MAX_PAYLOAD)
@dataclass(slots=True, eq=False)
class DiscardPages(_RunsFrame):
    """DISCARD: postcopy: the destination's copies of these pages are stale (written after
    they were sent); it drops them, so that the guest's first touch fetches them anew."""


@frame(9, "ROUND_END", _ROUND_END.size)
@dataclass(slots=True)
class RoundEnd(Event):
    """ROUND_END: the source finished a precopy round; totals of what the round sent."""

    round: int
    pages: int
    bytes: int
    #: Pages the guest dirtied during the round (what the next round has to send).
    dirty_pages: int
    seconds: float

    def write(self, w: Writer) -> None:
        w.uint(U32, self.round, "round")
        w.uint(U64, self.pages, "pages")
        w.uint(U64, self.bytes, "bytes")
        w.uint(U64, self.dirty_pages, "dirty_pages")
        w.time(self.seconds, "seconds")

    @classmethod
    def read(cls, r: Reader) -> Self:
        rnd = r.uint(U32, "round")
        pages = r.uint(U64, "pages")
        nbytes = r.uint(U64, "bytes")
        dirty = r.uint(U64, "dirty_pages")
        seconds = r.time("seconds")
        return cls(rnd, pages, nbytes, dirty, seconds)


@frame(10, "ROUND_ACK", 4)
@dataclass(slots=True)
class RoundAck(Event):
    """ROUND_ACK: the destination has applied every frame of a round."""

    round: int

    def write(self, w: Writer) -> None:
        w.uint(U32, self.round, "round")

    @classmethod
    def read(cls, r: Reader) -> Self:
        return cls(r.uint(U32, "round"))


# ------------------------------------------------------------------------------ switchover


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


@frame(11, "FLIP", 2, 2 + MAX_REGIONS * FLIP_REGION.size, takes_fds=True)
@dataclass(slots=True)
class Flip(Event):
    """FLIP: the source hands its regions' memfds over (the fds travel with the frame).

    A decoded Flip's ``fds`` belong to whoever took the event: close them when done.
    """

    regions: list[FlipRegion]
    fds: list[int] = field(default_factory=list)

    def write(self, w: Writer) -> None:
        fds = list(self.fds)
        if any(not isinstance(fd, int) or fd < 0 for fd in fds):
            raise w.fail(f"fds {fds!r} are not all fds")
        if len(self.regions) > MAX_REGIONS:
            raise w.fail(f"{len(self.regions)} regions, at most {MAX_REGIONS}")
        w.uint(U16, len(self.regions), "nregions")
        seen: set[int] = set()
        used: set[int] = set()
        for i, entry in enumerate(self.regions):
            index = w.region(entry.index)
            if index in seen:
                raise w.fail(f"region {index} appears twice")
            seen.add(index)
            fd_index = w.uint(U16, entry.fd_index, "fd_index")
            if fd_index >= len(fds):
                raise w.fail(f"entry {i}: fd_index {fd_index}, the frame has {len(fds)} fds")
            used.add(fd_index)
            offset = w.uint(U64, entry.offset, "offset")
            size = w.uint(U64, entry.size, "size")
            problem = region_problem(size, offset, w.page_size)
            if problem:
                raise w.fail(f"entry {i}: {problem}")
            if w.regions is not None and size != w.regions[index]:
                raise w.fail(f"entry {i}: size {size}, region {index} is {w.regions[index]}")
            w.uint(U64, entry.inode, "inode")
            w.uint(U64, entry.sample_digest, "sample_digest")
        if used != set(range(len(fds))):
            raise w.fail(f"fds {sorted(set(range(len(fds))) - used)} are not used by any region")
        w.fds = fds

    @classmethod
    def read(cls, r: Reader) -> Self:
        ps, known, nfds = r.page_size, r.regions, len(r.fds)
        at = r.at
        n = r.uint(U16, "nregions")
        if n > MAX_REGIONS:
            raise Invalid(f"{n} regions, at most {MAX_REGIONS}", at)
        regions: list[FlipRegion] = []
        seen: set[int] = set()
        used: set[int] = set()
        for i in range(n):
            at = r.at
            index, fd_index, offset, size, inode, digest = r.unpack(FLIP_REGION, f"entry {i}")
            if known is not None and index >= len(known):
                raise Invalid(f"entry {i}: region {index}, there are {len(known)}", at)
            if index in seen:
                raise Invalid(f"entry {i}: region {index} appears twice", at)
            seen.add(index)
            if fd_index >= nfds:
                raise Invalid(f"entry {i}: fd_index {fd_index}, the frame has {nfds} fds", at + 2)
            used.add(fd_index)
            problem = region_problem(size, 0, ps)
            if problem is None and known is not None and size != known[index]:
                problem = f"size {size}, region {index} is {known[index]} bytes"
            if problem:
                raise Invalid(f"entry {i}: {problem}", at + 12)
            problem = region_problem(size, offset, ps)
            if problem:
                raise Invalid(f"entry {i}: {problem}", at + 4)
            regions.append(FlipRegion(index, fd_index, offset, size, inode, digest))
        r.finish()
        if len(used) != nfds:
            unused = sorted(set(range(nfds)) - used)
            raise Invalid(f"fds {unused} are not used by any region", r.start + NFDS_AT)
        return cls(regions, r.fds)


@frame(25, "LEND", 2, 2 + MAX_REGIONS * FLIP_REGION.size, takes_fds=True)
@dataclass(slots=True)
class Lend(Flip):
    """LEND: a flip's memfds, lent at setup while the guest still runs at the source (the
    fds travel with the frame; same layout as FLIP). The destination maps them and gets
    them ready, but must not write to them: until COMMIT the guest is the source's. The
    FLIP in the pause then names the same memfds (by inode), or with the AHEAD feature
    the SWITCHOVER alone stands for them."""


@frame(26, "PREVIEW", 4, 4 + MAX_STATE)
@dataclass(slots=True)
class Preview(Event):
    """PREVIEW: the guest's state as it stands while it still runs at the source (AHEAD,
    after LEND), for the destination to restore the guest ahead of the pause; the state in
    SWITCHOVER is then all the pause carries, and must be of the same guest."""

    state: bytes

    def write(self, w: Writer) -> None:
        w.state(self.state)

    @classmethod
    def read(cls, r: Reader) -> Self:
        state = r.state()
        r.finish()
        return cls(state)


@frame(12, "SWITCHOVER", 8 + 2 + 4, 8 + 2 + 8 * MAX_REGIONS + 4 + MAX_STATE)
@dataclass(slots=True)
class Switchover(Event):
    """SWITCHOVER: the guest is paused on the source; its state, and a digest per region.

    In postcopy mode ``digests`` may be empty: POSTCOPY_END carries them.
    """

    #: When the guest was paused (seconds, the source's clock).
    paused_at: float
    digests: list[int]
    state: bytes

    def write(self, w: Writer) -> None:
        w.time(self.paused_at, "paused_at")
        w.digests(self.digests, allow_empty=True)
        w.state(self.state)

    @classmethod
    def read(cls, r: Reader) -> Self:
        paused_at = r.time("paused_at")
        digests = r.digests(allow_empty=True)
        state = r.state()
        r.finish()
        return cls(paused_at, digests, state)


@frame(20, "PREPARED", 0)
@dataclass(slots=True)
class Prepared(_Signal):
    """PREPARED: the destination did everything that can fail (memory mapped and checked,
    the guest's state loaded, its threads and control socket ready) and waits for COMMIT;
    all that is left for it is resuming the guest."""


@frame(21, "COMMIT", 0)
@dataclass(slots=True)
class Commit(_Signal):
    """COMMIT: the source lets go of the guest (the commit point): the destination resumes
    it. The source never resumes its own copy after sending this."""


@frame(13, "RESUMED", 8)
@dataclass(slots=True)
class Resumed(Event):
    """RESUMED: the guest runs on the destination."""

    resumed_at: float

    def write(self, w: Writer) -> None:
        w.time(self.resumed_at, "resumed_at")

    @classmethod
    def read(cls, r: Reader) -> Self:
        return cls(r.time("resumed_at"))


@frame(22, "GUEST_PAUSE", 9)
@dataclass(slots=True)
class GuestPause(Event):
    """GUEST_PAUSE: the pause the guest itself observed around the switchover (seconds, by
    its own clock), or None where the guest cannot tell."""

    seconds: float | None

    def write(self, w: Writer) -> None:
        w.uint(U8, 0 if self.seconds is None else 1, "known")
        w.time(0.0 if self.seconds is None else self.seconds, "seconds")

    @classmethod
    def read(cls, r: Reader) -> Self:
        at = r.at
        known = r.uint(U8, "known")
        if known > 1:
            raise Invalid(f"known is {known}, not 0 or 1", at)
        seconds = r.time("seconds")
        return cls(seconds if known else None)


# -------------------------------------------------------------------------------- postcopy


@frame(14, "REQUEST", _REQUEST.size)
@dataclass(slots=True)
class Request(Event):
    """REQUEST: postcopy, the destination faulted on pages it does not have yet."""

    region: int
    first_page: int
    count: int

    def write(self, w: Writer) -> None:
        region = w.region(self.region)
        first = w.uint(U64, self.first_page, "first_page")
        count = w.uint(U32, self.count, "count")
        run = np.array([[first, count]], dtype=np.uint64)
        bad = bad_run(run, runs_limit(w.page_size, w.regions, region))
        if bad:
            raise w.fail(bad[2])

    @classmethod
    def read(cls, r: Reader) -> Self:
        region = r.region()
        at = r.at
        first = r.uint(U64, "first_page")
        count = r.uint(U32, "count")
        run = np.array([[first, count]], dtype=np.uint64)
        bad = bad_run(run, runs_limit(r.page_size, r.regions, region))
        if bad:
            raise Invalid(bad[2], at + 8 * bad[1])
        return cls(region, first, count)


@frame(24, "POSTCOPY_PROGRESS", _PROGRESS.size)
@dataclass(slots=True)
class PostcopyProgress(Event):
    """POSTCOPY_PROGRESS: the destination's pager at work: pages still missing, pages swept
    in, and faults served; sent a few times a second, it also says the destination lives."""

    remaining: int
    pushed: int
    requested: int

    def write(self, w: Writer) -> None:
        w.uint(U64, self.remaining, "remaining")
        w.uint(U64, self.pushed, "pushed")
        w.uint(U64, self.requested, "requested")

    @classmethod
    def read(cls, r: Reader) -> Self:
        return cls(*r.unpack(_PROGRESS, "progress"))


@frame(15, "POSTCOPY_END", 2, 2 + 8 * MAX_REGIONS)
@dataclass(slots=True)
class PostcopyEnd(Event):
    """POSTCOPY_END: every page has been sent; a digest per region to check them."""

    digests: list[int]

    def write(self, w: Writer) -> None:
        w.digests(self.digests, allow_empty=False)

    @classmethod
    def read(cls, r: Reader) -> Self:
        digests = r.digests(allow_empty=False)
        r.finish()
        return cls(digests)


@frame(18, "VERIFIED", 3, 3 + MAX_TEXT)
@dataclass(slots=True)
class Verified(Event):
    """VERIFIED: the destination checked the region digests."""

    ok: bool
    message: str = ""

    def write(self, w: Writer) -> None:
        w.uint(U8, 1 if self.ok else 0, "ok")
        w.text(U16, self.message, MAX_TEXT, "message")

    @classmethod
    def read(cls, r: Reader) -> Self:
        at = r.at
        ok = r.uint(U8, "ok")
        if ok > 1:
            raise Invalid(f"ok is {ok}, not 0 or 1", at)
        message = r.text(U16, MAX_TEXT, "message")
        r.finish()
        return cls(bool(ok), message)


@frame(23, "RECOVER", 0)
@dataclass(slots=True)
class Recover(_Signal):
    """RECOVER: on a new connection with the same session, the source takes up a postcopy
    whose connection was lost after the commit point."""


# --------------------------------------------------------------------------------- the end


@frame(16, "DONE", 4, 4 + MAX_STATS)
@dataclass(slots=True)
class Done(Event):
    """DONE: the migration is over; ``stats`` is a JSON object of its totals."""

    stats: dict[str, Any]

    def write(self, w: Writer) -> None:
        if not isinstance(self.stats, dict):
            raise w.fail(f"stats must be a dict, got {type(self.stats).__name__}")
        try:
            text = json.dumps(self.stats, allow_nan=False, separators=(",", ":"))
        except (TypeError, ValueError) as err:
            raise w.fail(f"stats are not JSON: {err}") from None
        w.text(U32, text, MAX_STATS, "stats")

    @classmethod
    def read(cls, r: Reader) -> Self:
        at = r.at + U32.size
        text = r.text(U32, MAX_STATS, "stats")
        r.finish()
        try:
            stats = json.loads(text, parse_constant=_refuse_constant)
        except (ValueError, RecursionError) as err:
            raise Invalid(f"stats are not JSON: {err}", at) from None
        if not isinstance(stats, dict):
            raise Invalid(f"stats are a JSON {type(stats).__name__}, not an object", at)
        return cls(stats)


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


@frame(17, "ABORT", 4, 4 + MAX_NAME + MAX_TEXT)
@dataclass(slots=True)
class Abort(Event):
    """ABORT: either side gives up; ``phase`` says where it was. The stream ends after it."""

    phase: str
    reason: str

    def write(self, w: Writer) -> None:
        w.text(U16, self.phase, MAX_NAME, "phase")
        w.text(U16, self.reason, MAX_TEXT, "reason")

    @classmethod
    def read(cls, r: Reader) -> Self:
        phase = r.text(U16, MAX_NAME, "phase")
        reason = r.text(U16, MAX_TEXT, "reason")
        r.finish()
        return cls(phase, reason)


#: The type byte of a frame header; its name is the ``frame`` of protocol errors.
FrameType = frame_types()

__all__ += [f.event.__name__ for f in FRAMES.values()]
