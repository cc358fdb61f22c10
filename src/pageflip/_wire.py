"""The channel's frames, sans I/O: bytes (and fds) in, frames out; frames in, bytes out.

Every frame is a 12-byte header and a payload::

    magic "PFCH" | version u8 | type u8 | nfds u16 | length u32 | payload (length bytes)

File descriptors travel as SCM_RIGHTS on the frame's first byte; ``nfds`` says how many
belong to it. Every length is checked against its bound before it is trusted: a peer's
bad frame is a :class:`RemoteProtocolError` naming the frame and the stream offset; a frame
we are asked to build wrong is a :class:`LocalProtocolError`.
"""

from __future__ import annotations

import enum
import json
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

from ._sys.fds import MAX_FDS, close_all
from .errors import LocalProtocolError, PeerAborted, RemoteProtocolError

MAGIC = b"PFCH"
VERSION = 1
HEADER = struct.Struct("<4sBBHI")
#: Largest payload accepted from a peer (an offer of MAX_SPANS spans fits).
MAX_PAYLOAD = 4 << 20
MAX_NAME = 255
#: Longest single span accepted from a peer (1 TiB).
MAX_SPAN = 1 << 40
MAX_TEXT = 4096


class FrameType(enum.IntEnum):
    HELLO = 1
    OFFER = 2
    PULL = 3
    PIPE = 4
    DONE = 5
    REFUSE = 6
    NOTE = 7


class PullMethod(enum.IntEnum):
    """How the receiver asks the sender to push the bytes it cannot read itself."""

    VMSPLICE = 1
    STREAM = 2


class OfferFlags(enum.IntFlag):
    NONE = 0
    #: gift(): the writer gives its pages up (send() keeps them).
    GIFT = 1
    #: The writer lets the reader read its memory with process_vm_readv.
    PEER_READ = 2
    #: Every memfd of a gift holds transparent huge pages: the reader moves them in 2 MiB
    #: units (a hugetlb memfd's page size the reader learns from the memfd itself).
    THP = 4


class SpanRow(NamedTuple):
    """One span of an offer: where the bytes are in the writer, and the memfd behind them."""

    addr: int
    length: int
    #: Index into the offer's fds, or -1 when only the writer's memory holds the bytes.
    fd_index: int
    fd_offset: int


SPAN = struct.Struct("<QQqQ")
#: Most spans one offer may carry.
MAX_SPANS = 1 << 16

_HELLO = struct.Struct("<II")
_OFFER = struct.Struct("<BBHIQ")
_PULL = struct.Struct("<B")
_DONE = struct.Struct("<QQQHH")
_REFUSE = struct.Struct("<H")


@dataclass
class Hello:
    page_size: int
    version: int = VERSION


@dataclass
class Offer:
    flags: OfferFlags
    nbytes: int
    name: str
    spans: list[SpanRow]
    fds: list[int] = field(default_factory=list)


@dataclass
class Pull:
    method: PullMethod


@dataclass
class Pipe:
    """The read end of a pipe the writer will vmsplice into."""

    fds: list[int]


@dataclass
class Done:
    nbytes: int
    pages_moved: int
    pages_copied: int
    method: str
    reason: str


@dataclass
class Refuse:
    reason: str


@dataclass
class Note:
    """A JSON object and fds: what a destination and its postcopy pager tell each other."""

    message: dict[str, Any]
    fds: list[int] = field(default_factory=list)


Frame = Hello | Offer | Pull | Pipe | Done | Refuse | Note


def _text(data: str, what: str, limit: int) -> bytes:
    raw = data.encode()
    if len(raw) > limit:
        raise LocalProtocolError(f"{what} is {len(raw)} bytes, at most {limit}", frame=what)
    return raw


def encode(frame: Frame) -> tuple[bytes, list[int]]:
    """The bytes of ``frame`` and the fds to attach to its first byte."""
    fds: list[int] = []
    if isinstance(frame, Hello):
        kind, payload = FrameType.HELLO, _HELLO.pack(frame.version, frame.page_size)
    elif isinstance(frame, Offer):
        name = _text(frame.name, "offer name", MAX_NAME)
        if len(frame.spans) > MAX_SPANS:
            raise LocalProtocolError(
                f"an offer of {len(frame.spans)} spans, at most {MAX_SPANS}", frame="OFFER"
            )
        head = _OFFER.pack(int(frame.flags), 0, len(name), len(frame.spans), frame.nbytes)
        rows = b"".join(SPAN.pack(*row) for row in frame.spans)
        kind, payload = FrameType.OFFER, head + name + rows
        fds = frame.fds
    elif isinstance(frame, Pull):
        kind, payload = FrameType.PULL, _PULL.pack(int(frame.method))
    elif isinstance(frame, Pipe):
        kind, payload = FrameType.PIPE, b""
        fds = frame.fds
    elif isinstance(frame, Done):
        method = _text(frame.method, "method", MAX_TEXT)
        reason = _text(frame.reason, "reason", MAX_TEXT)
        head = _DONE.pack(
            frame.nbytes, frame.pages_moved, frame.pages_copied, len(method), len(reason)
        )
        kind, payload = FrameType.DONE, head + method + reason
    elif isinstance(frame, Refuse):
        reason = _text(frame.reason, "reason", MAX_TEXT)
        kind, payload = FrameType.REFUSE, _REFUSE.pack(len(reason)) + reason
    elif isinstance(frame, Note):
        kind, payload = FrameType.NOTE, json.dumps(frame.message, separators=(",", ":")).encode()
        fds = frame.fds
    else:  # pragma: no cover - the union is closed
        raise LocalProtocolError(f"cannot encode {frame!r}")
    if len(fds) > MAX_FDS:
        raise LocalProtocolError(f"{len(fds)} fds in one frame, at most {MAX_FDS}", frame=kind.name)
    if len(payload) > MAX_PAYLOAD:
        raise LocalProtocolError(
            f"{kind.name} payload of {len(payload)} bytes, at most {MAX_PAYLOAD}", frame=kind.name
        )
    return HEADER.pack(MAGIC, VERSION, kind, len(fds), len(payload)) + payload, list(fds)


