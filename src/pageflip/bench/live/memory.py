"""The memory of every process of the service (the ones found by the run's tag), from a
thread: the Pss of one copy before an action, the peak of the sum during it."""

from __future__ import annotations

import threading
import time

from ..migrate.sampling import PSS_SHARE, pss_of
from .records import MemoryRecord
from .service import tagged_pids

__all__ = ["PEAK", "MemoryWatch"]

PEAK = (
    "Pss (/proc/PID/smaps_rollup: pages shared by two processes counted once) summed over "
    "every process whose command line holds the run's directory (old, new, and any the "
    "upgrade started), sampled every {interval:g} s but at most {share:.0%} of the time; "
    "one copy: the same sum just before the action, with one version serving"
)


class MemoryWatch:
    """Samples the Pss sum of the processes tagged ``tag`` until stopped."""

    def __init__(self, tag: str, interval: float = 0.05) -> None:
        self.tag = tag
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def total(self) -> int:
        return sum(v for pid in tagged_pids(self.tag) if (v := pss_of(pid)) is not None)

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            self.peak = max(self.peak, self.total())
            self.samples += 1
            cost = time.perf_counter() - started
            self._stop.wait(max(self.interval, cost * (1 / PSS_SHARE - 1)))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="pageflip-bench-pss", daemon=True)
        self._thread.start()

    def stop(self, one_copy: int) -> MemoryRecord:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join()
        return {
            "one_copy": one_copy,
            "peak": self.peak,
            "ratio": self.peak / one_copy if one_copy else None,
            "samples": self.samples,
        }
