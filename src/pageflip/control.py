"""Control sockets: one JSON object per line over a Unix stream socket.

Every pageflip process that takes commands serves one: a guest's host (``pageflip workload``,
``incoming``, ``vm run``; :class:`~pageflip.migration.GuestHost`) and a live service
(:class:`~pageflip.live.Upgrader`). ``pageflip status``, ``migrate``, ``verify`` and
``upgrade`` are clients. This module is the one implementation of both ends:

* :func:`bind_control` claims a path (a stale socket file is replaced, a live one or a file
  that is not a socket refused) and binds a listening socket there;
* :class:`ControlServer` serves it from a thread, one thread per connection, each request
  line handed to the owner's handler, an error answered as ``{"ok": false, "error": "Type:
  message"}``;
* :class:`ControlClient` connects (optionally waiting for a process that is starting),
  sends requests and reads answers and event streams, refusing whatever is not a control
  socket with one line that names the path.

A request is ``{"cmd": NAME, ...}``; an answer is one object, or a stream of event objects
that ends with a last one (the owner's protocol says which).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import select
import socket
import stat
import threading
import time
from collections.abc import Callable, Collection, Iterator
from typing import Any, Self

from . import errors
from .errors import LocalProtocolError, PageflipError, PeerClosed, PeerTimeout, StateError, one_line
from .stream import MAGIC
from .transport import refusal, socket_address

log = logging.getLogger("pageflip.control")

#: Longest request line a server reads.
MAX_LINE = 64 << 10
#: Longest answer line a client reads.
MAX_ANSWER = 1 << 20

#: Sends one answer line to the client of a request.
Send = Callable[[dict[str, Any]], None]
#: A request handler: (request, send, connection). It may send any number of lines; what it
#: raises (a PageflipError, ValueError, TypeError or KeyError) is answered as an error line.
#: It returns False to end the connection after this request.
Handler = Callable[[dict[str, Any], Send, socket.socket], "bool | None"]

#: What a handler may raise for a request it cannot serve: answered, not logged.
_REFUSALS = (PageflipError, ValueError, TypeError, KeyError)


# -- paths ------------------------------------------------------------------------------


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


def bind_control(path: str, backlog: int = 16) -> tuple[socket.socket, int]:
    """A listening Unix socket at ``path`` (``@name``: abstract) and the inode of its file
    (0 for an abstract name), for :func:`unlink_if` to remove it later only if it is still
    ours. FileExistsError while a live process listens there."""
    claim_socket_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(socket_address(path))
        inode = 0 if path.startswith("@") else os.stat(path).st_ino
        sock.listen(backlog)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:  # someone took it between the claim and the bind
            raise FileExistsError(
                err.errno,
                f"{path} is in use: a live process listens there (stop it, or choose another path)",
            ) from None
        _remove(path)
        raise type(err)(
            err.errno, f"cannot serve a control socket at {path}: {err.strerror or err}"
        ) from None
    except BaseException:  # an interrupt: nobody else will remove the file
        sock.close()
        _remove(path)
        raise
    return sock, inode


def unlink_if(path: str, inode: int) -> None:
    """Remove the socket file at ``path`` if it is still the one we bound (``inode``): after
    a live update, a successor serves a socket of its own at the same path."""
    if path.startswith("@"):
        return
    with contextlib.suppress(FileNotFoundError):
        if os.stat(path).st_ino == inode:
            os.unlink(path)


def _remove(path: str) -> None:
    if not path.startswith("@"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _stale(path: str) -> bool:
    """True if nothing listens at ``path`` (a socket file left by a dead process)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return True
    finally:
        probe.close()
    return False


def kind_of(path: str) -> str | None:
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


# -- the server -------------------------------------------------------------------------


