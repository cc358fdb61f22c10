"""The migration stream as a codec of the channel's :class:`~pageflip.channel.Endpoint`.

A migration is one connection: :func:`open_link` puts the :mod:`pageflip.stream` codec on
it. The waiting, the deadlines and what a closed, silent or refusing peer becomes are the
endpoint's, as for every other conversation pageflip holds; what is the migration's own is
here: its frames, zstd for page data sent from this side, and ABORT, the frame by which a
peer gives up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .. import stream
from .._sys.mm import PAGE_SIZE
from ..channel import Endpoint
from ..errors import LocalProtocolError, PeerAborted
from ..stream.table import frame_of
from ..transport import Connection

#: Bytes asked of the socket per read while a frame of page data (megabytes) is coming in;
#: otherwise the endpoint's own, smaller size (see :attr:`StreamCodec.wanted`).
READ_SIZE = 4 << 20


class StreamCodec:
    """:mod:`pageflip.stream`'s encoder and decoder as one codec; ``compress`` (a zstd
    level) applies to page data sent from here."""

    def __init__(self, *, compress: int | None = None) -> None:
        self.encoder = stream.Encoder(compress_level=compress)
        self.decoder = stream.Decoder(page_size=PAGE_SIZE)

    def encode(self, frame: Any) -> tuple[bytes, list[int]]:
        return self.encoder.encode(frame)

    def feed(self, data: bytes | memoryview, fds: list[int]) -> None:
        self.decoder.feed(data, fds)

    def next_frame(self) -> Any | None:
        return self.decoder.next_event()

    @property
    def buffered(self) -> int:
        return self.decoder.buffered

    @property
    def wanted(self) -> int:
        """Bytes the frame in progress still lacks (the endpoint reads no more than that,
        or its small read size: a 4 MiB receive buffer costs ~40 us a read, three times
        inside a flip's pause)."""
        return self.decoder.wanted

    def take_raw(self, n: int) -> bytes:
        raise LocalProtocolError("the migration stream carries no raw bytes")

    def aborted(self, frame: Any) -> PeerAborted | None:
        if not isinstance(frame, stream.Abort):
            return None
        return PeerAborted(
            f"the peer gave up in {frame.phase}: {frame.reason}",
            phase=frame.phase,
            reason=frame.reason,
        )

    def name(self, frame: Any) -> str:
        return frame_name(frame)

    def close(self) -> None:
        self.decoder.close()


def frame_name(event: Any) -> str:
    """An event's frame name on the wire (ZERO_PAGES, not ZEROPAGES)."""
    spec = frame_of(event)
    return spec.name if spec is not None else type(event).__name__.upper()


def open_link(
    conn: Connection,
    *,
    compress: int | None = None,
    interrupt: Callable[[], None] | None = None,
) -> Endpoint:
    """The migration stream over ``conn`` (see :class:`~pageflip.channel.Endpoint`)."""
    return Endpoint(conn, StreamCodec(compress=compress), interrupt=interrupt, read_size=READ_SIZE)
