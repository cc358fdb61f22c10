"""The memory of a run's processes, followed from a thread: the Pss peak and the RSS peak."""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ..._sys import huge
from ..._sys.procfs import proc, procfs_path
from .config import MigrateBenchmarkError
from .records import MemoryRecord, Peak

__all__ = ["COUNTERS", "PEAK", "PSS_SHARE", "Sampler", "SharedOnce", "private_of", "pss_of"]

#: The sampler reads Pss (a page-table walk: about 4 ms per 256 MiB mapped here) at most this
#: share of the time: after a read that took ``c`` seconds it waits ``c * (1/share - 1)``.
PSS_SHARE = 0.2

#: How the peak is measured, in words (the result's notes).
PEAK = (
    "Pss (/proc/PID/smaps_rollup: pages shared by both processes counted once) of source + "
    "destination + the destination's helper processes (postcopy pager), sampled from a thread "
    "in the benchmark's process from just before the migration starts until the source has "
    "exited, every {interval:g} s but at most {share:.0%} of the time (a read walks every page "
    "table); RSS (/proc/PID/status, cheap) is read every {interval:g} s as a dense upper bound"
)

#: How the peak is measured without walking page tables (``Sampler(walk=False)``), in words.
COUNTERS = (
    "counters, no page-table walk: each process's RssAnon + RssFile (/proc/PID/status), plus "
    "shared memory counted once: the largest shmem and hugetlb memory (RssShmem + "
    "HugetlbPages) a process mapped at the start (the guest's, held by the source), plus the "
    "growth of the host's Shmem (/proc/meminfo) and of its hugetlb pages in use since; "
    "sampled every {interval:g} s from a "
    "thread of the benchmark from just before the migration until it completed. (Reading Pss "
    "walks every page table and holds off the guest's page faults meanwhile: 20-60 ms per "
    "4 GiB, which showed as pauses the guest observed)"
)


def _read_kib(path: str, *keys: str) -> int | None:
    """The sum of the ``key:  N kB`` lines of a /proc file, in bytes (None: the process is
    gone, or a zombie, which has no memory lines)."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    wanted = {key.encode() + b":" for key in keys}
    found = [
        int(words[1]) * 1024
        for words in map(bytes.split, text.splitlines())
        if words and words[0] in wanted
    ]
    return sum(found) if found else None


def pss_of(pid: int) -> int | None:
    """The Pss of process ``pid`` in bytes (a walk of its page tables; None: gone)."""
    return _read_kib(proc(pid, "smaps_rollup"), "Pss")


def _rss(pid: int) -> int | None:
    return _read_kib(proc(pid, "status"), "VmRSS")


def private_of(pid: int) -> int | None:
    """Process ``pid``'s own memory by counters: RssAnon + RssFile (None: gone)."""
    return _read_kib(proc(pid, "status"), "RssAnon", "RssFile")


def _shmem(pid: int) -> int | None:
    """Shared memory a process maps: shmem (memfds) and hugetlb pages (hugetlb memfds)."""
    return _read_kib(proc(pid, "status"), "RssShmem", "HugetlbPages")


def _hugetlb_in_use() -> int:
    """Bytes of the host's hugetlb pools in use (hugetlb memory is not in Shmem)."""
    pools = (huge.pool(size) for size in huge.hugetlb_sizes())
    return sum((p.total - p.free) * p.page_size for p in pools)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (through /proc/PID/task/TID/children)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(proc(parent, "task"))
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(proc(parent, "task", tid, "children")) as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                continue
            for kid in kids:
                if kid not in found:
                    found.append(kid)
                    todo.append(kid)
    return found


class SharedOnce:
    """Shared memory counted once, by counters: the largest RssShmem + HugetlbPages one
    process had at the first look, plus the growth of the host's Shmem (/proc/meminfo) and
    of its hugetlb pages in use since. Two processes that map the same memfd count it once;
    a new memfd counts as it fills."""

    def __init__(self) -> None:
        self._host0: int | None = None
        self._base = 0

    def __call__(self, pids: Iterable[int]) -> int:
        host = _read_kib(os.path.join(procfs_path(), "meminfo"), "Shmem") or 0
        host += _hugetlb_in_use()
        if self._host0 is None:
            self._host0 = host
            self._base = max((v for pid in pids if (v := _shmem(pid)) is not None), default=0)
        return max(0, self._base + host - self._host0)


@dataclass
class _Peak:
    """The largest sum seen of one measure, and what each role held then."""

    total: int = 0
    at: dict[str, int] = field(default_factory=dict)
    by_role: dict[str, int] = field(default_factory=dict)
    samples: int = 0

    def add(self, values: dict[str, int]) -> None:
        self.samples += 1
        total = sum(values.values())
        if total > self.total:
            self.total, self.at = total, dict(values)
        for role, value in values.items():
            self.by_role[role] = max(self.by_role.get(role, 0), value)

    def record(self) -> Peak:
        return {"total": self.total, "at_peak": self.at, "max_by_role": self.by_role}


class Sampler:
    """Follows the memory of a run's processes from a thread: Pss peak and RSS peak.

    Roles: ``source``, ``destination`` and ``helpers`` (processes the destination started:
    the postcopy pager). Pss counts a page mapped by both processes once (half in each), which
    is what "memory of source and destination together" needs, but reading it walks every page
    table of the process (about 4 ms per 256 MiB mapped here, 60+ ms per 4 GiB), so the thread
    reads it every ``interval`` seconds but never more than :data:`PSS_SHARE` of the time. RSS
    from /proc/PID/status costs next to nothing and is read every ``interval`` seconds; summed
    over processes it counts a shared page twice: an upper bound.
    """

    def __init__(self, pids: dict[str, int], interval: float, *, walk: bool = True) -> None:
        self.pids = pids
        self.interval = interval
        #: False: the peak comes from counters (:data:`COUNTERS`), never a page-table walk.
        self.walk = walk
        self._shared = SharedOnce()
        self.pss = _Peak()
        self.rss = _Peak()
        self.pss_costs: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_pss = 0.0
        self._helpers: list[int] = []
        self.error: BaseException | None = None

    def _read(self, read: Callable[[int], int | None]) -> dict[str, int]:
        out: dict[str, int] = {}
        for role, pid in self.pids.items():
            value = read(pid)
            if value is not None:
                out[role] = value
        helpers = [v for pid in self._helpers if (v := read(pid)) is not None]
        if helpers:
            out["helpers"] = sum(helpers)
        return out

    def sample(self, pss: bool = True) -> dict[str, int] | None:
        """One sample: RSS always, Pss if ``pss`` (returns the Pss values)."""
        if "destination" in self.pids:
            self._helpers = _descendants(self.pids["destination"])
        self.rss.add(self._read(_rss))
        if not pss and self.walk:
            return None
        started = time.perf_counter()
        values = self._read(pss_of) if self.walk else self._counted()
        cost = time.perf_counter() - started
        self.pss_costs.append(cost)
        self.pss.add(values)
        self._next_pss = time.monotonic() + cost * (1 / PSS_SHARE - 1)
        return values

    def _counted(self) -> dict[str, int]:
        """Memory by counters: private per role, shared memory once (see :data:`COUNTERS`).
        At the start only one process holds the guest's memory (the source); a destination
        that maps the same file already (QEMU's shared mode) counts once."""
        values = self._read(private_of)
        values["shared"] = self._shared([*self.pids.values(), *self._helpers])
        return values

    def baseline(self) -> dict[str, int]:
        """The first sample, just before the migration starts (a peak candidate too)."""
        return self.sample() or {}

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self.sample(pss=time.monotonic() >= self._next_pss)
                self._stop.wait(self.interval)
        except BaseException as err:  # reported by stop()
            self.error = err

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._loop, name="pageflip-bench-memory", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and take a last Pss sample. Idempotent."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        thread.join()
        if self.error is not None:
            raise MigrateBenchmarkError(f"the memory sampler failed: {self.error!r}")
        self.sample()

    def result(self, baseline: dict[str, int], guest_bytes: int) -> MemoryRecord:
        """What was seen, against the guest's memory and the ``baseline``."""
        costs = self.pss_costs
        base = sum(baseline.values())
        return {
            "guest_bytes": guest_bytes,
            "baseline": {"total": base, "by_role": baseline},
            "peak_pss": self.pss.record(),
            "peak_rss": self.rss.record(),
            "peak": self.pss.total,
            "ratio": self.pss.total / guest_bytes,
            "added": self.pss.total - base,
            "added_ratio": (self.pss.total - base) / guest_bytes,
            "rss_ratio": self.rss.total / guest_bytes,
            "pss_samples": self.pss.samples,
            "rss_samples": self.rss.samples,
            "pss_read_ms_mean": statistics.fmean(costs) * 1e3 if costs else None,
            "pss_read_ms_max": max(costs) * 1e3 if costs else None,
            "interval": self.interval,
            "method": "pss" if self.walk else "counters",
        }
