"""The memory of every process of the service (the ones found by the run's tag), from a
thread, by counters (no page-table walk): one copy before an action, the peak during it."""

from __future__ import annotations

import threading

from ..migrate.sampling import SharedOnce, private_of
from .records import MemoryRecord
from .service import tagged_pids

__all__ = ["PEAK", "MemoryWatch"]

PEAK = (
    "counters, no page-table walk: RssAnon + RssFile (/proc/PID/status) summed over every "
    "process whose command line holds the run's directory (old, new, and any the upgrade "
    "started), plus shared memory (the index's memfd) once: the largest RssShmem a process "
    "had just before the action plus the growth of the host's Shmem (/proc/meminfo) since; "
    "sampled every {interval:g} s; one copy: the same sum just before the action, with one "
    "version serving. (Reading Pss walks every page table and holds off the service's page "
    "faults meanwhile)"
)


class MemoryWatch:
    """Samples the memory of the processes tagged ``tag`` (see :data:`PEAK`) until stopped;
    the first :meth:`total` is the baseline of the shared part."""

    def __init__(self, tag: str, interval: float = 0.05) -> None:
        self.tag = tag
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._shared = SharedOnce()

    def total(self) -> int:
        pids = tagged_pids(self.tag)
        own = sum(v for pid in pids if (v := private_of(pid)) is not None)
        return own + self._shared(pids)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.total())
            self.samples += 1
            self._stop.wait(self.interval)

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._loop, name="pageflip-bench-memory", daemon=True
        )
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
