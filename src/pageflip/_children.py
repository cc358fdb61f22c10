"""Helper processes of the demos and benchmarks: how they start, fail and end.

A child is a ``spawn`` process that talks to its parent over a ``multiprocessing`` pipe.
The child ignores Ctrl-C (the parent stops it) and turns SIGTERM into ``SystemExit``, so its
``finally`` blocks still close regions and unlink shared memory. The parent ends a child with
:func:`end_process`: ask it to quit, then terminate, then kill, and always close the handles.
"""

from __future__ import annotations

import contextlib
import pickle
import signal
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

__all__ = ["end_process", "picklable", "stop_on_signals"]


def stop_on_signals() -> None:
    """In a child: leave Ctrl-C to the parent (which stops us), and let SIGTERM unwind
    (``finally`` blocks close regions and unlink shared memory) instead of killing outright."""

    def exit_now(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, exit_now)


def picklable(err: BaseException) -> BaseException | None:
    """``err`` if it survives the pipe to the parent, else None (the traceback text still does)."""
    try:
        pickle.loads(pickle.dumps(err))
    except Exception:
        return None
    return err


def end_process(process: BaseProcess, conn: Connection, wait: float) -> None:
    """Send ``("quit",)``, give the process ``wait`` seconds, then SIGTERM, then SIGKILL; close
    the pipe and the process handle. Idempotent."""
    try:
        running = process.exitcode is None
    except ValueError:  # the handle is closed: an earlier call ended it
        return
    if running:
        with contextlib.suppress(OSError, ValueError):
            conn.send(("quit",))
        process.join(wait)
        if process.exitcode is None:
            process.terminate()
            process.join(5)
        if process.exitcode is None:
            process.kill()
            process.join()
    conn.close()
    process.close()
