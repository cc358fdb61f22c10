"""The example service's processes: start one, wait until it serves, drain or stop it, and
find every process of a run (an upgrade starts some that are not our children)."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, TypedDict

from ..._sys.procfs import proc, procfs_path
from ...errors import BenchmarkError

__all__ = ["Serving", "ServiceProcess", "default_app", "kill_tagged", "tagged_pids"]


class Serving(TypedDict):
    """The service's ``{"event": "serving", ...}`` line."""

    event: str
    port: int
    pid: int
    generation: int


def default_app() -> Path:
    """examples/live_service/app.py of the source tree this package runs from."""
    return Path(__file__).resolve().parents[4] / "examples" / "live_service" / "app.py"


class ServiceProcess:
    """One ``app.py`` process; its stdout lines are read by a thread."""

    def __init__(self, app: Path, args: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(app), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, True), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, False), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: IO[str], out: bool) -> None:
        for line in stream:
            if out:
                self.lines.put(line)
            else:
                self.stderr.append(line.rstrip())
        if out:
            self.lines.put(None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def serving(self, timeout: float) -> Serving:
        """The next serving line (BenchmarkError if the process ends or stays silent)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise BenchmarkError(f"the service did not serve within {timeout:g} s") from None
            if line is None:
                self.proc.wait()
                tail = " | ".join(self.stderr[-3:])
                raise BenchmarkError(
                    f"the service exited ({self.proc.returncode}) before serving: {tail}"
                )
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict) and event.get("event") == "serving":
                    return Serving(
                        event="serving",
                        port=int(event["port"]),
                        pid=int(event["pid"]),
                        generation=int(event["generation"]),
                    )

    def drain(self, timeout: float) -> None:
        """SIGHUP (the no-live service drains, then exits) and wait for it to exit."""
        self.proc.send_signal(signal.SIGHUP)
        self.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``. Idempotent."""
        if self.proc.poll() is None:
            self.proc.terminate()
        self.wait(timeout)

    def wait(self, timeout: float) -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        # A successor started by this process (pageflip.live) keeps its stdout and stderr:
        # then the pipes stay open and a reader stays blocked in them, holding the stream's
        # lock; such a stream is left to its (daemon) reader, which ends with the successor.
        streams = (self.proc.stdout, self.proc.stderr)
        for reader, stream in zip(self._readers, streams, strict=True):
            reader.join(timeout=1.0)
            if stream is not None and not reader.is_alive():
                stream.close()


def tagged_pids(tag: str) -> list[int]:
    """Every live process whose command line contains ``tag`` (a run's own directory)."""
    found = []
    needle = tag.encode()
    for name in os.listdir(procfs_path()):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(proc(name, "cmdline"), "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if needle in cmdline and cmdline:
            found.append(int(name))
    return found


def kill_tagged(tag: str) -> list[int]:
    """SIGKILL every process of the run still alive (ones an upgrade started)."""
    pids = tagged_pids(tag)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids
