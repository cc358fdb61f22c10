"""Sockets that carry pageflip's bytes and fds: Unix (local, with fds and credentials) and TCP.

A :class:`UnixConnection` sends bytes with file descriptors attached (SCM_RIGHTS) and
receives them with the sender's kernel-checked pid (SCM_CREDENTIALS), so that a peer cannot
claim to be another process. A :class:`UnixListener` accepts only peers whose uid it
allows (SO_PEERCRED), by default the same uid as ours.

Over TCP there are no credentials, so peers prove who they are (:class:`TcpAuth`): by a
shared key checked by challenge-response, or by TLS certificates both ways. A
:class:`TcpListener` hands out only peers that did, before a byte of theirs reaches the
caller; without authentication it listens on loopback addresses only, unless told
``insecure``. :meth:`TcpConnection.connect` refuses the same way and learns when the listener
refused it (PeerRejected, not just PeerClosed).
"""

from __future__ import annotations

import array
import contextlib
import errno
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import secrets
import select
import socket
import ssl
import stat
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass

from ._sys.fds import MAX_FDS, close_all, peer_credentials
from ._sys.fds import sendmsg as _sendmsg
from .errors import (
    ClosedError,
    FeatureUnavailable,
    PeerClosed,
    PeerRejected,
    PeerTimeout,
    SpanError,
)

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
        return nbytes, self._ancillary(anc, flags)

    def recv_ready(self, view: memoryview) -> tuple[int, list[int]] | None:
        """What has arrived, into ``view`` without waiting: (bytes, fds), (0, []) at EOF,
        None when nothing has. No buffer is made per call: this is what a wait inside a
        guest's pause polls with (see :meth:`.channel.Endpoint.recv`)."""
        try:
            nbytes, anc, flags, _ = self.sock.recvmsg_into(
                [view], _FD_SPACE + _CRED_SPACE, socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT
            )
        except BlockingIOError:
            return None
        return nbytes, self._ancillary(anc, flags)

    def _ancillary(self, anc: list[tuple[int, int, bytes]], flags: int) -> list[int]:
        """The fds of a message's ancillary data (the sender's pid kept in
        :attr:`last_pid`); all closed, and EMSGSIZE raised, if the kernel truncated them."""
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
        return fds


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
            raise _bind_error(path, err) from None
        self._sock: socket.socket | None = sock
        self._inode = None if path.startswith("@") else os.stat(path).st_ino

    def accept(self, timeout: float | None = None) -> UnixConnection:
        """The next peer whose uid we allow; others are closed and raise PeerRejected."""
        conn = UnixConnection(self._accept_socket(timeout))
        pid, uid, _ = conn.peer()
        if self.uids is not None and uid not in self.uids:
            why = f"uid {uid} is not one this listener takes ({sorted(self.uids)})"
            tell_refused(conn.sock, f"{self.path} refused pid {pid}: {why}")
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


def _bind_error(path: str, err: OSError) -> OSError:
    """Why a Unix socket cannot listen at ``path``, naming it and what to do."""
    why = err.strerror or str(err)
    if err.errno == errno.EADDRINUSE:
        why = (
            "a live process listens there (stop it, or choose another name)"
            if path.startswith("@")
            else "a file is in the way (remove it, or choose another path)"
        )
    elif err.errno == errno.ENOENT:
        why = f"its directory {os.path.dirname(path) or '.'} does not exist"
    elif err.errno == errno.EINVAL and len(os.fsencode(path)) > 107:
        why = "the path is longer than a socket address may be (107 bytes)"
    return type(err)(err.errno, f"cannot listen on {path}: {why}")


def _unresolved(host: str, port: int, err: socket.gaierror) -> OSError:
    """A host name that does not resolve, as a plain OSError naming it (getaddrinfo's codes
    are not errnos, so none is set)."""
    return OSError(f"cannot resolve {host!r} of {_tcp_text(host, port)}: {err.strerror or err}")


