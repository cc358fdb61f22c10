"""The RFC's pipe between two processes: gift, send, receive, receive_into.

A transfer is a rendezvous. The writer offers spans (:meth:`Channel.gift` or
:meth:`Channel.send`) and waits; the reader (:meth:`Channel.receive` or
:meth:`Channel.receive_into`) takes them, by moving pages where the RFC's rules hold and by
copying where they do not, and answers with what it did. Both sides get a :class:`Transfer`.

The rules for a move, per byte range:

1. the writer gives the pages up (``gift``; ``send`` keeps them, so it copies);
2. the source pages are movable (memfd-backed), not private anonymous memory;
3. source and destination addresses are page-aligned, and
4. the length is a whole number of pages;
5. the destination is memory pageflip may replace (a region, anonymous or memfd memory,
   not a file mapping).

Pages are the source memfd's: 2 MiB (or 1 GiB) for a hugetlb memfd, and 2 MiB for a memfd of
transparent huge pages when the writer says so (OfferFlags.THP), so a huge region moves in
whole huge pages (rules 3 and 4 in its units), and only into a destination with pages of the
same size (a region of another page size gets a copy).

A move maps the writer's memfd pages over the destination: the reader then holds the very
same physical pages, and the writer unmaps its own view before ``gift`` returns. Anything
else is copied, by the fastest way available, and the Transfer says which rule made it copy.
Until the reader has answered, the writer keeps every page: if the reader dies, the data is
still the writer's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from .. import features
from .._sys import io, mm
from .._sys.fds import close_all
from .._sys.flags import MAP_SHARED_FIXED, PROT_RW, Madv, Splice
from .._sys.huge import THP_SIZE, size_name
from .._sys.mm import PAGE_SIZE
from .._sys.procfs import mappings
from .._wire import (
    Done,
    Frame,
    Hello,
    Offer,
    OfferFlags,
    Pipe,
    Pull,
    PullMethod,
    Refuse,
    SpanRow,
    WireCodec,
)
from ..errors import (
    BadArgument,
    ClosedError,
    LocalProtocolError,
    PageflipError,
    PeerClosed,
    PeerRefused,
    PeerTimeout,
    RemoteProtocolError,
    SpanError,
    WrongType,
)
from ..memory import Memfd, Region, Span, bytes_at, region_at, writable_address
from ..transport import UnixConnection, UnixListener
from .endpoint import Endpoint
from .peer import (
    allow_peer_read,
    check_peer_memfd,
    forbid_peer_read,
    map_checked_memfds,
    memfd_page_size,
    pull_from,
)

__all__ = ["Channel", "CopyMethod", "Listener", "Transfer", "channel_pair", "vmsplice"]

log = logging.getLogger("pageflip.channel")

CopyMethod = Literal["auto", "process_vm_readv", "vmsplice", "stream"]
_COPY_METHODS = ("auto", "process_vm_readv", "vmsplice", "stream")

_GIFT = int(OfferFlags.GIFT)
_PEER_READ = int(OfferFlags.PEER_READ)

#: Pipe capacity asked for on the vmsplice path (root may exceed pipe-max-size).
PIPE_SIZE = 1 << 20


@dataclass(frozen=True)
class Transfer:
    """What one gift, send, receive or receive_into did.

    ``seconds`` is the writer's call until the reader answered and, on the reader, the time
    from the writer's offer to the data being in place (not the wait for it). ``release`` is
    what a gift spent afterwards letting go of the writer's own mapping of the pages (unmap
    and close, after the reader had them: never on the reader's path), and
    ``release_cpu`` the CPU time that took (the wall time also counts waiting for CPUs others
    want, or for a reader freeing the same pages meanwhile); both 0 for a send and on the
    reader.
    ``method`` is ``"move"`` when every page moved, else the copy method (``"pread"`` from
    a gifted memfd, ``"process_vm_readv"``, ``"vmsplice"``, ``"stream"``), joined with ``+``
    when a transfer mixed them. ``reason`` says in words which rule made it copy (None for a
    pure move).
    """

    nbytes: int
    pages_moved: int
    pages_copied: int
    method: str
    reason: str | None
    seconds: float
    release: float = 0.0
    release_cpu: float = 0.0

    @property
    def moved(self) -> bool:
        """True when every page moved and none was copied."""
        return self.pages_copied == 0 and self.pages_moved > 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        what = (
            f"moved {self.pages_moved} pages"
            if self.moved
            else f"{self.pages_moved} pages moved, {self.pages_copied} copied"
        )
        why = f" ({self.reason})" if self.reason else ""
        freed = f", released in {self.release * 1e3:.3f} ms" if self.release else ""
        return (
            f"{self.nbytes} bytes by {self.method}: {what} in {self.seconds * 1e3:.3f} ms"
            f"{freed}{why}"
        )


def _readable(item: Any) -> memoryview:
    """A flat byte view of a region, span or any C-contiguous buffer."""
    if isinstance(item, (Region, Span)):
        return item.view()
    try:
        view = memoryview(item)
    except TypeError:
        raise SpanError(f"{type(item).__name__} is not a buffer") from None
    if not view.c_contiguous:
        raise SpanError(f"the {type(item).__name__} buffer is not contiguous")
    return view.cast("B") if view.ndim != 1 or view.format != "B" else view


def _address_of(view: memoryview) -> int:
    """Address of a byte view's first byte, read-only views included."""
    return int(np.frombuffer(view, np.uint8).ctypes.data)


