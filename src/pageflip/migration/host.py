"""A process that hosts a guest and takes commands on a control socket (JSON lines).

``pageflip workload`` and ``pageflip incoming`` are such hosts; ``pageflip migrate`` and the
tests talk to them through :class:`ControlClient`. One request per line, one JSON object
per answer line::

    {"cmd": "status"}                      -> {"ok": true, "status": {...}}
    {"cmd": "verify"}                      -> {"ok": true, "report": {...}}
    {"cmd": "pause"} / {"cmd": "resume"}   -> {"ok": true, "t": ...}
    {"cmd": "migrate", "to": ADDR, "mode": "flip", ...}
                                           -> one {"event": ...} line per migration event,
                                              the last one "done" or "failed"
    {"cmd": "cancel"}                      -> {"ok": true}   (a migration in progress)
    {"cmd": "quit"}                        -> {"ok": true}   (stops the guest, ends the host)

An error answers ``{"ok": false, "error": "Type: message"}``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import socketserver
import threading
from collections.abc import Iterator
from typing import Any

from ..errors import LocalProtocolError, MigrationError, PageflipError, PeerClosed, StateError
from ..guests import Guest
from .events import MigrationEvent
from .source import MigrationOptions, Source

log = logging.getLogger("pageflip.host")

#: Longest request line a host reads.
MAX_LINE = 64 << 10


class GuestHost:
    """Hold ``guest``, serve its control socket at ``path``, migrate it away on request.

    :meth:`wait` returns when the guest is gone: quit, or migrated to another host.
    """

    def __init__(self, guest: Guest, path: str) -> None:
        self.guest: Guest | None = guest
        self.path = path
        self._lock = threading.Lock()
        self._source: Source | None = None
        self._finished = threading.Event()
        self.outcome = "running"
        host = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                host._serve(self.rfile, self.wfile)

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True
            allow_reuse_address = False

        if os.path.exists(path) and _stale(path):
            os.unlink(path)
        self._server = Server(path, Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="pageflip-control")
        self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the guest left this host; True if it did."""
        return self._finished.wait(timeout)

    def close(self) -> None:
        """Stop serving, remove the socket file, close the guest if it is still here."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        guest, self.guest = self.guest, None
        if guest is not None:
            guest.close()
        self._finished.set()

    def __enter__(self) -> GuestHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests -------------------------------------------------------------------------

    def _serve(self, rfile: Any, wfile: Any) -> None:
        def send(obj: dict[str, Any]) -> None:
            wfile.write(json.dumps(obj, separators=(",", ":")).encode() + b"\n")
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
                    self._migrate(request, send)
                    continue
                send({"ok": True, **self._simple(cmd, request)})
            except (PageflipError, ValueError, TypeError) as err:
                with contextlib.suppress(OSError):
                    send({"ok": False, "error": f"{type(err).__name__}: {err}"})
            except OSError:
                return
            if self._finished.is_set():
                return

    def _guest(self) -> Guest:
        if self.guest is None:
            raise StateError("the guest has left this host", phase=self.outcome, needed="running")
        return self.guest

    def _simple(self, cmd: Any, request: dict[str, Any]) -> dict[str, Any]:
        if cmd == "status":
            return {"status": self._guest().status(), "pid": os.getpid(), "host": self.outcome}
        if cmd == "verify":
            return {"report": dataclasses.asdict(self._guest().verify())}
        if cmd == "pause":
            return {"t": self._guest().pause()}
        if cmd == "resume":
            return {"t": self._guest().resume()}
        if cmd == "cancel":
            source = self._source
            if source is None:
                raise StateError("no migration is running", phase="running", needed="migrating")
            source.cancel()
            return {}
        if cmd == "quit":
            self.outcome = "quit"
            guest, self.guest = self.guest, None
            if guest is not None:
                guest.close()
            self._finished.set()
            return {}
        raise LocalProtocolError(f"unknown command {cmd!r}")

    def _migrate(self, request: dict[str, Any], send: Any) -> None:
        options = MigrationOptions(**{k: v for k, v in request.items() if k not in ("cmd", "to")})
        with self._lock:
            guest = self._guest()
            if self._source is not None:
                raise StateError(
                    "a migration is already running", phase="migrating", needed="running"
                )
            self._source = Source(
                guest,
                str(request["to"]),
                options,
                on_event=lambda event: _send_event(send, event),
            )
        try:
            self._source.run()
        except MigrationError:
            pass  # the failed event went out; the guest runs here again
        else:
            self.outcome = "migrated"
            self.guest = None
            self._finished.set()
        finally:
            self._source = None


def _send_event(send: Any, event: MigrationEvent) -> None:
    with contextlib.suppress(OSError):
        send(event.as_dict())


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
    """Talk to a :class:`GuestHost` at ``path``."""

    def __init__(self, path: str, timeout: float | None = 30.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(path)
        except OSError as err:
            self._sock.close()
            raise type(err)(err.errno, f"connect({path!r}): {err.strerror or err}") from None
        self._file = self._sock.makefile("rwb")

    def _line(self) -> dict[str, Any]:
        line = self._file.readline(1 << 20)
        if not line:
            raise PeerClosed("the guest host closed the control connection", phase="control")
        answer = json.loads(line)
        if not isinstance(answer, dict):
            raise LocalProtocolError("the host answered something that is not an object")
        return answer

    def request(self, cmd: str, **args: Any) -> dict[str, Any]:
        """Send one command; return its answer, raising PageflipError when it failed."""
        self._file.write(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        self._file.flush()
        answer = self._line()
        if not answer.get("ok", False):
            raise StateError(str(answer.get("error", "failed")), phase="control", needed=cmd)
        return answer

    def migrate(self, to: str, **options: Any) -> Iterator[dict[str, Any]]:
        """Start a migration; yields its events until "done" or "failed"."""
        self._sock.settimeout(None)
        self._file.write(json.dumps({"cmd": "migrate", "to": to, **options}).encode() + b"\n")
        self._file.flush()
        while True:
            event = self._line()
            if event.get("ok") is False:
                raise StateError(str(event.get("error")), phase="control", needed="migrate")
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
