"""A migration's own thread must not wait for the guest's threads to let go of the GIL.

A thread that comes back from a blocking call (a socket read, a syscall) needs the GIL, and a
guest thread running Python code keeps it for up to ``sys.getswitchinterval()`` (5 ms by
default) before it must hand it over. A flip exchanges a handful of messages before and after
the pause, so each wait shows in its total time: 3 ms without writer threads, 8-19 ms with two
of them at 4 GiB in ``pageflip bench migrate``. While a migration runs, the interval is
lowered to :data:`SWITCH_INTERVAL` and put back afterwards.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator

__all__ = ["SWITCH_INTERVAL", "responsive"]

#: The GIL switch interval while a migration runs (seconds).
SWITCH_INTERVAL = 0.0002

_lock = threading.Lock()
_users = 0
_saved = 0.0


@contextlib.contextmanager
def responsive() -> Iterator[None]:
    """Lower the GIL switch interval (never raise it) for the duration; nests and is
    thread-safe: the last one out restores the interval the first one in found."""
    global _users, _saved
    with _lock:
        if _users == 0:
            _saved = sys.getswitchinterval()
            sys.setswitchinterval(min(_saved, SWITCH_INTERVAL))
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                sys.setswitchinterval(_saved)
