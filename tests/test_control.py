"""pageflip.control: the one control-socket server and client (JSON lines over Unix
sockets) that guests' hosts, live services and the CLI share."""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pageflip.control import (
    ControlClient,
    ControlServer,
    Send,
    bind_control,
    claim_socket_path,
    unlink_if,
)
from pageflip.errors import (
    LiveError,
    LocalProtocolError,
    PeerClosed,
    PeerTimeout,
    StateError,
)


class Served:
    """A ControlServer at ``path`` whose handler answers a few test commands."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock, self.inode = bind_control(path)
        self.server = ControlServer(self.sock, self.handle)
        self.release = threading.Event()

    def handle(self, request: dict[str, Any], send: Send, conn: socket.socket) -> bool | None:
        cmd = request.get("cmd")
        if cmd == "status":
            send({"ok": True, "pid": os.getpid()})
        elif cmd == "count":
            for i in range(int(request["to"])):
                send({"event": "progress", "i": i})
            send({"event": "done"})
        elif cmd == "live-error":
            raise LiveError("no such thing here")
        elif cmd == "bye":
            send({"ok": True})
            return False
        elif cmd == "hang":
            self.release.wait(10)
        else:
            raise ValueError(f"unknown command {cmd!r}")
        return None

    def close(self) -> None:
        self.release.set()
        self.server.stop()
        # A handler that was hanging ends its connection on its own thread, once released
        # and its client gone: waited for, or its socket would count as leaked.
        assert self.server.join(10), "a connection is still served"
        unlink_if(self.path, self.inode)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(str(tmp_path / "c.sock"))
    try:
        yield s
    finally:
        s.close()
    assert not (tmp_path / "c.sock").exists()


def test_a_request_gets_its_answer_and_a_stream_ends_at_its_last_event(served: Served) -> None:
    with ControlClient(served.path) as client:
        assert client.request("status") == {"ok": True, "pid": os.getpid()}
        events = list(client.events("count", ("done",), to=3))
        assert [e.get("i") for e in events] == [0, 1, 2, None]
        assert events[-1] == {"event": "done"}
        # The connection serves further requests after a stream.
        assert client.request("status")["ok"] is True


def test_an_error_answer_is_raised_as_the_error_it_names(served: Served) -> None:
    with ControlClient(served.path) as client:
        with pytest.raises(LiveError, match=f"{served.path}: no such thing here"):
            client.request("live-error")
        # A ValueError of the handler is not a pageflip error: a protocol error naming it.
        with pytest.raises(LocalProtocolError, match="refused the nope request: ValueError"):
            client.request("nope")
        assert client.request("status")["ok"] is True


def test_a_line_that_is_not_a_json_object_is_answered_with_an_error(served: Served) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(served.path)
        with sock.makefile("rwb") as f:
            for line in (b"[1, 2]\n", b"not json\n"):
                f.write(line)
                f.flush()
                answer = json.loads(f.readline())
                assert answer["ok"] is False
                assert answer["error"].split(":")[0] in ("LocalProtocolError", "JSONDecodeError")


def test_a_handler_that_returns_false_ends_the_connection(served: Served) -> None:
    with ControlClient(served.path) as client:
        assert client.request("bye") == {"ok": True}
        with pytest.raises(PeerClosed, match="closed the connection"):
            client.request("status")


def test_a_silent_server_is_a_timeout_naming_the_path(served: Served) -> None:
    want = f"{served.path} did not answer within 0.3 s"
    with ControlClient(served.path, timeout=0.3) as client, pytest.raises(PeerTimeout, match=want):
        client.request("hang")


def test_requests_on_several_connections_are_served_at_once(served: Served) -> None:
    with socket.socket(socket.AF_UNIX) as hung, ControlClient(served.path) as other:
        hung.connect(served.path)
        hung.sendall(b'{"cmd": "hang"}\n')  # its thread now waits in the handler
        assert other.request("status")["ok"] is True


def test_join_waits_for_the_connections_still_served(served: Served) -> None:
    """After stop, join tells whether the connections served have ended: not while a
    handler hangs, and once it is released and its client gone, yes."""
    with socket.socket(socket.AF_UNIX) as hung:
        hung.connect(served.path)
        hung.sendall(b'{"cmd": "hang"}\n')
        with ControlClient(served.path) as other:  # answered: the hung one was taken first
            assert other.request("status")["ok"] is True
        served.server.stop()
        assert not served.server.join(0.2)
        served.release.set()
    assert served.server.join(10)


def test_a_missing_path_waits_then_names_what_is_missing(tmp_path: Path) -> None:
    path = str(tmp_path / "none.sock")
    with pytest.raises(FileNotFoundError, match=r"there is no such socket \(waited 0.2 s\)"):
        ControlClient(path, wait=0.2)
    with pytest.raises(FileNotFoundError, match=r"there is no such socket; start one"):
        ControlClient(path)


def test_a_client_waits_for_a_server_that_is_starting(tmp_path: Path) -> None:
    path = str(tmp_path / "late.sock")
    started: list[Served] = []
    timer = threading.Timer(0.3, lambda: started.append(Served(path)))
    timer.start()
    try:
        with ControlClient(path, wait=10) as client:
            assert client.request("status")["ok"] is True
    finally:
        timer.join()
        for s in started:
            s.close()


@pytest.mark.parametrize("kind", ["a directory", "a regular file"])
def test_a_path_that_is_not_a_socket_is_named(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "thing"
    if kind == "a directory":
        path.mkdir()
    else:
        path.write_text("x")
    with pytest.raises(OSError, match=f"{path} is {kind}, not a socket"):
        ControlClient(str(path), wait=5)  # no wait for what is not a socket
    with pytest.raises(FileExistsError, match="exists and is not a socket"):
        bind_control(str(path))


def test_a_path_in_use_is_refused_and_a_stale_one_replaced(served: Served, tmp_path: Path) -> None:
    with pytest.raises(FileExistsError, match="is in use: a live process listens there"):
        bind_control(served.path)
    stale = str(tmp_path / "stale.sock")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(stale)  # bound, never listening, then closed: a stale file
    with pytest.raises(ConnectionRefusedError, match="a stale socket file"):
        ControlClient(stale)
    claim_socket_path(stale)
    assert not os.path.exists(stale)


def test_a_stream_that_ends_early_says_so(tmp_path: Path) -> None:
    """A server that goes away in the middle of an event stream: the given message."""
    path = str(tmp_path / "early.sock")
    sock, inode = bind_control(path)

    def half(request: dict[str, Any], send: Send, conn: socket.socket) -> bool:
        send({"event": "progress"})
        return False

    server = ControlServer(sock, half)
    try:
        with ControlClient(path) as client:
            events = client.events("x", ("done",), gone="it went away mid-way")
            assert next(events) == {"event": "progress"}
            with pytest.raises(PeerClosed, match="it went away mid-way"):
                next(events)
    finally:
        server.stop()
        unlink_if(path, inode)


def test_unlink_if_removes_only_the_socket_file_we_bound(tmp_path: Path) -> None:
    """After a live update the successor serves its own socket at the same path: the old
    process's unlink_if (its own inode) leaves that one alone."""
    path = str(tmp_path / "mine.sock")
    sock, inode = bind_control(path)
    try:
        unlink_if(path, inode + 1)  # someone else's socket file: kept
        assert os.stat(path).st_ino == inode
        unlink_if(path, inode)
        assert not os.path.exists(path)
        unlink_if(path, inode)  # gone already: nothing to do
    finally:
        sock.close()


