"""The :class:`Upgrader`: one per service process, on both sides of a live update.

The old version (it serves now) starts the new one: the same interpreter and command line,
cwd and environment, plus :data:`HANDOVER_ENV` naming one end of a socket pair, in a
session of its own. Over that pair (the channel's framing, one
:class:`~pageflip._wire.Note` per message, as a destination talks to its pager) it offers
everything at once: the memfd of each region and the fd of each listener (and of the
control socket). The new version maps and wraps what it asks for, calls :meth:`take_over`
when it is about to serve ("take": the old one stops accepting, ``on_stop_accepting``, and
says so, "stopped"; the new one starts accepting, take_over's ``accept``, and says when,
"accepting"; meanwhile the old one finishes its requests, ``on_stop``, and sends the state
blob in a memfd), then :meth:`ready` ("ready": the old one runs ``on_exit`` and closes its
copies). The service's pause is from the old version's stop to the new one's accept.
Any failure before "ready" (the new one exits, raises, hangs, asks for what the old one
does not have) ends the new one's whole process group; the old one resumes and serves on.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from types import FrameType, TracebackType
from typing import Any

from .._sys import mm
from .._sys.fds import close_all
from .._sys.flags import PROT_RW, Prot
from ..channel import Endpoint
from ..channel.peer import check_peer_memfd, map_checked_memfds
from ..control import ControlClient, ControlServer, bind_control, claim_socket_path, unlink_if
from ..errors import (
    BufferInUse,
    ClosedError,
    LiveError,
    LocalProtocolError,
    PageflipError,
    PeerClosed,
    PeerTimeout,
    UpgradeFailed,
    UpgradeRunning,
    one_line,
)
from ..memory import Region
from ..migration.pager import open_pager_link, recv_note, send_note
from ..transport import socket_address
from . import _systemd

log = logging.getLogger("pageflip.live")

#: The variable that tells a new version which fd is its end of the handover socket pair.
HANDOVER_ENV = "PAGEFLIP_LIVE_FD"
#: The variable naming an fd of the old version's own stderr: the new one writes its
#: stderr through the old one (which keeps the last lines) until it is ready.
STDERR_ENV = "PAGEFLIP_LIVE_STDERR"
#: Listen backlog of a socket bound here.
BACKLOG = 2048
#: Lines of the new version's stderr kept for a failure report.
STDERR_LINES = 20
#: Longest wait of a new version for the offer it is started with.
OFFER_TIMEOUT = 10.0

Address = tuple[str, int] | str


@dataclass
class UpgradeReport:
    """What one upgrade did (``ok``) or why it was rolled back (``reason``, ``stderr``)."""

    ok: bool
    generation: int
    old_pid: int
    new_pid: int | None = None
    reason: str | None = None
    #: Each region handed over: name, bytes, moved (always True: its memfd, not a copy).
    regions: list[dict[str, Any]] = field(default_factory=list)
    #: Each listener handed over: name and address (the same kernel socket).
    listeners: list[dict[str, Any]] = field(default_factory=list)
    #: Size of the state blob handed over (None: none).
    state_bytes: int | None = None
    #: The service's pause: seconds from the old version's stop of accepting (on_stop_accepting,
    #: else on_stop) to the new one accepting (take_over's accept, else ready); None: not
    #: reached.
    pause: float | None = None
    #: Seconds from the start of the upgrade to its end.
    total: float = 0.0
    #: The new version's last lines on stderr (a failure only).
    stderr: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Held:
    """A region of ours: the mapping and our own dup of its memfd (what we hand on)."""

    region: Region
    fd: int
    size: int
    inherited: bool


@dataclass
class _Listener:
    """A listener of ours: our own dup of its fd, what it listens on, its socket file."""

    fd: int
    address: str
    inherited: bool
    sockets: list[socket.socket] = field(default_factory=list)
    #: What this version asked for, spelled by :func:`_spell` (a successor must match it).
    asked: str | None = None
    #: A Unix socket's path and inode (removed at close unless handed over).
    path: str | None = None
    inode: int = 0


class _Offer:
    """What the old version handed us at start-up (the new version's side)."""

    def __init__(self, link: Endpoint, message: dict[str, Any], fds: list[int]) -> None:
        self.link: Endpoint | None = link
        self.generation = int(message["generation"])
        self.parent = int(message["parent"])
        self.regions: dict[str, tuple[int, int]] = {}
        self.listeners: dict[str, tuple[int, dict[str, Any]]] = {}
        self.control: tuple[int, str, int] | None = None
        fds = list(fds)
        try:
            for item in message["regions"]:
                fd = fds.pop(0)
                name, size = str(item["name"]), int(item["size"])
                self.regions[name] = (fd, size)
                check_peer_memfd(
                    fd, offset=0, length=size, what=f"the memfd of region {name!r}", frame="NOTE"
                )
            for item in message["listeners"]:
                self.listeners[str(item["name"])] = (fds.pop(0), item)
            control = message.get("control")
            if control:
                self.control = (fds.pop(0), str(control["path"]), int(control["inode"]))
        except (KeyError, IndexError, TypeError, ValueError) as err:
            self.close()
            close_all(fds)
            raise LiveError(f"a bad offer from the old version: {one_line(err)}") from None
        except BaseException:
            self.close()
            close_all(fds)
            raise
        if fds:
            close_all(fds)
            self.close()
            raise LiveError(f"the old version's offer carried {len(fds)} fds too many")

    def fds(self) -> list[int]:
        out = [fd for fd, _ in self.regions.values()]
        out += [fd for fd, _ in self.listeners.values()]
        if self.control is not None:
            out.append(self.control[0])
        return out

    def close(self) -> None:
        """Close every fd nobody took, and the link."""
        close_all(self.fds())
        self.regions.clear()
        self.listeners.clear()
        self.control = None
        if self.link is not None:
            self.link.close()
            self.link = None


def _page_round(n: int) -> int:
    return mm.page_round_up(n)


def _describe(sock: socket.socket) -> str:
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        text = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
        return "unix:" + (("@" + text[1:]) if text.startswith("\0") else text)
    host, port = name[0], name[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _spell(family: socket.AddressFamily, where: Any) -> str:
    """An asked-for address, spelled as :func:`_describe` does, so that two can be compared:
    a Unix path made absolute, a host that is an IP literal normalized."""
    import ipaddress

    if family == socket.AF_UNIX:
        if isinstance(where, bytes):
            return "unix:@" + where[1:].decode(errors="replace")
        return "unix:" + os.path.abspath(str(where))
    host, port = str(where[0]), int(where[1])
    try:
        host = str(ipaddress.ip_address(host or "0.0.0.0"))
    except ValueError:
        host = host.lower()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _same_place(want: str, item: dict[str, Any]) -> bool:
    """Whether ``want`` (spelled by :func:`_spell`) names the old version's listener
    ``item``: what the old version asked for, or where its socket is (port 0: any port)."""
    if want == item.get("asked"):
        return True
    actual = str(item.get("address") or "")
    if actual.startswith("unix:") or want.startswith("unix:"):
        name = actual[len("unix:") :]
        if name and not name.startswith("@"):
            actual = "unix:" + os.path.abspath(name)
        return want == actual
    host, _, port = want.rpartition(":")
    return want == actual or (port == "0" and actual.rpartition(":")[0] == host)


def _parse(address: Address) -> tuple[socket.AddressFamily, Any]:
    if isinstance(address, str):
        if not address.startswith("unix:") or len(address) == len("unix:"):
            raise LiveError(f"a listener address is (host, port) or 'unix:/path', not {address!r}")
        path = address[len("unix:") :]
        return socket.AF_UNIX, socket_address(path)
    if not (isinstance(address, tuple) and len(address) == 2 and isinstance(address[1], int)):
        raise LiveError(f"a listener address is (host, port) or 'unix:/path', not {address!r}")
    host = address[0]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return family, (host, address[1])


class Upgrader:
    """Hand this process's memory, listening sockets and state to a new version of itself.

    Made at start-up. ``fresh`` is True in a first version; in a new version started by
    :meth:`upgrade`, the old version's offer is received here (its regions and listeners,
    not yet taken). ``control`` is the path of a Unix socket that ``pageflip upgrade``
    talks to (None: none). ``state_limit`` bounds the state blob of :meth:`on_stop`.
    SIGHUP starts an upgrade when the Upgrader is made in the main thread.
    """

    def __init__(
        self, control: str | None = None, *, state_limit: int = 1 << 20, sighup: bool = True
    ) -> None:
        self.control = control
        self.state_limit = state_limit
        self.state_lost = False
        self._cwd = os.getcwd()
        self._argv = [sys.executable, *sys.orig_argv[1:]]
        self._lock = threading.Lock()
        self._regions: dict[str, _Held] = {}
        self._listeners: dict[str, _Listener] = {}
        self._on_stop: Callable[[float], bytes | None] | None = None
        self._on_stop_accepting: Callable[[Callable[[], None]], None] | None = None
        self._on_resume: Callable[[], None] | None = None
        self._on_exit: Callable[[], None] | None = None
        self._upgrading: tuple[int, float] | None = None
        self._closed = False
        self._serving = False
        self._taken = False
        self._handed_over = False
        self._control_server: ControlServer | None = None
        self._control_file: tuple[str, int] | None = None
        self._control_sock: socket.socket | None = None
        self._previous_hup: Any = None
        self._previous_hook: Any = None
        self._stderr_fd: int | None = None
        self._systemd = {} if HANDOVER_ENV in os.environ else _systemd.listen_fds()
        self._offer: _Offer | None = None
        raw = os.environ.pop(HANDOVER_ENV, None)
        stderr_raw = os.environ.pop(STDERR_ENV, None)
        try:
            if stderr_raw is not None:
                self._stderr_fd = int(stderr_raw)
                os.set_inheritable(self._stderr_fd, False)
            if raw is not None:
                self._receive_offer(int(raw))
                self.generation = self._offer.generation if self._offer else 1
            else:
                self.generation = 1
                if control is not None:
                    self._control_sock = self._bind_control(control)
                    self._control_server = ControlServer(self._control_sock, self._request)
            self._install_sighup(sighup)
        except BaseException as err:
            self._tell_failure(one_line(err))
            self.close()
            raise

    # -- the new version's side -----------------------------------------------------------

    @property
    def fresh(self) -> bool:
        """True in a first version; False where this process takes over from an old one."""
        return self.generation == 1

    def _receive_offer(self, fd: int) -> None:
        sock = socket.socket(fileno=fd)
        os.set_inheritable(fd, False)
        link = open_pager_link(sock)
        try:
            message, fds = recv_note(link, OFFER_TIMEOUT)
        except PeerClosed:
            link.close()
            raise LiveError(
                "the old version went away before it offered anything: nothing to take over"
            ) from None
        except BaseException:
            link.close()
            raise
        if "offer" not in message:
            close_all(fds)
            link.close()
            raise LiveError(f"the old version sent {sorted(message)} instead of its offer")
        self._offer = _Offer(link, message["offer"], fds)
        self._previous_hook = sys.excepthook
        sys.excepthook = self._excepthook
        atexit.register(self._at_exit)
        log.info("generation %d takes over from pid %d", self._offer.generation, self._offer.parent)

    def _excepthook(
        self, kind: type[BaseException], err: BaseException, tb: TracebackType | None
    ) -> None:
        self._tell_failure(one_line(err))
        hook = self._previous_hook or sys.__excepthook__
        hook(kind, err, tb)

    def _at_exit(self) -> None:
        if not self._serving and self._offer is not None:
            self._tell_failure("the new version exited before it called ready()")

    def _tell_failure(self, reason: str) -> None:
        """Tell the old version why we fail (the first reason counts), once."""
        offer = self._offer
        if offer is None or offer.link is None or self._serving:
            return
        with contextlib.suppress(Exception):
            send_note(offer.link, {"error": reason})
        offer.link.close()
        offer.link = None

    def inherited(self, name: str) -> bool:
        """Whether region ``name`` holds the old version's pages (True) or new zeros."""
        held = self._regions.get(name)
        return held is not None and held.inherited

    def region(self, name: str, size: int) -> Region:
        """The region ``name`` of ``size`` bytes: new (zeros) in a first version, else the
        old version's pages mapped here (its memfd: moved, not copied).

        An inherited region is mapped read-only until :meth:`ready` (then read-write), so
        that a rollback finds the old version's memory as it left it: the new version may
        read it while it starts, not write it. A size other than the old version's is a
        LiveError naming both. A name the old version does not have is a new region.
        """
        self._check_open()
        if name in self._regions:
            raise LiveError(f"region {name!r} was asked for already")
        want = _page_round(size)
        offer = self._offer
        if offer is not None and name in offer.regions:
            fd, old_size = offer.regions[name]
            if old_size != want:
                raise LiveError(
                    f"region {name!r} is {old_size} bytes in the old version, the new one asks "
                    f"for {size} bytes"
                )
            region = map_checked_memfds([fd], [(0, 0, old_size)], name, shared=False)
            if not self._serving:
                mm.mprotect(region.address, region.size, Prot.READ)
            del offer.regions[name]
            self._regions[name] = _Held(region, fd, old_size, inherited=True)
            return region
        region = Region.movable(size, name)
        memfd = region.extents()[0].memfd
        assert memfd is not None
        self._regions[name] = _Held(region, os.dup(memfd.fd), region.size, inherited=False)
        return region

    def listener(self, name: str, address: Address) -> socket.socket:
        """A listening socket for ``address`` ((host, port) or ``"unix:/path"``): the old
        version's (the same kernel socket: its backlog goes on) when taking over, else from
        systemd (``LISTEN_FDNAMES`` names it) or bound here (IPPROTO_TCP, SO_REUSEADDR,
        backlog 2048). Asked again for the same name, a new socket object of the same
        socket (for a server that closed its own in ``on_stop`` and accepts again).

        When taking over, ``address`` must name the old version's listener: what the old
        version asked for, or where its socket is (port 0 matches any port). Another address
        under the same name is a LiveError naming both (the old version serves on)."""
        self._check_open()
        held = self._listeners.get(name)
        if held is not None:
            sock = socket.socket(fileno=os.dup(held.fd))
            held.sockets.append(sock)
            return sock
        family, where = _parse(address)
        want = _spell(family, where)
        offer = self._offer
        if offer is not None:
            if name not in offer.listeners:
                raise LiveError(
                    f"the old version has no listener {name!r} (it has: "
                    f"{', '.join(sorted(offer.listeners)) or 'none'})"
                )
            item = offer.listeners[name][1]
            if not _same_place(want, item):
                raise LiveError(
                    f"listener {name!r} is {item.get('address')} in the old version, the new "
                    f"one asks for {want}"
                )
            fd, item = offer.listeners.pop(name)
            held = _Listener(fd, str(item["address"]), True)
            held.path, held.inode = item.get("path"), int(item.get("inode", 0))
        elif name in self._systemd:
            fd = self._systemd.pop(name)
            held = _Listener(fd, "", True)
        else:
            held = self._bind(family, where)
        held.asked = want
        sock = socket.socket(fileno=os.dup(held.fd))
        held.address = _describe(sock)
        held.sockets.append(sock)
        self._listeners[name] = held
        return sock

    def _bind(self, family: socket.AddressFamily, where: Any) -> _Listener:
        proto = 0 if family == socket.AF_UNIX else socket.IPPROTO_TCP
        sock = socket.socket(family, socket.SOCK_STREAM, proto)
        path = None
        try:
            if family == socket.AF_UNIX:
                if isinstance(where, str):  # a path (an abstract name is bytes)
                    claim_socket_path(where)
                    path = where
            else:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(where)
            sock.listen(BACKLOG)
            held = _Listener(sock.detach(), "", False)
        finally:
            sock.close()
        if path is not None:
            held.path, held.inode = path, os.stat(path).st_ino
        return held

    def take_over(
        self, timeout: float = 10.0, *, accept: Callable[[], float | None] | None = None
    ) -> bytes | None:
        """Right before serving: the old version stops accepting, finishes its in-flight
        requests and hands its state blob, returned here (None when fresh, or when the old
        version sent none). If the old version died before it handed the state, we take
        over all the same (regions and listeners are here already): None, and
        ``state_lost`` is True.

        ``accept()`` starts this version accepting on its listeners and returns once it
        does (it may return the time.monotonic() at which it started; else its return
        counts). It is called as soon as nothing else accepts: at once in a first version;
        in a new one when the old version has stopped accepting, while the old one still
        finishes its requests and before its state is here. The service's pause is then
        from the old version's stop to this call, not the old one's drain. Requests served
        before :meth:`ready` must not write inherited regions (read-only until then), and a
        failure before it loses the connections this version holds (the old one serves
        on). Without ``accept``, start accepting once this returns."""
        self._check_open()
        if self._taken:
            return None
        self._taken = True
        offer = self._offer
        if offer is None:
            self._accept(accept, None)
            return None
        if offer.link is None:
            self._lost("its handover socket is closed")
            self._accept(accept, None)
            return None
        deadline = time.monotonic() + timeout
        accepted = accept is None
        heard = False  # "stopped": the old version knows it, and hears "accepting"
        try:
            # "tell_stopped": say when you stopped accepting. An old version that does not
            # know it sends its state only, after which we accept, and tell it nothing.
            send_note(offer.link, {"take": True, "tell_stopped": not accepted})
            while True:
                message, fds = recv_note(offer.link, max(0.0, deadline - time.monotonic()))
                if "stopped" not in message or "error" in message:
                    break
                close_all(fds)
                heard = True
                if not accepted:
                    accepted = True
                    self._accept(accept, offer.link)
        except PeerClosed:
            self._lost("it went away")
            if not accepted:
                self._accept(accept, None)
            return None
        except PeerTimeout:
            raise LiveError(
                f"the old version did not hand its state within {timeout:g} s"
            ) from None
        state: bytes | None = None
        try:
            if "error" in message:
                raise LiveError(f"the old version refused: {message['error']}")
            size = message.get("state")
            if size is not None:
                if len(fds) != 1 or mm.fstat_size(fds[0]) != int(size):
                    raise LiveError("the old version's state memfd is not the size it announced")
                state = os.pread(fds[0], int(size), 0) if size else b""
        finally:
            close_all(fds)
        if not accepted:
            self._accept(accept, offer.link if heard else None)
        return state

    def _accept(self, accept: Callable[[], float | None] | None, link: Endpoint | None) -> None:
        """Call ``accept`` and tell the old version (over ``link``) when we accepted: the
        end of the service's pause. A stamp from ``accept`` counts within its call."""
        if accept is None:
            return
        called = time.monotonic()
        said = accept()
        done = time.monotonic()
        at = done if said is None else min(max(float(said), called), done)
        if link is not None:
            with contextlib.suppress(PageflipError, OSError):
                send_note(link, {"accepting": at})

    def _lost(self, why: str) -> None:
        self.state_lost = True
        self._restore_stderr()  # the old version copied our stderr: nobody reads it now
        log.warning(
            "the old version's state is lost (%s): taking over its regions and listeners "
            "without it",
            why,
        )

    def ready(self) -> None:
        """Serve now. After a takeover: regions become writable, the old version is told
        (it runs on_exit and closes its copies), and our stderr goes where the old one's
        went. Then the control socket is served and systemd told (READY=1, and MAINPID
        after an upgrade)."""
        self._check_open()
        if self._serving:
            return
        offer = self._offer
        if offer is not None and not self._taken:
            self.take_over()
        for held in self._regions.values():
            if held.inherited:
                mm.mprotect(held.region.address, held.region.size, PROT_RW)
        took_control = False
        if offer is not None and offer.control is not None and self.control is not None:
            fd, path, inode = offer.control
            if os.path.realpath(path) == os.path.realpath(self.control):
                self._control_sock = socket.socket(fileno=fd)
                self._control_file = (path, inode)
                offer.control = None
                took_control = True
        self._serving = True
        if offer is not None:
            if offer.link is not None:
                with contextlib.suppress(PageflipError, OSError):
                    send_note(offer.link, {"ready": True, "control": took_control})
            atexit.unregister(self._at_exit)
            if sys.excepthook == self._excepthook:
                sys.excepthook = self._previous_hook
            dropped = sorted(offer.regions) + sorted(offer.listeners)
            if dropped:
                log.info("not taken over from the old version: %s", ", ".join(dropped))
            offer.close()
        self._restore_stderr()
        if self.control is not None and self._control_server is None:
            if self._control_sock is None:
                self._control_sock = self._bind_control(self.control)
            self._control_server = ControlServer(self._control_sock, self._request)
        sent = "READY=1" if self.fresh else f"MAINPID={os.getpid()}\nREADY=1"
        _systemd.notify(sent)

    def _restore_stderr(self) -> None:
        fd, self._stderr_fd = self._stderr_fd, None
        if fd is None:
            return
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        with contextlib.suppress(OSError):
            os.dup2(fd, 2)
        os.close(fd)

    def _bind_control(self, path: str) -> socket.socket:
        sock, inode = bind_control(path)
        if inode:
            self._control_file = (path, inode)
        return sock

    # -- hooks of the running version -----------------------------------------------------

    def on_stop(self, fn: Callable[[float], bytes | None]) -> None:
        """``fn(deadline)``: stop accepting (if :meth:`on_stop_accepting` did not), finish
        in-flight requests by ``deadline`` (time.monotonic), return the state blob (bytes or
        None). Called on the upgrade's thread."""
        self._on_stop = fn

    def on_stop_accepting(self, fn: Callable[[Callable[[], None]], None]) -> None:
        """``fn(stopped)``: stop accepting new connections, now, and call ``stopped()`` the
        moment it did, from the thread that did it (the service's event loop, say): that
        tells a new version that takes over with ``accept`` to start accepting, at once,
        while ``on_stop`` finishes the requests in flight here. Return once stopped. If
        ``fn`` returns without calling ``stopped()``, its call counts as the moment and the
        new version hears it then. Called on the upgrade's thread."""
        self._on_stop_accepting = fn

    def on_resume(self, fn: Callable[[], None]) -> None:
        """``fn()``: the upgrade failed after on_stop: accept again."""
        self._on_resume = fn

    def on_exit(self, fn: Callable[[], None]) -> None:
        """``fn()``: the new version serves now: leave (default: nothing)."""
        self._on_exit = fn

    # -- the old version's side -----------------------------------------------------------

    def upgrade(
        self,
        timeout: float = 30.0,
        *,
        progress: Callable[[str], None] | None = None,
        announce: Callable[[UpgradeReport], None] | None = None,
    ) -> UpgradeReport:
        """Start the new version and hand everything over to it; a report either way
        (``ok`` False: it was rolled back, we serve on). UpgradeRunning while another
        upgrade runs; LiveError before :meth:`ready` or after :meth:`close`.

        ``progress(message)`` hears each step; ``announce(report)`` gets a successful
        report before ``on_exit`` runs (so that it can still be told to whoever asked)."""
        with self._lock:
            self._check_open()
            if not self._serving:
                raise LiveError("this version does not serve yet: call ready() first")
            if self._handed_over:
                raise LiveError("this version has handed over to a new one already")
            if self._upgrading is not None:
                pid, since = self._upgrading
                raise UpgradeRunning(
                    f"an upgrade is already running (pid {pid} since "
                    f"{time.strftime('%H:%M:%S', time.localtime(since))})",
                    pid=pid,
                )
            self._upgrading = (os.getpid(), time.time())
        try:
            return _Handover(self, timeout, progress or (lambda _: None), announce).run()
        finally:
            with self._lock:
                self._upgrading = None

    def _set_upgrading_pid(self, pid: int) -> None:
        with self._lock:
            if self._upgrading is not None:
                self._upgrading = (pid, self._upgrading[1])

    def _request(
        self, request: dict[str, Any], send: Callable[[dict[str, Any]], None], _: socket.socket
    ) -> None:
        cmd = request.get("cmd")
        if cmd == "status":
            send(
                {
                    "ok": True,
                    "pid": os.getpid(),
                    "generation": self.generation,
                    "serving": self._serving,
                    "upgrading": self._upgrading is not None,
                }
            )
        elif cmd == "upgrade":
            timeout = float(request.get("timeout", 30.0))

            def say(message: str) -> None:
                with contextlib.suppress(OSError):
                    send({"event": "progress", "message": message})

            def done(report: UpgradeReport) -> None:
                with contextlib.suppress(OSError):
                    send({"event": "upgraded", "report": report.to_dict()})

            try:
                report = self.upgrade(timeout, progress=say, announce=done)
            except LiveError as err:
                send({"event": "failed", "error": one_line(err), "report": None})
                return
            if not report.ok:
                error = UpgradeFailed(str(report.reason), reason=report.reason)
                send({"event": "failed", "error": one_line(error), "report": report.to_dict()})
        else:
            raise LiveError(f"unknown command {cmd!r} (status, upgrade)")

    def _install_sighup(self, wanted: bool) -> None:
        if not wanted or threading.current_thread() is not threading.main_thread():
            return
        self._previous_hup = signal.signal(signal.SIGHUP, self._on_sighup)

    def _on_sighup(self, signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=self._upgrade_logged, name="pageflip-live-sighup").start()

    def _upgrade_logged(self) -> None:
        try:
            report = self.upgrade()
        except LiveError as err:
            log.warning("SIGHUP: no upgrade: %s", err)
            return
        except Exception:
            log.exception("SIGHUP: the upgrade failed")
            return
        if report.ok:
            log.info("SIGHUP: upgraded to pid %s", report.new_pid)
        else:
            log.warning("SIGHUP: the upgrade was rolled back: %s", report.reason)

    # -- lifetime -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("the upgrader is closed", what="upgrader")

    def _release(self, *, handed_over: bool) -> None:
        """Close every fd and mapping of ours (after a handover: leave the socket files,
        which are the new version's now)."""
        if self._control_server is not None:
            self._control_server.stop()
            self._control_server = None
        elif self._control_sock is not None:
            self._control_sock.close()
        self._control_sock = None
        control_file, self._control_file = self._control_file, None
        if control_file is not None and not handed_over:
            unlink_if(*control_file)
        for held in self._listeners.values():
            for sock in held.sockets:
                sock.close()
            os.close(held.fd)
            if held.path is not None and not handed_over:
                unlink_if(held.path, held.inode)
        self._listeners.clear()
        for name, kept in list(self._regions.items()):
            try:
                kept.region.close()
            except BufferInUse as err:
                log.info("region %r stays mapped until its views are gone: %s", name, err)
            os.close(kept.fd)
        self._regions.clear()
        close_all(list(self._systemd.values()))
        self._systemd.clear()

    def close(self) -> None:
        """Close every region, listener and socket of ours; remove our socket files (not
        those handed to a new version). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._offer is not None:
            self._tell_failure("the new version closed its Upgrader before ready()")
            self._offer.close()
            atexit.unregister(self._at_exit)
            if sys.excepthook == self._excepthook:
                sys.excepthook = self._previous_hook
        if self._stderr_fd is not None:
            os.close(self._stderr_fd)
            self._stderr_fd = None
        self._release(handed_over=self._handed_over)
        if self._previous_hup is not None:
            with contextlib.suppress(ValueError):
                signal.signal(signal.SIGHUP, self._previous_hup)
            self._previous_hup = None

    def __enter__(self) -> Upgrader:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: object
    ) -> None:
        if err is not None:
            self._tell_failure(one_line(err))
        self.close()


def _rollback(reason: str) -> UpgradeFailed:
    """The upgrade cannot go on: end the new version, serve on (``reason`` says why)."""
    return UpgradeFailed(reason, reason=reason)


class _StderrTail:
    """Copy the new version's stderr (a pipe) to ours, keeping its last lines."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self.lines: deque[str] = deque(maxlen=STDERR_LINES)
        self._partial = b""
        self._thread = threading.Thread(target=self._run, name="pageflip-live-stderr", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while chunk := os.read(self._fd, 65536):
                with contextlib.suppress(OSError):
                    os.write(2, chunk)
                text = self._partial + chunk
                *done, self._partial = text.split(b"\n")
                self.lines.extend(line.decode(errors="replace") for line in done if line)
        except OSError:
            pass
        finally:
            os.close(self._fd)

    def wait(self, timeout: float) -> list[str]:
        self._thread.join(timeout)
        tail = list(self.lines)
        if self._partial:
            tail.append(self._partial.decode(errors="replace"))
        return tail[-STDERR_LINES:]


class _Handover:
    """One upgrade, on the old version's side."""

    def __init__(
        self,
        up: Upgrader,
        timeout: float,
        say: Callable[[str], None],
        announce: Callable[[UpgradeReport], None] | None,
    ) -> None:
        self.up = up
        self.announce = announce
        self._control_taken = False
        self.timeout = timeout
        self.say = say
        self.start = time.monotonic()
        self._thread = threading.current_thread()
        self.deadline = self.start + timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.link: Endpoint | None = None
        self.tail: _StderrTail | None = None
        self.stopped_at: float | None = None
        self.accepting_at: float | None = None
        self._stop_lock = threading.Lock()
        self._stop_told = False
        self._stop_failed = False
        self.report = UpgradeReport(ok=False, generation=up.generation + 1, old_pid=os.getpid())

    def run(self) -> UpgradeReport:
        try:
            self._spawn()
            self._offer()
            self._wait_take()
            self._wait_ready()
        except UpgradeFailed as why:
            self._roll_back(str(why))
            return self.report
        except BaseException as err:
            self._roll_back(one_line(err))
            if not isinstance(err, Exception):
                raise
            return self.report
        self._finish()
        return self.report

    def _spawn(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        err_r, err_w = os.pipe()
        stderr_copy = os.dup(2)
        env = dict(os.environ)
        env[HANDOVER_ENV] = str(theirs.fileno())
        env[STDERR_ENV] = str(stderr_copy)
        try:
            self.link = open_pager_link(ours)
            self.process = subprocess.Popen(
                self.up._argv,
                cwd=self.up._cwd,
                env=env,
                pass_fds=(theirs.fileno(), stderr_copy),
                stderr=err_w,
                start_new_session=True,
            )
        except OSError as err:
            os.close(err_r)
            if self.link is None:
                ours.close()
            raise _rollback(f"cannot start the new version: {one_line(err)}") from None
        finally:
            theirs.close()
            os.close(err_w)
            os.close(stderr_copy)
        self.tail = _StderrTail(err_r)
        self.report.new_pid = self.process.pid
        self.up._set_upgrading_pid(self.process.pid)
        self.say(f"started the new version: pid {self.process.pid}")

    def _offer(self) -> None:
        up = self.up
        regions = [{"name": n, "size": h.size} for n, h in up._regions.items()]
        listeners = [
            {"name": n, "address": h.address, "asked": h.asked, "path": h.path, "inode": h.inode}
            for n, h in up._listeners.items()
        ]
        fds = [h.fd for h in up._regions.values()] + [h.fd for h in up._listeners.values()]
        offer: dict[str, Any] = {
            "generation": up.generation + 1,
            "parent": os.getpid(),
            "regions": regions,
            "listeners": listeners,
            "control": None,
        }
        if up._control_sock is not None and up.control is not None and up._control_file:
            offer["control"] = {"path": up.control, "inode": up._control_file[1]}
            fds.append(up._control_sock.fileno())
        assert self.link is not None
        try:
            send_note(self.link, {"offer": offer}, fds)
        except PeerClosed:
            raise _rollback(self._why_gone("before it took the offer")) from None
        self.report.regions = [
            {"name": r["name"], "bytes": r["size"], "moved": True} for r in regions
        ]
        self.report.listeners = [{"name": i["name"], "address": i["address"]} for i in listeners]
        self.say(
            f"offered {len(regions)} region(s) "
            f"({sum(int(r['bytes']) for r in self.report.regions)} bytes) and "
            f"{len(listeners)} listener(s)"
        )

    def _next(self, waiting_for: str) -> dict[str, Any]:
        assert self.link is not None
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise _rollback(f"the new version did not {waiting_for} within {self.timeout:g} s")
        try:
            message, fds = recv_note(self.link, left)
        except PeerTimeout:
            raise _rollback(
                f"the new version did not {waiting_for} within {self.timeout:g} s"
            ) from None
        except PeerClosed:
            raise _rollback(self._why_gone(f"before it could {waiting_for}")) from None
        close_all(fds)
        if "error" in message:
            raise _rollback(f"the new version failed: {message['error']}")
        return message

    def _why_gone(self, when: str) -> str:
        assert self.process is not None
        try:
            status = self.process.wait(2.0)
        except subprocess.TimeoutExpired:
            return f"the new version closed its handover socket {when}"
        if status < 0:
            return f"the new version was killed by {signal.Signals(-status).name} {when}"
        return f"the new version exited with status {status} {when}"

    def _wait_take(self) -> None:
        message = self._next("take over")
        if "take" not in message:
            raise _rollback(f"the new version sent {sorted(message)}, expected take")
        up = self.up
        tell = bool(message.get("tell_stopped"))
        self.say("the new version takes over: stopping this one")
        called = self.stopped_at = time.monotonic()
        if up._on_stop_accepting is not None:
            try:
                up._on_stop_accepting(lambda: self._stopped(tell))
            except Exception as err:
                raise _rollback(f"on_stop_accepting failed: {one_line(err)}") from None
            self._stopped(tell, at=called)
        state: bytes | None = None
        if up._on_stop is not None:
            try:
                state = up._on_stop(self.deadline)
            except Exception as err:
                raise _rollback(f"on_stop failed: {one_line(err)}") from None
        if state is not None and not isinstance(state, (bytes, bytearray, memoryview)):
            raise _rollback(f"on_stop returned {type(state).__name__}, not bytes or None")
        self._stopped(tell, at=called)
        fds: list[int] = []
        try:
            if state is not None:
                blob = bytes(state)
                if len(blob) > up.state_limit:
                    raise _rollback(
                        f"the state blob is {len(blob)} bytes, over the limit of "
                        f"{up.state_limit} bytes (state_limit)"
                    )
                fd = mm.memfd_create("pageflip:live-state")
                fds.append(fd)
                view = memoryview(blob)
                while view:
                    view = view[os.write(fd, view) :]
                self.report.state_bytes = len(blob)
            assert self.link is not None
            send_note(self.link, {"state": None if state is None else len(bytes(state))}, fds)
        except PeerClosed:
            raise _rollback(self._why_gone("before it took the state")) from None
        finally:
            close_all(fds)

    def _stopped(self, tell: bool, at: float | None = None) -> None:
        """Nothing here accepts any more (since ``at``, else now): the service's pause
        starts; if ``tell``, the new version hears it (it accepts then). Once; from any
        thread (the service's loop, through on_stop_accepting's ``stopped``), while the
        upgrade's thread waits for on_stop_accepting: the link is not used meanwhile."""
        with self._stop_lock:
            if not self._stop_told:
                self._stop_told = True
                self.stopped_at = time.monotonic() if at is None else at
                if tell and self.link is not None:
                    try:
                        send_note(self.link, {"stopped": True})
                    except (PageflipError, OSError):
                        self._stop_failed = True
        if self._stop_failed and threading.current_thread() is self._thread:
            raise _rollback(self._why_gone("before it heard that this one stopped")) from None

    def _wait_ready(self) -> None:
        message = self._next("become ready")
        if "accepting" in message and self.stopped_at is not None:
            # The new version's own stamp (CLOCK_MONOTONIC is the machine's), kept within
            # what we saw: after we stopped, before we heard it.
            said = float(message["accepting"])
            self.accepting_at = min(max(said, self.stopped_at), time.monotonic())
            message = self._next("become ready")
        if "ready" not in message:
            raise _rollback(f"the new version sent {sorted(message)}, expected ready")
        self._control_taken = bool(message.get("control"))

    def _finish(self) -> None:
        up = self.up
        now = time.monotonic()
        self.report.ok = True
        if self.stopped_at is not None:
            self.report.pause = (self.accepting_at or now) - self.stopped_at
        self.say(f"the new version (pid {self.report.new_pid}) serves")
        up._handed_over = True
        self.report.total = now - self.start
        if self.announce is not None:
            self.announce(self.report)
        if not self._control_taken and up._control_file is not None:
            unlink_if(*up._control_file)  # the new version serves no control socket there
        if up._on_exit is not None:
            try:
                up._on_exit()
            except Exception:
                log.exception("on_exit failed")
        # Ours to close now: the new version holds every fd (it said ready).
        up._release(handed_over=True)
        if self.link is not None:
            self.link.close()
        if self.tail is not None:
            self.tail.wait(1.0)
        log.info("upgraded to generation %d, pid %s", self.report.generation, self.report.new_pid)

    def _roll_back(self, reason: str) -> None:
        self.report.ok = False
        self.report.reason = reason
        log.warning("the upgrade is rolled back: %s", reason)
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        if self.link is not None:
            self.link.close()
        if self.tail is not None:
            self.report.stderr = self.tail.wait(5.0)
        if self.stopped_at is not None and self.up._on_resume is not None:
            try:
                self.up._on_resume()
            except Exception:
                log.exception("on_resume failed")
        self.say(f"rolled back: {reason}")
        self.report.total = time.monotonic() - self.start


class ServiceClient(ControlClient):
    """Talk to the control socket of a live service (an :class:`Upgrader` with
    ``control=``): ``pageflip upgrade`` is one."""

    what = "live service"
    hint = "start the service with Upgrader(control=...) at {path}, or give --control"

    def status(self) -> dict[str, Any]:
        """The service's pid, generation, and whether it serves or upgrades now."""
        answer = self.request("status")
        if "generation" not in answer:
            raise LocalProtocolError(
                f"{self.path} is a guest's control socket, not a live service's: a guest "
                "moves with pageflip migrate, a VM's process with pageflip vm upgrade"
            )
        return answer

    def upgrade(self, timeout: float) -> Iterator[dict[str, Any]]:
        """Start an upgrade that waits at most ``timeout`` seconds for the new version to
        be ready; yields its progress events, the last one "upgraded" or "failed"."""
        self.status()
        return self.events(
            "upgrade",
            ("upgraded", "failed"),
            gone=f"the live service at {self.path} went away (killed?) during the upgrade",
            timeout=timeout,
        )