class ControlServer:
    """Serve ``sock`` (a listening Unix socket, ours) from a thread: one thread per
    connection, each request line handed to ``handler``. ``encode`` turns an answer object
    into JSON text (default: :func:`json.dumps`, compact)."""

    def __init__(
        self,
        sock: socket.socket,
        handler: Handler,
        *,
        name: str = "pageflip-control",
        encode: Callable[[dict[str, Any]], str] | None = None,
    ) -> None:
        self.sock = sock
        self._handler = handler
        self._name = name
        self._encode = encode or (lambda obj: json.dumps(obj, separators=(",", ":")))
        self._wake_r, self._wake_w = os.pipe()
        self._stopped = False
        #: The threads serving connections now (one each).
        self._serving: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                readable, _, _ = select.select([self.sock.fileno(), self._wake_r], [], [])
            except (OSError, ValueError):
                return  # closed under us
            if self._wake_r in readable:
                return
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            thread = threading.Thread(
                target=self._serve, args=(conn,), name=f"{self._name}-request", daemon=True
            )
            with self._lock:
                self._serving.add(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self._converse(conn)
        finally:
            with self._lock:
                self._serving.discard(threading.current_thread())

    def _converse(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as stream:

            def send(obj: dict[str, Any]) -> None:
                stream.write(self._encode(obj).encode() + b"\n")
                stream.flush()

            try:
                while line := stream.readline(MAX_LINE):
                    if self._request(line, send, conn) is False:
                        return
            except OSError:
                pass  # the client went away
            except Exception:
                log.exception("the control socket failed a request")

    def _request(self, line: bytes, send: Send, conn: socket.socket) -> bool | None:
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise LocalProtocolError("a request is a JSON object")
            return self._handler(request, send, conn)
        except _REFUSALS as err:
            send({"ok": False, "error": one_line(err)})
            return None

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

    def join(self, timeout: float | None = None) -> bool:
        """Wait, ``timeout`` seconds at most, until every connection served has ended (each
        ends when its client hangs up or its handler says so); True if all did. For after
        :meth:`stop`, by whoever must know that the connections' sockets are closed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                serving = [t for t in self._serving if t is not threading.current_thread()]
            if not serving:
                return True
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            serving[0].join(left)


# -- the client -------------------------------------------------------------------------


class ControlClient:
    """Talk to the control socket at ``path``.

    ``timeout`` bounds each answer (None: no bound). ``wait`` seconds are given to a process
    that is just starting (its socket file not there yet, or not listening yet). After that
    a missing or dead socket is a one-line error naming the path (and the wait); a socket
    that answers something other than this protocol (a migration listener, say) is refused
    as such.
    """

    #: What serves the socket, for error messages ("no guest at PATH").
    what = "pageflip process"
    #: How to start one, for the "nothing there" error; ``{path}`` is the path.
    hint = "start one, or give --control"

    def __init__(self, path: str, timeout: float | None = 30.0, wait: float = 0.0) -> None:
        self.path = path
        self._timeout = timeout
        self._sock = self._connect(wait)
        self._file = self._sock.makefile("rwb")

    def _connect(self, wait: float) -> socket.socket:
        path = self.path
        deadline = time.monotonic() + wait
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(self._timeout)
                sock.connect(socket_address(path))
                return sock
            except (FileNotFoundError, ConnectionRefusedError) as err:
                sock.close()
                kind = kind_of(path)
                if kind is not None:
                    raise OSError(
                        errno.ENOTSOCK,
                        f"{path} is {kind}, not a socket: give --control the path of a "
                        f"{self.what}'s control socket",
                    ) from None
                if time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                why, hint = _absent(path, err, wait), self.hint.format(path=path)
                raise type(err)(err.errno, f"no {self.what} at {path}: {why}; {hint}") from None
            except OSError as err:
                sock.close()
                raise type(err)(
                    err.errno, f"cannot reach a control socket at {path}: {err.strerror or err}"
                ) from None

    def _line(self) -> dict[str, Any]:
        try:
            line = self._file.readline(MAX_ANSWER)
        except TimeoutError:
            assert self._timeout is not None
            raise PeerTimeout(
                f"{self.path} did not answer within {self._timeout:g} s: is it a pageflip "
                "control socket?",
                phase="control",
            ) from None
        except ConnectionResetError:
            line = b""
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
        """Send one command; return its answer, raising the error it names when it failed."""
        self._send({"cmd": cmd, **args})
        answer = self._line()
        if not answer.get("ok", False):
            raise self._refused(answer.get("error"), cmd)
        return answer

    def events(
        self, cmd: str, last: Collection[str], *, gone: str | None = None, **args: Any
    ) -> Iterator[dict[str, Any]]:
        """Send one command whose answer is a stream of events; yield them up to and with
        the first whose ``event`` is in ``last``. An error answer raises the error it names;
        ``gone`` is the message if the connection ends after the first event."""
        self._sock.settimeout(None)
        self._send({"cmd": cmd, **args})
        seen = False
        while True:
            try:
                event = self._line()
            except PeerClosed:
                if not seen or gone is None:
                    raise
                raise PeerClosed(gone, phase="control") from None
            seen = True
            if event.get("ok") is False:
                raise self._refused(event.get("error"), cmd)
            yield event
            if event.get("event") in last:
                return

    def _refused(self, error: Any, cmd: str) -> PageflipError:
        """An error answer (``Type: message``) as that error, naming the path; one of a
        type that is not pageflip's (a request it could not read) as a protocol error."""
        text = str(error or "failed")
        name, sep, message = text.partition(": ")
        cls = getattr(errors, name, None) if sep else None
        if isinstance(cls, type) and issubclass(cls, PageflipError):
            with contextlib.suppress(TypeError):
                return cls(f"{self.path}: {message}")
        if sep and name.isidentifier():
            return LocalProtocolError(f"{self.path} refused the {cmd} request: {text}")
        return StateError(f"{self.path}: {text}", phase="control", needed=cmd)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _absent(path: str, err: OSError, wait: float) -> str:
    """Why nothing answers at ``path`` (after ``wait`` seconds of trying)."""
    if path.startswith("@"):
        why = "nothing listens on that abstract socket"
    elif isinstance(err, FileNotFoundError):
        why = "there is no such socket"
    else:
        why = "nothing listens there (a stale socket file)"
    return f"{why} (waited {wait:g} s)" if wait > 0 else why