_TYPES = {t.value: t for t in FrameType}
_KNOWN_OFFER_FLAGS = int(OfferFlags.GIFT | OfferFlags.PEER_READ | OfferFlags.THP)


class Decoder:
    """Feed it bytes and fds as they arrive; take frames out with :meth:`next_frame`.

    fds that arrive stay owned by the decoder until a frame takes them; :meth:`close`
    closes any that no frame took.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._fds: deque[int] = deque()
        #: Stream offset of the first byte in the buffer, for error messages.
        self._offset = 0
        self._broken: RemoteProtocolError | None = None

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview, fds: list[int] | None = None) -> None:
        self._buf += data
        if fds:
            self._fds.extend(fds)

    def take_raw(self, n: int) -> bytes:
        """Up to ``n`` buffered bytes that are not frames (raw data after a PULL)."""
        out = bytes(self._buf[:n])
        del self._buf[:n]
        self._offset += len(out)
        return out

    def close(self) -> None:
        fds = list(self._fds)
        self._fds.clear()
        close_all(fds)

    def _error(self, message: str, frame: str, at: int = 0) -> RemoteProtocolError:
        err = RemoteProtocolError(
            f"bad {frame} frame at stream offset {self._offset + at}: {message}",
            frame=frame,
            offset=self._offset + at,
        )
        self._broken = err
        return err

    def next_frame(self) -> Frame | None:
        """The next whole frame, or None until more bytes arrive."""
        if self._broken is not None:
            raise self._broken
        buf = self._buf
        if len(buf) < HEADER.size:
            return None
        magic, version, kind, nfds, length = HEADER.unpack_from(buf)
        if magic != MAGIC:
            raise self._error(f"magic {bytes(magic)!r}, expected {MAGIC!r}", "header")
        if version != VERSION:
            raise self._error(f"version {version}, expected {VERSION}", "header", 4)
        ftype = _TYPES.get(kind)
        if ftype is None:
            raise self._error(f"unknown frame type {kind}", "header", 5)
        if nfds > MAX_FDS:
            raise self._error(f"{nfds} fds, at most {MAX_FDS}", ftype.name, 6)
        if length > MAX_PAYLOAD:
            raise self._error(f"payload of {length} bytes, at most {MAX_PAYLOAD}", ftype.name, 8)
        end = HEADER.size + length
        if len(buf) < end:
            return None
        if len(self._fds) < nfds:
            raise self._error(f"announces {nfds} fds, {len(self._fds)} arrived", ftype.name, 6)
        payload = bytes(buf[HEADER.size : end])
        fds = [self._fds.popleft() for _ in range(nfds)]
        try:
            frame = self._parsers[ftype](self, payload, fds)
        except BaseException:
            close_all(fds)
            raise
        del buf[:end]
        self._offset += end
        return frame

    # -- one parser per frame type: payload and fds in, frame out ------------------------

    def _exact(self, payload: bytes, size: int, name: str) -> None:
        if len(payload) != size:
            raise self._error(
                f"payload of {len(payload)} bytes, expected {size}", name, HEADER.size
            )

    def _need(self, payload: bytes, size: int, name: str) -> None:
        if len(payload) < size:
            raise self._error(f"payload of {len(payload)} bytes, needs {size}", name, HEADER.size)

    def _no_fds(self, fds: list[int], name: str) -> None:
        if fds:
            raise self._error(f"carries {len(fds)} fds, expected none", name, 6)

    def _hello(self, payload: bytes, fds: list[int]) -> Frame:
        self._exact(payload, _HELLO.size, "HELLO")
        self._no_fds(fds, "HELLO")
        version, page_size = _HELLO.unpack(payload)
        return Hello(page_size=page_size, version=version)

    def _offer(self, payload: bytes, fds: list[int]) -> Frame:
        at = HEADER.size
        self._need(payload, _OFFER.size, "OFFER")
        flags, _, name_len, nspans, nbytes = _OFFER.unpack_from(payload)
        if flags & ~_KNOWN_OFFER_FLAGS:
            raise self._error(f"unknown flags {flags:#x}", "OFFER", at)
        if nspans > MAX_SPANS:
            raise self._error(f"{nspans} spans, at most {MAX_SPANS}", "OFFER", at)
        self._exact(payload, _OFFER.size + name_len + nspans * SPAN.size, "OFFER")
        try:
            label = payload[_OFFER.size : _OFFER.size + name_len].decode()
        except UnicodeDecodeError:
            raise self._error("name is not UTF-8", "OFFER", at + _OFFER.size) from None
        rows = SPAN.iter_unpack(payload[_OFFER.size + name_len :])
        spans = [SpanRow._make(row) for row in rows]
        self._check_spans(spans, nbytes, len(fds), at + _OFFER.size + name_len)
        return Offer(OfferFlags(flags), nbytes, label, spans, fds)

    def _pull(self, payload: bytes, fds: list[int]) -> Frame:
        self._exact(payload, _PULL.size, "PULL")
        self._no_fds(fds, "PULL")
        (method,) = _PULL.unpack(payload)
        try:
            return Pull(PullMethod(method))
        except ValueError:
            raise self._error(f"unknown method {method}", "PULL", HEADER.size) from None

    def _pipe(self, payload: bytes, fds: list[int]) -> Frame:
        self._exact(payload, 0, "PIPE")
        if len(fds) != 1:
            raise self._error(f"carries {len(fds)} fds, expected 1", "PIPE", 6)
        return Pipe(fds)

    def _done(self, payload: bytes, fds: list[int]) -> Frame:
        self._need(payload, _DONE.size, "DONE")
        self._no_fds(fds, "DONE")
        nbytes, moved, copied, mlen, rlen = _DONE.unpack_from(payload)
        self._exact(payload, _DONE.size + mlen + rlen, "DONE")
        if mlen > MAX_TEXT or rlen > MAX_TEXT:
            raise self._error("method or reason too long", "DONE", HEADER.size)
        text = payload[_DONE.size :]
        try:
            method, reason = text[:mlen].decode(), text[mlen:].decode()
        except UnicodeDecodeError:
            raise self._error("text is not UTF-8", "DONE", HEADER.size + _DONE.size) from None
        return Done(nbytes, moved, copied, method, reason)

    def _refuse(self, payload: bytes, fds: list[int]) -> Frame:
        self._need(payload, _REFUSE.size, "REFUSE")
        self._no_fds(fds, "REFUSE")
        (rlen,) = _REFUSE.unpack_from(payload)
        self._exact(payload, _REFUSE.size + rlen, "REFUSE")
        try:
            return Refuse(payload[_REFUSE.size :].decode())
        except UnicodeDecodeError:
            raise self._error("reason is not UTF-8", "REFUSE", HEADER.size + _REFUSE.size) from None

    def _note(self, payload: bytes, fds: list[int]) -> Frame:
        try:
            message = json.loads(payload)
        except ValueError as err:
            raise self._error(f"not JSON: {err}", "NOTE", HEADER.size) from None
        if not isinstance(message, dict):
            raise self._error("not a JSON object", "NOTE", HEADER.size)
        return Note(message, fds)

    _parsers: ClassVar[dict[FrameType, Callable[[Decoder, bytes, list[int]], Frame]]] = {
        FrameType.HELLO: _hello,
        FrameType.OFFER: _offer,
        FrameType.PULL: _pull,
        FrameType.PIPE: _pipe,
        FrameType.DONE: _done,
        FrameType.REFUSE: _refuse,
        FrameType.NOTE: _note,
    }

    def _check_spans(self, spans: list[SpanRow], nbytes: int, nfds: int, at: int) -> None:
        if not spans:
            raise self._error("offers no spans", "OFFER", at)
        used = set()
        total = 0
        for addr, length, fd_index, fd_offset in spans:
            if length == 0:
                raise self._error("a span has length 0", "OFFER", at)
            if length > MAX_SPAN:
                raise self._error(f"a span longer than {MAX_SPAN} bytes", "OFFER", at)
            if addr + length > 1 << 64 or fd_offset + length > 1 << 64:
                raise self._error("a span runs past the end of the address space", "OFFER", at)
            if not -1 <= fd_index < nfds:
                raise self._error(f"an fd index outside 0..{nfds - 1}", "OFFER", at)
            used.add(fd_index)
            total += length
        if total != nbytes:
            raise self._error(f"spans do not add up to {nbytes} bytes", "OFFER", at)
        if nfds and not set(range(nfds)) <= used:
            raise self._error("an fd that no span uses", "OFFER", at)


class WireCodec(Decoder):
    """The channel's frames as a codec for :class:`pageflip.channel.Endpoint`: the decoder
    and :func:`encode`. The channel has no frame that aborts a conversation (a REFUSE is an
    answer), so :meth:`aborted` is always None."""

    def encode(self, frame: Frame) -> tuple[bytes, list[int]]:
        return encode(frame)

    def aborted(self, frame: Any) -> PeerAborted | None:
        return None

    def name(self, frame: Any) -> str:
        return type(frame).__name__.upper()
