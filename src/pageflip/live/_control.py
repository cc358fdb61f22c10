"""The control socket of a live service: ``pageflip upgrade`` talks to it (JSON lines).

::

    {"cmd": "status"}                 -> {"ok": true, "pid": ..., "generation": ..., ...}
    {"cmd": "upgrade", "timeout": T}  -> {"event": "progress", "message": ...} lines, then
                                         {"event": "upgraded", "report": {...}} or
                                         {"event": "failed", "error": "Type: message",
                                          "report": {...} or null}

The listening socket is a live one too: a successor inherits it (same kernel socket, same
file), so the path answers throughout an upgrade.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import LocalProtocolError, PeerClosed, PeerTimeout
from ..transport import socket_address

log = logging.getLogger("pageflip.live")

#: Longest request line read.
MAX_LINE = 64 << 10

#: A request handler: the request and a function that sends one answer line.
Handler = Callable[[dict[str, Any], Callable[[dict[str, Any]], None]], None]


def one_line(err: BaseException) -> str:
    """``Type: message`` on one line."""
    if isinstance(err, OSError) and not str(err).strip() and err.strerror:
        text = err.strerror
    else:
        text = str(err) or type(err).__name__
    return f"{type(err).__name__}: {' '.join(text.split())}"


class ControlServer:
    """Serve ``sock`` (a listening Unix socket, ours) on a thread: one thread per connection,
    each line a request handed to ``handler``."""

    def __init__(self, sock: socket.socket, handler: Handler) -> None:
        self.sock = sock
        self._handler = handler
        self._wake_r, self._wake_w = os.pipe()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="pageflip-live-control", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                readable, _, _ = select.select([self.sock.fileno(), self._wake_r], [], [])
            except (OSError, ValueError):
                return
            if self._wake_r in readable:
                return
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(
                target=self._serve, args=(conn,), name="pageflip-live-request", daemon=True
            ).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as stream:

            def send(obj: dict[str, Any]) -> None:
                stream.write(json.dumps(obj, separators=(",", ":")).encode() + b"\n")
                stream.flush()

            try:
                while line := stream.readline(MAX_LINE):
                    try:
                        request = json.loads(line)
                        if not isinstance(request, dict):
                            raise LocalProtocolError("a request is a JSON object")
                        self._handler(request, send)
                    except (OSError, ValueError) as err:
                        if isinstance(err, (BrokenPipeError, ConnectionResetError)):
                            raise
                        send({"ok": False, "event": "failed", "error": one_line(err)})
            except OSError:
                pass  # the client went away
            except Exception:
                log.exception("the control socket failed a request")

    def stop(self) -> None:
        """Stop accepting and close our copy of the listening socket (idempotent; requests
        under way finish on their own threads)."""
        if self._stopped:
            return
        self._stopped = True
        os.write(self._wake_w, b"x")
        self._thread.join()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self.sock.close()


class ControlClient:
    """Talk to a live service's control socket at ``path``."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(socket_address(path))
        except OSError as err:
            self.sock.close()
            raise type(err)(
                err.errno, f"cannot reach a live service at {path}: {err.strerror or err}"
            ) from None
        self._stream = self.sock.makefile("rwb")

    def request(self, cmd: str, **args: Any) -> Iterator[dict[str, Any]]:
        """Send one request; its answer lines, until the connection ends or a last line."""
        self._stream.write(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        self._stream.flush()
        while True:
            try:
                line = self._stream.readline(MAX_LINE)
            except TimeoutError:
                raise PeerTimeout(
                    f"the live service at {self.path} did not answer in time", phase=cmd
                ) from None
            if not line:
                raise PeerClosed(
                    f"the live service at {self.path} closed the connection", phase=cmd
                )
            answer = json.loads(line)
            if not isinstance(answer, dict):
                raise LocalProtocolError(f"not a JSON object from {self.path}: {line[:80]!r}")
            yield answer
            if answer.get("event") != "progress":
                return

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._stream.close()
        self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