def tell_refused(sock: socket.socket, reason: str) -> None:
    """Best effort: tell a peer we refuse it why (the refusal marker, then a line), so that
    it raises PeerRejected instead of seeing a bare PeerClosed."""
    with contextlib.suppress(OSError):
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            sock.recv(65536)  # what it sent already: closing with it unread would reset
        sock.send(_REFUSED + reason.encode()[:1000] + b"\n")
        sock.shutdown(socket.SHUT_WR)


def refusal(head: bytes) -> str | None:
    """The reason a listener gave for refusing us, if ``head`` (the first bytes it sent)
    is its refusal (see :func:`tell_refused`); else None."""
    if not head.startswith(_REFUSED):
        return None
    reason = head[len(_REFUSED) :].split(b"\n", 1)[0].decode(errors="replace")
    return reason or "refused by the listener"


def check_path(path: str) -> None:
    """Refuse a listening path whose name cannot be a Unix socket address."""
    limit = 107
    if len(os.fsencode(path)) > limit:
        raise SpanError(f"socket path {path!r} is longer than {limit} bytes")


# -- TCP: who may connect -------------------------------------------------------------------

#: Seconds a peer has to finish authenticating, so that a silent one cannot hold a listener.
AUTH_TIMEOUT = 5.0
#: Shortest shared key taken: a key is a secret to guess, not a password to remember.
MIN_KEY_BYTES = 16
#: Longest key file read: anything bigger is not a key file.
MAX_KEY_FILE = 4096
#: How to make a key file, for the messages that refuse one.
MAKE_KEY = "(umask 077; openssl rand -hex 32 > FILE)"
_AUTH_OPTIONS = "--key-file FILE (a shared key), --tls-cert/--tls-key/--tls-ca (TLS) or --insecure"


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine only: 127.0.0.0/8, ::1 (or v4-mapped) or "localhost".

    Names other than "localhost" are not resolved: a name is not proof of where it points.
    """
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(name.partition("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def _tcp_text(host: str, port: int) -> str:
    return f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for TLS (as QEMU's ``tls-creds-x509``).

    A listener needs ``cert`` and ``key`` (its own) and ``ca``: the CA that signed its
    clients' certificates. Every client must present one (mutual TLS); a listener that took
    any client would let anyone who can reach the port make it allocate memory.

    A connector needs ``ca`` to verify the listener (None: the system's trust store), and
    ``cert`` and ``key`` of its own, which a pageflip listener always asks for. The
    listener's certificate must name ``server_name`` (default: the host connected to, an IP
    address matching an IP entry of subjectAltName).
    """

    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise SpanError(
                "a TLS certificate goes with its private key: give both --tls-cert and --tls-key"
            )

    def server_context(self) -> ssl.SSLContext:
        """The context a listener wraps accepted sockets in: TLS 1.3, client certificates
        required and checked against ``ca``."""
        if self.cert is None or self.key is None:
            raise SpanError("a TLS listener needs its certificate: give --tls-cert and --tls-key")
        if self.ca is None:
            raise SpanError(
                "a TLS listener must verify its clients: give --tls-ca, the CA that signed "
                "the sources' certificates"
            )
        ctx = _tls_context(ssl.Purpose.CLIENT_AUTH, self.ca)
        _load_chain(ctx, self.cert, self.key)
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.num_tickets = 0  # one connection per migration: nothing to resume
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """The context a connector uses: TLS 1.3, the listener's certificate checked against
        ``ca`` (or the system's trust store) and its name against ``server_name``."""
        ctx = _tls_context(ssl.Purpose.SERVER_AUTH, self.ca)
        if self.cert is not None and self.key is not None:
            _load_chain(ctx, self.cert, self.key)
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


def _tls_context(purpose: ssl.Purpose, ca: str | None) -> ssl.SSLContext:
    if not ssl.HAS_TLSv1_3:
        raise FeatureUnavailable(
            f"TLS 1.3 is not available in {ssl.OPENSSL_VERSION}",
            feature="tls1.3",
            reason=ssl.OPENSSL_VERSION,
        )
    try:
        ctx = ssl.create_default_context(purpose, cafile=ca)
    except (OSError, ValueError) as err:
        raise SpanError(f"TLS CA file {ca}: {_reason(err)}") from err
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def _load_chain(ctx: ssl.SSLContext, cert: str, key: str) -> None:
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ValueError) as err:
        raise SpanError(f"TLS certificate {cert} with key {key}: {_reason(err)}") from err


