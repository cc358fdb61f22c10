"""A nearest-neighbour service that upgrades itself without dropping a request.

The index is ``n x 64`` float32 rows (unit length, filled from a seed) in a pageflip region,
so a new version of the service maps the same pages instead of loading them again. Requests:

    GET /search?q=<row id>&k=5   the k rows of q's partition nearest to row q (dot product);
                                 the first one is q itself, so answers can be checked
    GET /version                 code version, pid, generation
    GET /count                   searches served, carried across upgrades

Run ``python app.py --help``; README.md next to this file shows an upgrade. ``--no-live``
serves the same thing without pageflip.live, binding its own socket (the baselines of
``pageflip bench live``); there SIGHUP drains the service and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

import numpy as np
import numpy.typing as npt
import uvicorn

VERSION = "live-service 1"
DIM = 64
#: Rows of one partition: a search scans the query's partition (an IVF-style coarse cell).
PARTITION = 4096
#: Rows filled from one seeded generator (the fill is the same whatever the chunking).
CHUNK = 65536
#: The environment variable that makes start-up fail (a broken new version, for rollbacks).
FAIL_ENV = "LIVE_SERVICE_FAIL"
KEEP_ALIVE = 5.0
#: Loop iterations after the listener is closed for connections accepted just before it to
#: reach their protocols (asyncio wires an accepted socket in a task of its own).
WIRING_TICKS = 5

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Index = npt.NDArray[np.float32]


def rows_for(nbytes: int) -> int:
    """Rows of an index of ``nbytes`` (at least one partition's worth of bytes is needed)."""
    return max(1, nbytes // (DIM * 4))


def fill(index: Index, seed: int) -> None:
    """Unit-length random rows, chunk by chunk: the same for a given seed and row count."""
    for start in range(0, len(index), CHUNK):
        rng = np.random.default_rng([seed, start // CHUNK])
        block = rng.standard_normal((min(CHUNK, len(index) - start), DIM), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        index[start : start + len(block)] = block


def search(index: Index, q: int, k: int) -> list[int]:
    """The ``k`` rows of q's partition with the largest dot product with row ``q``."""
    lo = (q // PARTITION) * PARTITION
    part = index[lo : lo + PARTITION]
    scores = part @ index[q]
    k = min(k, len(part))
    top = np.argpartition(-scores, k - 1)[:k]
    top = top[np.argsort(-scores[top], kind="stable")]
    return [int(lo + i) for i in top]


def save_index(path: str, nbytes: int, seed: int) -> None:
    """Write the index to ``path`` as .npy (what a plain restart loads from disk)."""
    shape = (rows_for(nbytes), DIM)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
    fill(out, seed)
    out.flush()
    del out


class Service:
    """The ASGI app, its state, and the uvicorn servers that serve it."""

    def __init__(self, index: Index, count: int, generation: int) -> None:
        self.index = index
        self.count = count
        self.generation = generation
        self.draining = False
        self.servers: list[uvicorn.Server] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.config = uvicorn.Config(
            self,
            lifespan="off",
            http="h11",
            loop="asyncio",
            log_level="warning",
            access_log=False,
            timeout_keep_alive=int(KEEP_ALIVE),
            backlog=2048,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The app behind the drain middleware: while draining, every response says
        ``Connection: close`` (decided when the response starts, not when it arrived)."""
        if scope["type"] != "http":
            return

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start" and self.draining:
                message["headers"] = [*message.get("headers", []), (b"connection", b"close")]
            await send(message)

        status, body = self.answer(scope["path"], scope.get("query_string", b"").decode())
        await send_closing(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send_closing({"type": "http.response.body", "body": body})

    def answer(self, path: str, query: str) -> tuple[int, bytes]:
        if path == "/search":
            args = parse_qs(query)
            try:
                q = int(args["q"][0])
                k = int(args.get("k", ["5"])[0])
            except (KeyError, ValueError):
                return 400, b'{"error": "give q=<row id> and k=<count>"}'
            if not 0 <= q < len(self.index) or not 0 < k <= 1000:
                return 400, b'{"error": "q or k out of range"}'
            self.count += 1
            return 200, json.dumps({"q": q, "ids": search(self.index, q, k)}).encode()
        if path == "/version":
            info = {"version": VERSION, "pid": os.getpid(), "generation": self.generation}
            return 200, json.dumps(info).encode()
        if path == "/count":
            return 200, json.dumps({"count": self.count}).encode()
        return 404, b'{"error": "not found"}'

    def prepare(self) -> None:
        """What uvicorn does before it serves (imports, protocol classes: tens of ms), done
        ahead, so that :meth:`listen` takes a fraction of a millisecond."""
        if not self.config.loaded:
            self.config.load()

    def start(self, sock: socket.socket) -> uvicorn.Server:
        """Serve on a copy of ``sock`` (closing the copy later leaves ``sock`` open)."""
        self.prepare()
        server = uvicorn.Server(self.config)
        self.servers.append(server)
        self.tasks.append(asyncio.ensure_future(server.serve(sockets=[sock.dup()])))
        return server

    async def listen(self, sock: socket.socket) -> float:
        """Start serving on ``sock``; return (time.monotonic()) once it accepts."""
        server = self.start(sock)
        task = self.tasks[-1]
        while not server.started:
            if task.done():
                task.result()  # it failed: raise why
                raise RuntimeError("the server ended before it served")
            await asyncio.sleep(0)
        return time.monotonic()

    def stop_accepting(self) -> None:
        """Close our copies of the listener (the socket stays open in the upgrader, and in
        the new version); from now on every response says ``Connection: close``."""
        self.draining = True
        for server in self.servers:
            for listener in getattr(server, "servers", []):
                listener.close()

    async def drain(self, deadline: float) -> None:
        """Stop accepting (if not yet), let the connections accepted just before get wired
        to their protocols (a few loop iterations), then wait until none is left, or until
        ``deadline`` (time.monotonic()). In an upgrade this runs while the new version
        accepts already: it is not part of the service's pause."""
        self.stop_accepting()
        bound = min(deadline, time.monotonic() + 2 * KEEP_ALIVE)
        for _ in range(WIRING_TICKS):
            await asyncio.sleep(0)
        while time.monotonic() < bound and any(s.server_state.connections for s in self.servers):
            await asyncio.sleep(0.001)

    def exit(self) -> None:
        for server in self.servers:
            server.should_exit = True

    async def wait(self) -> None:
        """Until every server has exited (one started meanwhile included)."""
        while not all(t.done() for t in self.tasks):
            await asyncio.gather(*list(self.tasks))

    def state(self) -> bytes:
        return json.dumps({"count": self.count}).encode()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index-size", default="256M", help="index bytes (K, M, G suffix)")
    parser.add_argument("--index-file", help="load the index from this .npy (no-live only)")
    parser.add_argument("--save-index", metavar="PATH", help="write the index as .npy; exit")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port")
    parser.add_argument("--control", default="app.sock", help="pageflip.live control socket")
    parser.add_argument("--no-live", action="store_true", help="serve without pageflip.live")
    parser.add_argument("--reuseport", action="store_true", help="SO_REUSEPORT (no-live only)")
    parser.add_argument("--fail-if-exists", metavar="PATH", help="fail at start-up if PATH is")
    parser.add_argument("--tag", help="ignored: marks the processes of one benchmark run")
    return parser.parse_args(argv)


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = units.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in units else text
    try:
        value = float(number) * scale
    except ValueError:
        raise SystemExit(f"app.py: {text!r} is not a size (e.g. 256M)") from None
    return int(value)


def check_start_up(args: argparse.Namespace) -> None:
    """A broken new version: fail here when asked to (rollback tests)."""
    if os.environ.get(FAIL_ENV) or (args.fail_if_exists and os.path.exists(args.fail_if_exists)):
        raise RuntimeError("start-up failed on purpose (a broken version)")


def announce(port: int, generation: int) -> None:
    line = {"event": "serving", "port": port, "pid": os.getpid(), "generation": generation}
    print(json.dumps(line), flush=True)


async def serve(service: Service, sock: socket.socket, on_serving: Callable[[], None]) -> None:
    """Serve on ``sock`` until every server of ``service`` has exited."""
    service.loop = asyncio.get_running_loop()
    await service.listen(sock)
    on_serving()
    await service.wait()


def listening_socket(host: str, port: int, reuseport: bool) -> socket.socket:
    """A listener of our own: IPPROTO_TCP, so that asyncio sets TCP_NODELAY on accepted
    connections (with proto 0 it does not, and Nagle plus delayed ACKs add ~40 ms)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


def run_plain(args: argparse.Namespace) -> None:
    """Without pageflip.live: load or build the index, bind, serve; SIGHUP drains and exits."""
    check_start_up(args)
    if args.index_file:
        index: Index = np.load(args.index_file)
    else:
        index = np.empty((rows_for(parse_size(args.index_size)), DIM), dtype=np.float32)
        fill(index, args.seed)
    sock = listening_socket(args.host, args.port, args.reuseport)
    service = Service(index, count=0, generation=0)

    def on_hup() -> None:
        async def leave() -> None:
            await service.drain(time.monotonic() + 2 * KEEP_ALIVE)
            service.exit()

        service.tasks.append(asyncio.ensure_future(leave()))

    def on_serving() -> None:
        assert service.loop is not None
        service.loop.add_signal_handler(signal.SIGHUP, on_hup)
        announce(sock.getsockname()[1], 0)

    asyncio.run(serve(service, sock, on_serving))


def run_live(args: argparse.Namespace) -> None:
    """With pageflip.live: the index in a region (inherited after an upgrade), the listener
    inherited too; take over from the old version (serving as soon as it stopped
    accepting), then say ready."""
    from pageflip import live  # type: ignore[attr-defined,unused-ignore]

    up = live.Upgrader(control=args.control, state_limit=1 << 20)
    nbytes = rows_for(parse_size(args.index_size)) * DIM * 4
    region = up.region("index", nbytes)
    index: Index = region.numpy(np.float32, (nbytes // (DIM * 4), DIM))
    if up.fresh:
        fill(index, args.seed)
    sock = up.listener("http", (args.host, args.port))
    check_start_up(args)
    service = Service(index, count=0, generation=up.generation)
    wire_upgrader(up, service, sock)
    # uvicorn handles SIGTERM and SIGINT while it serves, then raises the signal again once
    # it stopped: here that becomes an exit that closes the upgrader (its socket file goes).
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _exit_on_signal)
    with up:  # an error before ready() is told to the old version, which serves on
        asyncio.run(serve_live(up, service, sock))


async def serve_live(up: Any, service: Service, sock: socket.socket) -> None:
    """Take over and serve. Everything slow is done before ``take_over``; its ``accept``
    starts uvicorn on the inherited socket the moment the old version stopped accepting,
    while the old one still drains; the old one's count arrives with its state, after."""
    loop = asyncio.get_running_loop()
    service.loop = loop
    service.prepare()

    def accept() -> float:  # on take_over's thread
        return asyncio.run_coroutine_threadsafe(service.listen(sock), loop).result()

    state = await loop.run_in_executor(None, lambda: up.take_over(timeout=10.0, accept=accept))
    service.count += int(json.loads(state)["count"]) if state else 0
    up.ready()
    announce(sock.getsockname()[1], up.generation)
    await service.wait()


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def wire_upgrader(up: Any, service: Service, sock: socket.socket) -> None:
    """The old version's side of an upgrade. The callbacks may come from any thread: each
    runs its work on the service's loop (stop_accepting blocks until the listener is
    closed, on_stop until the drain is done)."""

    def stop_accepting(stopped: Callable[[], None]) -> None:
        loop = service.loop
        assert loop is not None
        if _on_thread(loop):
            raise RuntimeError("on_stop_accepting must not be called on the service's loop")

        async def stop() -> None:
            service.stop_accepting()
            stopped()  # from the loop: the new version hears it now, not when we wake up

        asyncio.run_coroutine_threadsafe(stop(), loop).result(timeout=10.0)

    def on_stop(deadline: float) -> bytes:
        loop = service.loop
        assert loop is not None
        if _on_thread(loop):
            raise RuntimeError("on_stop must not be called on the service's event loop")
        future = asyncio.run_coroutine_threadsafe(service.drain(deadline), loop)
        future.result(timeout=max(0.1, deadline - time.monotonic()) + 1.0)
        return service.state()

    def on_resume() -> None:
        def resume() -> None:
            service.draining = False
            service.start(sock)

        _call_soon(service, resume)

    up.on_stop_accepting(stop_accepting)
    up.on_stop(on_stop)
    up.on_resume(on_resume)
    up.on_exit(lambda: _call_soon(service, service.exit))


def _on_thread(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _call_soon(service: Service, fn: Callable[[], None]) -> None:
    loop = service.loop
    assert loop is not None
    if _on_thread(loop):
        fn()
    else:
        loop.call_soon_threadsafe(fn)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.save_index:
        save_index(args.save_index, parse_size(args.index_size), args.seed)
        return 0
    if args.no_live:
        run_plain(args)
        return 0
    try:
        import pageflip.live  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
    except ImportError:
        print("app.py: pageflip.live is not installed here: use --no-live", file=sys.stderr)
        return 2
    run_live(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
