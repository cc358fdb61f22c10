"""Sockets that carry pageflip's bytes and fds: Unix (local, with fds and credentials) and TCP.

A :class:`UnixConnection` sends bytes with file descriptors attached (SCM_RIGHTS) and
receives them with the sender's kernel-checked pid (SCM_CREDENTIALS), so that a peer cannot
claim to be another process. A :class:`UnixListener` accepts only peers whose uid it
allows (SO_PEERCRED), by default the same uid as ours.
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import os
import select
import socket
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from ._sys.fds import MAX_FDS, close_all, peer_credentials
from ._sys.fds import sendmsg as _sendmsg
from .errors import ClosedError, PeerClosed, PeerRejected, SpanError

log = logging.getLogger("pageflip.transport")

_FD_SPACE = socket.CMSG_SPACE(MAX_FDS * 4)
_CRED_SPACE = socket.CMSG_SPACE(struct.calcsize("3i"))
#: Socket buffers asked for, so that a stream copy moves in large chunks.
SOCKET_BUFFER = 4 << 20


def socket_address(path: str) -> str | bytes:
    """``@name`` is an abstract-namespace address (no file); anything else a path."""
    if path.startswith("@"):
        return b"\0" + path[1:].encode()
    return path


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)


class _Connected:
    """What every connected socket of pageflip's has: the socket, readiness, closing."""

    _sock: socket.socket | None

    @property
    def sock(self) -> socket.socket:
        if self._sock is None:
            raise ClosedError("the connection is closed", what="connection")
        return self._sock

    @property
    def closed(self) -> bool:
        return self._sock is None

    def fileno(self) -> int:
        return self.sock.fileno()

    def wait_readable(self, timeout: float | None) -> bool:
        """Whether the socket became readable (or closed) within ``timeout`` seconds."""
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)
        ms = None if timeout is None else max(0, int(timeout * 1000))
        return bool(poller.poll(ms))

    def recv_into(self, view: memoryview) -> int:
        return self.sock.recv_into(view)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


