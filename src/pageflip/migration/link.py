"""One migration connection: stream events over a Unix or TCP socket, with deadlines."""

from __future__ import annotations

import contextlib
import errno
import os
import select
import time
from collections.abc import Callable
from typing import Any

from .. import stream
from .._sys.fds import close_all, pidfd_open
from .._sys.mm import PAGE_SIZE
from ..errors import PeerAborted, PeerClosed, PeerTimeout, RemoteProtocolError
from ..transport import Connection, UnixConnection

#: Bytes asked of the socket per read.
READ_SIZE = 4 << 20
#: Longest sleep between two looks at ``interrupt`` while waiting for the peer.
POLL_SLICE = 0.05


class Link:
    """Send and receive :mod:`pageflip.stream` events on one connection.

    ``compress`` (a zstd level) applies to page data sent from here. ``bytes_sent`` and
    ``bytes_received`` count what went over the socket. ``interrupt`` is called every
    :data:`POLL_SLICE` seconds while a receive waits; it raises to stop the wait (a cancel).
    """

    def __init__(
        self,
        conn: Connection,
        *,
        compress: int | None = None,
        interrupt: Callable[[], None] | None = None,
    ) -> None:
        self.conn = conn
        self.decoder = stream.Decoder(page_size=PAGE_SIZE)
        self.encoder = stream.Encoder(compress_level=compress)
        self.bytes_sent = 0
        self.bytes_received = 0
        self.interrupt = interrupt
        #: The first bytes the peer sent (to say what answered, when it is not pageflip).
        self.head = b""

    @property
    def local(self) -> bool:
        """True for a Unix socket: same host, fds can travel, memory can be pulled."""
        return isinstance(self.conn, UnixConnection)

    @property
    def closed(self) -> bool:
        return self.conn.closed

    def peer_pid(self) -> int:
        """The peer's pid as the kernel saw it at connect time (0 over TCP)."""
        return self.conn.peer()[0]

    def send(self, event: stream.Event, phase: str) -> int:
        data, fds = self.encoder.encode(event)
        self.conn.send(data, fds, phase)
        self.bytes_sent += len(data)
        return len(data)

    def recv(self, phase: str, timeout: float | None = None, spin: float = 0.0) -> stream.Event:
        """The next event; PeerClosed at EOF, PeerTimeout after ``timeout`` seconds.

        ``spin`` seconds are spent polling before sleeping in the kernel: waking a process
        from a blocking read can take milliseconds on an idle virtual CPU, which matters
        only where a guest is paused waiting for us.
        """
        now = time.monotonic()
        deadline = None if timeout is None else now + timeout
        spin_until = now + spin if spin else 0.0
        while True:
            event = self.decoder.next_event()
            if event is not None:
                return event
            if spin_until:
                while time.monotonic() < spin_until and not self.conn.wait_readable(0):
                    pass
                spin_until = 0.0
            while True:
                wait = POLL_SLICE
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise PeerTimeout(
                            f"the peer sent nothing for {_seconds(timeout)} ({phase})",
                            phase=phase,
                        )
                    wait = min(wait, left)
                if self.conn.wait_readable(wait):
                    break
                if self.interrupt is not None:
                    self.interrupt()
            self._read(phase)

    def poll(self, phase: str) -> stream.Event | None:
        """An event if one is ready now, without blocking."""
        event = self.decoder.next_event()
        if event is not None:
            return event
        if not self.conn.wait_readable(0):
            return None
        self._read(phase)
        return self.decoder.next_event()

    def _read(self, phase: str) -> None:
        try:
            data, fds = self.conn.recv(READ_SIZE)
        except ConnectionResetError as err:
            raise PeerClosed(f"the peer reset the connection ({phase})", phase=phase) from err
        if not data:
            close_all(fds)
            raise PeerClosed(f"the peer closed the connection ({phase})", phase=phase)
        if len(self.head) < 64:
            self.head += data[: 64 - len(self.head)]
        self.bytes_received += len(data)
        self.decoder.feed(data, fds)

    def expect(
        self,
        kinds: tuple[type[Any], ...],
        phase: str,
        timeout: float | None = None,
        spin: float = 0,
    ) -> Any:
        """The next event, which must be one of ``kinds`` (an Abort is raised as such)."""
        event = self.recv(phase, timeout, spin)
        if isinstance(event, kinds):
            return event
        if isinstance(event, stream.Abort):
            raise PeerAborted(
                f"the peer gave up in {event.phase}: {event.reason}",
                phase=event.phase,
                reason=event.reason,
            )
        close_all(list(getattr(event, "fds", [])))
        names = " or ".join(k.__name__.upper() for k in kinds)
        raise RemoteProtocolError(
            f"{phase}: expected {names}, got {type(event).__name__.upper()}",
            frame=type(event).__name__.upper(),
        )

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.decoder.close()
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
