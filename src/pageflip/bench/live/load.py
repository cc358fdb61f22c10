"""A bounded HTTP/1.1 load on 127.0.0.1: keep-alive connections that record every request.

``Load(port, connections)`` runs its connections on an asyncio loop in a thread. Each one
sends ``GET /search?q=<random row>&k=5``, reads the whole response, and sends the next on the
same connection. A response with ``Connection: close`` ends the connection after it: the
client reconnects, and that is not a failure. A failure is a refused or reset connection, an
end of stream before or in the middle of a response, a timeout, or a status that is not 2xx;
each is recorded with its time and the connection waits :data:`RETRY_PAUSE` before trying
again (the count of refused requests during an outage therefore depends on that pace).
"""

from __future__ import annotations

import asyncio
import random
import threading
from dataclasses import dataclass, field

from ..common import now

__all__ = ["RETRY_PAUSE", "Failure", "Load", "Request"]

#: Seconds a connection waits after a failure before it tries again.
RETRY_PAUSE = 0.01
#: Longest wait for one response before it counts as a timeout failure.
TIMEOUT = 10.0


@dataclass(frozen=True)
class Request:
    """One answered request: when it was sent and how long it took (CLOCK_MONOTONIC)."""

    start: float
    latency: float


@dataclass(frozen=True)
class Failure:
    """One failed request: when, which kind (refused, reset, eof, eof-mid-response,
    timeout, status), and the details."""

    at: float
    kind: str
    detail: str


@dataclass
class _Tally:
    requests: list[Request] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    reconnects: int = 0


class _Failed(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(kind, detail)
        self.kind = kind
        self.detail = detail


class Load:
    """``connections`` keep-alive clients hammering ``/search`` on ``port`` from a thread."""

    def __init__(self, port: int, connections: int, rows: int, seed: int = 0) -> None:
        self.port = port
        self.connections = connections
        self.rows = rows
        self.tally = _Tally()
        self._rng = random.Random(seed)
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    @property
    def requests(self) -> list[Request]:
        return self.tally.requests

    @property
    def failures(self) -> list[Failure]:
        return self.tally.failures

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pageflip-bench-load", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop every connection (a request in flight is abandoned, not counted). Idempotent."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        stop = self._stop
        if stop is not None:
            self._loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=TIMEOUT + 5)
        if thread.is_alive():
            self.error = TimeoutError("the load's connections did not stop")
        else:
            self._loop.close()

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as err:  # reported by the caller through .error
            self.error = err

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        clients = [asyncio.ensure_future(self._client()) for _ in range(self.connections)]
        await self._stop.wait()
        for client in clients:
            client.cancel()
        await asyncio.wait(clients, timeout=TIMEOUT)

    async def _client(self) -> None:
        stop = self._stop
        assert stop is not None
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError as err:
                self._fail(_kind(err), str(err))
                await asyncio.sleep(RETRY_PAUSE)
                continue
            try:
                await self._session(reader, writer)
            except _Failed as err:
                self._fail(err.kind, err.detail)
                await asyncio.sleep(RETRY_PAUSE)
            finally:
                writer.close()
            self.tally.reconnects += 1

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Requests on one connection until the server says ``Connection: close``."""
        while True:
            q = self._rng.randrange(self.rows)
            sent = now()
            try:
                writer.write(f"GET /search?q={q}&k=5 HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
                async with asyncio.timeout(TIMEOUT):
                    status, close = await _response(reader)
            except TimeoutError:
                raise _Failed("timeout", f"no response in {TIMEOUT:g} s") from None
            except OSError as err:
                raise _Failed(_kind(err), str(err)) from None
            if not 200 <= status < 300:
                raise _Failed("status", f"HTTP {status}")
            self.tally.requests.append(Request(sent, now() - sent))
            if close:
                return

    def _fail(self, kind: str, detail: str) -> None:
        self.tally.failures.append(Failure(now(), kind, detail))


async def _response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one response: its status and whether it said ``Connection: close``."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as err:
        kind = "eof" if not err.partial else "eof-mid-response"
        raise _Failed(kind, f"end of stream after {len(err.partial)} bytes") from None
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length, close = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "connection" and value.strip().lower() == "close":
            close = True
    try:
        await reader.readexactly(length)
    except asyncio.IncompleteReadError as err:
        raise _Failed("eof-mid-response", f"body cut at {len(err.partial)}/{length}") from None
    return status, close


def _kind(err: OSError) -> str:
    if isinstance(err, ConnectionRefusedError):
        return "refused"
    if isinstance(err, ConnectionResetError):
        return "reset"
    if isinstance(err, BrokenPipeError):
        return "broken-pipe"
    return type(err).__name__
