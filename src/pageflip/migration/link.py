"""One migration connection: stream events over a Unix or TCP socket, with timeouts."""

from __future__ import annotations

import contextlib
import time
from typing import Any

from .. import stream
from .._sys.fds import close_all
from .._sys.mm import PAGE_SIZE
from ..errors import PeerAborted, PeerClosed, PeerTimeout, RemoteProtocolError
from ..transport import Connection, UnixConnection

#: Bytes asked of the socket per read.
READ_SIZE = 4 << 20


class Link:
    """Send and receive :mod:`pageflip.stream` events on one connection.

    ``compress`` (a zstd level) applies to page data sent from here. ``bytes_sent`` and
    ``bytes_received`` count what went over the socket.
    """

    def __init__(self, conn: Connection, *, compress: int | None = None) -> None:
        self.conn = conn
        self.decoder = stream.Decoder(page_size=PAGE_SIZE)
        self.encoder = stream.Encoder(compress_level=compress)
        self.bytes_sent = 0
        self.bytes_received = 0

    @property
    def local(self) -> bool:
        """True for a Unix socket: same host, fds can travel, memory can be pulled."""
        return isinstance(self.conn, UnixConnection)

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
        deadline = None if timeout is None else time.monotonic() + timeout
        spin_until = time.monotonic() + spin if spin else 0.0
        while True:
            event = self.decoder.next_event()
            if event is not None:
                return event
            if spin_until:
                while time.monotonic() < spin_until and not self.conn.wait_readable(0):
                    pass
                spin_until = 0.0
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0 or not self.conn.wait_readable(left):
                    raise PeerTimeout(
                        f"the peer sent nothing for {timeout} s ({phase})", phase=phase
                    )
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
        self.bytes_received += len(data)
        self.decoder.feed(data, fds)

    def expect(self, kinds: tuple[type[Any], ...], phase: str, timeout: float | None = None) -> Any:
        """The next event, which must be one of ``kinds`` (an Abort is raised as such)."""
        event = self.recv(phase, timeout)
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