def _reason(err: BaseException) -> str:
    """An error's words without Python's decorations ("[Errno 2]", "(_ssl.c:1006)")."""
    text = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    if isinstance(err, ssl.SSLError):
        text = re.sub(r" \(_ssl\.c:\d+\)$", "", text)
    return text or type(err).__name__


@dataclass(frozen=True, repr=False)
class TcpAuth:
    """How TCP peers prove who they are: exactly one of ``key``, ``tls`` or ``insecure``.

    ``key``: a shared secret (see :meth:`from_key_file`). Both sides prove they know it by
    challenge-response (HMAC-SHA256 over both sides' nonces and the prover's role) before
    anything else is read. It authenticates the peer when the connection is made and nothing
    more: the stream is neither encrypted nor protected afterwards, so a host on the path
    can read it, and one that can rewrite packets can take over an authenticated
    connection. Use it on a network you trust; use TLS elsewhere.

    ``tls``: :class:`TlsFiles`; the stream is encrypted and both ends hold certificates.

    ``insecure``: take any peer. Without any ``TcpAuth`` (None), listening and connecting
    are allowed on loopback addresses only (:func:`is_loopback`).

    ``timeout``: seconds a peer has to finish authenticating, so that a silent or slow one
    holds a listener no longer than that.
    """

    key: bytes | None = None
    tls: TlsFiles | None = None
    insecure: bool = False
    timeout: float = AUTH_TIMEOUT

    def __post_init__(self) -> None:
        chosen = [
            name
            for name, given in (
                ("key", self.key is not None),
                ("tls", self.tls is not None),
                ("insecure", self.insecure),
            )
            if given
        ]
        if len(chosen) != 1:
            raise SpanError(
                f"authenticate TCP peers in exactly one way, {_AUTH_OPTIONS} "
                f"(given: {' and '.join(chosen) or 'none'})"
            )
        if self.key is not None and len(self.key) < MIN_KEY_BYTES:
            raise SpanError(
                f"a shared key needs at least {MIN_KEY_BYTES} bytes, this one has "
                f"{len(self.key)}: make one with {MAKE_KEY}"
            )
        if not self.timeout > 0:
            raise SpanError(f"the authentication timeout must be positive, not {self.timeout}")

    @property
    def mode(self) -> str:
        """ "key", "tls" or "insecure"."""
        if self.key is not None:
            return "key"
        return "tls" if self.tls is not None else "insecure"

    def __repr__(self) -> str:
        if self.key is not None:
            what = f"key=<{len(self.key)} bytes>"
        elif self.tls is not None:
            what = f"tls={self.tls!r}"
        else:
            what = "insecure=True"
        return f"TcpAuth({what}, timeout={self.timeout})"

    @classmethod
    def from_key_file(cls, path: str, *, timeout: float = AUTH_TIMEOUT) -> TcpAuth:
        """The shared key in the file at ``path`` (trailing newlines are not part of it).

        Refused: a file other users may read or write (``chmod 600`` it), an empty one, a
        key shorter than :data:`MIN_KEY_BYTES`, anything but a small regular file.
        """
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError as err:
            raise SpanError(f"key file {path}: {_reason(err)}") from err
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise SpanError(f"key file {path} is not a regular file: make one with {MAKE_KEY}")
            if st.st_mode & 0o007:
                raise SpanError(
                    f"key file {path} is open to other users (mode "
                    f"{stat.S_IMODE(st.st_mode):04o}): run chmod 600 {path}"
                )
            data = os.read(fd, MAX_KEY_FILE + 1)
        finally:
            os.close(fd)
        if len(data) > MAX_KEY_FILE:
            raise SpanError(f"key file {path} is over {MAX_KEY_FILE} bytes: is it a key file?")
        key = data.rstrip(b"\r\n")
        if not key:
            raise SpanError(f"key file {path} is empty: make one with {MAKE_KEY}")
        if len(key) < MIN_KEY_BYTES:
            raise SpanError(
                f"key file {path} holds {len(key)} bytes, a shared key needs at least "
                f"{MIN_KEY_BYTES}: make one with {MAKE_KEY}"
            )
        return cls(key=key, timeout=timeout)

    @classmethod
    def from_options(
        cls,
        *,
        key_file: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_ca: str | None = None,
        tls_server_name: str | None = None,
        insecure: bool = False,
        timeout: float = AUTH_TIMEOUT,
    ) -> TcpAuth | None:
        """The setting that command-line options ask for; None when none is given (then
        only loopback addresses are allowed). Conflicting options raise SpanError."""
        tls_given = any(v is not None for v in (tls_cert, tls_key, tls_ca, tls_server_name))
        given = [
            name
            for name, on in (
                ("--key-file", key_file is not None),
                ("--tls-*", tls_given),
                ("--insecure", insecure),
            )
            if on
        ]
        if len(given) > 1:
            raise SpanError(f"{' and '.join(given)} exclude each other: choose one")
        if key_file is not None:
            return cls.from_key_file(key_file, timeout=timeout)
        if tls_given:
            tls = TlsFiles(cert=tls_cert, key=tls_key, ca=tls_ca, server_name=tls_server_name)
            return cls(tls=tls, timeout=timeout)
        if insecure:
            return cls(insecure=True, timeout=timeout)
        return None