class UnixConnection(_Connected):
    """A connected Unix stream socket carrying bytes, fds and credentials."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock: socket.socket | None = sock
        _tune(sock)
        #: The pid the kernel stamped on the last message received (0 if none).
        self.last_pid = 0

    @classmethod
    def pair(cls) -> tuple[UnixConnection, UnixConnection]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        return cls(a), cls(b)

    @classmethod
    def connect(cls, path: str, timeout: float | None = None) -> UnixConnection:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(socket_address(path))
            sock.settimeout(None)
        except OSError as err:
            sock.close()
            raise type(err)(err.errno, f"connect({path!r}): {err.strerror or err}") from None
        return cls(sock)

    def peer(self) -> tuple[int, int, int]:
        """(pid, uid, gid) of the peer when the connection was made (SO_PEERCRED)."""
        return peer_credentials(self.sock)

    def send(self, data: bytes | memoryview, fds: list[int] | None = None, phase: str = "") -> None:
        """Send all of ``data``, with ``fds`` on its first byte."""
        view = memoryview(data)
        try:
            sent = _sendmsg(self.sock, view, fds)
            while sent < len(view):
                sent += self.sock.send(view[sent:])
        except (BrokenPipeError, ConnectionResetError) as err:
            raise PeerClosed(f"the peer closed the connection ({phase})", phase=phase) from err

    def sendall_spans(self, views: Iterable[memoryview], phase: str) -> None:
        """Send raw bytes of several buffers in order (the stream copy path)."""
        try:
            for view in views:
                self.sock.sendall(view)
        except (BrokenPipeError, ConnectionResetError) as err:
            raise PeerClosed(f"the peer closed the connection ({phase})", phase=phase) from err

    def recv(self, size: int = 65536) -> tuple[bytes, list[int]]:
        """Some bytes (b"" at EOF) and the fds that came with them."""
        nbytes, anc, flags, _ = self.sock.recvmsg(
            size, _FD_SPACE + _CRED_SPACE, socket.MSG_CMSG_CLOEXEC
        )
        fds: list[int] = []
        for level, kind, payload in anc:
            if level != socket.SOL_SOCKET:
                continue
            if kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % 4
                fds.extend(array.array("i", payload[:usable]))
            elif kind == socket.SCM_CREDENTIALS and len(payload) >= 12:
                self.last_pid = struct.unpack_from("3i", payload)[0]
        if flags & socket.MSG_CTRUNC:
            close_all(fds)
            raise OSError(errno.EMSGSIZE, "recvmsg: file descriptors were truncated")
        return nbytes, fds


class _Listening:
    """What both listeners share: the listening socket, its fd, and accepting with a timeout."""

    path: str
    _sock: socket.socket | None

    @property
    def closed(self) -> bool:
        return self._sock is None

    def fileno(self) -> int:
        return self._listening().fileno()

    def _listening(self) -> socket.socket:
        if self._sock is None:
            raise ClosedError(f"listener {self.path!r} is closed", what="listener")
        return self._sock

    def _accept_socket(self, timeout: float | None) -> socket.socket:
        """The next connection (blocking for at most ``timeout`` seconds), in blocking mode."""
        listening = self._listening()
        listening.settimeout(timeout)
        try:
            sock, _ = listening.accept()
        finally:
            if self._sock is not None:
                self._sock.settimeout(None)
        sock.settimeout(None)
        return sock

    def __del__(self) -> None:
        if getattr(self, "_sock", None) is not None:
            self.close()

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


class UnixListener(_Listening):
    """A listening Unix socket at ``path`` (``@name`` for the abstract namespace).

    ``uids`` are the peer uids :meth:`accept` takes; by default only our own. The socket
    file is removed on :meth:`close`, if it is still the one we made.
    """

    def __init__(self, path: str, *, uids: Iterable[int] | None = None, backlog: int = 16) -> None:
        self.path = path
        self.uids: frozenset[int] | None = (
            frozenset(uids) if uids is not None else frozenset({os.geteuid()})
        )
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(socket_address(path))
            sock.listen(backlog)
        except OSError as err:
            sock.close()
            raise type(err)(err.errno, f"bind({path!r}): {err.strerror or err}") from None
        self._sock: socket.socket | None = sock
        self._inode = None if path.startswith("@") else os.stat(path).st_ino

    def accept(self, timeout: float | None = None) -> UnixConnection:
        """The next peer whose uid we allow; others are closed and raise PeerRejected."""
        conn = UnixConnection(self._accept_socket(timeout))
        pid, uid, _ = conn.peer()
        if self.uids is not None and uid not in self.uids:
            conn.close()
            raise PeerRejected(
                f"refused a peer on {self.path!r}: pid {pid} runs as uid {uid}, "
                f"this listener takes uid(s) {sorted(self.uids)}",
                phase="accept",
                pid=pid,
                uid=uid,
            )
        return conn

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        sock.close()
        if self._inode is not None:
            with contextlib.suppress(OSError):
                st = os.stat(self.path)
                if stat.S_ISSOCK(st.st_mode) and st.st_ino == self._inode:
                    os.unlink(self.path)

    def __enter__(self) -> UnixListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_path(path: str) -> None:
    """Refuse a listening path whose name cannot be a Unix socket address."""
    limit = 107
    if len(os.fsencode(path)) > limit:
        raise SpanError(f"socket path {path!r} is longer than {limit} bytes")


class TcpConnection(_Connected):
    """A connected TCP socket: bytes only (no fds, no peer pid), for migration across hosts."""

    last_pid = 0

    def __init__(self, sock: socket.socket) -> None:
        self._sock: socket.socket | None = sock
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)

    @classmethod
    def connect(cls, host: str, port: int, timeout: float | None = None) -> TcpConnection:
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as err:
            raise type(err)(err.errno, f"connect({host}:{port}): {err.strerror or err}") from None
        sock.settimeout(None)
        return cls(sock)

    def peer(self) -> tuple[int, int, int]:
        """TCP peers have no credentials: (0, -1, -1)."""
        return 0, -1, -1

    def send(self, data: bytes | memoryview, fds: list[int] | None = None, phase: str = "") -> None:
        if fds:
            raise SpanError("file descriptors cannot travel over TCP")
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as err:
            raise PeerClosed(f"the peer closed the connection ({phase})", phase=phase) from err

    def recv(self, size: int = 65536) -> tuple[bytes, list[int]]:
        return self.sock.recv(size), []


class TcpListener(_Listening):
    """A listening TCP socket; ``port`` 0 picks a free one (see :attr:`port`)."""

    def __init__(self, host: str, port: int, backlog: int = 16) -> None:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(backlog)
        except OSError as err:
            sock.close()
            raise type(err)(err.errno, f"bind({host}:{port}): {err.strerror or err}") from None
        self._sock: socket.socket | None = sock
        self.host = host
        self.port = sock.getsockname()[1]
        self.path = f"tcp:{host}:{self.port}"

    def accept(self, timeout: float | None = None) -> TcpConnection:
        """The next peer (TCP carries no credentials to check)."""
        return TcpConnection(self._accept_socket(timeout))

    def __enter__(self) -> TcpListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


Connection = UnixConnection | TcpConnection
Listener = UnixListener | TcpListener


@dataclass(frozen=True)
class Address:
    """Where to reach a peer: a Unix socket path (``@name`` abstract) or TCP host and port."""

    kind: str  # "unix" or "tcp"
    path: str = ""
    host: str = ""
    port: int = 0

    @classmethod
    def parse(cls, text: str) -> Address:
        """``/path``, ``unix:/path``, ``@name``; ``tcp:host:port`` or ``host:port``."""
        if text.startswith("unix:"):
            return cls("unix", path=text[5:])
        if text.startswith("tcp:"):
            text = text[4:]
        elif text.startswith(("/", ".", "@")) or ":" not in text:
            return cls("unix", path=text)
        host, _, port = text.rpartition(":")
        try:
            number = int(port)
        except ValueError:
            raise SpanError(f"bad address {text!r}: the port must be a number") from None
        if not 0 <= number < 65536:
            raise SpanError(f"bad address {text!r}: port {number} is out of range")
        return cls("tcp", host=host.strip("[]") or "127.0.0.1", port=number)

    @property
    def local(self) -> bool:
        return self.kind == "unix"

    def connect(self, timeout: float | None = None) -> Connection:
        if self.kind == "unix":
            return UnixConnection.connect(self.path, timeout)
        return TcpConnection.connect(self.host, self.port, timeout)

    def listen(self, *, uids: Iterable[int] | None = None) -> Listener:
        if self.kind == "unix":
            return UnixListener(self.path, uids=uids)
        return TcpListener(self.host, self.port)

    def __str__(self) -> str:
        return self.path if self.kind == "unix" else f"tcp:{self.host}:{self.port}"