def _pages(nbytes: int) -> int:
    return (nbytes + PAGE_SIZE - 1) // PAGE_SIZE


# -- what a writer offers -------------------------------------------------------------------


@dataclass(slots=True)
class _Piece:
    """A byte range of the writer's memory, with the memfd behind it if it has one."""

    address: int
    length: int
    memfd: Memfd | None
    fd_offset: int


def _gift_spans(obj: Region | Span | Iterable[Region | Span]) -> list[Span]:
    items: Iterable[Any] = [obj] if isinstance(obj, (Region, Span)) else obj
    spans: list[Span] = []
    for item in items:
        if isinstance(item, Region):
            item.bounds(0, None)
            spans.append(Span(item, 0, item.size))
        elif isinstance(item, Span):
            item.region.bounds(item.offset, item.offset + item.size)
            spans.append(item)
        else:
            raise WrongType(
                f"gift() takes Regions or slices of them, not {type(item).__name__}; "
                "use send() to copy any other buffer"
            )
    if not spans:
        raise SpanError("nothing to gift: the list is empty")
    seen: dict[int, list[tuple[int, int]]] = {}
    for span in spans:
        ranges = seen.setdefault(id(span.region), [])
        for lo, hi in ranges:
            if span.offset < hi and lo < span.offset + span.size:
                raise SpanError(
                    f"bytes [{span.offset}, {span.offset + span.size}) of region "
                    f"{span.region.name!r} are listed twice",
                    offset=span.offset,
                    length=span.size,
                )
        ranges.append((span.offset, span.offset + span.size))
    return spans


# -- where a reader puts it ------------------------------------------------------------------


@dataclass(slots=True)
class _Target:
    """A destination byte range: part of a region, or foreign memory at an address."""

    address: int
    length: int
    region: Region | None
    region_offset: int
    #: For foreign memory: why pages may not be mapped over it (None: they may).
    no_move: str | None = None
    #: Keeps a foreign buffer alive (and its address valid) while we write to it.
    keep: Any = None


def _replaceable(path: str) -> bool:
    """Whether a mapping named ``path`` in /proc/self/maps is plain memory we may replace.

    Private anonymous memory (no name, or a ``[anon:...]`` name), shared anonymous memory
    (``/dev/zero (deleted)``, as ``mmap.mmap(-1, n)`` makes) and memfds are; files, the
    brk heap and stacks are not.
    """
    return not path or path.startswith(("[anon:", "/memfd:")) or path == "/dev/zero (deleted)"


def _foreign_move_block(address: int, length: int) -> str | None:
    """Why pages cannot be mapped over foreign memory ``[address, address+length)``."""
    if address % PAGE_SIZE or length % PAGE_SIZE:
        return None  # alignment rules speak for themselves
    end = address + length
    pos = address
    for lo, hi, perms, path in mappings():
        if hi <= pos or lo >= end:
            continue
        if lo > pos:
            break
        if not perms.startswith("rw"):
            return f"destination mapping {lo:#x}-{hi:#x} is not writable"
        if not _replaceable(path):
            return f"destination is backed by {path}: mapping pages over it would detach it"
        pos = hi
        if pos >= end:
            return None
    return "destination is not one mapping pageflip may replace"


def _targets(dest: Any) -> list[_Target]:
    items = dest if isinstance(dest, (list, tuple)) else [dest]
    targets: list[_Target] = []
    for item in items:
        if isinstance(item, Region):
            item.bounds(0, None)
            targets.append(_Target(item.address, item.size, item, 0))
        elif isinstance(item, Span):
            item.region.bounds(item.offset, item.offset + item.size)
            targets.append(_Target(item.address, item.size, item.region, item.offset))
        else:
            address, nbytes = writable_address(item)
            if nbytes == 0:
                continue
            found = region_at(address, nbytes)
            if found is not None:
                region, offset = found
                region.bounds(offset, offset + nbytes)
                targets.append(_Target(address, nbytes, region, offset, keep=item))
            else:
                block = _foreign_move_block(address, nbytes)
                targets.append(_Target(address, nbytes, None, 0, block, keep=item))
    return targets


