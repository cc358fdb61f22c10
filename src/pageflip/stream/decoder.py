"""Bytes and fds in, events out: the :class:`Decoder` of the migration stream."""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Sequence
from typing import NamedTuple

import zstandard

from .._sys.fds import MAX_FDS, close_all
from .._sys.mm import PAGE_SIZE
from ..errors import LocalProtocolError, RemoteProtocolError
from .fields import Invalid, Reader
from .table import FRAMES, SIGNALS, Event, Frame
from .wire import (
    HEADER,
    LENGTH_AT,
    MAGIC,
    MAX_PAYLOAD,
    NFDS_AT,
    TYPE_AT,
    VERSION,
    VERSION_AT,
    check_regions,
    page_size_problem,
)


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
        problem = page_size_problem(page_size)
        if problem:
            raise LocalProtocolError(problem)
        self._page_size = page_size
        self._regions = check_regions(regions, page_size)
        self._buf = bytearray()
        #: Index of the first unread byte in the buffer.
        self._pos = 0
        #: Stream offset of the buffer's first byte.
        self._base = 0
        self._fds: deque[_QueuedFd] = deque()
        self._broken: RemoteProtocolError | None = None
        self._dctx: zstandard.ZstdDecompressor | None = None

    @property
    def page_size(self) -> int:
        return self._page_size

    @property
    def regions(self) -> tuple[int, ...] | None:
        """Sizes of the regions (from SETUP or the constructor), or None while unknown."""
        return self._regions

    @regions.setter
    def regions(self, sizes: Sequence[int] | None) -> None:
        self._regions = check_regions(sizes, self.page_size)

    @property
    def buffered(self) -> int:
        """Bytes fed that no event has consumed yet."""
        return len(self._buf) - self._pos

    @property
    def wanted(self) -> int:
        """Bytes the frame in progress still lacks: what is left of its header, then of its
        payload; 0 when a whole frame is buffered."""
        avail = self.buffered
        if avail < HEADER.size:
            return HEADER.size - avail
        length = int(HEADER.unpack_from(self._buf, self._pos)[4])
        return max(0, HEADER.size + length - avail)

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
        except Invalid as bad:
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
            raise Invalid(
                f"fds arrived with the bytes at {stray.first}..{stray.limit} "
                "but no frame starting there announced them",
                stray.first,
            )
        if avail >= HEADER.size:
            # A frame of nothing but its header is known whole by its bytes (table.SIGNALS).
            signal = SIGNALS.get(bytes(buf[start : start + HEADER.size]))
            if signal is not None and FRAMES.get(signal.code) is signal:
                self._consume(start + HEADER.size, False)
                return signal.event()
        self._check_header_start(start, avail, at)
        if avail < HEADER.size:
            return None
        _, _, kind, nfds, length = HEADER.unpack_from(buf, start)
        spec = FRAMES[kind]
        self._check_header(spec, nfds, length, at)
        end = start + HEADER.size + length
        if len(buf) < end:
            return None
        fds = self._claim(nfds, at, spec.name)
        reader = Reader(
            buf,
            start + HEADER.size,
            end,
            base=self._base,
            start=at,
            fds=fds,
            page_size=self._page_size,
            regions=self._regions,
            inflater=self._inflater,
        )
        try:
            event = spec.event.read(reader)
        except Invalid as bad:
            close_all(fds)
            bad.frame = spec.name
            raise
        except BaseException:
            close_all(fds)
            raise
        # A frame that declares the regions (SETUP) has told the reader their sizes.
        self._regions = reader.regions
        self._consume(end, reader.handover)
        return event

    def _check_header_start(self, start: int, avail: int, at: int) -> None:
        """Refuse a bad magic, version or type as soon as its bytes are in."""
        buf = self._buf
        n = min(avail, len(MAGIC))
        if buf[start : start + n] != MAGIC[:n]:
            raise Invalid(f"magic {bytes(buf[start : start + n])!r}, expected {MAGIC!r}", at)
        if avail > VERSION_AT and buf[start + VERSION_AT] != VERSION:
            version = buf[start + VERSION_AT]
            raise Invalid(f"version {version}, expected {VERSION}", at + VERSION_AT)
        if avail > TYPE_AT and buf[start + TYPE_AT] not in FRAMES:
            raise Invalid(f"unknown frame type {buf[start + TYPE_AT]}", at + TYPE_AT)

    def _check_header(self, spec: Frame, nfds: int, length: int, at: int) -> None:
        """Refuse a header whose fds or length its frame type does not allow."""
        name = spec.name
        if nfds > MAX_FDS:
            raise Invalid(f"{nfds} fds, at most {MAX_FDS}", at + NFDS_AT, name)
        if nfds and not spec.takes_fds:
            raise Invalid(f"announces {nfds} fds, a {name} frame carries none", at + NFDS_AT, name)
        if length > MAX_PAYLOAD:
            raise Invalid(
                f"a payload of {length} bytes, at most {MAX_PAYLOAD}", at + LENGTH_AT, name
            )
        if not spec.least <= length <= spec.most:
            sizes = f"{spec.least}" if spec.least == spec.most else f"{spec.least}..{spec.most}"
            raise Invalid(
                f"a payload of {length} bytes, {name} takes {sizes} bytes", at + LENGTH_AT, name
            )

    def _claim(self, nfds: int, at: int, name: str) -> list[int]:
        """The ``nfds`` fds that arrived with the first byte of the frame at ``at``."""
        ready = 0
        for queued in self._fds:
            if ready == nfds or queued.first > at:
                break
            ready += 1
        if ready < nfds:
            raise Invalid(
                f"announces {nfds} fds, {ready} arrived with its first byte", at + NFDS_AT, name
            )
        return [self._fds.popleft().fd for _ in range(nfds)]

    def _inflater(self) -> zstandard.ZstdDecompressor:
        """This decoder's zstd decompressor, made the first time a frame needs one."""
        if self._dctx is None:
            self._dctx = zstandard.ZstdDecompressor()
        return self._dctx

    def _consume(self, end: int, handover: bool) -> None:
        if handover:
            # The event holds a view of the old buffer: start a new one with what follows.
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
