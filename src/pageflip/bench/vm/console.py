"""A guest's console on the host: every line with the CLOCK_MONOTONIC moment it arrived.

:class:`ConsoleLog` holds the lines (fed from anywhere: a serial socket, a child's JSON lines)
and lets the benchmark wait for the next line of a kind; :class:`SerialConsole` feeds one
from a QEMU ``-chardev socket`` and sends requests back to the guest.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from ...errors import BenchmarkError
from ..common import now
from .guest import ConsoleLine, Fault, Heartbeat, parse_line

__all__ = ["ConsoleLog", "Line", "SerialConsole", "connect_unix"]

_Kind = TypeVar("_Kind")

#: Longest text kept of a console's unfinished last line (a guest that prints no newline).
_MAX_PARTIAL = 1 << 16


@dataclass(frozen=True)
class Line:
    """One console line: when it arrived on the host, its text and what it says."""

    t: float
    text: str
    parsed: ConsoleLine | None


class ConsoleLog:
    """The lines of one console, in order; safe to feed from one thread and read from
    another."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lines: list[Line] = []
        self._cond = threading.Condition()
        self._closed = False

    def add(self, text: str, t: float | None = None) -> Line:
        line = Line(now() if t is None else t, text, parse_line(text))
        with self._cond:
            self._lines.append(line)
            self._cond.notify_all()
        return line

    def close(self) -> None:
        """No more lines will come (waiters stop waiting)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._lines)

    def lines(self, start: int = 0) -> list[Line]:
        with self._cond:
            return self._lines[start:]

    def tail(self, n: int = 3) -> list[str]:
        return [line.text for line in self.lines()[-n:]]

    def wait_for(
        self,
        kind: type[_Kind],
        timeout: float,
        start: int = 0,
        alive: Callable[[], bool] | None = None,
    ) -> tuple[int, Line, _Kind]:
        """The first line at index >= ``start`` that parses as a ``kind``: (index, line,
        record). Raises :class:`BenchmarkError` after ``timeout`` seconds, when the console
        closes, when ``alive()`` turns false, or when the guest prints a fault."""
        deadline = now() + timeout
        i = start
        with self._cond:
            while True:
                while i < len(self._lines):
                    line = self._lines[i]
                    if isinstance(line.parsed, kind):
                        return i, line, line.parsed
                    if isinstance(line.parsed, Fault):
                        raise BenchmarkError(f"{self.name}: the guest failed: {line.text}")
                    i += 1
                left = deadline - now()
                what = f"{self.name}: no {kind.__name__.upper()} line"
                if left <= 0:
                    raise BenchmarkError(
                        f"{what} within {timeout:g} s (last lines: {self._tail_text()})"
                    )
                if self._closed:
                    raise BenchmarkError(f"{what}: the console closed ({self._tail_text()})")
                if alive is not None and not alive():
                    raise BenchmarkError(f"{what}: the process exited ({self._tail_text()})")
                self._cond.wait(min(left, 0.2))

    def _tail_text(self) -> str:
        return " | ".join(line.text for line in self._lines[-3:]) or "none"

    def heartbeats(self, start: int = 0) -> list[tuple[float, Heartbeat]]:
        """(host time, heartbeat) of every heartbeat line from ``start`` on."""
        return [(ln.t, ln.parsed) for ln in self.lines(start) if isinstance(ln.parsed, Heartbeat)]


def connect_unix(path: str, timeout: float, alive: Callable[[], bool], what: str) -> socket.socket:
    """A connected unix stream socket to ``path``, retrying until the server listens; raises
    :class:`BenchmarkError` once ``alive()`` is false or after ``timeout`` seconds."""
    deadline = now() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except OSError as err:
            sock.close()
            if not alive():
                raise BenchmarkError(f"{what}: the process exited before {path} listened") from None
            if now() > deadline:
                raise BenchmarkError(
                    f"{what}: cannot connect to {path} within {timeout:g} s: {err}"
                ) from None
            threading.Event().wait(0.02)
            continue
        return sock


class SerialConsole:
    """A QEMU serial port (``-chardev socket,server=on``): a thread reads it into a
    :class:`ConsoleLog`; :meth:`send` writes to the guest. :meth:`close` is idempotent."""

    def __init__(self, sock: socket.socket, log: ConsoleLog) -> None:
        self.log = log
        self._sock: socket.socket | None = sock
        self._thread = threading.Thread(
            target=self._read, args=(sock,), name=f"pageflip-bench-vm-{log.name}", daemon=True
        )
        self._thread.start()

    def _read(self, sock: socket.socket) -> None:
        partial = b""
        try:
            while True:
                try:
                    chunk = sock.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                t = now()
                partial += chunk
                *done, partial = partial.split(b"\n")
                for raw in done:
                    self.log.add(raw.decode(errors="replace").rstrip("\r"), t)
                partial = partial[-_MAX_PARTIAL:]
        finally:
            self.log.close()

    def send(self, data: bytes) -> None:
        if self._sock is None:
            raise BenchmarkError(f"{self.log.name}: the console is closed")
        self._sock.sendall(data)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(5.0)
        sock.close()
