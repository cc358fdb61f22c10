"""A small live-updatable service for tests/test_live.py: a line protocol on 127.0.0.1.

One request per connection: the client sends a line, the server answers one line and
closes. ``INFO`` answers a JSON object (pid, generation, region checksum and memfd inode,
listener inode, state); ``GET`` answers ``v<generation> <pid>``; ``WRITE text`` writes
text at the start of the region. Each version prints a JSON line on stdout when it serves.

``--mode-file F``: what a *new* version (or the old one's on_stop) does wrong, read when it
starts (see MODES in the test). ``SLOW s`` answers after s seconds (a request in flight
during an upgrade); ``HOLD path`` creates ``path.held``, then answers once ``path`` exists.
By default the old version stops accepting first (on_stop_accepting) and the new one accepts
while the old one drains (take_over's accept); ``--plain-hooks`` uses on_stop and take_over
alone (the new one accepts once it has the state); the mode ``no-accept`` makes a new
version take over without accept (``never-ready`` too, which then hangs;
``serves-never-ready`` hangs after accepting). ``--size`` is the region's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import select
import signal
import socket
import sys
import threading
import time

SIZE = 64 << 10
STATE_LIMIT = 4096


def mode(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        return ""


parser = argparse.ArgumentParser()
parser.add_argument("--control")
parser.add_argument("--mode-file", required=True)
parser.add_argument("--unix")
parser.add_argument("--size", type=int, default=SIZE)
parser.add_argument("--plain-hooks", action="store_true")
args = parser.parse_args()
NEW = "PAGEFLIP_LIVE_FD" in os.environ
MODE = mode(args.mode_file) if NEW else ""

if MODE == "crash-import":
    raise ImportError("simulated import failure of the new version")

import logging  # noqa: E402

from pageflip import live  # noqa: E402

logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")


class Server:
    def __init__(self, sock: socket.socket, up: live.Upgrader) -> None:
        self.sock = sock
        self.sock.setblocking(False)
        self.up = up
        self.lock = threading.Lock()
        self.idle = threading.Condition(self.lock)
        self.accepting = True
        self.active = 0
        self.exiting = threading.Event()
        self.served = 0
        self.region: live.Upgrader | None = None
        self.state: dict[str, object] = {}

    def serve_forever(self, handle: object) -> None:
        while not self.exiting.is_set():
            readable, _, _ = select.select([self.sock], [], [], 0.05)
            if not readable:
                continue
            with self.lock:
                if not self.accepting:
                    conn = None
                else:
                    try:
                        conn, _ = self.sock.accept()
                    except (BlockingIOError, InterruptedError):
                        continue
                    self.active += 1
            if conn is None:
                time.sleep(0.005)
                continue
            threading.Thread(target=self._handle, args=(conn, handle), daemon=True).start()

    def _handle(self, conn: socket.socket, handle: object) -> None:
        try:
            conn.settimeout(10)
            with conn, conn.makefile("rwb") as stream:
                line = stream.readline(4096).decode().strip()
                answer = handle(line)  # type: ignore[operator]
                stream.write(answer.encode() + b"\n")
                stream.flush()
        finally:
            with self.lock:
                self.active -= 1
                self.served += 1
                self.idle.notify_all()

    def stop_accepting(self, stopped: object) -> None:
        with self.lock:
            self.accepting = False
            stopped()  # type: ignore[operator]

    def stop(self, deadline: float) -> bytes | None:
        with self.lock:
            self.accepting = False
            while self.active and time.monotonic() < deadline:
                self.idle.wait(deadline - time.monotonic())
        now = mode(args.mode_file)
        if now == "big-state":
            return b"x" * (STATE_LIMIT + 1)
        if now == "kill-old":
            os.kill(os.getpid(), signal.SIGKILL)
        counter = int(str(self.state.get("counter", 0))) + 1
        return json.dumps({"counter": counter, "from": os.getpid()}).encode()

    def resume(self) -> None:
        with self.lock:
            self.accepting = True

    def exit(self) -> None:
        self.exiting.set()


def memfd_maps() -> int:
    """Mappings of memfds in this process (the region's: one)."""
    with open("/proc/self/maps") as f:
        return sum("/memfd:" in line for line in f)


def main() -> None:
    up = live.Upgrader(control=args.control, state_limit=STATE_LIMIT)
    if MODE == "raise":
        raise RuntimeError("simulated start-up failure of the new version")
    region = up.region("index", args.size * 2 if MODE == "bad-size" else args.size)
    # port 0: any port, which matches the old version's listener; port 1 does not.
    sock = up.listener("tcp", ("127.0.0.1", 1 if MODE == "other-address" else 0))
    extra = up.listener("unix", f"unix:{args.unix}") if args.unix else None
    if MODE == "bad-listener":
        up.listener("admin", ("127.0.0.1", 0))
    server = Server(sock, up)
    if not args.plain_hooks:
        up.on_stop_accepting(server.stop_accepting)
    up.on_stop(server.stop)
    up.on_resume(server.resume)
    up.on_exit(server.exit)
    memfd = region.extents()[0].memfd
    assert memfd is not None
    region_inode = os.fstat(memfd.fd).st_ino

    def handle(line: str) -> str:
        if line == "GET":
            return f"v{up.generation} {os.getpid()}"
        if line.startswith("SLOW "):
            time.sleep(float(line[5:]))
            return f"slow v{up.generation} {os.getpid()}"
        if line.startswith("HOLD "):
            path = line[5:]
            with open(path + ".held", "w"):
                pass
            deadline = time.monotonic() + 60
            while not os.path.exists(path) and time.monotonic() < deadline:
                time.sleep(0.01)
            return f"held v{up.generation} {os.getpid()}"
        if line.startswith("WRITE "):
            data = line[6:].encode()
            region.view()[: len(data)] = data
            return "ok"
        if line == "QUIT":
            server.exit()
            return "bye"
        if line == "INFO":
            return json.dumps(
                {
                    "pid": os.getpid(),
                    "generation": up.generation,
                    "fresh": up.fresh,
                    "inherited": up.inherited("index"),
                    "state": server.state,
                    "state_lost": up.state_lost,
                    "region_inode": region_inode,
                    "checksum": hashlib.sha256(region.view()).hexdigest(),
                    "head": bytes(region.view()[:16]).rstrip(b"\0").decode(errors="replace"),
                    "listener_inode": os.fstat(sock.fileno()).st_ino,
                    "port": sock.getsockname()[1],
                    "fds": len(os.listdir("/proc/self/fd")),
                    "memfd_maps": memfd_maps(),
                    "served": server.served,
                }
            )
        return "?"

    serving = threading.Thread(target=server.serve_forever, args=(handle,), daemon=True)

    def accept() -> None:  # on take_over's thread: serve while the old version drains
        serving.start()

    if args.plain_hooks or MODE in ("no-accept", "never-ready"):
        state = up.take_over(timeout=10)
    else:
        state = up.take_over(timeout=10, accept=accept)
    if MODE in ("never-ready", "serves-never-ready"):
        time.sleep(3600)
    server.state = json.loads(state) if state else {}
    up.ready()
    if up.fresh:
        region.view()[:9] = b"gen1-data"
    if serving.ident is None:
        serving.start()
    print(
        json.dumps(
            {
                "ready": os.getpid(),
                "generation": up.generation,
                "port": sock.getsockname()[1],
                "unix": extra is not None,
            }
        ),
        flush=True,
    )
    try:
        serving.join()
    finally:
        with server.lock:
            while server.active:
                server.idle.wait(5)
        up.close()
        if extra is not None:
            extra.close()
    sys.exit(0)


if __name__ == "__main__":
    main()
