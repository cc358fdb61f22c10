"""What systemd gives a service and wants from it: sockets it bound for us (LISTEN_FDS,
LISTEN_PID, LISTEN_FDNAMES, from fd 3 on) and the notify socket (NOTIFY_SOCKET)."""

from __future__ import annotations

import contextlib
import logging
import os
import socket

from ..transport import socket_address

log = logging.getLogger("pageflip.live")

#: The first fd systemd passes (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3
_LISTEN_VARS = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


def listen_fds() -> dict[str, int]:
    """The sockets systemd passed to this process, by name (LISTEN_FDNAMES), when
    LISTEN_PID is our pid. The variables are removed either way once they are ours, so that
    no process we start takes them for its own; the fds stop being inherited."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return {}
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        count = 0
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    for name in _LISTEN_VARS:
        os.environ.pop(name, None)
    found: dict[str, int] = {}
    for i in range(count):
        fd = LISTEN_FDS_START + i
        with contextlib.suppress(OSError):
            os.set_inheritable(fd, False)
        if i < len(names) and names[i]:
            found[names[i]] = fd
    return found


def notify(message: str) -> bool:
    """Send ``message`` to systemd's notify socket (NOTIFY_SOCKET), if there is one; True if
    it was sent. A notify socket that cannot be reached is logged, never raised."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    address = socket_address(path)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), address)
    except OSError as err:
        log.warning("cannot notify systemd at %s: %s", path, err)
        return False
    return True
