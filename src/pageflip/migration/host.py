"""A process that hosts a guest and takes commands on a control socket (JSON lines).

``pageflip workload`` and ``pageflip incoming`` are such hosts; ``pageflip migrate`` and the
tests talk to them through :class:`ControlClient`. The control socket is bound before the
guest exists (a workload still filling its memory, an incoming migration not yet running):
``status`` answers at once, and ``verify`` or ``migrate`` wait (bounded) for the guest.
One request per line, one JSON object per answer line::

    {"cmd": "status"}                      -> {"ok": true, "status": {...}, "host": ...}
    {"cmd": "verify"}                      -> {"ok": true, "report": {...}}
    {"cmd": "pause"} / {"cmd": "resume"}   -> {"ok": true, "t": ...}
    {"cmd": "migrate", "to": ADDR, "mode": "flip", ...}
                                           -> one {"event": ...} line per migration event,
                                              the last one "done" or "failed"
    {"cmd": "migrate", "resume": true [, "to": ADDR]}
                                           -> takes up a postcopy whose connection broke;
                                              its events until "done" or "failed"
    {"cmd": "console", "send": "P", "expect": "PAUSE"}
                                           -> {"ok": true, "line": ..., "fields": {...}}
                                              (a VM: a request on its serial console)
    {"cmd": "upgrade"}                     -> a live update's events (see .upgrade)
    {"cmd": "cancel"}                      -> {"ok": true}   (a migration before its commit)
    {"cmd": "quit"}                        -> {"ok": true}   (stops the guest, ends the host)

An error answers ``{"ok": false, "error": "Type: message"}``. A migrate request whose
client goes away before the commit point is cancelled: the guest keeps running here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import select
import socket
import socketserver
import stat
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from .. import errors
from ..errors import (
    GuestLost,
    LocalProtocolError,
    MigrationError,
    PageflipError,
    PeerClosed,
    PeerTimeout,
    StateError,
)
from ..guests import Guest
from ..identity import code_identity
from ..stream import MAGIC
from ..transport import TcpAuth, refusal, socket_address
from .events import MigrationEvent, jsonable
from .source import MigrationOptions, Source

log = logging.getLogger("pageflip.host")

#: Longest request line a host reads.
MAX_LINE = 64 << 10
#: Longest a verify or migrate request waits for a guest that is not here yet.
GUEST_WAIT = 600.0
#: Options a migrate request may carry (those of MigrationOptions).
_OPTIONS = frozenset(f.name for f in dataclasses.fields(MigrationOptions))


class _ControlServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """A GuestHost's control socket: one thread per connection, each served by the host."""

    daemon_threads = True
    allow_reuse_address = False

    def __init__(self, address: str | bytes, host: GuestHost) -> None:
        self.host = host
        super().__init__(address, _ControlHandler)

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        try:
            super().serve_forever(poll_interval)
        except (OSError, ValueError):
            if self.socket.fileno() != -1:
                raise
            # Closed under it: an interrupt while the host was starting.


class _ControlHandler(socketserver.StreamRequestHandler):
    """One connection to the control socket, served by its host (GuestHost._serve)."""

    server: _ControlServer

    def handle(self) -> None:
        self.server.host._serve(self.connection, self.rfile, self.wfile)