def require_auth(action: str, host: str, port: int, auth: TcpAuth | None) -> None:
    """Refuse to listen or connect beyond loopback with no authentication chosen (PeerRejected
    naming the options that choose one); ``action`` is "listen on" or "connect to"."""
    if auth is None and not is_loopback(host):
        raise PeerRejected(
            f"refusing to {action} {_tcp_text(host, port)} without authentication: beyond "
            f"loopback give {_AUTH_OPTIONS} to take anyone who can reach the port",
            phase=action,
        )


# -- the shared-key handshake ------------------------------------------------------------------
#
#   connector                                   listener
#   HELLO_CLIENT + nonce_c (32)         ->
#                                       <-      HELLO_SERVER + nonce_s (32)   (or REFUSED)
#   PROOF + mac("client")               ->
#                                       <-      PROOF + mac("server")         (or REFUSED)
#   ACCEPTED                            ->                                    (or REFUSED)
#
# mac(role) = HMAC-SHA256(key, "pageflip-auth-v1 " role NUL nonce_c nonce_s). Every message
# has a fixed size, so nothing past the handshake is read. The connector proves first: a
# listener shows nothing keyed to a peer that has not proven the key. The roles differ, so a
# proof sent back at its author (reflected) fails.

_TAG = 8
_NONCE = 32
_MAC = 32
_HELLO_CLIENT = b"PFA1-HC\n"
_HELLO_SERVER = b"PFA1-HS\n"
_PROOF = b"PFA1-PF\n"
_ACCEPTED = b"PFA1-OK\n"
#: The refusal marker: a peer reading it knows it was refused, not just disconnected.
_REFUSED = b"PFA1-NO\n"


def _mac(key: bytes, role: bytes, nonce_c: bytes, nonce_s: bytes) -> bytes:
    data = b"pageflip-auth-v1 " + role + b"\0" + nonce_c + nonce_s
    return hmac.new(key, data, hashlib.sha256).digest()


