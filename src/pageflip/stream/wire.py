"""The stream's vocabulary: header, limits, enums, and the checks both directions share.

Nothing here knows a frame by name; :mod:`pageflip.stream` declares the frames in these
terms, and the encoder and decoder check them with the functions below.
"""

from __future__ import annotations

import enum
import math
import struct
from collections.abc import Sequence
from typing import Final, Literal, TypeAlias

import numpy as np
import numpy.typing as npt

from ..errors import LocalProtocolError

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
VERSION_AT: Final = 4
TYPE_AT: Final = 5
NFDS_AT: Final = 6
LENGTH_AT: Final = 8

U8: Final = struct.Struct("<B")
U16: Final = struct.Struct("<H")
U32: Final = struct.Struct("<I")
U64: Final = struct.Struct("<Q")
F64: Final = struct.Struct("<d")
#: Bytes of one run on the wire: (first_page u64, count u64).
RUN_SIZE: Final = 16
U64_MAX: Final = np.uint64(2**64 - 1)


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
    #: A flip's memfds are lent at setup (LEND), before the guest pauses: the destination
    #: maps them, fills its page tables and prepares the guest's memory meanwhile, and the
    #: FLIP in the pause only confirms them.
    LEND = 32
    #: A flip's pause carries SWITCHOVER alone: after LEND the source sends a preview of the
    #: guest's state (PREVIEW, when its kind has one) from which the destination restores the
    #: guest ahead, threads started and parked, and in the pause the source checks itself
    #: that its regions are still the lent memfds instead of sending them again in FLIP.
    AHEAD = 64
    #: SETUP says what pages each region sits on (:class:`PageKind`: 4 KiB, hugetlb 2 MiB or
    #: 1 GiB, transparent huge pages), and a destination that copies makes its regions of
    #: the same kind. Without it every region is announced, and made, on 4 KiB pages.
    HUGE = 128


KNOWN_FEATURES: Final = int(
    Feature.FLIP
    | Feature.PULL
    | Feature.ZSTD
    | Feature.POSTCOPY
    | Feature.XXH3
    | Feature.LEND
    | Feature.AHEAD
    | Feature.HUGE
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


KNOWN_PAGE_FLAGS: Final = int(PageFlags.URGENT)


class PageKind(enum.IntEnum):
    """What pages a region sits on, as a SETUP announces it (with the HUGE feature): two
    bits of the region's flags byte, above MOVABLE. The names are those of
    ``Region.movable(huge=...)``."""

    #: 4 KiB pages (every region, without the HUGE feature).
    SMALL = 0
    #: A hugetlb memfd of 2 MiB pages (``huge="hugetlb"``).
    HUGETLB = 1
    #: A hugetlb memfd of 1 GiB pages (``huge="hugetlb-1g"``).
    HUGETLB_1G = 2
    #: A memfd with transparent huge pages (``huge="thp"``).
    THP = 3

    @property
    def page_size(self) -> int:
        """The unit a region of this kind is made in: its size is a whole number of them."""
        return _KIND_PAGE_SIZES[self]

    @property
    def huge(self) -> Literal[False, "hugetlb", "hugetlb-1g", "thp"]:
        """What ``Region.movable(huge=...)`` takes to make a region of this kind."""
        return _KIND_HUGE[self]

    @classmethod
    def of(cls, huge: str | None, page_size: int) -> PageKind:
        """The kind of a region whose ``huge`` and ``page_size`` are these (``Region.huge``,
        ``Region.page_size``)."""
        if huge == "thp":
            return cls.THP
        if huge == "hugetlb":
            return cls.HUGETLB_1G if page_size == 1 << 30 else cls.HUGETLB
        return cls.SMALL

    def describe(self) -> str:
        """``4 KiB``, ``2 MiB hugetlb``, ``1 GiB hugetlb``, ``2 MiB THP``."""
        return _KIND_TEXT[self]


_KIND_PAGE_SIZES: Final = {
    PageKind.SMALL: 1 << 12,
    PageKind.HUGETLB: 2 << 20,
    PageKind.HUGETLB_1G: 1 << 30,
    PageKind.THP: 2 << 20,
}
_KIND_HUGE: Final[dict[PageKind, Literal[False, "hugetlb", "hugetlb-1g", "thp"]]] = {
    PageKind.SMALL: False,
    PageKind.HUGETLB: "hugetlb",
    PageKind.HUGETLB_1G: "hugetlb-1g",
    PageKind.THP: "thp",
}
_KIND_TEXT: Final = {
    PageKind.SMALL: "4 KiB",
    PageKind.HUGETLB: "2 MiB hugetlb",
    PageKind.HUGETLB_1G: "1 GiB hugetlb",
    PageKind.THP: "2 MiB THP",
}

#: Page runs: shape (k, 2), dtype uint64, columns (first_page, count).
Runs: TypeAlias = npt.NDArray[np.uint64]


def no_runs() -> Runs:
    return np.empty((0, 2), dtype=np.uint64)


def same_runs(a: Runs, b: Runs) -> bool:
    return bool(np.array_equal(np.asarray(a), np.asarray(b)))


def page_size_problem(page_size: int) -> str | None:
    if not MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE or page_size & (page_size - 1):
        return (
            f"page size {page_size} is not a power of two from {MIN_PAGE_SIZE} to {MAX_PAGE_SIZE}"
        )
    return None


def region_problem(size: int, address: int, page_size: int) -> str | None:
    if size <= 0 or size % page_size or size > MAX_REGION_SIZE:
        return (
            f"size {size} is not a positive multiple of the page size {page_size} "
            f"up to {MAX_REGION_SIZE}"
        )
    if address % page_size or address + size > 1 << 64:
        return f"address {address:#x} is not page-aligned or the region ends past 2**64"
    return None


def time_problem(value: float) -> str | None:
    if not math.isfinite(value) or value < 0:
        return f"{value!r} is not a finite time >= 0"
    return None


def bad_run(runs: Runs, limit: int) -> tuple[int, int, str] | None:
    """(index, column, why) of the first run that breaks a rule, vectorized; or None.

    Rules: count > 0, first + count does not overflow u64, the run ends within ``limit``
    pages. Column 0 is ``first``, 1 is ``count``.
    """
    if not len(runs):
        return None
    first, count = runs[:, 0], runs[:, 1]
    top = np.uint64(limit)
    zero = count == 0
    overflow = count > U64_MAX - first
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


def runs_limit(page_size: int, regions: tuple[int, ...] | None, region: int) -> int:
    """How many pages a run may reach into ``region``."""
    if regions is None:
        return MAX_REGION_SIZE // page_size
    return regions[region] // page_size


def check_regions(sizes: Sequence[int] | None, page_size: int) -> tuple[int, ...] | None:
    """Region sizes given to an encoder or decoder, checked; LocalProtocolError if bad."""
    if sizes is None:
        return None
    out = tuple(int(s) for s in sizes)
    if len(out) > MAX_REGIONS:
        raise LocalProtocolError(f"{len(out)} regions, at most {MAX_REGIONS}")
    for i, size in enumerate(out):
        problem = region_problem(size, 0, page_size)
        if problem:
            raise LocalProtocolError(f"region {i}: {problem}")
    return out
