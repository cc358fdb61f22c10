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
                                           -> {"ok": true, "line": ..., "fields": {...},
                                               "at": ...}   (a VM: a request on its serial
                                              console; "at": when the line's end arrived,
                                              CLOCK_MONOTONIC)
    {"cmd": "upgrade"}                     -> a live update's events (see .upgrade)
    {"cmd": "cancel"}                      -> {"ok": true}   (a migration before its commit)
    {"cmd": "quit"}                        -> {"ok": true}   (stops the guest, ends the host)

An error answers ``{"ok": false, "error": "Type: message"}``. A migrate request whose
client goes away before the commit point is cancelled: the guest keeps running here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from .. import control
from ..control import ControlServer, Send, bind_control, unlink_if
from ..errors import (
    GuestLost,
    LocalProtocolError,
    MigrationError,
    StateError,
)
from ..guests import Guest
from ..identity import code_identity
from ..transport import TcpAuth
from .events import MigrationEvent, jsonable
from .source import MigrationOptions, Source

log = logging.getLogger("pageflip.host")

#: Longest a verify or migrate request waits for a guest that is not here yet.
GUEST_WAIT = 600.0
#: Options a migrate request may carry (those of MigrationOptions).
_OPTIONS = frozenset(f.name for f in dataclasses.fields(MigrationOptions))


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
        self._server, self._inode = self._start_serving(path)

    def _start_serving(self, path: str) -> tuple[ControlServer, int]:
        """Bind the control socket at ``path`` and serve it from a thread of its own:
        (server, the socket file's inode, 0 for an abstract name)."""
        sock, inode = bind_control(path)
        try:
            return ControlServer(sock, self._serve, encode=_encode), inode
        except BaseException:  # an interrupt: the caller has no host to close
            sock.close()
            unlink_if(path, inode)
            raise

    def move_to(self, path: str) -> None:
        """Serve the control socket at ``path`` from now on (FileExistsError while a live
        process still listens there); the old socket file is removed."""
        server, inode = self._start_serving(path)
        old = (self._server, self.path, self._inode)
        self._server, self.path, self._inode = server, path, inode
        old[0].stop()
        unlink_if(old[1], old[2])

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
        self._server.stop()
        unlink_if(self.path, self._inode)
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

    def _serve(self, request: dict[str, Any], send: Send, conn: socket.socket) -> bool:
        """One request (see the module's docstring); False once the guest left this host
        (the connection ends)."""
        cmd = request.get("cmd")
        if cmd == "migrate":
            self._migrate(request, send, conn)
        elif cmd == "upgrade":
            self._upgrade(request, send, conn)
        elif cmd == "quit":
            self._quit(send)
        else:
            send({"ok": True, **self._simple(cmd, request)})
        return not self._finished.is_set()

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
        raise LocalProtocolError(f"unknown command {cmd!r}")

    def _quit(self, send: Send) -> None:
        """Stop the guest, answer, then let the host end. The answer goes first: the host's
        main thread exits once the guest is gone, and this thread dies with the process (a
        guest's close, or freeing it, may let go of the GIL before an answer sent after)."""
        self.outcome = "quit"
        guest, self.guest = self.guest, None
        try:
            if guest is not None:
                guest.close()
            del guest
            send({"ok": True})
        finally:
            self._finished.set()
            with self._arrived:
                self._arrived.notify_all()

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
        return {"fields": fields, "line": line, "at": getattr(guest, "answered_at", None)}

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


def _encode(obj: dict[str, Any]) -> str:
    return json.dumps(jsonable(obj), separators=(",", ":"), allow_nan=False)


class ControlClient(control.ControlClient):
    """Talk to a :class:`GuestHost` at ``path`` (see :class:`pageflip.control.ControlClient`
    for ``timeout`` and ``wait``)."""

    what = "guest"
    hint = "start one with pageflip workload --control {path}, or give --control"

    def migrate(self, to: str | None, **options: Any) -> Iterator[dict[str, Any]]:
        """Start (or, with ``resume=True``, take up) a migration; yields its events until
        "done" or "failed"."""
        if to is not None:
            options["to"] = to
        return self.events("migrate", _LAST, gone=self._gone(), **options)

    def upgrade(self, timeout: float = 60.0) -> Iterator[dict[str, Any]]:
        """Live-update the host (see :mod:`.upgrade`); yields the flip's events until
        "done" (which names the ``successor``) or "failed"."""
        return self.events("upgrade", _LAST, gone=self._gone(), timeout=timeout)

    def _gone(self) -> str:
        return (
            f"the guest's host at {self.path} went away (killed?) before the migration "
            "ended: ask the destination where the guest is (pageflip status)"
        )


#: The last event of a migration's stream.
_LAST = ("done", "failed")