@dataclass(slots=True)
class _Segment:
    """``length`` bytes from one offered span to one target."""

    span: int
    src: int  # writer's address
    fd_index: int
    fd_offset: int
    target: _Target
    dst: int  # reader's address
    length: int
    #: The source's page size: its memfd's (2 MiB for a hugetlb one), else 4 KiB.
    unit: int = PAGE_SIZE


def _segments(
    spans: list[SpanRow], targets: list[_Target], nbytes: int, units: dict[int, int]
) -> list[_Segment]:
    """The offer's ``spans`` cut where ``targets`` meet; ``units`` is each memfd's page size
    by fd index."""
    out: list[_Segment] = []
    ti, toff = 0, 0
    for si, (addr, length, fd_index, fd_offset) in enumerate(spans):
        soff = 0
        while soff < length:
            target = targets[ti]
            n = min(length - soff, target.length - toff)
            out.append(
                _Segment(
                    si,
                    addr + soff,
                    fd_index,
                    fd_offset + soff if fd_index >= 0 else 0,
                    target,
                    target.address + toff,
                    n,
                    units.get(fd_index, PAGE_SIZE),
                )
            )
            soff += n
            toff += n
            if toff == target.length:
                ti, toff = ti + 1, 0
    assert sum(s.length for s in out) == nbytes
    return out


def _move_units(offer: Offer, pages: dict[int, int]) -> dict[int, int]:
    """The unit each memfd of ``offer`` moves in, by fd index: its page size (``pages``), or
    2 MiB for a shmem memfd when the writer says its memfds hold transparent huge pages."""
    if not offer.flags & OfferFlags.THP:
        return pages
    return {i: THP_SIZE if size == PAGE_SIZE else size for i, size in pages.items()}


def _page_words(unit: int) -> str:
    return "page-aligned" if unit == PAGE_SIZE else f"aligned to {size_name(unit)} pages"


def _copy_reasons(seg: _Segment, gift: bool, allow_move: bool) -> list[str]:
    """Each RFC rule this segment breaks, in words; empty when it can move.

    The rules count in the pages of the source memfd and of a destination region (a
    destination that is not a region takes the source's): both must be the same size.
    """
    why = []
    if not allow_move:
        why.append("the reader asked for a copy (move=False)")
    if not gift:
        why.append("send() keeps the writer's pages mapped (copy semantics)")
    region = seg.target.region
    dst_unit = region.page_size if region is not None else seg.unit
    # Where the sizes differ, that is the reason; alignment is then told in the smaller.
    unit = min(seg.unit, dst_unit) if seg.fd_index >= 0 else dst_unit
    if seg.fd_index < 0:
        if gift:
            why.append("the source is not movable: private anonymous memory")
    else:
        if seg.unit != dst_unit:
            why.append(
                f"the source has {size_name(seg.unit)} pages, the destination region "
                f"{size_name(dst_unit)} pages"
            )
        if seg.fd_offset % unit or seg.src % unit:
            why.append(f"the source at {seg.src:#x} is not {_page_words(unit)}")
    if seg.dst % unit:
        why.append(f"the destination at {seg.dst:#x} is not {_page_words(unit)}")
    if seg.length % unit:
        size = "" if unit == PAGE_SIZE else f" ({size_name(unit)})"
        why.append(f"the length {seg.length} is not a multiple of the page size {unit}{size}")
    if region is None and seg.target.no_move:
        why.append(seg.target.no_move)
    return why


def _offer_rows(pieces: list[_Piece], gift: bool) -> tuple[list[SpanRow], list[int]]:
    """An offer's span rows and the memfds they name. In a gift, a piece with a memfd names
    it by its index (each memfd sent once, and marked shared from now on); any other piece
    is a copy (fd index -1)."""
    spans: list[SpanRow] = []
    fds: list[int] = []
    index: dict[int, int] = {}
    for piece in pieces:
        if gift and piece.memfd is not None:
            fd_index = index.get(id(piece.memfd), -1)
            if fd_index < 0:
                fd_index = index[id(piece.memfd)] = len(fds)
                fds.append(piece.memfd.fd)
                piece.memfd.shared = True
            spans.append(SpanRow(piece.address, piece.length, fd_index, piece.fd_offset))
        else:
            spans.append(SpanRow(piece.address, piece.length, -1, 0))
    return spans, fds


