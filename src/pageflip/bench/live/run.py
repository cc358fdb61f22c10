"""A whole ``pageflip bench live`` run: its configuration, its directory, its sides."""

from __future__ import annotations

import datetime
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from ...errors import BadArgument, BenchmarkError
from ..common import finite, machine
from . import wrk as wrk_driver
from .load import RETRY_PAUSE
from .memory import PEAK
from .records import LiveResult
from .service import default_app
from .sides import Bench
from .upgrades import live_side

__all__ = ["LiveConfig", "run"]

LOADS = ("python", "wrk")


@dataclass(frozen=True)
class LiveConfig:
    """What to run; a bad value raises BadArgument."""

    index_size: int
    upgrades: int = 20
    rollbacks: int = 5
    duration: float = 5.0
    connections: int = 16
    load: str = "python"
    app: Path | None = None

    def __post_init__(self) -> None:
        if self.index_size < 1 << 20:
            raise BadArgument("the index must be at least 1M", argument="index_size")
        if self.upgrades < 0 or self.rollbacks < 0 or self.connections < 1:
            raise BadArgument("upgrades and rollbacks >= 0, connections >= 1")
        if self.load not in LOADS:
            raise BadArgument(f"--load is one of {', '.join(LOADS)}", argument="load")
        if self.load == "wrk" and wrk_driver.available() is None:
            raise BadArgument("wrk is not installed (make wrk), use --load python")
        if not self.app_path.is_file():
            raise BadArgument(f"no service at {self.app_path}: give --app", argument="app")

    @property
    def app_path(self) -> Path:
        return self.app or default_app()


NOTES = {
    "clock": "time: plain restart, from SIGTERM to the old until the new one serves; overlap, "
    "from starting the new one until the old one has exited; pageflip live, each "
    "`pageflip upgrade` command from start to exit (a new interpreter included)",
    "failures": "refused or reset connections, end of stream before or inside a response, "
    f"timeouts, non-2xx; a failed connection retries after {RETRY_PAUSE * 1e3:g} ms, so a "
    "restart's count grows with its outage; Connection: close is not a failure",
    "latency": "worst: the longest request that overlapped the action; steady p99: the "
    "requests before it; longest gap: the longest time in the action without a response",
    "search": "each request searches its row's partition (4096 rows, 1 MiB) by dot product",
    "peak": PEAK.format(interval=0.05),
}


def run(config: LiveConfig, say: Callable[[str], None], command: str = "") -> LiveResult:
    """Every side in one run (the index saved once); every process and file removed after."""
    started = datetime.datetime.now().astimezone()
    with tempfile.TemporaryDirectory(prefix="pageflip-bench-live-") as tmp:
        bench = Bench(
            app=config.app_path,
            tag=Path(tmp),
            index_size=config.index_size,
            duration=config.duration,
            connections=config.connections,
            load=config.load,
            say=say,
        )
        try:
            bench.save_index()
            sides = [bench.restart(), bench.overlap()]
            sides.append(live_side(bench, config.upgrades, config.rollbacks))
        except BenchmarkError:
            raise
        finally:
            bench.cleanup()
    result: LiveResult = {
        "benchmark": "live",
        "date": started.isoformat(timespec="seconds"),
        "machine": machine(),
        "command": command,
        "config": {
            "index_size": config.index_size,
            "upgrades": config.upgrades,
            "rollbacks": config.rollbacks,
            "duration": config.duration,
            "connections": config.connections,
            "load": config.load,
        },
        "notes": NOTES,
        "sides": sides,
    }
    return cast(LiveResult, finite(result))
