"""Regions: page-aligned memory that pageflip can hand to another process.

A *movable* region is a shared mapping of a memfd sealed against shrinking and growing: its
pages can change owner without a copy. An *anonymous* region is private memory: it can only
be copied. Both give zero-copy views (:meth:`Region.view`, :meth:`Region.numpy`); the region
tracks every view it hands out, so that closing or gifting memory that a view or array still
uses raises :class:`~pageflip.errors.BufferInUse` instead of leaving a dangling pointer.

A movable region has 4 KiB pages, or huge ones (``Region.movable(size, huge=...)``): a
hugetlb memfd (2 MiB or 1 GiB pages from the kernel's pool) or a memfd whose mapping has
transparent huge pages (``"thp"``). ``region.page_size`` is the unit its size, its slices
and its moves come in; ``region.huge`` says which kind of huge pages back it, if any.

Internally a region is a list of *extents*: byte ranges of its address range, each backed by
a range of a memfd (or by anonymous memory), or gone (gifted away). A move into part of a
region replaces the extents under it; a gift of part of a region marks them gone and makes
that address range inaccessible.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import errno
import functools
import gc
import logging
import os
import threading
import types
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Concatenate, Generic, Literal, ParamSpec, SupportsIndex, overload

import numpy as np
import numpy.typing as npt

from ._sys import huge as _huge
from ._sys import mm, pagemap
from ._sys.flags import MAP_SHARED_FIXED, PROT_RW, Madv, Map, Seal
from ._sys.mm import PAGE_SIZE
from .errors import (
    BadArgument,
    BufferInUse,
    ClosedError,
    FeatureUnavailable,
    SpanError,
    WrongType,
)

__all__ = ["PAGE_SIZE", "HugeKind", "HugePages", "Region", "Span", "physical_frames"]

log = logging.getLogger("pageflip.memory")

#: What backs a huge region: a hugetlb memfd, or a memfd with transparent huge pages.
HugeKind = Literal["hugetlb", "thp"]
#: What ``Region.movable(huge=...)`` takes: False (4 KiB pages), True (huge pages, hugetlb
#: first, else THP; FeatureUnavailable if neither), ``"auto"`` (the same, else 4 KiB pages,
#: saying so in the log), ``"hugetlb"`` (2 MiB), ``"hugetlb-1g"`` (1 GiB) or ``"thp"``.
HugePages = bool | Literal["auto", "hugetlb", "hugetlb-1g", "thp"]
#: The names among them (for command-line choices and configurations).
HUGE_NAMES: tuple[str, ...] = ("auto", "hugetlb", "hugetlb-1g", "thp")
_HUGE_CHOICES = (False, True, *HUGE_NAMES)

#: Seals every movable region carries: a receiver's mapping can never be cut short.
REGION_SEALS = Seal.SHRINK | Seal.GROW


class Memfd:
    """An owned memfd: closed exactly once; ``shared`` once another process has it too.

    ``page_size`` is the size of its pages as mmap enforces it: a hugetlb memfd's huge page
    size, else 4 KiB (also for a memfd with transparent huge pages, which ``thp`` says).
    """

    __slots__ = ("__weakref__", "fd", "page_size", "shared", "thp")

    def __init__(
        self, fd: int, *, shared: bool = False, page_size: int = PAGE_SIZE, thp: bool = False
    ) -> None:
        self.fd = fd
        self.shared = shared
        self.page_size = page_size
        self.thp = thp

    @property
    def unit(self) -> int:
        """The size its pages move in: ``page_size``, or 2 MiB for transparent huge pages."""
        return _huge.THP_SIZE if self.thp else self.page_size

    def punch(self, offset: int, length: int) -> None:
        """Free the pages of ``[offset, offset+length)``: they read as zeros from now on,
        and a mapping that touches them next gets new ones. (On a hugetlb memfd the parts
        of huge pages the range only cuts are zeroed in place; whole ones are freed.)

        A hugetlb memfd's shared mappings reserved their pages from the pool when they were
        made, so that no touch of them can fail. Punching a whole huge page gives its
        reservation back with it, and another process could take the page: the next touch
        here would be SIGBUS. So the freed pages are reserved again at once (a new shared
        mapping of the range reserves what it lacks, and its reservation outlives it);
        FeatureUnavailable, naming the setting, if the pool no longer has them.
        """
        mm.punch_hole(self.fd, offset, length)
        size = self.page_size
        first, end = -(-offset // size) * size, (offset + length) // size * size
        if size > PAGE_SIZE and end > first:
            try:
                address = mm.mmap(None, end - first, PROT_RW, Map.SHARED, self.fd, first)
            except OSError as err:
                if err.errno != errno.ENOMEM:
                    raise
                why = _hugetlb_unavailable(size, end - first, err)
                raise FeatureUnavailable(
                    f"huge pages just freed could not be reserved again: {why}",
                    feature=why.feature,
                    reason=why.reason,
                ) from None
            mm.munmap(address, end - first)

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Memfd(fd={self.fd}{', shared' if self.shared else ''})"


#: What a page that never arrived holds instead of its data: postcopy writes it over every
#: page it could no longer bring (its source died), so that such a page never reads as
#: zeros, which a guest could take for data. 64 bytes of text, repeated over the page.
LOST_PAGE_LINE = b"pageflip: this page never arrived: its source was lost mid-copy\n"
LOST_PAGE = LOST_PAGE_LINE * (PAGE_SIZE // len(LOST_PAGE_LINE))


@dataclass(slots=True)
class Extent:
    """``length`` bytes at ``offset`` of a region: backed by ``memfd`` at ``fd_offset``,
    by anonymous memory (``memfd`` None), or gone (given away)."""

    offset: int
    length: int
    memfd: Memfd | None
    fd_offset: int = 0
    gone: bool = False

    @property
    def end(self) -> int:
        return self.offset + self.length

    def cut(self, start: int, stop: int) -> Extent:
        """The part of this extent inside ``[start, stop)`` (which must overlap it)."""
        lo, hi = max(start, self.offset), min(stop, self.end)
        return Extent(lo, hi - lo, self.memfd, self.fd_offset + (lo - self.offset), self.gone)


@functools.lru_cache(maxsize=256)
def _buffer_type(nbytes: int) -> type[ctypes.Array[ctypes.c_ubyte]]:
    # A Python subclass of a ctypes array gets a __dict__ and weak references: the region
    # can then follow each buffer it hands out, and the buffer can keep its region alive.
    return type(f"RegionBytes{nbytes}", (ctypes.c_ubyte * nbytes,), {})


# Live regions by address, so that a buffer handed to receive_into can be recognised as
# (part of) a region: a numpy array made by Region.numpy(), say.
_registry_lock = threading.Lock()
_registry_starts: list[int] = []
_registry: dict[int, weakref.ReferenceType[Region]] = {}


def _register(region: Region) -> None:
    with _registry_lock:
        bisect.insort(_registry_starts, region.address)
        _registry[region.address] = weakref.ref(region)


def _unregister(address: int) -> None:
    with _registry_lock:
        if _registry.pop(address, None) is not None:
            del _registry_starts[bisect.bisect_left(_registry_starts, address)]


def region_at(address: int, length: int) -> tuple[Region, int] | None:
    """The live region holding ``[address, address+length)`` and the offset there, if any."""
    with _registry_lock:
        i = bisect.bisect_right(_registry_starts, address) - 1
        if i < 0:
            return None
        ref = _registry.get(_registry_starts[i])
    region = ref() if ref else None
    if region is None or region.closed:
        return None
    offset = address - region.address
    if offset + length > region.size:
        return None
    return region, offset


_P = ParamSpec("_P")


class _MakerOrFlag(Generic[_P]):
    """``Region.movable(size)`` makes a region; ``region.movable`` says whether it is one.

    A descriptor: on the class it is the constructor, on an instance the flag.
    """

    def __init__(
        self,
        make: Callable[Concatenate[type[Region], _P], Region],
        flag: Callable[[Region], bool],
    ) -> None:
        self._make = make
        self._flag = flag
        self.__doc__ = make.__doc__

    @overload
    def __get__(self, obj: None, cls: type[Region]) -> Callable[_P, Region]: ...

    @overload
    def __get__(self, obj: Region, cls: type[Region]) -> bool: ...

    def __get__(self, obj: Region | None, cls: type[Region]) -> Callable[_P, Region] | bool:
        if obj is None:
            return types.MethodType(self._make, cls)
        return self._flag(obj)


def _choose_pages(huge: HugePages, size: int) -> tuple[HugeKind | None, int]:
    """Which pages a movable region of ``size`` bytes gets for ``huge``: (kind, page size).

    Explicit choices are not checked here: making the mapping says whether the pool has
    the pages (see _hugetlb_unavailable). True and "auto" look at the pools and settings.
    """
    if huge is False:
        return None, PAGE_SIZE
    if huge == "hugetlb":
        return "hugetlb", _huge.HUGE_2M
    if huge == "hugetlb-1g":
        return "hugetlb", _huge.HUGE_1G
    if huge == "thp":
        thp = _huge.thp_shmem()
        if not thp.available:
            raise FeatureUnavailable(
                f"shmem transparent huge pages are {thp.describe()}; to allow them: "
                f"{thp.setting()}",
                feature="shmem_thp",
                reason=thp.describe(),
            )
        return "thp", _huge.THP_SIZE
    if huge not in (True, "auto"):
        raise BadArgument(f"huge must be one of {_HUGE_CHOICES}, not {huge!r}", argument="huge")
    if huge == "auto" and size < _huge.HUGE_2M:
        log.info("%d bytes are less than one 2 MiB page; using 4 KiB pages", size)
        return None, PAGE_SIZE
    gib = _huge.pool(_huge.HUGE_1G)
    if huge == "auto" and size % _huge.HUGE_1G == 0 and gib.available >= size // _huge.HUGE_1G:
        return "hugetlb", _huge.HUGE_1G
    two = _huge.pool(_huge.HUGE_2M)
    if two.available >= -(-size // _huge.HUGE_2M):
        return "hugetlb", _huge.HUGE_2M
    thp = _huge.thp_shmem()
    if thp.available:
        return "thp", _huge.THP_SIZE
    need = -(-size // _huge.HUGE_2M)
    why = (
        f"no huge pages for {size} bytes here: the hugetlb {two.describe()}, {need} needed "
        f"({two.setting(two.total + need - two.available)} reserves them), and shmem THP is "
        f"{thp.describe()} ({thp.setting()} allows it)"
    )
    if huge is True:
        raise FeatureUnavailable(why, feature="hugetlb_2m", reason=why)
    log.info("%s; using 4 KiB pages", why)
    return None, PAGE_SIZE


def _hugetlb_unavailable(page_size: int, size: int, err: OSError) -> FeatureUnavailable:
    """The error for a hugetlb mapping the pool could not back (mmap said ENOMEM)."""
    pool = _huge.pool(page_size)
    need = size // page_size
    feature = "hugetlb_1g" if page_size == _huge.HUGE_1G else "hugetlb_2m"
    if not pool.exists:
        why = pool.describe()
    else:
        why = (
            f"{size} bytes of {_huge.size_name(page_size)} hugetlb pages need {need} "
            f"page{'' if need == 1 else 's'}; "
            f"the {pool.describe()} ({os.strerror(err.errno or 0)}); to reserve enough: "
            f"{pool.setting_for(need)}"
        )
    return FeatureUnavailable(why, feature=feature, reason=why)


class Region:
    """Page-aligned memory: movable (memfd-backed) or anonymous (private, copy only).

    Make one with :meth:`movable` or :meth:`anonymous`; a :class:`~pageflip.Channel` makes
    them on receive. ``r[start:stop]`` is a :class:`Span` of page-aligned offsets.
    """

    def __init__(
        self,
        address: int,
        size: int,
        extents: list[Extent],
        name: str,
        *,
        page_size: int = PAGE_SIZE,
        huge: HugeKind | None = None,
    ) -> None:
        # Private: use Region.movable(), Region.anonymous() or Channel.receive().
        self._address = address
        self._size = size
        self._extents = extents
        self._name = name
        self._page_size = page_size
        self._huge = huge
        self._closed = False
        self._exports: list[tuple[weakref.ReferenceType[Any], int, int]] = []
        _register(self)

    # -- construction -------------------------------------------------------------------

    def _make_movable(  # type: ignore[misc]  # the class, not self: see _MakerOrFlag
        cls: type[Region],
        /,
        size: int,
        name: str = "region",
        *,
        populate: bool = False,
        huge: HugePages = False,
    ) -> Region:
        """``size`` bytes (rounded up to whole pages) of memfd memory that can be moved.

        The memfd is sealed against shrinking and growing, so a process that maps it can
        never be hit by SIGBUS. ``populate`` allocates every page now instead of on first
        touch.

        ``huge`` asks for huge pages (see :data:`HugePages`): ``"hugetlb"`` (2 MiB) and
        ``"hugetlb-1g"`` take them from the kernel's hugetlb pool, reserved when the region
        is made (FeatureUnavailable, naming the setting that reserves a pool, when it has
        too few); ``"thp"`` advises transparent huge pages on a plain memfd, which the kernel
        honours for shmem only where its ``shmem_enabled`` settings allow (FeatureUnavailable
        otherwise); True takes hugetlb 2 MiB pages where the pool has enough, else THP;
        ``"auto"`` does the same (and 1 GiB pages for whole GiBs the 1 GiB pool has) but
        falls back to 4 KiB pages, logging why (also for less than one 2 MiB page, which
        would round up 512-fold). The size is rounded up to whole huge pages
        (logged when that adds bytes), and ``page_size`` tells what the region got.
        """
        kind, page_size = _choose_pages(huge, size)
        size = _check_size(size, page_size, name)
        if kind == "hugetlb":
            fd = mm.memfd_create(f"pageflip:{name}", _huge.memfd_flags(page_size))
        else:
            fd = mm.memfd_create(f"pageflip:{name}")
        memfd = Memfd(
            fd, page_size=page_size if kind == "hugetlb" else PAGE_SIZE, thp=kind == "thp"
        )
        try:
            mm.ftruncate(fd, size)
            mm.add_seals(fd, REGION_SEALS)
            if kind == "thp":
                # Advised before any page exists: MAP_POPULATE would allocate 4 KiB pages.
                address = mm.map_aligned(size, page_size, PROT_RW, Map.SHARED, fd)
                _advise(address, size, hugepage=True, populate=populate)
            else:
                flags = Map.SHARED | (Map.POPULATE if populate else Map(0))
                try:
                    address = mm.map_aligned(size, page_size, PROT_RW, flags, fd)
                except OSError as err:
                    if kind == "hugetlb" and err.errno == errno.ENOMEM:
                        raise _hugetlb_unavailable(page_size, size, err) from None
                    raise
        except BaseException:
            memfd.close()
            raise
        return cls(address, size, [Extent(0, size, memfd)], name, page_size=page_size, huge=kind)

    @classmethod
    def anonymous(
        cls, size: int, name: str = "anonymous", *, hugepages: bool = False, populate: bool = False
    ) -> Region:
        """``size`` bytes (rounded up to whole pages) of private memory: it can only be copied.

        ``hugepages`` asks for transparent huge pages (much faster first touch); ``populate``
        allocates every page now.
        """
        size = _check_size(size)
        address = mm.mmap(None, size, PROT_RW, Map.PRIVATE | Map.ANONYMOUS)
        _advise(address, size, hugepage=hugepages, populate=populate)
        return cls(address, size, [Extent(0, size, None)], name)

    @classmethod
    def from_memfds(cls, pieces: Sequence[tuple[Memfd, int, int]], name: str) -> Region:
        """A region mapping ``(memfd, fd_offset, length)`` pieces one after the other.

        The memfds become the region's. A peer's memfds are mapped through
        :func:`pageflip.channel.map_peer_memfds`, which checks each piece first.
        """
        size = sum(length for _, _, length in pieces)
        page_size = max(memfd.unit for memfd, _, _ in pieces)
        size = _check_size(size, page_size, name)
        kind: HugeKind | None = None
        if any(memfd.page_size > PAGE_SIZE for memfd, _, _ in pieces):
            kind = "hugetlb"
        elif any(memfd.thp for memfd, _, _ in pieces):
            kind = "thp"
        # Mapped where a 2 MiB page can sit whole, so that huge pages of a shmem memfd (THP)
        # are mapped whole too.
        align = max(page_size, _huge.THP_SIZE) if size >= _huge.THP_SIZE else PAGE_SIZE
        rw = PROT_RW
        if len(pieces) == 1:
            memfd, fd_offset, _ = pieces[0]
            address = mm.map_aligned(size, align, rw, Map.SHARED, memfd.fd, fd_offset)
            return cls(
                address,
                size,
                [Extent(0, size, memfd, fd_offset)],
                name,
                page_size=page_size,
                huge=kind,
            )
        address = mm.reserve(size, align)
        extents = []
        offset = 0
        try:
            for memfd, fd_offset, length in pieces:
                mm.mmap(address + offset, length, rw, MAP_SHARED_FIXED, memfd.fd, fd_offset)
                extents.append(Extent(offset, length, memfd, fd_offset))
                offset += length
        except BaseException:
            mm.munmap(address, size)
            raise
        return cls(address, size, extents, name, page_size=page_size, huge=kind)

    # -- properties ---------------------------------------------------------------------

    @property
    def address(self) -> int:
        """Address of the first byte (page-aligned)."""
        return self._address

    @property
    def size(self) -> int:
        """Size in bytes (a whole number of pages)."""
        return self._size

    @property
    def name(self) -> str:
        return self._name

    @property
    def page_size(self) -> int:
        """The size of the region's pages: 4096, or a huge page size (2 MiB, 1 GiB).

        Its size, the offsets of its slices and the moves into or out of it come in whole
        pages of this size.
        """
        return self._page_size

    @property
    def huge(self) -> HugeKind | None:
        """``"hugetlb"`` or ``"thp"`` for a region on huge pages, None for 4 KiB pages."""
        return self._huge

    @property
    def closed(self) -> bool:
        return self._closed

    def _is_movable(self) -> bool:
        """True when every page can be moved: all memfd-backed, nothing given away."""
        return not self._closed and all(e.memfd is not None and not e.gone for e in self._extents)

    #: ``Region.movable(size, name)`` makes a movable region; ``r.movable`` tells if r is one.
    movable = _MakerOrFlag(_make_movable, _is_movable)

    def __len__(self) -> int:
        return self._size

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("movable" if self.movable else "copy-only")
        pages = f", {self._huge} {_huge.size_name(self._page_size)} pages" if self._huge else ""
        return f"<Region {self._name!r} {self._size} bytes at {self._address:#x}, {state}{pages}>"

    # -- views --------------------------------------------------------------------------

    def view(self, start: int = 0, stop: int | None = None) -> memoryview:
        """A writable, zero-copy memoryview of bytes ``[start, stop)``."""
        start, stop = self.bounds(start, stop)
        return self._export(start, stop)

    def numpy(
        self,
        dtype: npt.DTypeLike = np.uint8,
        shape: int | Sequence[int] | None = None,
        *,
        offset: int = 0,
    ) -> npt.NDArray[Any]:
        """A zero-copy numpy array over the region from byte ``offset``.

        Without ``shape`` the array is one-dimensional and fills the rest of the region.
        """
        dt = np.dtype(dtype)
        start, _ = self.bounds(offset, None)
        if shape is None:
            count = (self._size - start) // dt.itemsize
            shape_t: tuple[int, ...] = (count,)
        else:
            shape_t = (shape,) if isinstance(shape, int) else tuple(shape)
            count = int(np.prod(shape_t, dtype=np.int64))
        nbytes = count * dt.itemsize
        if start + nbytes > self._size:
            raise SpanError(
                f"an array of {nbytes} bytes at offset {start} does not fit in region "
                f"{self._name!r} of {self._size} bytes",
                offset=start,
                length=nbytes,
            )
        buf = self._export(start, start + nbytes)
        return np.frombuffer(buf, dtype=dt, count=count).reshape(shape_t)

    def __getitem__(self, key: slice) -> Span:
        if not isinstance(key, slice):
            raise WrongType("index a region with a slice of page-aligned offsets, r[start:stop]")
        if key.step not in (None, 1):
            raise SpanError("a region slice cannot have a step")
        start, stop = self.bounds(0 if key.start is None else key.start, key.stop, need_pages=True)
        return Span(self, start, stop - start)

    def bounds(
        self, start: SupportsIndex, stop: SupportsIndex | None = None, *, need_pages: bool = False
    ) -> tuple[int, int]:
        """``[start, stop)`` as absolute offsets (negative ones count from the end), checked
        against the region (SpanError outside it; ``need_pages``: also page-aligned)."""
        self._check_open()
        start = int(start)
        stop = self._size if stop is None else int(stop)
        if start < 0:
            start += self._size
        if stop < 0:
            stop += self._size
        if not 0 <= start <= stop <= self._size:
            raise SpanError(
                f"bytes [{start}, {stop}) are outside region {self._name!r} of {self._size} bytes",
                offset=start,
                length=stop - start,
            )
        page = self._page_size
        if need_pages and (start % page or stop % page):
            raise SpanError(
                f"a region slice needs page-aligned offsets (multiples of {page}), "
                f"got [{start}, {stop})",
                offset=start,
                length=stop - start,
            )
        for extent in self._extents:
            if extent.gone and extent.offset < stop and start < extent.end:
                raise ClosedError(
                    f"bytes [{extent.offset}, {extent.end}) of region {self._name!r} were "
                    "given away",
                    what=self._name,
                )
        return start, stop

    def _export(self, start: int, stop: int) -> memoryview:
        if stop == start:
            return memoryview(bytearray())
        obj = _buffer_type(stop - start).from_address(self._address + start)
        obj._pageflip_region = self  # type: ignore[attr-defined]
        self._exports.append((weakref.ref(obj), start, stop))
        if len(self._exports) > 64:
            self._prune_exports()
        return memoryview(obj).cast("B")

    def _prune_exports(self) -> None:
        self._exports = [e for e in self._exports if e[0]() is not None]

    def exports(self, start: int = 0, stop: int | None = None) -> int:
        """How many views or arrays still use bytes ``[start, stop)``."""
        stop = self._size if stop is None else stop
        self._prune_exports()
        return sum(1 for _, lo, hi in self._exports if lo < stop and start < hi)

    def check_unused(self, start: int = 0, stop: int | None = None, *, doing: str) -> None:
        """Raise BufferInUse if a view or array uses bytes ``[start, stop)``."""
        stop = self._size if stop is None else stop
        if not self.exports(start, stop):
            return
        gc.collect()  # a view may only be waiting in a reference cycle
        count = self.exports(start, stop)
        if count:
            raise BufferInUse(
                f"cannot {doing} region {self._name!r}: {count} view(s) or array(s) still use "
                f"bytes [{start}, {stop}); delete them (del arr) first",
                region=self._name,
                offset=start,
                length=stop - start,
                count=count,
            )

    # -- extents ------------------------------------------------------------------------

    def extents(self, start: int = 0, stop: int | None = None) -> list[Extent]:
        """The extents covering ``[start, stop)``, cut to it."""
        stop = self._size if stop is None else stop
        return [e.cut(start, stop) for e in self._extents if e.offset < stop and start < e.end]

    def _split_at(self, *points: int) -> None:
        for point in points:
            for i, e in enumerate(self._extents):
                if e.offset < point < e.end:
                    self._extents[i : i + 1] = [e.cut(e.offset, point), e.cut(point, e.end)]
                    break

    def _drop_unused_memfds(self, before: Iterable[Memfd | None]) -> None:
        alive = {id(e.memfd) for e in self._extents if e.memfd is not None and not e.gone}
        for memfd in {id(m): m for m in before if m is not None}.values():
            if id(memfd) not in alive:
                memfd.close()

    def replace(self, start: int, memfd: Memfd, fd_offset: int, length: int) -> None:
        """Map ``length`` bytes of ``memfd`` over ``[start, start+length)``: a move in.

        The pages that were there are freed (punched out of their memfd if it is shared).
        """
        self._check_open()
        stop = start + length
        mm.mmap(
            self._address + start,
            length,
            PROT_RW,
            MAP_SHARED_FIXED,
            memfd.fd,
            fd_offset,
        )
        self._split_at(start, stop)
        old = [e for e in self._extents if start <= e.offset and e.end <= stop]
        for e in old:
            if e.memfd is not None and e.memfd.shared and not e.gone:
                mm.punch_hole(e.memfd.fd, e.fd_offset, e.length)
        keep = [e for e in self._extents if not (start <= e.offset and e.end <= stop)]
        keep.append(Extent(start, length, memfd, fd_offset))
        keep.sort(key=lambda e: e.offset)
        self._extents = keep
        self._drop_unused_memfds(e.memfd for e in old)

    def give_away(self, start: int, stop: int) -> None:
        """Forget ``[start, stop)``: its pages now belong to a peer. Closes a region left empty."""
        if start == 0 and stop == self._size:
            self._close_mapping(punch=False)
            return
        mm.release(self._address + start, stop - start)
        self._split_at(start, stop)
        before = [e.memfd for e in self._extents]
        for e in self._extents:
            if start <= e.offset and e.end <= stop:
                e.gone = True
        self._drop_unused_memfds(before)
        if all(e.gone for e in self._extents):
            self._close_mapping(punch=False)

    # -- lifetime -----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"region {self._name!r} is closed", what=self._name)

    def close(self) -> None:
        """Unmap the region and free its pages. Idempotent.

        Raises BufferInUse (and changes nothing) while a view or array still uses it.
        """
        if self._closed:
            return
        self.check_unused(doing="close")
        self._close_mapping(punch=True)

    def _close_mapping(self, *, punch: bool) -> None:
        if self._closed:
            return
        self._closed = True
        _unregister(self._address)
        mm.munmap(self._address, self._size)
        for e in self._extents:
            if punch and e.memfd is not None and e.memfd.shared and not e.gone and e.memfd.fd >= 0:
                # Someone else holds this memfd for other ranges: free ours now.
                mm.punch_hole(e.memfd.fd, e.fd_offset, e.length)
        for e in self._extents:
            if e.memfd is not None:
                e.memfd.close()
        self._extents = []

    def __enter__(self) -> Region:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Every export holds a reference to its region, so none can be left at this point.
        if not getattr(self, "_closed", True):
            with contextlib.suppress(OSError):
                self._close_mapping(punch=True)


class Span:
    """Bytes ``[offset, offset+size)`` of a region, page-aligned: what ``r[a:b]`` gives."""

    __slots__ = ("offset", "region", "size")

    def __init__(self, region: Region, offset: int, size: int) -> None:
        self.region = region
        self.offset = offset
        self.size = size

    @property
    def address(self) -> int:
        return self.region.address + self.offset

    def __len__(self) -> int:
        return self.size

    def view(self) -> memoryview:
        return self.region.view(self.offset, self.offset + self.size)

    def numpy(
        self, dtype: npt.DTypeLike = np.uint8, shape: int | Sequence[int] | None = None
    ) -> npt.NDArray[Any]:
        dt = np.dtype(dtype)
        if shape is None:
            shape = self.size // dt.itemsize
        return self.region.numpy(dt, shape, offset=self.offset)

    def __getitem__(self, key: slice) -> Span:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise WrongType("index a span with a slice of page-aligned offsets")
        start = 0 if key.start is None else int(key.start)
        stop = self.size if key.stop is None else int(key.stop)
        if not 0 <= start <= stop <= self.size:
            raise SpanError(
                f"bytes [{start}, {stop}) are outside this span of {self.size} bytes",
                offset=start,
                length=stop - start,
            )
        return self.region[self.offset + start : self.offset + stop]

    def __repr__(self) -> str:
        return f"<Span {self.region.name!r}[{self.offset}:{self.offset + self.size}]>"


def _advise(address: int, size: int, *, hugepage: bool, populate: bool) -> None:
    """Ask a new mapping for transparent huge pages and/or allocate it now; unmapped if
    that fails."""
    try:
        if hugepage:
            mm.madvise(address, size, Madv.HUGEPAGE)
        if populate:
            mm.madvise(address, size, Madv.POPULATE_WRITE)
    except BaseException:
        mm.munmap(address, size)
        raise


def _check_size(size: int, page_size: int = PAGE_SIZE, name: str = "") -> int:
    """``size`` rounded up to whole pages of ``page_size``; logged where a huge page size
    added more than rounding to 4 KiB pages would."""
    size = int(size)
    if size <= 0:
        raise SpanError(f"a region needs a positive size, got {size}", length=size)
    rounded = -(-size // page_size) * page_size
    if page_size > PAGE_SIZE and rounded != mm.page_round_up(size):
        log.info(
            "region %r: %d bytes rounded up to %d, a whole number of %s pages",
            name,
            size,
            rounded,
            _huge.size_name(page_size),
        )
    return rounded


def writable_address(buffer: Any) -> tuple[int, int]:
    """(address, nbytes) of a writable, C-contiguous buffer; SpanError otherwise."""
    try:
        view = memoryview(buffer)
    except TypeError as err:
        raise SpanError(f"{type(buffer).__name__} is not a buffer") from err
    with view:
        if view.readonly:
            raise SpanError(f"the {type(buffer).__name__} buffer is read-only", length=view.nbytes)
        if not view.c_contiguous:
            raise SpanError(
                f"the {type(buffer).__name__} buffer is not contiguous", length=view.nbytes
            )
        if view.nbytes == 0:
            return 0, 0
        flat = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        with flat:
            return mm.buffer_address(flat), view.nbytes


def bytes_at(address: int, nbytes: int) -> memoryview:
    """A writable byte view of ``nbytes`` at ``address`` (memory that stays mapped while
    the view is used: the caller's to guarantee)."""
    return memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")


def readable_address(buffer: Any) -> tuple[int, int, memoryview]:
    """(address, nbytes, view) of a C-contiguous buffer, read-only ones included.

    The view must stay alive while the address is used.
    """
    try:
        view = memoryview(buffer)
    except TypeError as err:
        raise SpanError(f"{type(buffer).__name__} is not a buffer") from err
    if not view.c_contiguous:
        view.release()
        raise SpanError(f"the {type(buffer).__name__} buffer is not contiguous")
    if view.nbytes == 0:
        return 0, 0, view
    # numpy gives the address of read-only buffers without a copy.
    arr = np.frombuffer(view.cast("B") if view.ndim != 1 or view.format != "B" else view, np.uint8)
    return int(arr.ctypes.data), view.nbytes, view


def physical_frames(obj: Region | Span | Any) -> npt.NDArray[np.uint64]:
    """Physical frame numbers of each page of a region, span or page-aligned buffer.

    Pages not present read as 0. Needs CAP_SYS_ADMIN (root): without it the kernel hides
    PFNs and this raises FeatureUnavailable.
    """
    if isinstance(obj, (Region, Span)):
        address, nbytes = obj.address, obj.size
    else:
        address, nbytes, view = readable_address(obj)
        view.release()
    first = address // PAGE_SIZE * PAGE_SIZE
    npages = (address + nbytes - first + PAGE_SIZE - 1) // PAGE_SIZE
    frames = pagemap.pfns(first, npages)
    if npages and not frames.any():
        present = pagemap.entries(first, npages) >> np.uint64(63)
        if present.any():
            raise FeatureUnavailable(
                "physical frame numbers are hidden without CAP_SYS_ADMIN",
                feature="pagemap_pfn",
                reason="no permission",
            )
    return frames
