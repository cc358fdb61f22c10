"""A small QMP client: JSON objects, one per line, over a unix socket.

:class:`QmpCodec` is sans-I/O (it builds commands and splits received bytes into typed
messages); :class:`QmpClient` moves the bytes, with a timeout on every wait, and keeps the
asynchronous events (``STOP``, ``RESUME``, ...) with the moment they arrived.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ...errors import BenchmarkError, RemoteProtocolError
from ..common import now
from .console import connect_unix

__all__ = [
    "Event",
    "Greeting",
    "QmpClient",
    "QmpCodec",
    "QmpMessage",
    "Reply",
    "ReplyError",
    "parse_message",
]

#: Longest line QMP may send before the codec gives up on the peer (query-migrate is ~2 KB).
_MAX_LINE = 1 << 22


@dataclass(frozen=True)
class Greeting:
    """``{"QMP": {"version": ..., "capabilities": [...]}}``."""

    version: dict[str, Any]
    capabilities: list[str]


@dataclass(frozen=True)
class Reply:
    """``{"return": ..., "id": ...}``."""

    value: Any
    id: str | None


@dataclass(frozen=True)
class ReplyError:
    """``{"error": {"class": ..., "desc": ...}, "id": ...}``."""

    error_class: str
    desc: str
    id: str | None


@dataclass(frozen=True)
class Event:
    """``{"event": NAME, "data": ..., "timestamp": {"seconds", "microseconds"}}``;
    ``timestamp`` in seconds of the realtime clock (QEMU's), ``received`` CLOCK_MONOTONIC."""

    name: str
    data: dict[str, Any]
    timestamp: float | None
    received: float = field(default=0.0, compare=False)


QmpMessage = Greeting | Reply | ReplyError | Event


def _bad(text: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"QMP: {text}", frame="qmp")


def parse_message(obj: object) -> QmpMessage:
    """The typed message for one decoded JSON object; raises
    :class:`~pageflip.errors.RemoteProtocolError` for anything QMP does not send."""
    if not isinstance(obj, dict):
        raise _bad(f"expected a JSON object, got {type(obj).__name__}")
    msg_id = obj.get("id")
    msg_id = None if msg_id is None else str(msg_id)
    if "QMP" in obj:
        qmp = obj["QMP"]
        if not isinstance(qmp, dict):
            raise _bad("a greeting without its object")
        return Greeting(qmp.get("version") or {}, list(qmp.get("capabilities") or []))
    if "return" in obj:
        return Reply(obj["return"], msg_id)
    if "error" in obj:
        err = obj["error"]
        if not isinstance(err, dict):
            raise _bad("an error without its object")
        return ReplyError(str(err.get("class", "?")), str(err.get("desc", "")), msg_id)
    if "event" in obj:
        stamp = obj.get("timestamp")
        when = None
        if isinstance(stamp, dict) and "seconds" in stamp:
            when = stamp["seconds"] + stamp.get("microseconds", 0) / 1e6
        data = obj.get("data")
        return Event(str(obj["event"]), data if isinstance(data, dict) else {}, when)
    raise _bad(f"a message of no known kind: {sorted(obj)}")


class QmpCodec:
    """Builds commands, each with its own id, and splits received bytes into messages."""

    def __init__(self) -> None:
        self._buffer = b""
        self._next = 0

    def command(self, name: str, arguments: dict[str, Any] | None = None) -> tuple[str, bytes]:
        """(id, bytes to send) for ``name``."""
        self._next += 1
        msg_id = f"pf{self._next}"
        msg: dict[str, Any] = {"execute": name, "id": msg_id}
        if arguments:
            msg["arguments"] = arguments
        return msg_id, json.dumps(msg, separators=(",", ":")).encode() + b"\n"

    def feed(self, data: bytes) -> list[QmpMessage]:
        """The messages completed by ``data`` (a partial line waits for more)."""
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        if len(self._buffer) > _MAX_LINE:
            raise _bad(f"a line longer than {_MAX_LINE} bytes")
        out = []
        for line in lines:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as err:
                raise _bad(f"not JSON: {line[:80]!r}: {err}") from None
            out.append(parse_message(obj))
        return out


class QmpClient:
    """One QMP connection: connects (retrying while QEMU starts), negotiates, executes
    commands and keeps events. Every wait ends after ``timeout`` seconds. ``close()`` is
    idempotent."""

    def __init__(
        self, path: str, name: str, timeout: float, alive: Callable[[], bool] = lambda: True
    ) -> None:
        self.name = name
        self.timeout = timeout
        self.events: list[Event] = []
        self._codec = QmpCodec()
        self._pending: list[QmpMessage] = []
        self._sock: socket.socket | None = connect_unix(path, timeout, alive, f"{name} QMP")
        try:
            first = self._next(timeout)
            if not isinstance(first, Greeting):
                raise _bad(f"{name}: expected the greeting, got {type(first).__name__}")
            self.greeting = first
            self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise

    def _next(self, timeout: float) -> Greeting | Reply | ReplyError:
        """The next message that is not an event (events are kept)."""
        deadline = now() + timeout
        while True:
            while self._pending:
                msg = self._pending.pop(0)
                if isinstance(msg, Event):
                    self.events.append(msg)
                    continue
                return msg
            self._receive(deadline - now())

    def _receive(self, timeout: float) -> None:
        sock = self._sock
        if sock is None:
            raise BenchmarkError(f"{self.name} QMP: the connection is closed")
        if timeout <= 0:
            raise BenchmarkError(f"{self.name} QMP: no answer within {self.timeout:g} s")
        sock.settimeout(timeout)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise BenchmarkError(f"{self.name} QMP: no answer within {self.timeout:g} s") from None
        except OSError as err:
            raise BenchmarkError(f"{self.name} QMP: {err}") from None
        if not chunk:
            raise BenchmarkError(f"{self.name} QMP: QEMU closed the connection")
        received = now()
        self._pending += [
            Event(m.name, m.data, m.timestamp, received) if isinstance(m, Event) else m
            for m in self._codec.feed(chunk)
        ]

    def execute(self, command: str, timeout: float | None = None, **arguments: Any) -> Any:
        """Run ``command`` and return its ``return`` value; QEMU's refusal raises
        :class:`~pageflip.errors.BenchmarkError` naming the command, QEMU's class and text."""
        sock = self._sock
        if sock is None:
            raise BenchmarkError(f"{self.name} QMP: the connection is closed")
        msg_id, data = self._codec.command(command, arguments or None)
        try:
            sock.sendall(data)
        except OSError as err:
            raise BenchmarkError(f"{self.name} QMP {command}: {err}") from None
        while True:
            reply = self._next(self.timeout if timeout is None else timeout)
            if isinstance(reply, Greeting) or reply.id not in (msg_id, None):
                continue  # an answer to an earlier command that timed out
            if isinstance(reply, ReplyError):
                raise BenchmarkError(
                    f"{self.name} QMP {command}: {reply.error_class}: {reply.desc}"
                )
            return reply.value

    def poll_events(self, wait: float = 0.0) -> list[Event]:
        """Read what has arrived (waiting up to ``wait`` seconds for something); returns
        every event so far."""
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(BenchmarkError):
                self._receive(wait if wait > 0 else 1e-3)
            keep: list[QmpMessage] = []
            for msg in self._pending:
                if isinstance(msg, Event):
                    self.events.append(msg)
                else:
                    keep.append(msg)
            self._pending = keep
        return list(self.events)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
