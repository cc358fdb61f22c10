"""One connection's I/O loop: the frames of any sans-I/O codec over a socket, with deadlines.

Every conversation pageflip holds runs through an :class:`Endpoint`: a channel's transfers
(:mod:`pageflip._wire`), a migration (:mod:`pageflip.stream`) and a postcopy destination's
talk with its pager (:class:`~pageflip._wire.Note` frames). The endpoint owns the socket and
the codec; it is the one place that waits for a peer, and so the one place that decides
what a silent, vanished, refusing or giving-up peer becomes:

* no byte within the deadline: :class:`~pageflip.errors.PeerTimeout`;
* end of stream or a reset: :class:`~pageflip.errors.PeerClosed`;
* a listener's refusal marker as the first bytes: :class:`~pageflip.errors.PeerRejected`
  with its reason (see :func:`pageflip.transport.tell_refused`);
* the codec's own "I give up" frame (the migration's ABORT) where a caller :meth:`expects
  <Endpoint.expect>` another: :class:`~pageflip.errors.PeerAborted`.

A codec is bytes in, frames out and frames in, bytes out (:class:`Codec`); it never touches
the socket, so each is tested without one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import time
from collections.abc import Callable
from typing import Any, Protocol

from .._sys.fds import close_all, pidfd_open
from ..errors import PeerAborted, PeerClosed, PeerRejected, PeerTimeout, RemoteProtocolError
from ..transport import Connection, UnixConnection, refusal

#: Bytes asked of the socket per read, unless an endpoint is told otherwise (a migration
#: asks for more: its frames carry page data).
READ_SIZE = 64 << 10
#: Longest sleep between two looks at ``interrupt`` while waiting for the peer.
POLL_SLICE = 0.05
#: How many of the peer's first bytes are kept (to say what answered, when it is not us).
HEAD_SIZE = 64
#: Bytes taken per poll while spinning (a flip's SWITCHOVER, its largest frame, is ~12 KiB).
SPIN_READ = 64 << 10


class Codec(Protocol):
    """A sans-I/O codec: what an :class:`Endpoint` needs of one."""

    def encode(self, frame: Any) -> tuple[bytes, list[int]]:
        """The bytes of ``frame`` and the fds to attach to its first byte."""
        ...

    def feed(self, data: bytes | memoryview, fds: list[int]) -> None:
        """Bytes (and fds) as they arrived; the codec owns the fds from here. A view is
        good only during the call (its buffer is read into again)."""
        ...

    def next_frame(self) -> Any | None:
        """The next whole frame, or None until more bytes arrive."""
        ...

    @property
    def buffered(self) -> int:
        """How many bytes wait in the codec, not yet taken as frames."""
        ...

    def take_raw(self, n: int) -> bytes:
        """Up to ``n`` buffered bytes that are not frames (raw data after a request)."""
        ...

    def aborted(self, frame: Any) -> PeerAborted | None:
        """The error to raise if ``frame`` says the peer gave up, else None."""
        ...

    def name(self, frame: Any) -> str:
        """The frame's name on the wire (HELLO, PAGES), for messages."""
        ...

    def close(self) -> None:
        """Close the fds no frame took."""
        ...