def _by_method(
    segments: list[_Segment], gift: bool, allow_move: bool
) -> tuple[list[_Segment], list[_Segment], list[_Segment], dict[str, None]]:
    """``segments`` sorted by how they arrive: moved, read from a memfd, or copied from the
    writer's process; and why any of them is copied (in order, each once)."""
    moves: list[_Segment] = []
    preads: list[_Segment] = []
    remote: list[_Segment] = []
    reasons: dict[str, None] = {}
    for seg in segments:
        why = _copy_reasons(seg, gift, allow_move)
        if not why:
            moves.append(seg)
            continue
        reasons.update(dict.fromkeys(why))
        (preads if seg.fd_index >= 0 else remote).append(seg)
    return moves, preads, remote, reasons


class Channel:
    """One end of a connection that moves (or else copies) memory to or from a peer.

    Make a pair with :func:`channel_pair` (for related processes), or
    :meth:`Channel.listen` and :meth:`Channel.connect` (for unrelated ones). A channel is
    safe to share between threads: one transfer runs at a time. ``timeout`` (seconds)
    bounds each wait for the peer; None waits as long as the peer lives.
    """

    def __init__(
        self, connection: UnixConnection, *, name: str = "channel", timeout: float | None = None
    ) -> None:
        self._conn = connection
        self._ep = Endpoint(connection, WireCodec())
        self._lock = threading.RLock()
        self._hello_sent = False
        self._peer_hello: Hello | None = None
        self._broken: PageflipError | None = None
        self.name = name
        self.timeout = timeout

    # -- making channels ------------------------------------------------------------------

    @classmethod
    def listen(
        cls, path: str, *, uids: Iterable[int] | None = None, any_uid: bool = False
    ) -> Listener:
        """Listen at ``path`` (``@name``: abstract namespace). Only our uid unless told."""
        return Listener(path, uids=None if any_uid else uids, any_uid=any_uid)

    @classmethod
    def connect(cls, path: str, *, timeout: float | None = None) -> Channel:
        """Connect to a :meth:`listen` ing peer at ``path``."""
        return cls(UnixConnection.connect(path, timeout), name=path, timeout=timeout)

    # -- lifetime -------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._conn.closed

    def fileno(self) -> int:
        return self._conn.fileno()

    def close(self) -> None:
        """Close the connection (idempotent). The peer sees PeerClosed."""
        self._ep.close()

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        return f"<Channel {self.name!r}{' closed' if self.closed else ''}>"

    def __reduce__(self) -> tuple[Any, ...]:
        # Only multiprocessing may pickle a channel, while it starts a child process.
        from multiprocessing import context, reduction

        if context.get_spawning_popen() is None:
            raise WrongType(
                "a Channel can only be passed to a child process when it starts "
                "(multiprocessing.Process args)"
            )
        if self._ep.codec.buffered:
            raise LocalProtocolError("cannot hand over a channel with unread frames")
        return (_rebuild_channel, (reduction.DupFd(self.fileno()), self.name, self.timeout))

    # -- frames ---------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._conn.closed:
            raise ClosedError(f"channel {self.name!r} is closed", what="channel")
        if self._broken is not None:
            raise LocalProtocolError(
                f"channel {self.name!r} is unusable after an earlier error: {self._broken}"
            ) from self._broken

    def _say_hello(self) -> None:
        if not self._hello_sent:
            self._hello_sent = True
            self._ep.send(Hello(page_size=PAGE_SIZE), "handshake")

    def _send(self, frame: Frame, phase: str) -> None:
        self._say_hello()
        self._ep.send(frame, phase)

    def _recv(self, phase: str) -> Frame:
        """The next frame from the peer (after its hello), waiting for it."""
        self._say_hello()
        while True:
            try:
                frame: Frame = self._ep.recv(phase, self.timeout)
            except RemoteProtocolError as err:
                self._broken = err
                raise
            if self._peer_hello is None:
                self._check_hello(frame)
                continue
            return frame

    def _check_hello(self, frame: Frame) -> None:
        if not isinstance(frame, Hello):
            err = RemoteProtocolError(
                f"handshake: expected HELLO, got {type(frame).__name__.upper()}",
                frame=type(frame).__name__.upper(),
            )
            self._broken = err
            raise err
        if frame.page_size != PAGE_SIZE:
            err = RemoteProtocolError(
                f"handshake: the peer's page size is {frame.page_size}, ours {PAGE_SIZE}",
                frame="HELLO",
            )
            self._broken = err
            raise err
        self._peer_hello = frame

    def _fail(self, err: PageflipError) -> PageflipError:
        """Mark the channel unusable after a failure that left its stream out of step."""
        self._broken = err
        return err

    # -- writer ---------------------------------------------------------------------------

    def gift(self, spans: Region | Span | Iterable[Region | Span]) -> Transfer:
        """Give the pages of ``spans`` (regions, slices of them, or a list) to the reader.

        The RFC's SPLICE_F_GIFT|SPLICE_F_MOVE: movable pages move, others are copied. When
        this returns the writer no longer maps the pages: a whole region is closed, a slice
        becomes inaccessible. If the reader refuses or dies first, nothing changed here.
        Raises BufferInUse while a view or array still uses the pages.

        The writer lets go of its mapping only once the reader has answered, and lets the
        reader run first (see below), so that tearing down a large mapping never holds the
        reader off its CPU; ``Transfer.release`` says how long it took.
        """
        with self._lock:
            self._check_usable()
            chosen = _gift_spans(spans)
            for span in chosen:
                span.region.check_unused(span.offset, span.offset + span.size, doing="gift")
            pieces = [
                _Piece(span.region.address + e.offset, e.length, e.memfd, e.fd_offset)
                for span in chosen
                for e in span.region.extents(span.offset, span.offset + span.size)
            ]
            name = chosen[0].region.name
            transfer = self._offer(pieces, gift=True, name=name)
            start, cpu = time.perf_counter(), time.thread_time()
            # The reader's answer woke us with a sync wake-up (a Unix socket's), which puts us
            # on the reader's CPU, ahead of it: unmapping a populated mapping there (30-70 ms
            # per GiB of 4 KiB pages) would keep the reader from returning with its pages.
            # Yielding lets it run first; the teardown then shares the CPU fairly.
            os.sched_yield()
            for span in chosen:
                span.region.give_away(span.offset, span.offset + span.size)
            return dataclasses.replace(
                transfer,
                release=time.perf_counter() - start,
                release_cpu=time.thread_time() - cpu,
            )

    def send(self, buffer: Any) -> Transfer:
        """Copy ``buffer`` (any contiguous buffer, a region, a slice, or a list) to the reader.

        Copy semantics: the writer keeps its data, unchanged. Blocks until the reader has it.
        """
        with self._lock:
            self._check_usable()
            items = buffer if isinstance(buffer, (list, tuple)) else [buffer]
            views: list[memoryview] = []
            try:
                for item in items:
                    view = _readable(item)
                    if view.nbytes:
                        views.append(view)
                if not views:
                    raise SpanError("nothing to send: the buffer is empty")
                pieces = [_Piece(_address_of(v), v.nbytes, None, 0) for v in views]
                name = items[0].name if isinstance(items[0], Region) else "buffer"
                return self._offer(pieces, gift=False, name=name)
            finally:
                for view in views:
                    with contextlib.suppress(BufferError):
                        view.release()

    def _offer(self, pieces: list[_Piece], *, gift: bool, name: str) -> Transfer:
        start = time.perf_counter()
        spans, fds = _offer_rows(pieces, gift)
        nbytes = sum(p.length for p in pieces)
        flags = OfferFlags.GIFT if gift else OfferFlags.NONE
        held = [p.memfd for p in pieces if p.memfd is not None]
        if gift and held and all(m.thp for m in held):
            flags |= OfferFlags.THP  # moved in 2 MiB units, kept huge on the reader's side
        copies = [p for p in pieces if not (gift and p.memfd is not None)]
        ptracer = False
        if copies and features.has("process_vm_readv"):
            flags |= OfferFlags.PEER_READ
            ptracer = allow_peer_read(self._ep.sender_pid())
        try:
            self._send(Offer(flags, nbytes, name, spans, fds), "offer")
            done = self._serve_pulls(copies, gift)
        finally:
            if ptracer:
                forbid_peer_read()
        if done.nbytes != nbytes:
            raise self._fail(
                RemoteProtocolError(
                    f"the reader reports {done.nbytes} bytes, {nbytes} were offered", frame="DONE"
                )
            )
        return Transfer(
            nbytes,
            done.pages_moved,
            done.pages_copied,
            done.method,
            done.reason or None,
            time.perf_counter() - start,
        )

    def _serve_pulls(self, copies: list[_Piece], gift: bool) -> Done:
        """Push ``copies`` each time the reader pulls, until it is done (its DONE) or
        refuses (PeerRefused)."""
        while True:
            frame = self._recv("waiting for the reader")
            if isinstance(frame, Pull):
                self._push(frame.method, copies, gift)
            elif isinstance(frame, Done):
                return frame
            elif isinstance(frame, Refuse):
                raise PeerRefused(
                    f"the reader refused the transfer: {frame.reason}",
                    phase="offer",
                    reason=frame.reason,
                )
            else:
                close_all(getattr(frame, "fds", []))
                raise self._fail(
                    RemoteProtocolError(
                        f"expected PULL, DONE or REFUSE, got {type(frame).__name__.upper()}",
                        frame=type(frame).__name__.upper(),
                    )
                )

    def _push(self, method: PullMethod, pieces: list[_Piece], gift: bool) -> None:
        """Push the bytes of ``pieces`` the way the reader asked."""
        if method is PullMethod.STREAM:
            self._conn.sendall_spans(
                (bytes_at(p.address, p.length) for p in pieces), "streaming data"
            )
            return
        r, w = io.pipe(PIPE_SIZE)
        try:
            try:
                self._send(Pipe([r]), "vmsplice")
            finally:
                os.close(r)
            iov = io.iovecs((p.address, p.length) for p in pieces)
            flags = Splice.GIFT | Splice.MOVE if gift else Splice.NONE
            while len(iov):
                try:
                    n = io.vmsplice(w, iov, flags)
                except BrokenPipeError as err:
                    raise PeerClosed(
                        "the reader closed the pipe (vmsplice)", phase="vmsplice"
                    ) from err
                iov = io.iov_advance(iov, n)
        finally:
            os.close(w)

    # -- reader ---------------------------------------------------------------------------

    def receive(
        self,
        *,
        name: str | None = None,
        copy_method: CopyMethod = "auto",
        move: bool = True,
        populate: bool = False,
    ) -> tuple[Region, Transfer]:
        """Take the next transfer into a new region: the writer's very pages when they move.

        ``populate`` maps every page before returning (the first touch is then free).
        ``copy_method`` chooses how copies are done (``"auto"``: the fastest that works).
        """
        _check_copy_method(copy_method)
        with self._lock:
            self._check_usable()
            offer = self._next_offer()
            start = time.perf_counter()  # the transfer, not the wait for the writer
            label = name or offer.name
            region: Region | None = None
            try:
                pages = self._check_memfds(offer)
                units = _move_units(offer, pages)
                all_fds = all(row.fd_index >= 0 for row in offer.spans)
                gift = bool(offer.flags & _GIFT)
                if move and gift and all_fds and self._aligned(offer, units):
                    region = self._map_offer(offer, label)
                    if populate:
                        mm.madvise(region.address, region.size, Madv.POPULATE_READ)
                    moved = region.size // PAGE_SIZE
                    transfer = Transfer(
                        offer.nbytes, moved, 0, "move", None, time.perf_counter() - start
                    )
                    self._answer(Done(offer.nbytes, moved, 0, "move", ""))
                    return region, transfer
                region = Region.movable(offer.nbytes, label)
                transfer = self._take(offer, _targets(region), start, copy_method, move, pages)
                if populate:
                    mm.madvise(region.address, region.size, Madv.POPULATE_READ)
                return region, transfer
            except BaseException:
                close_all(offer.fds)
                if region is not None:
                    region.close()
                raise

    def receive_into(
        self, buffer: Any, *, copy_method: CopyMethod = "auto", move: bool = True
    ) -> Transfer:
        """Take the next transfer into existing memory, moving pages where the rules allow.

        ``buffer``: a region, a slice of one, a numpy array, any writable contiguous buffer,
        or a list of them (filled in order). It must hold at least as many bytes as the
        writer offers; otherwise the transfer is refused and the writer keeps its data.
        """
        _check_copy_method(copy_method)
        targets = _targets(buffer)
        with self._lock:
            self._check_usable()
            offer = self._next_offer()
            start = time.perf_counter()  # the transfer, not the wait for the writer
            try:
                pages = self._check_memfds(offer)
                return self._take(offer, targets, start, copy_method, move, pages)
            finally:
                close_all(offer.fds)

    def _next_offer(self) -> Offer:
        frame = self._recv("waiting for an offer")
        if not isinstance(frame, Offer):
            close_all(getattr(frame, "fds", []))
            raise self._fail(
                RemoteProtocolError(
                    f"expected OFFER, got {type(frame).__name__.upper()}",
                    frame=type(frame).__name__.upper(),
                )
            )
        if not frame.flags & _GIFT and frame.fds:
            close_all(frame.fds)
            raise self._refuse(RemoteProtocolError("a send() offer carries memfds", frame="OFFER"))
        return frame

    def _refuse(self, err: PageflipError) -> PageflipError:
        """Tell the writer we refuse (it keeps its data); return ``err`` to raise."""
        with contextlib.suppress(PageflipError, OSError):
            self._send(Refuse(str(err)), "refuse")
        return err

    def _answer(self, done: Done) -> None:
        # The data is ours by now: a writer that died meanwhile changes nothing here.
        try:
            self._send(done, "done")
        except PeerClosed:
            log.debug("the writer left before our DONE; the data is already here")

    @staticmethod
    def _aligned(offer: Offer, units: dict[int, int]) -> bool:
        """Whether every span is whole pages of its memfd, all of one page size."""
        if len(set(units.values())) > 1:
            return False
        return all(
            not (row.fd_offset % units[row.fd_index] or row.length % units[row.fd_index])
            for row in offer.spans
        )

    def _check_memfds(self, offer: Offer) -> dict[int, int]:
        """Refuse the offer unless each span's memfd range may be mapped (check_peer_memfd);
        returns each memfd's page size by fd index (see :func:`_move_units`)."""
        units: dict[int, int] = {}
        for row in offer.spans:
            if row.fd_index < 0:
                continue
            try:
                st = check_peer_memfd(
                    offer.fds[row.fd_index],
                    offset=row.fd_offset,
                    length=row.length,
                    what=f"memfd {row.fd_index} of the offer",
                    frame="OFFER",
                )
            except RemoteProtocolError as err:
                raise self._refuse(err) from None
            units[row.fd_index] = memfd_page_size(st)
        return units

    @staticmethod
    def _map_offer(offer: Offer, name: str) -> Region:
        """A new region mapping the offer's memfds: the move."""
        # Every span's memfd passed _check_memfds already (the offer was refused otherwise).
        region = map_checked_memfds(
            offer.fds,
            [(row.fd_index, row.fd_offset, row.length) for row in offer.spans],
            name,
            thp=bool(offer.flags & OfferFlags.THP),
        )
        fds, offer.fds = offer.fds, []
        close_all(fds)  # the region holds its own
        return region

    def _take(
        self,
        offer: Offer,
        targets: list[_Target],
        start: float,
        copy_method: CopyMethod,
        allow_move: bool,
        pages: dict[int, int],
    ) -> Transfer:
        room = sum(t.length for t in targets)
        if room < offer.nbytes:
            raise self._refuse(
                SpanError(
                    f"the destination holds {room} bytes, the writer offers {offer.nbytes}",
                    length=room,
                )
            )
        segments = _segments(offer.spans, targets, offer.nbytes, _move_units(offer, pages))
        moves, preads, remote, reasons = _by_method(segments, bool(offer.flags & _GIFT), allow_move)
        methods: list[str] = []
        thp = bool(offer.flags & OfferFlags.THP)
        holders = {
            i: Memfd(
                fd,
                shared=True,
                page_size=pages.get(i, PAGE_SIZE),
                thp=thp and pages.get(i, PAGE_SIZE) == PAGE_SIZE,
            )
            for i, fd in enumerate(offer.fds)
        }
        offer.fds = []
        try:
            if moves:
                self._move_in(moves, holders)
                methods.append("move")
            if preads:
                self._pread_in(preads, holders)
                methods.append("pread")
            if remote:
                methods.append(self._copy_remote(offer, remote, copy_method))
        finally:
            for holder in holders.values():
                holder.close()  # regions that mapped one keep their own reference

        moved = sum(s.length for s in moves) // PAGE_SIZE
        copied = sum(_pages(s.length) for s in preads + remote)
        method = "+".join(methods)
        reason = "; ".join(reasons)
        self._answer(Done(offer.nbytes, moved, copied, method, reason))
        return Transfer(
            offer.nbytes, moved, copied, method, reason or None, time.perf_counter() - start
        )

    def _pread_in(self, preads: list[_Segment], holders: dict[int, Memfd]) -> None:
        """Copy ``preads`` out of the offer's memfds; a short read refuses the offer."""
        for seg in preads:
            got = io.preadv(
                holders[seg.fd_index].fd, io.iovecs([(seg.dst, seg.length)]), seg.fd_offset
            )
            if got != seg.length:
                raise self._refuse(
                    RemoteProtocolError(
                        f"memfd read gave {got} of {seg.length} bytes", frame="OFFER"
                    )
                )

    def _move_in(self, moves: list[_Segment], holders: dict[int, Memfd]) -> None:
        # Each destination region gets its own reference (a dup) to each memfd it maps.
        own: dict[tuple[int, int], tuple[Region, Memfd]] = {}
        try:
            for seg in moves:
                target = seg.target
                if target.region is None:
                    mm.mmap(
                        seg.dst,
                        seg.length,
                        PROT_RW,
                        MAP_SHARED_FIXED,
                        holders[seg.fd_index].fd,
                        seg.fd_offset,
                    )
                    continue
                key = (id(target.region), seg.fd_index)
                if key not in own:
                    holder = holders[seg.fd_index]
                    dup = Memfd(
                        os.dup(holder.fd),
                        shared=True,
                        page_size=holder.page_size,
                        thp=holder.thp,
                    )
                    own[key] = (target.region, dup)
                offset = target.region_offset + (seg.dst - target.address)
                target.region.replace(offset, own[key][1], seg.fd_offset, seg.length)
        except BaseException:
            for region, memfd in own.values():
                if not any(e.memfd is memfd for e in region.extents()):
                    memfd.close()
            raise

    def _copy_remote(self, offer: Offer, segs: list[_Segment], copy_method: CopyMethod) -> str:
        """Copy segments that only the writer's memory holds; returns the method used."""
        local = io.iovecs((s.dst, s.length) for s in segs)
        pid = self._conn.last_pid
        want = copy_method
        if want in ("auto", "process_vm_readv") and offer.flags & _PEER_READ and pid > 0:
            remote = io.iovecs((s.src, s.length) for s in segs)
            try:
                pull_from(pid, local, remote, phase="process_vm_readv")
                return "process_vm_readv"
            except PermissionError as err:
                if want == "process_vm_readv":
                    raise
                log.debug("process_vm_readv refused (%s); asking for vmsplice", err)
        if want in ("auto", "vmsplice", "process_vm_readv") and features.has("vmsplice"):
            self._send(Pull(PullMethod.VMSPLICE), "pull")
            frame = self._recv("waiting for the pipe")
            if not isinstance(frame, Pipe):
                close_all(getattr(frame, "fds", []))
                raise self._fail(
                    RemoteProtocolError(
                        f"expected PIPE, got {type(frame).__name__.upper()}", frame="PIPE"
                    )
                )
            fd = frame.fds[0]
            try:
                got = io.read_all_into(fd, local)
            finally:
                os.close(fd)
            if got != int(local[:, 1].sum()):
                raise self._fail(
                    PeerClosed("the writer closed the pipe early (vmsplice)", phase="vmsplice")
                )
            return "vmsplice"
        self._send(Pull(PullMethod.STREAM), "pull")
        self._stream_into(local)
        return "stream"

    def _stream_into(self, local: io.IovArray) -> None:
        try:
            for base, length in local.tolist():
                self._ep.read_raw_into(bytes_at(int(base), int(length)), "stream")
        except PeerClosed as err:
            raise self._fail(err) from None


