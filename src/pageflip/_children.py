"""Helper processes of the demos and benchmarks: how they start, fail and end.

A child is a ``spawn`` process that talks to its parent over a ``multiprocessing`` pipe.
The child ignores Ctrl-C (the parent stops it) and turns SIGTERM into ``SystemExit``, so its
``finally`` blocks still close regions and unlink shared memory. The parent ends a child with
:func:`end_process`: ask it to quit, then terminate, then kill, and always close the handles.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnContext, SpawnProcess
from multiprocessing.process import BaseProcess
from typing import Any, NoReturn

from .errors import PageflipError

__all__ = ["Child", "end_process", "picklable", "raise_failure", "serve", "stop_on_signals"]


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


def serve(ctrl: Connection, handle: Callable[..., Any], reply: str = "ok") -> None:
    """In a child: say ``("ready", pid)``, then answer each command ``(name, *args)`` with
    ``(reply, handle(name, *args))``, or ``("error", err, traceback)`` when it raises, until
    the parent says ``("quit",)`` or is gone."""
    ctrl.send(("ready", os.getpid()))
    while True:
        try:
            command, *args = ctrl.recv()
        except EOFError:
            return  # the parent is gone
        if command == "quit":
            return
        try:
            result = handle(command, *args)
        except Exception as err:
            ctrl.send(("error", picklable(err), traceback.format_exc()))
            continue
        ctrl.send((reply, result))


def raise_failure(message: tuple[Any, ...], error: type[PageflipError], who: str) -> NoReturn:
    """In the parent: raise what a child's ``("error", err, traceback)`` reports, the
    pageflip error itself when it came through, else ``error`` naming the child's error on
    one line, with the child's traceback as a note (shown with a traceback, not by the CLI)."""
    _, err, text = message
    if isinstance(err, PageflipError):
        raise err
    if err is not None:
        what = " ".join(f"{type(err).__name__}: {err}".split())
    else:  # it did not pickle: the last line of the traceback names it
        lines = [line.strip() for line in str(text).splitlines() if line.strip()]
        what = lines[-1] if lines else "no traceback"
    failure = error(f"the {who} failed: {what}")
    failure.add_note(f"the {who}'s traceback:\n{text}")
    raise failure


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


class Child:
    """The parent's handle on one child: a ``spawn`` process and the pipe to it.

    ``target`` gets its end of the pipe first, then ``args``. ``role`` names the child in
    errors ("the receiver died"). :meth:`stop` ends it (see :func:`end_process`).
    """

    def __init__(
        self,
        ctx: SpawnContext,
        target: Callable[..., None],
        args: tuple[Any, ...],
        *,
        role: str,
        name: str,
        daemon: bool = True,
    ) -> None:
        self.role = role
        self.conn, child = ctx.Pipe()
        self.process: SpawnProcess = ctx.Process(
            target=target, args=(child, *args), name=name, daemon=daemon
        )
        try:
            self.process.start()
        finally:
            child.close()

    def send(self, *message: Any) -> None:
        self.conn.send(message)

    def stop(self, wait: float = 10.0) -> None:
        """Ask the child to quit; end it if it has not within ``wait`` seconds. Idempotent."""
        end_process(self.process, self.conn, wait)
