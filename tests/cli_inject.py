"""Run the real ``pageflip`` command with a failure injected at a named point.

``python tests/cli_inject.py ARGS...`` with ``PAGEFLIP_TEST_FAULTS=name[,name...]`` in the
environment: the faults are installed by patching the engine in this process (the
workload's, or incoming's), then ``pageflip.cli.main(ARGS)`` runs as the console script
would. Each fault really happens: a process stops (SIGSTOP) or dies (SIGKILL) at that
point, a socket is shut down in the kernel, or a call raises.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from pageflip import stream
from pageflip.channel import Endpoint as Link
from pageflip.guests import BadGuestState, Workload
from pageflip.migration.destination import Destination
from pageflip.migration.source import Source


def _stop_self() -> None:
    os.kill(os.getpid(), signal.SIGSTOP)


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _before(cls: type[Any], name: str, action: Callable[[Any], None]) -> None:
    """Run ``action(self)`` at the start of ``cls.name``, then the method itself."""
    original = getattr(cls, name)

    def patched(self: Any, *args: Any, **kwargs: Any) -> Any:
        action(self)
        return original(self, *args, **kwargs)

    setattr(cls, name, patched)


def _after(cls: type[Any], name: str, action: Callable[[Any], None]) -> None:
    """Run ``cls.name``, then ``action(self)``."""
    original = getattr(cls, name)

    def patched(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        action(self)
        return result

    setattr(cls, name, patched)


def _kill_child(child: Any, role: str | None = None) -> None:
    """SIGKILL a demo's or a benchmark's helper process (of ``role``) just after it started."""
    if role is None or child.role == role:
        os.kill(child.process.pid, signal.SIGKILL)


def _demo_receiver_dies() -> None:
    from pageflip import demo

    _after(demo._Child, "__init__", _kill_child)


def _bench_receiver_dies() -> None:
    from pageflip.bench import handoff

    _after(handoff._Worker, "__init__", lambda w: _kill_child(w, "receiver"))


def _verify_fails(self: Workload, *args: Any, **kwargs: Any) -> Any:
    raise BadGuestState("injected: the journal cannot be read", kind="workload", field="journal")


def _after(cls: type[Any], name: str, action: Callable[[Any], None]) -> None:
    """Run ``cls.name``, then ``action(self)``."""
    original = getattr(cls, name)

    def patched(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        action(self)
        return result

    setattr(cls, name, patched)


def _restore_fails(cls: type[Workload], regions: Any, state: bytes) -> Workload:
    raise BadGuestState("injected: the state cannot be loaded", kind="workload", field="state")


def _finish_restore_fails(self: Workload, state: bytes) -> None:
    raise BadGuestState(
        "injected: the final state cannot be loaded", kind="workload", field="state"
    )


def _resume_fails_after_restore(self: Workload) -> float:
    raise RuntimeError("injected: resuming failed")


def _kill_after_commit(self: Link, event: Any, phase: str) -> int:
    sent = _send(self, event, phase)
    if isinstance(event, stream.Commit):
        _kill_self()
    return sent


def _cut(self: Source) -> None:
    """Shut the connection down in the kernel: both processes live, the link is gone."""
    self.link.conn.sock.shutdown(socket.SHUT_RDWR)


def _pager_worker(self: Destination) -> int:
    """The pid of the pager's worker (the pager process's one child)."""
    assert self._pager_proc is not None
    pid = self._pager_proc.pid
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        (child,) = f.read().split()
    return int(child)


def _stop_worker(self: Destination, *args: Any) -> None:
    """Stop the pager's worker before it hears "go": it pulls no page, so that what happens
    to it later is not hidden by a worker that finished first."""
    os.kill(_pager_worker(self), signal.SIGSTOP)


def _stop_then_kill_worker(self: Destination, *args: Any) -> None:
    """Stop the worker before "go", kill it a second later from another process: by then
    the guest runs, and a guest thread may be faulting on a missing page holding the GIL."""
    worker = _pager_worker(self)
    os.kill(worker, signal.SIGSTOP)
    subprocess.Popen(["sh", "-c", f"sleep 1; kill -9 {worker}"])


def _stop_at_round_end(self: Link, event: Any, phase: str) -> int:
    if isinstance(event, stream.RoundAck):
        _stop_self()
    return _send(self, event, phase)


def _kill_at_round_end(self: Link, event: Any, phase: str) -> int:
    if isinstance(event, stream.RoundAck):
        _kill_self()
    return _send(self, event, phase)


_send = Link.send
_resume = Workload.resume


def _resume_unless_restored(self: Workload) -> float:
    if self.migrations > 0:
        return _resume_fails_after_restore(self)
    return _resume(self)


FAULTS: dict[str, Callable[[], None]] = {
    # the destination (pageflip incoming)
    "dest-restore-fails": lambda: setattr(Workload, "restore", classmethod(_restore_fails)),
    # a flip restores ahead (PREVIEW) at setup: inside its pause it only finishes
    "dest-finish-restore-fails": lambda: setattr(Workload, "finish_restore", _finish_restore_fails),
    "dest-resume-fails": lambda: setattr(Workload, "resume", _resume_unless_restored),
    # After WELCOME: the source knows it speaks to a pageflip destination, then waits.
    "dest-stop-in-setup": lambda: _after(Destination, "_welcome", lambda s: _stop_self()),
    "dest-stop-at-round-end": lambda: setattr(Link, "send", _stop_at_round_end),
    "dest-stop-before-prepared": lambda: _before(
        Destination, "_verify_and_prepare", lambda s: _stop_self()
    ),
    # kill -9 of the destination in each phase before PREPARED
    "dest-kill-in-setup": lambda: _after(Destination, "_welcome", lambda s: _kill_self()),
    "dest-kill-at-round-end": lambda: setattr(Link, "send", _kill_at_round_end),
    "dest-kill-before-prepared": lambda: _before(
        Destination, "_verify_and_prepare", lambda s: _kill_self()
    ),
    "dest-kill-after-commit": lambda: _before(Destination, "_resume", lambda s: _kill_self()),
    "dest-kill-pager-worker": lambda: _before(
        Destination, "_verify_and_prepare", _stop_then_kill_worker
    ),
    "dest-hang-pager-worker": lambda: _before(Destination, "_verify_and_prepare", _stop_worker),
    # the source (pageflip workload)
    "src-stop-before-prepared": lambda: _before(Source, "_await_prepared", lambda s: _stop_self()),
    "src-stop-after-commit": lambda: _before(Source, "_finish", lambda s: _stop_self()),
    "src-kill-after-commit": lambda: setattr(Link, "send", _kill_after_commit),
    "src-cut-in-postcopy": lambda: _before(Source, "_postcopy_finish", _cut),
    "src-verify-fails": lambda: setattr(Workload, "verify", _verify_fails),
    # the demo and the benchmarks: a helper process dies as it starts
    "demo-receiver-dies": _demo_receiver_dies,
    "bench-receiver-dies": _bench_receiver_dies,
}


def main() -> None:
    for name in filter(None, os.environ.get("PAGEFLIP_TEST_FAULTS", "").split(",")):
        FAULTS[name]()
    from pageflip.cli import main as pageflip

    sys.exit(pageflip(sys.argv[1:], prog_name="pageflip"))


if __name__ == "__main__":
    main()
