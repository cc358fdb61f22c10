"""The three ways to replace the service under load, each measured the same way: load for
``duration`` seconds (steady state), the action, a short tail, then the summary."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import BenchmarkError
from ..common import now
from . import wrk as wrk_driver
from .load import Load
from .memory import MemoryWatch
from .records import SideRecord
from .service import ServiceProcess, kill_tagged
from .traffic import summary

__all__ = ["Bench", "live_available"]

#: Longest wait for a service to serve (a 4 GiB index takes a few seconds to build or load).
START_TIMEOUT = 300.0
TAIL = 1.0


def live_available() -> str | None:
    """None if pageflip.live can be imported, else why not."""
    try:
        import pageflip.live  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
    except ImportError as err:
        return f"pageflip.live is not available here ({err})"
    return None


@dataclass
class Bench:
    """What every side shares: the app, the run's directory (its tag), the options."""

    app: Path
    tag: Path
    index_size: int
    duration: float
    connections: int
    load: str
    say: Callable[[str], None]
    procs: list[ServiceProcess] = field(default_factory=list)

    @property
    def index_file(self) -> Path:
        return self.tag / "index.npy"

    @property
    def rows(self) -> int:
        return max(1, self.index_size // 256)

    def start(self, *args: str, env: dict[str, str] | None = None) -> ServiceProcess:
        """An app.py process (stopped by :meth:`cleanup` whatever happens)."""
        service = ServiceProcess(self.app, [*args, "--tag", str(self.tag)], env)
        self.procs.append(service)
        return service

    def save_index(self) -> None:
        self.say(f"writing the index ({self.index_size >> 20} MiB) to {self.index_file}")
        args = ["--save-index", str(self.index_file), "--index-size", str(self.index_size)]
        self.start(*args).wait(START_TIMEOUT)
        if not self.index_file.exists():
            raise BenchmarkError("app.py --save-index wrote no index")

    def cleanup(self) -> None:
        for service in self.procs:
            service.stop(timeout=5.0)
        kill_tagged(str(self.tag))

    def measure(self, side: str, port: int, action: Callable[[], dict[str, Any]]) -> SideRecord:
        """Load on ``port``: steady state, then ``action()`` (its times, pauses, reports)."""
        load = Load(port, self.connections, self.rows)
        wrk_proc = None
        if self.load == "wrk":
            wrk_proc = wrk_driver.start(port, 3600, self.connections)
        else:
            load.start()
        watch = MemoryWatch(str(self.tag))
        one_copy = 0
        try:
            self.say(f"{side}: {self.duration:g} s of steady load")
            time.sleep(self.duration)
            one_copy = watch.total()
            watch.start()
            begin = now()
            done = action()
            end = now()
            time.sleep(TAIL)
        finally:
            load.stop()
            memory = watch.stop(one_copy)
            wrk_result = wrk_driver.finish(wrk_proc, 0) if wrk_proc is not None else None
        if load.error is not None:
            raise BenchmarkError(f"the load generator failed: {load.error!r}")
        return {
            "side": side,
            "available": True,
            "reason": None,
            "times": done.get("times", []),
            "pauses": done.get("pauses", []),
            "rollbacks_ok": done.get("rollbacks_ok"),
            "traffic": summary(load.requests, load.failures, (begin, end), wrk_result),
            "memory": memory,
            "reports": done.get("reports", []),
        }

    def _plain(self, *extra: str, port: int = 0) -> list[str]:
        return ["--no-live", "--index-file", str(self.index_file), "--port", str(port), *extra]

    def restart(self) -> SideRecord:
        """Plain restart: SIGTERM the old, start the new (np.load from disk), until it serves."""
        old = self.start(*self._plain())
        port = old.serving(START_TIMEOUT)["port"]

        def action() -> dict[str, Any]:
            self.say("restart: stopping the old process, starting the new one")
            begin = now()
            old.stop()
            new = self.start(*self._plain(port=port))
            new.serving(START_TIMEOUT)
            return {"times": [now() - begin]}

        try:
            return self.measure("plain restart", port, action)
        finally:
            self.cleanup_services()

    def overlap(self) -> SideRecord:
        """Overlap restart: the new loads its own copy beside the old (SO_REUSEPORT), then
        the old drains (Connection: close) and exits."""
        old = self.start(*self._plain("--reuseport"))
        port = old.serving(START_TIMEOUT)["port"]

        def action() -> dict[str, Any]:
            self.say("overlap: starting the new process beside the old one")
            begin = now()
            new = self.start(*self._plain("--reuseport", port=port))
            new.serving(START_TIMEOUT)
            old.drain(timeout=30.0)
            return {"times": [now() - begin]}

        try:
            return self.measure("overlap restart", port, action)
        finally:
            self.cleanup_services()

    def cleanup_services(self) -> None:
        kill_tagged(str(self.tag))  # every generation, also those started by an upgrade
        for service in self.procs:
            service.stop(timeout=5.0)
        self.procs.clear()