def test_a_state_error_answer_without_a_type_is_a_state_error(tmp_path: Path) -> None:
    path = str(tmp_path / "plain.sock")
    sock, inode = bind_control(path)

    def plain(request: dict[str, Any], send: Send, conn: socket.socket) -> None:
        send({"ok": False, "error": "the guest is filling"})

    server = ControlServer(sock, plain)
    try:
        with ControlClient(path) as client, pytest.raises(StateError, match="is filling"):
            client.request("verify")
    finally:
        server.stop()
        unlink_if(path, inode)


#: A host process whose guest lets go of the GIL while it is freed, as a workload's close
#: and its memory's release do: the host's main thread, which ends the process once the
#: guest is gone, then runs before the request's thread.
_SLOW_TO_FREE_HOST = """
import sys, time
from pageflip.migration.host import GuestHost

class SlowToFree:
    kind = "slow"
    def close(self): pass
    def status(self): return {}
    def __del__(self): time.sleep(0.3)

host = GuestHost(SlowToFree(), sys.argv[1])
print("ready", flush=True)
while not host.wait(0.2):
    pass
host.close()
"""


def test_quit_is_answered_before_the_host_may_end(tmp_path: Path) -> None:
    """`pageflip stop` got "closed the connection without an answer" now and then from a
    host whose guest let go of the GIL after the host had been told it was gone: the answer
    goes out before that now."""
    import subprocess
    import sys

    path = str(tmp_path / "host.sock")
    host = subprocess.Popen(
        [sys.executable, "-c", _SLOW_TO_FREE_HOST, path], stdout=subprocess.PIPE, text=True
    )
    try:
        assert host.stdout is not None and host.stdout.readline() == "ready\n"
        with ControlClient(path, timeout=10) as client:
            assert client.request("quit") == {"ok": True}
        assert host.wait(timeout=30) == 0
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()
        if host.stdout is not None:
            host.stdout.close()
    assert not os.path.exists(path)