class _Refused(Exception):
    """A handshake step failed: ``reason`` for our PeerRejected, ``tell`` whether the peer
    should get the refusal marker."""

    def __init__(self, reason: str, *, tell: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.tell = tell


def _recv_exact(sock: socket.socket, size: int, deadline: float) -> bytes:
    """``size`` bytes, fewer only at EOF; TimeoutError once ``deadline`` has passed."""
    buf = bytearray()
    while len(buf) < size:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(errno.ETIMEDOUT, "timed out")
        sock.settimeout(left)
        chunk = sock.recv(size - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def _expect(
    sock: socket.socket, tag_wanted: bytes, deadline: float, who: str, hint: str = ""
) -> None:
    tag = _recv_exact(sock, _TAG, deadline)
    if tag == _REFUSED:
        raise _Refused(f"{who} refused us{hint}", tell=False)
    if tag != tag_wanted:
        if not tag:
            raise _Refused(f"{who} closed the connection without a word{hint}", tell=False)
        raise _Refused(f"{who} does not speak pageflip's key authentication (sent {tag!r})")


def _exact(sock: socket.socket, size: int, deadline: float, who: str) -> bytes:
    data = _recv_exact(sock, size, deadline)
    if len(data) < size:
        raise _Refused(f"{who} closed the connection in the middle of a message", tell=False)
    return data


def _refuse(sock: socket.socket) -> None:
    """Best effort: read what is waiting (so that closing does not reset the connection and
    lose the marker), send the refusal marker, end our side."""
    with contextlib.suppress(OSError):
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            sock.recv(65536)
        sock.send(_REFUSED)
        sock.shutdown(socket.SHUT_WR)


def _key_accept(sock: socket.socket, key: bytes, timeout: float, where: str) -> None:
    """The listener's half of the handshake; PeerRejected unless the peer proved the key."""
    deadline = time.monotonic() + timeout
    who = "the peer"
    try:
        _expect(sock, _HELLO_CLIENT, deadline, who)
        nonce_c = _exact(sock, _NONCE, deadline, who)
        nonce_s = secrets.token_bytes(_NONCE)
        sock.sendall(_HELLO_SERVER + nonce_s)
        _expect(sock, _PROOF, deadline, who)
        proof = _exact(sock, _MAC, deadline, who)
        if not hmac.compare_digest(proof, _mac(key, b"client", nonce_c, nonce_s)):
            raise _Refused("the peer does not know the shared key (the key files differ)")
        sock.sendall(_PROOF + _mac(key, b"server", nonce_c, nonce_s))
        _expect(sock, _ACCEPTED, deadline, who, " (our proof failed: the key files differ)")
    except _Refused as err:
        if err.tell:
            _refuse(sock)
        raise PeerRejected(f"refused a peer on {where}: {err.reason}", phase="auth") from None
    except TimeoutError:
        _refuse(sock)
        raise PeerRejected(
            f"refused a peer on {where}: it did not authenticate within {timeout} s",
            phase="auth",
        ) from None
    except OSError as err:
        raise PeerRejected(
            f"refused a peer on {where}: authentication broke off: {_reason(err)}", phase="auth"
        ) from err


def _key_connect(sock: socket.socket, key: bytes, timeout: float, where: str) -> None:
    """The connector's half: PeerRejected if the listener refused us or did not prove the
    key, PeerTimeout if it did not answer within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    who = f"the listener at {where}"
    hint = ": does it listen with the same --key-file?"
    try:
        nonce_c = secrets.token_bytes(_NONCE)
        sock.sendall(_HELLO_CLIENT + nonce_c)
        _expect(sock, _HELLO_SERVER, deadline, who, hint)
        nonce_s = _exact(sock, _NONCE, deadline, who)
        sock.sendall(_PROOF + _mac(key, b"client", nonce_c, nonce_s))
        _expect(sock, _PROOF, deadline, who, hint)
        proof = _exact(sock, _MAC, deadline, who)
        if not hmac.compare_digest(proof, _mac(key, b"server", nonce_c, nonce_s)):
            raise _Refused(f"{who} does not know the shared key (the key files differ)")
        sock.sendall(_ACCEPTED)
    except _Refused as err:
        if err.tell:
            _refuse(sock)
        raise PeerRejected(err.reason, phase="auth") from None
    except TimeoutError:
        raise PeerTimeout(
            f"{who} did not finish authenticating within {timeout} s", phase="auth"
        ) from None
    except OSError as err:
        raise PeerRejected(
            f"{who} broke off authentication ({_reason(err)}){hint}",
            phase="auth",
        ) from err


# -- TLS -------------------------------------------------------------------------------------


def _tls_accept(
    raw: socket.socket, ctx: ssl.SSLContext, timeout: float, where: str
) -> ssl.SSLSocket:
    """Wrap an accepted socket in TLS, the client's certificate checked. Closes it on failure."""
    deadline = time.monotonic() + timeout
    tls: ssl.SSLSocket | None = None
    try:
        tls = ctx.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        tls.settimeout(timeout)
        tls.do_handshake()
        # The connector's handshake ends before we have checked its certificate (TLS 1.3):
        # this verdict is how it learns that we took it.
        tls.settimeout(max(0.001, deadline - time.monotonic()))
        tls.sendall(_ACCEPTED)
        tls.settimeout(None)
    except TimeoutError:
        _close_quietly(tls or raw)
        raise PeerRejected(
            f"refused a peer on {where}: it did not finish the TLS handshake within {timeout} s",
            phase="tls",
        ) from None
    except OSError as err:
        _close_quietly(tls or raw)
        raise PeerRejected(
            f"refused a peer on {where}: TLS handshake failed: {_reason(err)}", phase="tls"
        ) from err
    return tls


def _tls_connect(
    raw: socket.socket, ctx: ssl.SSLContext, server_name: str, timeout: float, where: str
) -> ssl.SSLSocket:
    """Wrap a connected socket in TLS and wait for the listener's verdict on our certificate.
    Closes the socket on failure."""
    deadline = time.monotonic() + timeout
    who = f"the listener at {where}"
    tls: ssl.SSLSocket | None = None
    try:
        tls = ctx.wrap_socket(raw, server_hostname=server_name, do_handshake_on_connect=False)
        tls.settimeout(timeout)
        tls.do_handshake()
        verdict = _recv_exact(tls, _TAG, deadline)
        if verdict != _ACCEPTED:
            raise ssl.SSLError(f"it answered {verdict!r} instead of taking us")
        tls.settimeout(None)
    except TimeoutError:
        _close_quietly(tls or raw)
        raise PeerTimeout(
            f"{who} did not finish the TLS handshake within {timeout} s", phase="tls"
        ) from None
    except OSError as err:
        _close_quietly(tls or raw)
        raise PeerRejected(f"TLS with {who} failed: {_reason(err)}", phase="tls") from err
    return tls


def _close_quietly(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()


def _peer_text(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "?"
    return f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"


class TcpConnection(_Connected):
    """A connected TCP socket, plain or TLS: bytes only (no fds, no peer pid), for migration
    across hosts. :meth:`connect` and :meth:`TcpListener.accept` authenticate the peer first
    (see :class:`TcpAuth`); ``auth_mode`` says how: "key", "tls", "insecure" or "loopback"
    (nothing asked, allowed on loopback only).

    Over TLS, use a connection from one thread at a time (the SSL object is not shared
    safely, and :meth:`wait_readable` briefly makes the socket non-blocking)."""

    last_pid = 0

    def __init__(self, sock: socket.socket, *, auth_mode: str = "loopback") -> None:
        self._sock: socket.socket | None = sock
        self.auth_mode = auth_mode
        self._tls = isinstance(sock, ssl.SSLSocket)
        # What a TLS readiness check has already decrypted: data, then EOF or an error.
        self._ahead = b""
        self._ahead_eof = False
        self._ahead_error: OSError | None = None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        timeout: float | None = None,
        *,
        auth: TcpAuth | None = None,
    ) -> TcpConnection:
        """Connect and authenticate as ``auth`` says (None: loopback only, nothing asked).

        The handshake may take the larger of ``timeout`` and ``auth.timeout``: a listener
        may first be busy refusing someone else. PeerRejected if the listener refused us or
        failed to prove itself, PeerTimeout if it did not answer.
        """
        require_auth("connect to", host, port, auth)
        ctx = None
        if auth is not None and auth.tls is not None:
            ctx = auth.tls.client_context()
        where = _tcp_text(host, port)
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except socket.gaierror as err:
            raise _unresolved(host, port, err) from None
        except OSError as err:
            raise type(err)(err.errno, f"connect({where}): {err.strerror or err}") from None
        if auth is None or auth.insecure:
            sock.settimeout(None)
            return cls(sock, auth_mode="loopback" if auth is None else "insecure")
        handshake = max(auth.timeout, timeout or 0.0)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if ctx is not None:
                assert auth.tls is not None
                name = auth.tls.server_name or host
                sock = _tls_connect(sock, ctx, name, handshake, where)
            else:
                assert auth.key is not None
                _key_connect(sock, auth.key, handshake, where)
            sock.settimeout(None)
            return cls(sock, auth_mode=auth.mode)
        except BaseException:
            sock.close()
            raise

    def peer(self) -> tuple[int, int, int]:
        """TCP peers have no credentials: (0, -1, -1)."""
        return 0, -1, -1

    def send(self, data: bytes | memoryview, fds: list[int] | None = None, phase: str = "") -> None:
        if fds:
            raise SpanError("file descriptors cannot travel over TCP")
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError) as err:
            raise PeerClosed(f"the peer closed the connection ({phase})", phase=phase) from err

    def wait_readable(self, timeout: float | None) -> bool:
        """Whether :meth:`recv` has something (data or EOF) within ``timeout`` seconds.

        Over TLS the socket's readiness says little: decrypted bytes may wait inside the
        SSL object (``pending()``) while the socket is not readable, and a readable socket
        may hold only part of a record, or a record with no data. So a readable TLS socket
        is read without blocking and what it gave kept for :meth:`recv`.
        """
        if not self._tls:
            return super().wait_readable(timeout)
        sock = self.sock
        assert isinstance(sock, ssl.SSLSocket)
        if self._has_ahead() or sock.pending():
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not super().wait_readable(left):
                return False
            if self._read_ahead(sock):
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False

    def _has_ahead(self) -> bool:
        return bool(self._ahead) or self._ahead_eof or self._ahead_error is not None

    def _read_ahead(self, sock: ssl.SSLSocket) -> bool:
        sock.setblocking(False)
        try:
            data = sock.recv(65536)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False
        except OSError as err:
            self._ahead_error = err
            return True
        finally:
            sock.setblocking(True)
        if data:
            self._ahead = data
        else:
            self._ahead_eof = True
        return True

    def _take_ahead(self, size: int) -> bytes:
        if self._ahead:
            data, self._ahead = self._ahead[:size], self._ahead[size:]
            return data
        err = self._ahead_error
        if err is not None:
            self._ahead_error = None
            raise ConnectionResetError(errno.ECONNRESET, f"TLS: {_reason(err)}") from err
        return b""  # EOF, and it stays so

    def recv(self, size: int = 65536) -> tuple[bytes, list[int]]:
        """Some bytes, b"" at EOF; a broken TLS stream raises ConnectionResetError."""
        if self._tls and self._has_ahead():
            return self._take_ahead(size), []
        try:
            return self.sock.recv(size), []
        except ssl.SSLError as err:
            raise ConnectionResetError(errno.ECONNRESET, f"TLS: {_reason(err)}") from err

    def recv_into(self, view: memoryview) -> int:
        if self._tls and self._has_ahead():
            data = self._take_ahead(len(view))
            view[: len(data)] = data
            return len(data)
        try:
            return self.sock.recv_into(view)
        except ssl.SSLError as err:
            raise ConnectionResetError(errno.ECONNRESET, f"TLS: {_reason(err)}") from err


class TcpListener(_Listening):
    """A listening TCP socket; ``port`` 0 picks a free one (:attr:`port` and :attr:`path`
    give the one bound).

    :meth:`accept` hands out only peers authenticated as ``auth`` says (see
    :class:`TcpAuth`). Without ``auth`` only a loopback ``host`` is allowed. Peers are
    authenticated one at a time, each within ``auth.timeout`` seconds.
    """

    def __init__(
        self, host: str, port: int, backlog: int = 16, *, auth: TcpAuth | None = None
    ) -> None:
        require_auth("listen on", host, port, auth)
        self.auth = auth
        self._tls_context: ssl.SSLContext | None = None
        if auth is not None and auth.tls is not None:
            self._tls_context = auth.tls.server_context()
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(backlog)
        except socket.gaierror as err:
            sock.close()
            raise _unresolved(host, port, err) from None
        except OSError as err:
            sock.close()
            where = _tcp_text(host, port)
            if err.errno == errno.EADDRINUSE:
                raise OSError(
                    err.errno,
                    f"cannot listen on {where}: the port is in use (another process has it: "
                    "choose another port, or 0 for any free one)",
                ) from None
            if err.errno == errno.EADDRNOTAVAIL:
                raise OSError(
                    err.errno,
                    f"cannot listen on {where}: {host} is not an address of this host "
                    "(0.0.0.0 for all of them)",
                ) from None
            raise type(err)(err.errno, f"cannot listen on {where}: {err.strerror or err}") from None
        self._sock: socket.socket | None = sock
        self.host = host
        self.port: int = sock.getsockname()[1]
        self.path = _tcp_text(host, self.port)

    @property
    def address(self) -> Address:
        """Where this listener is, with the port really bound."""
        return Address("tcp", host=self.host, port=self.port)

    def accept(self, timeout: float | None = None) -> TcpConnection:
        """The next authenticated peer. One that fails is closed and raises PeerRejected;
        the listener stays open for the next. TimeoutError if nobody came in ``timeout``."""
        raw = self._accept_socket(timeout)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = self._authenticate(raw)
            return TcpConnection(sock, auth_mode=self.auth_mode)
        except PeerRejected as err:
            raw.close()  # a no-op once TLS took it over; _tls_accept closes its own
            log.warning("%s", err)
            raise
        except BaseException:
            raw.close()
            raise

    @property
    def auth_mode(self) -> str:
        """How peers are authenticated: "key", "tls", "insecure" or "loopback"."""
        return "loopback" if self.auth is None else self.auth.mode

    def _authenticate(self, raw: socket.socket) -> socket.socket:
        auth = self.auth
        if auth is None or auth.insecure:
            return raw
        where = f"{self.path} (from {_peer_text(raw)})"
        if self._tls_context is not None:
            tls = _tls_accept(raw, self._tls_context, auth.timeout, where)
            try:
                tls.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except BaseException:
                tls.close()
                raise
            return tls
        assert auth.key is not None
        _key_accept(raw, auth.key, auth.timeout, where)
        raw.settimeout(None)
        return raw

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
        """``/path``, ``unix:/path``, ``@name``; ``tcp:host:port`` or ``host:port``
        (``tcp:[::1]:port`` for IPv6)."""
        if text.startswith("unix:"):
            return cls("unix", path=text[5:])
        given = text
        if text.startswith("tcp:"):
            text = text[4:]
        elif text.startswith(("/", ".", "@")) or ":" not in text:
            return cls("unix", path=text)
        host, _, port = text.rpartition(":")
        try:
            number = int(port)
        except ValueError:
            raise SpanError(
                f"bad address {given!r}: the port must be a number (tcp:HOST:PORT)"
            ) from None
        if not 0 <= number < 65536:
            raise SpanError(
                f"bad address {given!r}: port {number} is out of range (0 to 65535; 0: any)"
            )
        return cls("tcp", host=host.strip("[]") or "127.0.0.1", port=number)

    @property
    def local(self) -> bool:
        return self.kind == "unix"

    def connect(self, timeout: float | None = None, *, auth: TcpAuth | None = None) -> Connection:
        """Connect; over TCP authenticate as ``auth`` says (Unix peers are checked by uid,
        ``auth`` does not apply to them)."""
        if self.kind == "unix":
            return UnixConnection.connect(self.path, timeout)
        return TcpConnection.connect(self.host, self.port, timeout, auth=auth)

    def listen(self, *, uids: Iterable[int] | None = None, auth: TcpAuth | None = None) -> Listener:
        """Listen; ``uids`` apply to Unix sockets, ``auth`` to TCP (see :class:`TcpAuth`)."""
        if self.kind == "unix":
            return UnixListener(self.path, uids=uids)
        return TcpListener(self.host, self.port, auth=auth)

    def __str__(self) -> str:
        return self.path if self.kind == "unix" else _tcp_text(self.host, self.port)
