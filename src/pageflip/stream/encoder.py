"""Events in, bytes and fds out: the :class:`Encoder` of the migration stream."""

from __future__ import annotations

from collections.abc import Sequence

import zstandard

from .._sys.fds import MAX_FDS
from .._sys.mm import PAGE_SIZE
from ..errors import LocalProtocolError
from .fields import Writer
from .table import Event, frame_of
from .wire import HEADER, MAGIC, VERSION, check_regions, page_size_problem


class Encoder:
    """Builds frames: :meth:`encode` returns an event's bytes and the fds to attach to
    their first byte (SCM_RIGHTS).

    ``compress_level`` is the zstd level for PAGES data (None: always RAW). A compressed
    frame is sent only when it is smaller than the raw data; otherwise the frame goes RAW.
    An encoder that encodes a SETUP (or is given ``regions``, their sizes in bytes) checks
    later frames' region indexes and runs against those regions, like the
    :class:`~pageflip.stream.Decoder`. Every rule the decoder enforces is checked here
    first, as a :class:`LocalProtocolError`.
    """

    def __init__(
        self,
        page_size: int = PAGE_SIZE,
        compress_level: int | None = None,
        *,
        regions: Sequence[int] | None = None,
    ) -> None:
        problem = page_size_problem(page_size)
        if problem:
            raise LocalProtocolError(problem)
        self._page_size = page_size
        self._level = compress_level
        self._cctx: zstandard.ZstdCompressor | None = None
        if compress_level is not None:
            if not -(1 << 17) <= compress_level <= zstandard.MAX_COMPRESSION_LEVEL:
                raise LocalProtocolError(f"zstd level {compress_level} is out of range")
            self._cctx = zstandard.ZstdCompressor(level=compress_level)
        self._regions = check_regions(regions, page_size)

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
        self._regions = check_regions(sizes, self.page_size)

    def encode(self, event: Event) -> tuple[bytes, list[int]]:
        """The bytes of ``event`` and the fds to attach to their first byte."""
        kind = frame_of(event)
        if kind is None:
            raise LocalProtocolError(f"cannot encode {event!r}: not a stream event")
        signal = kind.signal
        if signal is not None:
            return signal, []
        w = Writer(kind.name, self._page_size, self._regions, self._cctx)
        event.write(w)
        if len(w.fds) > MAX_FDS:
            raise w.fail(f"{len(w.fds)} fds in one frame, at most {MAX_FDS}")
        if not kind.least <= w.size <= kind.most:
            raise w.fail(f"a payload of {w.size} bytes, at most {kind.most}")
        # A frame that declares the regions (SETUP) has told the writer their sizes.
        self._regions = w.regions
        head = HEADER.pack(MAGIC, VERSION, kind.code, len(w.fds), w.size)
        return b"".join([head, *w.parts]), w.fds


def encode(
    event: Event, *, compress: int | None = None, page_size: int = PAGE_SIZE
) -> tuple[bytes, list[int]]:
    """The bytes of ``event`` and the fds to attach to their first byte.

    A stateless :class:`Encoder`: ``compress`` is the zstd level for PAGES (None: RAW).
    Region sizes are unknown to it, so runs are bounded by
    :data:`~pageflip.stream.MAX_RUNS` only.
    """
    return Encoder(page_size, compress).encode(event)