def _check_copy_method(method: str) -> None:
    if method not in _COPY_METHODS:
        raise BadArgument(
            f"copy_method must be one of {_COPY_METHODS}, not {method!r}", argument="copy_method"
        )


def _rebuild_channel(dup: Any, name: str, timeout: float | None) -> Channel:
    sock = socket.socket(fileno=dup.detach())
    return Channel(UnixConnection(sock), name=name, timeout=timeout)


class Listener:
    """A listening channel endpoint: :meth:`accept` gives a :class:`Channel` per peer."""

    def __init__(
        self, path: str, *, uids: Iterable[int] | None = None, any_uid: bool = False
    ) -> None:
        self._listener = UnixListener(path, uids=uids)
        if any_uid:
            self._listener.uids = None
        self.path = path

    def accept(self, *, timeout: float | None = None) -> Channel:
        """Wait for the next peer (PeerRejected for a uid we do not take)."""
        try:
            conn = self._listener.accept(timeout)
        except TimeoutError as err:
            raise PeerTimeout(
                f"no peer connected to {self.path!r} in {timeout} s", phase="accept"
            ) from err
        return Channel(conn, name=self.path)

    def fileno(self) -> int:
        return self._listener.fileno()

    def close(self) -> None:
        """Stop listening and remove the socket file. Idempotent."""
        self._listener.close()

    @property
    def closed(self) -> bool:
        return self._listener.closed

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def channel_pair(*, timeout: float | None = None) -> tuple[Channel, Channel]:
    """Two connected channels, for related processes (fork, or multiprocessing spawn)."""
    a, b = UnixConnection.pair()
    return Channel(a, name="pair:a", timeout=timeout), Channel(b, name="pair:b", timeout=timeout)


def vmsplice(fd: int, iovecs: Sequence[Any], flags: Splice | int = Splice.NONE) -> int:
    """vmsplice(2), thinly: splice user memory into (or, on a read end, copy out of) a pipe.

    ``iovecs`` are buffers or (address, length) pairs. Returns the bytes the kernel took.
    On a read end SPLICE_F_MOVE is ignored by every merged kernel: the data is copied.
    With SPLICE_F_GIFT the caller promises not to touch the pages again.
    """
    pairs: list[tuple[int, int]] = []
    keep: list[memoryview] = []
    for item in iovecs:
        if isinstance(item, tuple):
            pairs.append((int(item[0]), int(item[1])))
            continue
        view = memoryview(item)
        keep.append(view)
        arr = np.frombuffer(
            view.cast("B") if view.ndim != 1 or view.format != "B" else view, np.uint8
        )
        pairs.append((int(arr.ctypes.data), view.nbytes))
    return io.vmsplice(fd, io.iovecs(pairs), Splice(int(flags)))