class Endpoint:
    """Frames of ``codec`` over ``conn``: send, receive with deadlines, expect.

    ``interrupt`` is called every :data:`POLL_SLICE` seconds while a receive waits; it
    raises to stop the wait (a cancel). ``read_size`` bytes are asked of the socket per
    read. ``bytes_sent`` and ``bytes_received`` count what went over the socket.
    """

    def __init__(
        self,
        conn: Connection,
        codec: Codec,
        *,
        interrupt: Callable[[], None] | None = None,
        read_size: int = READ_SIZE,
    ) -> None:
        self.conn = conn
        self.codec = codec
        self.interrupt = interrupt
        self.read_size = read_size
        self.bytes_sent = 0
        self.bytes_received = 0
        #: The first bytes the peer sent (to say what answered, when it is not pageflip).
        self.head = b""
        self._spin_buffer: memoryview | None = None

    @property
    def local(self) -> bool:
        """True for a Unix socket: same host, fds can travel, memory can be pulled."""
        return isinstance(self.conn, UnixConnection)

    @property
    def closed(self) -> bool:
        return self.conn.closed

    @property
    def pending(self) -> bool:
        """Whether bytes already read wait in the codec (a frame may be ready without the
        socket being readable: look here before sleeping on it)."""
        return self.codec.buffered > 0

    def fileno(self) -> int:
        return self.conn.fileno()

    def peer_pid(self) -> int:
        """The peer's pid as the kernel saw it at connect time (0 over TCP)."""
        return self.conn.peer()[0]

    def sender_pid(self) -> int:
        """The pid stamped on the last message received (the connect-time pid if none)."""
        last = getattr(self.conn, "last_pid", 0)
        return int(last) or self.peer_pid()

    # -- sending --------------------------------------------------------------------------

    def send(self, frame: Any, phase: str) -> int:
        """Send ``frame`` whole; returns its size in bytes. A listener that refused us
        before we had sent anything may have closed before our first frame went out: its
        refusal then waits unread and the send fails, and PeerRejected says why."""
        data, fds = self.codec.encode(frame)
        try:
            self.conn.send(data, fds, phase)
        except PeerClosed:
            why = self._refused_unread()
            if why is not None:
                raise PeerRejected(why, phase=phase) from None
            raise
        self.bytes_sent += len(data)
        return len(data)

    def _refused_unread(self) -> str | None:
        """The refusal a listener left before it closed, if nothing was read yet and it is
        there to read (see :func:`~pageflip.transport.tell_refused`)."""
        ready = getattr(self.conn, "recv_ready", None)
        if self.bytes_received or ready is None:
            return None
        buf = bytearray(1024)
        with contextlib.suppress(OSError):
            got = ready(memoryview(buf))
            if got is not None:
                close_all(got[1])
                return refusal(bytes(buf[: got[0]]))
        return None

    # -- receiving ------------------------------------------------------------------------

    def recv(self, phase: str, timeout: float | None = None, spin: float = 0.0) -> Any:
        """The next frame; PeerClosed at EOF, PeerTimeout after ``timeout`` seconds of
        silence (None: as long as the peer lives).

        ``spin`` seconds are spent polling before sleeping in the kernel: waking a process
        from a blocking read can take milliseconds on an idle virtual CPU, which matters
        only where a guest is paused waiting for us.
        """
        now = time.monotonic()
        deadline = None if timeout is None else now + timeout
        frame = self.codec.next_frame()
        if frame is None and spin:
            frame = self._spin(phase, now + spin)
        while frame is None:
            self._wait(phase, deadline, timeout)
            self._read(phase)
            frame = self.codec.next_frame()
        return frame

    def _spin(self, phase: str, until: float) -> Any | None:
        """Poll for the next frame until ``until`` (monotonic); None if none came whole.

        Inside a guest's pause each hop of the conversation costs what it takes to see the
        peer's bytes and decode them, cold: the poll reads without waiting, into a buffer
        made once (a Unix connection's :meth:`recv_ready`), rather than asking the socket
        whether it is readable and then reading into a new 64 KiB buffer."""
        ready = getattr(self.conn, "recv_ready", None)
        if ready is None:
            while time.monotonic() < until and not self.conn.wait_readable(0):
                os.sched_yield()
            return None
        if self._spin_buffer is None:
            self._spin_buffer = memoryview(bytearray(SPIN_READ))
        view = self._spin_buffer
        while True:
            try:
                got = ready(view)
            except ConnectionResetError as err:
                raise PeerClosed(f"the peer reset the connection ({phase})", phase=phase) from err
            if got is not None:
                self._took(view[: got[0]], got[1], phase)
                frame = self.codec.next_frame()
                if frame is not None:
                    return frame
            elif time.monotonic() >= until:
                return None
            else:
                # Yielding on each turn: the peer's thread, woken by what it just sent us,
                # is often put on this very CPU (the scheduler's wake-affine choice) and
                # would wait behind the spin for the rest of its time slice, 3-4 ms.
                os.sched_yield()

    def poll(self, phase: str, wait: float = 0.0) -> Any | None:
        """A frame if one is ready within ``wait`` seconds (now, by default), else None."""
        frame = self.codec.next_frame()
        if frame is not None:
            return frame
        if not self.conn.wait_readable(wait):
            return None
        self._read(phase)
        return self.codec.next_frame()

    def expect(
        self,
        kinds: tuple[type[Any], ...],
        phase: str,
        timeout: float | None = None,
        spin: float = 0.0,
    ) -> Any:
        """The next frame, which must be one of ``kinds`` (the peer giving up is raised as
        PeerAborted; anything else is a RemoteProtocolError)."""
        frame = self.recv(phase, timeout, spin)
        if isinstance(frame, kinds):
            return frame
        aborted = self.codec.aborted(frame)
        if aborted is not None:
            raise aborted
        close_all(list(getattr(frame, "fds", [])))
        names = " or ".join(k.__name__.upper() for k in kinds)
        got = self.codec.name(frame)
        raise RemoteProtocolError(f"{phase}: expected {names}, got {got}", frame=got)

    def read_raw_into(self, view: memoryview, phase: str) -> None:
        """Fill ``view`` with raw bytes that follow the last frame (a stream copy)."""
        raw = self.codec.take_raw(len(view))
        view[: len(raw)] = raw
        filled = len(raw)
        while filled < len(view):
            n = self.conn.recv_into(view[filled:])
            if n == 0:
                raise PeerClosed(f"the peer closed mid-stream ({phase})", phase=phase)
            filled += n
        self.bytes_received += len(view)

    def _wait(self, phase: str, deadline: float | None, limit: float | None) -> None:
        """Until the socket is readable; PeerTimeout once ``deadline`` has passed (a
        deadline already passed still gets one look, so that a zero timeout polls)."""
        while True:
            wait = POLL_SLICE if self.interrupt is not None else None
            if deadline is not None:
                left = max(0.0, deadline - time.monotonic())
                wait = left if wait is None else min(wait, left)
            if self.conn.wait_readable(wait):
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise PeerTimeout(
                    f"the peer sent nothing for {_seconds(limit)} ({phase})", phase=phase
                )
            if self.interrupt is not None:
                self.interrupt()

    def _read(self, phase: str) -> None:
        # A codec that knows how much its frame in progress lacks gets no more than that
        # (or READ_SIZE, the least): a large receive buffer costs a large allocation.
        wanted = getattr(self.codec, "wanted", None)
        size = self.read_size if wanted is None else min(self.read_size, max(READ_SIZE, wanted))
        try:
            data, fds = self.conn.recv(size)
        except ConnectionResetError as err:
            raise PeerClosed(f"the peer reset the connection ({phase})", phase=phase) from err
        self._took(data, fds, phase)

    def _took(self, data: bytes | memoryview, fds: list[int], phase: str) -> None:
        """Bytes (and fds) the socket gave: to the codec, or the error they mean."""
        if not len(data):
            close_all(fds)
            raise PeerClosed(f"the peer closed the connection ({phase})", phase=phase)
        if not self.bytes_received and (why := refusal(bytes(data))) is not None:
            close_all(fds)
            raise PeerRejected(why, phase=phase)
        if len(self.head) < HEAD_SIZE:
            self.head += bytes(data[: HEAD_SIZE - len(self.head)])
        self.bytes_received += len(data)
        self.codec.feed(data, fds)

    def close(self) -> None:
        """Close the connection and any fds no frame took (idempotent)."""
        with contextlib.suppress(Exception):
            self.codec.close()
        self.conn.close()


def _seconds(value: float | None) -> str:
    return "ever" if value is None else f"{value:g} s"


class ProcessWatch:
    """Whether a local peer process still lives, by a pidfd taken when it connected (so a
    pid reused later by another process cannot pass for it)."""

    def __init__(self, pidfd: int) -> None:
        self._fd = pidfd

    @classmethod
    def of(cls, pid: int) -> ProcessWatch | None:
        """A watch on ``pid``, or None where it cannot be had (no pid, no pidfd_open)."""
        if pid <= 0:
            return None
        try:
            return cls(pidfd_open(pid))
        except OSError as err:
            if err.errno == errno.ESRCH:
                return cls(-1)  # it is gone already
            return None

    def alive(self, grace: float = 0.0) -> bool:
        """Whether the process still lives; waits up to ``grace`` seconds for it to end (a
        killed process closes its sockets a moment before it counts as exited)."""
        if self._fd < 0:
            return False
        readable, _, _ = select.select([self._fd], [], [], grace)
        return not readable  # a pidfd becomes readable when its process exits

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