class GuestHost:
    """Hold a guest, serve its control socket at ``path``, migrate it away on request.

    ``guest`` may come later (:meth:`attach`): until then ``status`` answers with what
    ``status()`` (a callable) says, e.g. a fill in progress. The socket is bound here, so a
    path in use by a live host is refused at once (a stale socket file is replaced).
    :meth:`wait` returns when the guest is gone: quit, or migrated to another host.
    """

    def __init__(
        self,
        guest: Guest | None,
        path: str,
        *,
        status: Callable[[], dict[str, Any]] | None = None,
        outcome: str = "running",
    ) -> None:
        self.guest: Guest | None = guest
        self.path = path
        self._status = status
        self._lock = threading.Lock()
        self._arrived = threading.Condition()
        self._source: Source | None = None
        self._subscribers: list[Callable[[dict[str, Any]], None]] = []
        self._finished = threading.Event()
        #: What the host is doing: "filling", "incoming", "running", "migrated", "lost",
        #: "stale", "quit".
        self.outcome = outcome if guest is None else "running"
        #: Why the guest here is stale (a loss after the commit point kept it), or None.
        self.stale: str | None = None
        code_identity()  # the code as it is now, before a live update installs new code
        #: Extra arguments for the successor of a live update (``pageflip incoming``).
        self.upgrade_args: list[str] = []
        self._server, self._thread, self._inode = self._start_serving(path)

    def _start_serving(self, path: str) -> tuple[_ControlServer, threading.Thread, int]:
        """Bind the control socket at ``path`` and serve it from a thread of its own:
        (server, its thread, the socket file's inode, 0 for an abstract name)."""
        claim_socket_path(path)
        server = None
        try:
            server = _ControlServer(socket_address(path), self)
            inode = 0 if path.startswith("@") else os.stat(path).st_ino
            # A daemon, so that an interrupt that leaves it serving cannot keep the process
            # alive.
            thread = threading.Thread(
                target=server.serve_forever, name="pageflip-control", daemon=True
            )
            thread.start()
        except OSError as err:
            if server is None and err.errno == errno.EADDRINUSE:  # someone took it meanwhile
                raise FileExistsError(
                    err.errno,
                    f"{path} is in use: a live process listens there (stop it, or choose "
                    "another path)",
                ) from None
            self._abandon(server, path)
            raise type(err)(
                err.errno, f"cannot serve a control socket at {path}: {err.strerror or err}"
            ) from None
        except BaseException:  # an interrupt: the caller has no host to close
            self._abandon(server, path)
            raise
        return server, thread, inode

    def move_to(self, path: str) -> None:
        """Serve the control socket at ``path`` from now on (FileExistsError while a live
        process still listens there); the old socket file is removed."""
        server, thread, inode = self._start_serving(path)
        old = (self._server, self._thread, self.path, self._inode)
        self._server, self._thread, self.path, self._inode = server, thread, path, inode
        old[0].shutdown()
        old[0].server_close()
        old[1].join()
        _unlink_if(old[2], old[3])

    @staticmethod
    def _abandon(server: socketserver.BaseServer | None, path: str) -> None:
        """Undo a start that failed: the socket closed, its file (ours: claim_socket_path
        made the path free before we bound it) removed."""
        if server is not None:
            server.server_close()
        if not path.startswith("@"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def attach(self, guest: Guest) -> None:
        """The guest is here now (filled, or resumed after an incoming migration)."""
        with self._arrived:
            self.guest = guest
            self.outcome = "running"
            self._arrived.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the guest left this host; True if it did."""
        return self._finished.wait(timeout)

    def close(self) -> None:
        """Stop serving, remove the socket file, close the guest if it is still here."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        _unlink_if(self.path, self._inode)
        guest, self.guest = self.guest, None
        if guest is not None:
            guest.close()
        self._finished.set()
        with self._arrived:
            self._arrived.notify_all()

    def __enter__(self) -> GuestHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests -------------------------------------------------------------------------

    def _serve(self, conn: socket.socket, rfile: Any, wfile: Any) -> None:
        def send(obj: dict[str, Any]) -> None:
            text = json.dumps(jsonable(obj), separators=(",", ":"), allow_nan=False)
            wfile.write(text.encode() + b"\n")
            wfile.flush()

        while True:
            line = rfile.readline(MAX_LINE)
            if not line:
                return
            try:
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise LocalProtocolError("a request is a JSON object")
                cmd = request.get("cmd")
                if cmd == "migrate":
                    self._migrate(request, send, conn)
                    continue
                if cmd == "upgrade":
                    self._upgrade(request, send, conn)
                    continue
                send({"ok": True, **self._simple(cmd, request)})
            except (PageflipError, ValueError, TypeError, KeyError) as err:
                with contextlib.suppress(OSError):
                    send({"ok": False, "error": f"{type(err).__name__}: {err}"})
            except OSError:
                return
            if self._finished.is_set():
                return

    def _guest(self, wait: float = 0.0) -> Guest:
        """The guest; waits up to ``wait`` seconds for one that is still coming."""
        deadline = time.monotonic() + wait
        with self._arrived:
            while self.guest is None and self.outcome in ("filling", "incoming"):
                left = deadline - time.monotonic()
                if left <= 0 or self._finished.is_set():
                    break
                self._arrived.wait(left)
            guest = self.guest
        if guest is None:
            raise StateError(
                f"there is no guest here ({self.outcome})", phase=self.outcome, needed="running"
            )
        return guest

    def _simple(self, cmd: Any, request: dict[str, Any]) -> dict[str, Any]:
        if cmd == "status":
            return self._status_answer()
        if cmd == "verify":
            report = self._guest(_wait(request)).verify()
            if self.stale is not None:
                report = dataclasses.replace(
                    report, ok=False, problems=[self.stale, *report.problems]
                )
            return {"report": dataclasses.asdict(report)}
        if cmd == "console":
            return self._console(request)
        if cmd == "pause":
            return {"t": self._guest().pause()}
        if cmd == "resume":
            return {"t": self._guest().resume()}
        if cmd == "cancel":
            source = self._source
            if source is None:
                raise StateError(
                    f"no migration is running (the host is {self.outcome}): nothing to cancel",
                    phase=self.outcome,
                    needed="migrating",
                )
            source.cancel()
            return {}
        if cmd == "quit":
            self.outcome = "quit"
            guest, self.guest = self.guest, None
            if guest is not None:
                guest.close()
            self._finished.set()
            with self._arrived:
                self._arrived.notify_all()
            return {}
        raise LocalProtocolError(f"unknown command {cmd!r}")

    def _console(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send ``send`` to the guest's console and wait for the line that starts with
        ``expect`` (a VM's serial port)."""
        guest = self._guest()
        ask = getattr(guest, "ask", None)
        if ask is None:
            raise StateError(
                f"a {guest.kind} guest has no console", phase=guest.kind, needed="console"
            )
        fields, line = ask(
            str(request["send"]), str(request["expect"]), float(request.get("timeout", 30.0))
        )
        return {"fields": fields, "line": line}

    def _status_answer(self) -> dict[str, Any]:
        guest = self.guest
        status: dict[str, Any] = dict(guest.status()) if guest is not None else {}
        if self._status is not None:
            status.update(self._status())
        if self.stale is not None:
            status["stale"] = self.stale
        source = self._source
        if source is not None:
            status["migration"] = {"phase": source.phase.value, "to": str(source.address)}
        return {
            "status": status,
            "pid": os.getpid(),
            "host": self.outcome,
            "code": code_identity(),
        }

    def _migrate(self, request: dict[str, Any], send: Any, conn: socket.socket) -> None:
        def deliver(event: dict[str, Any]) -> None:
            with contextlib.suppress(OSError, ValueError):
                send(event)

        if request.get("resume"):
            self._resume_migration(request, deliver)
            return
        unknown = set(request) - _OPTIONS - {"cmd", "to", "wait"}
        if unknown:
            raise LocalProtocolError(f"unknown migrate option(s): {', '.join(sorted(unknown))}")
        options = MigrationOptions(
            **{k: v for k, v in request.items() if k in _OPTIONS and k != "auth"}
        )
        if request.get("auth"):
            given = dict(request["auth"])
            options.auth = TcpAuth.from_options(
                key_file=given.get("key_file"),
                tls_cert=given.get("tls_cert"),
                tls_key=given.get("tls_key"),
                tls_ca=given.get("tls_ca"),
                tls_server_name=given.get("tls_server_name"),
                insecure=bool(given.get("insecure")),
            )
        guest = self._guest(_wait(request))
        with self._lock:
            if self._source is not None:
                raise StateError(
                    "a migration is already running", phase="migrating", needed="running"
                )
            if self.stale is not None:
                raise StateError(self.stale, phase="stale", needed="running")
            self._subscribers = [deliver]
            source = self._source = Source(
                guest, str(request["to"]), options, on_event=self._broadcast
            )
        watch = _ClientWatch(conn, source)
        try:
            source.run()
        except GuestLost:
            if source.stale is not None:
                self.stale = source.stale
                self.outcome = "stale"
            else:
                self._gone("lost")
        except MigrationError:
            pass  # the failed event went out; the guest runs here again
        else:
            self._gone("migrated")
        finally:
            watch.stop()
            self._source = None
            self._subscribers = []

    def _upgrade(self, request: dict[str, Any], send: Any, conn: socket.socket) -> None:
        """A live update: start a successor host running the code installed now, flip the
        guest into it (see :mod:`.upgrade`). The done event names the successor."""
        from .upgrade import start_successor

        unknown = set(request) - {"cmd", "timeout"}
        if unknown:
            raise LocalProtocolError(f"unknown upgrade option(s): {', '.join(sorted(unknown))}")
        timeout = float(request.get("timeout", 60.0))
        self._guest()
        if self._source is not None:
            raise StateError("a migration is already running", phase="migrating", needed="running")
        successor = start_successor(self.path, self.upgrade_args, timeout)

        def send_named(event: dict[str, Any]) -> None:
            if event.get("event") == "done":
                event = {**event, "successor": successor.identity()}
            send(event)

        migrate = {"cmd": "migrate", "to": successor.listen, "mode": "flip", "timeout": timeout}
        try:
            self._migrate(migrate, send_named, conn)
        finally:
            if self.outcome != "migrated":
                successor.end()

    def _resume_migration(self, request: dict[str, Any], deliver: Any) -> None:
        source = self._source
        if source is None:
            raise StateError("no migration is running here", phase=self.outcome, needed="postcopy")
        source.recover(request.get("to"))
        self._subscribers.append(deliver)
        # Stay on this connection until the migration ends, so that its events reach us.
        while self._source is source:
            time.sleep(0.05)

    def _broadcast(self, event: MigrationEvent) -> None:
        data = event.as_dict()
        for subscriber in list(self._subscribers):
            subscriber(data)

    def _gone(self, outcome: str) -> None:
        self.outcome = outcome
        self.guest = None
        self._finished.set()


def _wait(request: dict[str, Any]) -> float:
    value = request.get("wait", GUEST_WAIT)
    return float(value) if isinstance(value, (int, float)) else GUEST_WAIT


class _ClientWatch:
    """Cancel a migration whose client went away (closed, killed) before its commit point."""

    def __init__(self, conn: socket.socket, source: Source) -> None:
        self._conn = conn
        self._source = source
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pageflip-client-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            try:
                readable, _, _ = select.select([self._conn], [], [], 0)
                gone = bool(readable) and not self._conn.recv(1, socket.MSG_PEEK)
            except (OSError, ValueError):
                gone = True
            if gone:
                if not self._source.committed:
                    log.warning("the migrate command went away: cancelling the migration")
                    with contextlib.suppress(StateError):
                        self._source.cancel()
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _unlink_if(path: str, inode: int) -> None:
    """Remove the socket file at ``path`` if it is still the one we bound (inode): after a
    live update, the successor serves a socket of its own at the same path."""
    if path.startswith("@"):
        return
    with contextlib.suppress(FileNotFoundError):
        if os.stat(path).st_ino == inode:
            os.unlink(path)


def claim_socket_path(path: str) -> None:
    """Make ``path`` free for a new listening socket: remove a stale one (nothing listens),
    refuse one in use by a live process, and refuse a path that is not a socket."""
    if path.startswith("@"):
        return
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(
            errno.EEXIST, f"{path} exists and is not a socket: choose another path"
        )
    if not _stale(path):
        raise FileExistsError(
            errno.EADDRINUSE,
            f"{path} is in use: a live process listens there (stop it, or choose another path)",
        )
    os.unlink(path)


def _kind_of(path: str) -> str | None:
    """What is at ``path`` if it is there and not a socket ("a directory", "a regular
    file", ...); None for a socket, an abstract name or nothing."""
    if path.startswith("@"):
        return None
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISSOCK(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory"
    return "a regular file" if stat.S_ISREG(mode) else "a file of another kind"


def _stale(path: str) -> bool:
    """True if nothing listens at ``path`` (a socket file left by a dead host)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return True
    finally:
        probe.close()
    return False


class ControlClient:
    """Talk to a :class:`GuestHost` at ``path``.

    ``wait`` seconds are given for a host that is just starting (its socket file not there
    yet); after that a missing or dead socket is a one-line error naming the path. A socket
    that answers something other than the control protocol (a migration listener, say) is
    refused as such.
    """

    def __init__(self, path: str, timeout: float | None = 30.0, wait: float = 0.0) -> None:
        self.path = path
        self._timeout = timeout
        self._sock = self._connect(path, timeout, wait)
        self._file = self._sock.makefile("rwb")

    @staticmethod
    def _connect(path: str, timeout: float | None, wait: float) -> socket.socket:
        deadline = time.monotonic() + wait
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect(socket_address(path))
                return sock
            except (FileNotFoundError, ConnectionRefusedError) as err:
                sock.close()
                kind = _kind_of(path)
                if kind is not None:
                    raise OSError(
                        errno.ENOTSOCK,
                        f"{path} is {kind}, not a socket: give --control the path of a "
                        "guest's control socket",
                    ) from None
                if time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                if path.startswith("@"):
                    why = "nothing listens on that abstract socket"
                elif isinstance(err, FileNotFoundError):
                    why = "there is no such socket"
                else:
                    why = "nothing listens there (a stale socket file)"
                raise type(err)(
                    err.errno,
                    f"no guest at {path}: {why}; start one with pageflip workload "
                    f"--control {path}, or give --control",
                ) from None
            except OSError as err:
                sock.close()
                raise type(err)(
                    err.errno, f"cannot reach a control socket at {path}: {err.strerror or err}"
                ) from None

    def _line(self) -> dict[str, Any]:
        try:
            line = self._file.readline(1 << 20)
        except TimeoutError:
            raise PeerTimeout(
                f"{self.path} did not answer within {self._timeout:g} s: is it a pageflip "
                "control socket?",
                phase="control",
            ) from None
        if not line:
            raise PeerClosed(
                f"{self.path} closed the connection without an answer: it is not a pageflip "
                "control socket (a migration listener?)",
                phase="control",
            )
        if line.startswith(MAGIC):
            raise LocalProtocolError(
                f"{self.path} is a migration listener (pageflip incoming --listen), not a "
                "control socket: give the --control path of that incoming or of a workload"
            )
        reason = refusal(line)
        if reason is not None:
            raise LocalProtocolError(
                f"{self.path} is not a control socket: it refused us ({reason})"
            )
        try:
            answer = json.loads(line)
        except ValueError:
            raise LocalProtocolError(
                f"{self.path} is not a pageflip control socket: it answered {line[:40]!r}"
            ) from None
        if not isinstance(answer, dict):
            raise LocalProtocolError(f"{self.path} answered something that is not an object")
        return answer

    def _send(self, request: dict[str, Any]) -> None:
        try:
            self._file.write(json.dumps(request).encode() + b"\n")
            self._file.flush()
        except (BrokenPipeError, ConnectionResetError) as err:
            raise PeerClosed(f"{self.path} closed the connection", phase="control") from err

    def request(self, cmd: str, **args: Any) -> dict[str, Any]:
        """Send one command; return its answer, raising PageflipError when it failed."""
        self._send({"cmd": cmd, **args})
        answer = self._line()
        if not answer.get("ok", False):
            raise self._refused(answer.get("error"), cmd)
        return answer

    def _refused(self, error: Any, cmd: str) -> PageflipError:
        """The host's error answer (``Type: message``) as that error, naming the path; one
        of a type that is not pageflip's (a request it could not read) as a protocol error."""
        text = str(error or "failed")
        name, sep, message = text.partition(": ")
        cls = getattr(errors, name, None) if sep else None
        if isinstance(cls, type) and issubclass(cls, PageflipError):
            return cls(f"{self.path}: {message}")
        if sep and name.isidentifier():
            return LocalProtocolError(f"{self.path} refused the {cmd} request: {text}")
        return StateError(f"{self.path}: {text}", phase="control", needed=cmd)

    def migrate(self, to: str | None, **options: Any) -> Iterator[dict[str, Any]]:
        """Start (or, with ``resume=True``, take up) a migration; yields its events until
        "done" or "failed"."""
        request: dict[str, Any] = {"cmd": "migrate", **options}
        if to is not None:
            request["to"] = to
        return self._events(request)

    def upgrade(self, timeout: float = 60.0) -> Iterator[dict[str, Any]]:
        """Live-update the host (see :mod:`.upgrade`); yields the flip's events until
        "done" (which names the ``successor``) or "failed"."""
        return self._events({"cmd": "upgrade", "timeout": timeout})

    def _events(self, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
        self._sock.settimeout(None)
        self._send(request)
        seen = False
        while True:
            try:
                event = self._line()
            except PeerClosed:
                if not seen:
                    raise
                raise PeerClosed(
                    f"the guest's host at {self.path} went away (killed?) before the migration "
                    "ended: ask the destination where the guest is (pageflip status)",
                    phase="control",
                ) from None
            seen = True
            if event.get("ok") is False:
                raise self._refused(event.get("error"), request["cmd"])
            yield event
            if event.get("event") in ("done", "failed"):
                return

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
        self._sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
