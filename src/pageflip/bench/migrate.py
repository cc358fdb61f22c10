"""Migration benchmark: a matrix of memory size x dirty rate x mode, each run migrated for real.

What it answers: how long a live migration of a running workload takes, how long the workload
is paused, how many bytes cross the socket and how much memory source and destination use
together, for ``flip`` (the pages change owner), ``precopy`` (rounds of copies, then a short
stop-and-copy) and ``postcopy`` (run on the destination at once, fetch pages on fault).

Every run of the matrix starts two fresh processes (``spawn``):

``destination``
    listens on an abstract Unix socket with :class:`~pageflip.migration.destination.Destination`,
    receives the guest, lets it run for a moment and then checks it with
    :meth:`~pageflip.guests.Workload.verify` (a run whose guest fails the check is an error,
    not a data point).
``source``
    creates a :class:`~pageflip.guests.Workload` of the size and dirty rate of the run (the
    fill is not timed), waits until the benchmark says go, reads the write rate the workload
    measured over the last second and migrates it with
    :class:`~pageflip.migration.source.Source`, collecting every event with a
    ``CLOCK_MONOTONIC`` stamp (system-wide, so source and destination stamps compare).

The benchmark's own process waits ``warmup`` seconds after the fill (the writers reach their
rate), reads both processes' memory (the *baseline*), starts a sampler thread and says go;
the sampler follows both processes, and the destination's helpers (the postcopy pager),
until the source has exited. See :class:`_Sampler` for what it reads and how often.

Runs are interleaved (:func:`run_order`): each repeat walks the sizes and rates in the order
given and runs every mode back to back for each (size, rate), rotating the order of the modes
by one from one (size, rate) to the next, so that no mode always runs first, right after the
previous size's memory was freed. Between runs both processes have exited (their memory is
free) and the benchmark waits ``settle`` seconds: with the default of 1 s memory is *warm* in
the sense of docs/kernel.md, "Memory warmth"; ``settle=15`` makes runs *cold*.

:func:`run` returns a JSON-ready dict; :func:`markdown_table` and :func:`target_rows` lay it
out and :func:`plot` draws downtime and total time against memory size. Nothing here prints:
progress goes to a callback.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import multiprocessing
import os
import statistics
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from multiprocessing import connection as mp_connection
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnContext, SpawnProcess
from pathlib import Path
from typing import Any

from .._children import end_process, stop_on_signals
from .._sys import mm
from .._sys.flags import Madv
from .._sys.procfs import proc
from ..errors import BadArgument, FeatureUnavailable, MigrateBenchmarkError, PageflipError
from ..memory import PAGE_SIZE, Region
from . import format_size, human_size
from .common import finite, machine, markdown_targets, now

__all__ = [
    "DEFAULT_RATES",
    "DEFAULT_SIZES",
    "MODES",
    "QEMU_REFERENCE",
    "MigrateBenchmarkError",
    "MigrateConfig",
    "ProgressCallback",
    "RunSpec",
    "cell_rows",
    "check_plot",
    "markdown_table",
    "plot",
    "run",
    "run_order",
    "target_rows",
]

MiB = 1 << 20
GiB = 1 << 30
MODES: tuple[str, ...] = ("flip", "precopy", "postcopy")
DEFAULT_SIZES: tuple[int, ...] = (256 * MiB, 1 * GiB, 4 * GiB)
DEFAULT_RATES: tuple[int, ...] = (0, 64 * MiB, 256 * MiB)

#: The sampler reads Pss (a page-table walk: about 4 ms per 256 MiB mapped here) at most this
#: share of the time: after a read that took ``c`` seconds it waits ``c * (1/share - 1)``.
PSS_SHARE = 0.2
#: How long the source's pause may be judged "running within" for postcopy (seconds).
POSTCOPY_RUNNING_LIMIT = 0.050
#: Flip targets (seconds, and a ratio of the guest's memory).
FLIP_DOWNTIME_LIMIT = 0.002
FLIP_TOTAL_LIMIT = 0.010
FLIP_PEAK_RATIO = 1.1
#: "Does not grow with size": the largest size's downtime within this factor of the smallest's.
FLIP_SCALING_FACTOR = 2.0

#: QEMU 7.2 + KVM localhost migration on this machine kind, unthrottled (``max-bandwidth``
#: lifted), for the precopy comparison. ``source`` says where each figure was stated: the
#: issue, or docs/benchmarks.md ("Targets and references") for the project's own measurements.
QEMU_REFERENCE: tuple[dict[str, Any], ...] = (
    {
        "size": 2 * GiB,
        "rate": 0,
        "total_seconds": 3.5,
        "downtime": None,
        "source": "issue",
        "note": "unthrottled, idle",
    },
    {
        "size": 2 * GiB,
        "rate": 256 * MiB,
        "total_seconds": 3.8,
        "downtime": 0.173,
        "source": "issue",
        "note": "unthrottled, 256 MiB/s of writes",
    },
    {
        "size": 4 * GiB,
        "rate": 256 * MiB,
        "total_seconds": 6.6,
        "downtime": 0.390,
        "source": "issue",
        "note": "unthrottled, 256 MiB/s of writes",
    },
    {
        "size": 4 * GiB,
        "rate": 0,
        "total_seconds": 10.6,
        "downtime": None,
        "source": "docs/benchmarks.md",
        "note": "unthrottled, idle, cold destination, median",
    },
    {
        "size": 4 * GiB,
        "rate": 256 * MiB,
        "total_seconds": 12.1,
        "downtime": None,
        "downtime_range": [0.201, 0.839],
        "source": "docs/benchmarks.md",
        "note": "unthrottled, 256 MiB/s of writes, cold destination, median",
    },
)
#: What QEMU does otherwise (context for the tables, not compared automatically).
QEMU_CONTEXT = (
    "QEMU defaults (128 MiB/s cap): 16 s for 2 GiB and 32 s for 4 GiB idle, never converging "
    "under 256 MiB/s of writes; its shared-memory local mode (x-ignore-shared) pauses the "
    "guest 1-2 ms at any size (issue; docs/benchmarks.md)."
)

ORDER = (
    "interleaved: for each repeat, sizes then dirty rates in the order given, every mode back "
    "to back for each (size, rate), the mode order rotated by one from one (size, rate) to "
    "the next; both processes exit (their memory is freed) and the benchmark waits "
    "{settle:g} s before the next run"
)
PEAK = (
    "Pss (/proc/PID/smaps_rollup: pages shared by both processes counted once) of source + "
    "destination + the destination's helper processes (postcopy pager), sampled from a thread "
    "in the benchmark's process from just before the migration starts until the source has "
    "exited, every {interval:g} s but at most {share:.0%} of the time (a read walks every page "
    "table); RSS (/proc/PID/status, cheap) is read every {interval:g} s as a dense upper bound"
)
CLOCK = (
    "downtime: the source's pause until the destination's resume (the source's DoneEvent); "
    "guest saw: the pause the guest measured itself, the longest gap in its own heartbeat "
    "around the migration (the DoneEvent's guest_pause; the destination's resumed event "
    "gives the same figure, kept as guest_pause_destination; '-' when the guest could not "
    "tell); total: the source's Source.run() start until done; switchover to running: the "
    "source's switchover event until the destination's resumed event, both stamped with "
    "CLOCK_MONOTONIC (system-wide)"
)

#: Called before each run with (runs done, runs in all, what runs now).
ProgressCallback = Callable[[int, int, str], None]


@dataclass(frozen=True)
class MigrateConfig:
    """What to run: every (size, rate, mode), ``repeat`` times. Sizes and rates in bytes
    (per second), times in seconds."""

    sizes: tuple[int, ...] = DEFAULT_SIZES
    rates: tuple[int, ...] = DEFAULT_RATES
    modes: tuple[str, ...] = MODES
    repeat: int = 1
    #: Precopy switches over once the rest would take at most this long (QEMU's default).
    downtime_limit: float = 0.3
    #: Writer threads of the workload.
    threads: int = 2
    #: Seconds between the end of the fill and the migration (the writers reach their rate).
    warmup: float = 1.0
    #: Seconds between runs, once both processes of the previous one have exited.
    settle: float = 1.0
    #: Just before each migration, touch and free as much memory as the destination will
    #: need, so that it gets warm memory (docs/kernel.md, "Memory warmth") whatever ran before.
    prewarm: bool = True
    #: Seconds between memory samples.
    sample_interval: float = 0.05
    #: Seconds the destination lets the guest run before it verifies it.
    verify_delay: float = 0.3
    #: Longest wait for any one step (a fill, a migration, a check), seconds.
    timeout: float = 900.0

    def __post_init__(self) -> None:
        if not self.sizes or not self.rates or not self.modes:
            raise BadArgument("choose at least one size, one dirty rate and one mode")
        unknown = [m for m in self.modes if m not in MODES]
        if unknown:
            raise BadArgument(
                f"unknown mode(s) {unknown}; choose from {list(MODES)}", argument="modes"
            )
        if len(set(self.modes)) != len(self.modes):
            raise BadArgument("each mode once, please", argument="modes")
        if any(s < PAGE_SIZE for s in self.sizes):
            raise BadArgument(
                f"every size must be at least one page ({PAGE_SIZE} bytes)", argument="sizes"
            )
        if any(r < 0 for r in self.rates):
            raise BadArgument("dirty rates cannot be negative", argument="rates")
        if self.repeat < 1:
            raise BadArgument("repeat must be at least 1", argument="repeat")
        if self.downtime_limit <= 0:
            raise BadArgument("the downtime limit must be positive", argument="downtime_limit")
        if self.threads < 1:
            raise BadArgument("the workload needs at least one thread", argument="threads")
        if min(self.warmup, self.settle, self.verify_delay) < 0:
            raise BadArgument("warmup, settle and verify_delay cannot be negative")
        if self.sample_interval <= 0 or self.timeout <= 0:
            raise BadArgument("sample_interval and timeout must be positive")


@dataclass(frozen=True)
class RunSpec:
    """One run of the matrix, in the order it runs."""

    index: int
    size: int
    rate: int
    mode: str
    repeat: int

    @property
    def label(self) -> str:
        return f"{format_size(self.size)} at {_rate_label(self.rate)}, {self.mode}"


def run_order(config: MigrateConfig) -> list[RunSpec]:
    """Every run in the order :func:`run` runs them (see :data:`ORDER`)."""
    specs: list[RunSpec] = []
    modes = list(config.modes)
    cell = 0
    for r in range(config.repeat):
        for size in config.sizes:
            for rate in config.rates:
                shift = (cell + r) % len(modes)
                for mode in modes[shift:] + modes[:shift]:
                    specs.append(RunSpec(len(specs), size, rate, mode, r))
                cell += 1
    return specs


def _rate_label(rate: float) -> str:
    return "idle" if rate == 0 else f"{format_size(int(rate))}/s"


# -- the two processes of a run ----------------------------------------------------------------


def _event_recorder(events: list[dict[str, Any]]) -> Callable[[Any], None]:
    def on_event(event: Any) -> None:
        data: dict[str, Any] = event.as_dict()
        # When it happened (held-back events come late, stamped with their moment).
        data["mono"] = data.get("at", now())
        events.append(data)

    return on_event


def _source_main(
    conn: Connection,
    to: str,
    size: int,
    rate: int,
    threads: int,
    options: dict[str, Any],
) -> None:
    """A run's source: create the workload, wait for go, migrate it, report."""
    stop_on_signals()
    from ..guests import Workload
    from ..migration.source import MigrationOptions, Source

    guest = None
    try:
        started = now()
        guest = Workload.create(size, dirty_rate=rate, threads=threads)
        conn.send(
            (
                "filled",
                {
                    "pid": os.getpid(),
                    "guest_bytes": sum(r.size for r in guest.regions),
                    "regions": {r.name: r.size for r in guest.regions},
                    "fill_seconds": now() - started,
                },
            )
        )
        command = conn.recv()
        if command[0] != "go":
            return
        events: list[dict[str, Any]] = []
        migration = Source(guest, to, MigrationOptions(**options), on_event=_event_recorder(events))
        write_rate = guest.write_rate()
        total_writes = guest.total_writes
        try:
            done = migration.run()
        except PageflipError as err:
            conn.send(("error", f"{type(err).__name__}: {err}", {"events": events}))
            return
        conn.send(
            (
                "done",
                {
                    "done": done.as_dict(),
                    "events": events,
                    "write_rate": write_rate,
                    "writes_before": total_writes,
                },
            )
        )
    except EOFError:
        return  # the benchmark is gone
    except Exception:
        with contextlib.suppress(OSError, ValueError):
            conn.send(("error", traceback.format_exc(), {}))
    finally:
        if guest is not None:
            guest.close()
        conn.close()


def _destination_main(conn: Connection, listen: str, timeout: float, verify_delay: float) -> None:
    """A run's destination: receive the guest, let it run, check it, report."""
    stop_on_signals()
    from ..guests import Workload
    from ..migration.destination import Destination

    events: list[dict[str, Any]] = []
    guest: Workload | None = None
    try:
        try:
            destination = Destination(
                listen, on_event=_event_recorder(events), timeout=timeout, accept_timeout=timeout
            )
        except PageflipError as err:
            conn.send(("error", f"{type(err).__name__}: {err}", {}))
            return
        conn.send(("listening", {"pid": os.getpid()}))
        try:
            received = destination.run()
        except PageflipError as err:
            conn.send(("error", f"{type(err).__name__}: {err}", {"events": events}))
            return
        assert isinstance(received, Workload)
        guest = received
        time.sleep(verify_delay)
        write_rate = guest.write_rate()
        report = guest.verify()
        conn.send(
            (
                "verified",
                {
                    "verify": report.as_dict(),
                    "events": events,
                    "done": destination.done,
                    "postcopy": destination.postcopy,
                    "write_rate_after": write_rate,
                    "status": guest.status(),
                },
            )
        )
    except Exception:
        with contextlib.suppress(OSError, ValueError):
            conn.send(("error", traceback.format_exc(), {"events": events}))
    finally:
        if guest is not None:
            guest.close()
        conn.close()


class _Child:
    """The benchmark's handle on one process of a run."""

    def __init__(self, ctx: SpawnContext, role: str, target: Any, args: tuple[Any, ...]) -> None:
        self.role = role
        self.conn, child = ctx.Pipe()
        self.process: SpawnProcess = ctx.Process(
            target=target,
            args=(child, *args),
            name=f"pageflip-bench-migrate-{role}",
            daemon=True,
        )
        try:
            self.process.start()
        finally:
            child.close()

    def send(self, *message: Any) -> None:
        self.conn.send(message)

    def expect(self, kind: str, timeout: float, what: str) -> dict[str, Any]:
        """The next message, which must be ``kind``; a failure or silence raises."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            ready = mp_connection.wait([self.conn, self.process.sentinel], max(0.0, left))
            if self.conn in ready or self.conn.poll():
                try:
                    message = self.conn.recv()
                except EOFError:
                    message = None
                if message is not None:
                    if message[0] == kind:
                        result: dict[str, Any] = message[1]
                        return result
                    if message[0] == "error":
                        raise MigrateBenchmarkError(f"{what}: the {self.role} failed: {message[1]}")
                    raise MigrateBenchmarkError(
                        f"{what}: the {self.role} said {message[0]!r}, expected {kind!r}"
                    )
            if not self.process.is_alive():
                self.process.join(1)
                raise MigrateBenchmarkError(
                    f"{what}: the {self.role} process died (exit code {self.process.exitcode})"
                )
            if not ready:
                raise MigrateBenchmarkError(
                    f"{what}: the {self.role} did not answer within {timeout:.0f} s"
                )

    def error(self, wait: float) -> str | None:
        """The process's error message, if it sends one within ``wait`` seconds."""
        with contextlib.suppress(OSError, EOFError, ValueError):
            if self.conn.poll(wait):
                message = self.conn.recv()
                if message[0] == "error":
                    return str(message[1])
        return None

    def join(self, timeout: float, what: str) -> None:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise MigrateBenchmarkError(
                f"{what}: the {self.role} did not exit within {timeout:.0f} s"
            )

    def stop(self, wait: float) -> None:
        """End the process if it still runs (after ``wait`` seconds). Idempotent."""
        end_process(self.process, self.conn, wait)


# -- memory -------------------------------------------------------------------------------------


def _read_kib(path: str, key: str) -> int | None:
    """The ``key:  N kB`` line of a /proc file, in bytes (None: the process is gone)."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    prefix = key.encode() + b":"
    for line in text.splitlines():
        if line.startswith(prefix):
            return int(line.split()[1]) * 1024
    return None  # a zombie has no memory lines


def _pss(pid: int) -> int | None:
    return _read_kib(proc(pid, "smaps_rollup"), "Pss")


def _rss(pid: int) -> int | None:
    return _read_kib(proc(pid, "status"), "VmRSS")


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

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total, "at_peak": self.at, "max_by_role": self.by_role}


class _Sampler:
    """Follows the memory of a run's processes from a thread: Pss peak and RSS peak.

    Roles: ``source``, ``destination`` and ``helpers`` (processes the destination started:
    the postcopy pager). Pss counts a page mapped by both processes once (half in each), which
    is what "memory of source and destination together" needs, but reading it walks every page
    table of the process (about 4 ms per 256 MiB mapped here, 60+ ms per 4 GiB), so the thread
    reads it every ``interval`` seconds but never more than :data:`PSS_SHARE` of the time. RSS
    from /proc/PID/status costs next to nothing and is read every ``interval`` seconds; summed
    over processes it counts a shared page twice: an upper bound.
    """

    def __init__(self, pids: dict[str, int], interval: float) -> None:
        self.pids = pids
        self.interval = interval
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
        if not pss:
            return None
        started = time.perf_counter()
        values = self._read(_pss)
        cost = time.perf_counter() - started
        self.pss_costs.append(cost)
        self.pss.add(values)
        self._next_pss = time.monotonic() + cost * (1 / PSS_SHARE - 1)
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

    def result(self, baseline: dict[str, int], guest_bytes: int) -> dict[str, Any]:
        costs = self.pss_costs
        base = sum(baseline.values())
        return {
            "guest_bytes": guest_bytes,
            "baseline": {"total": base, "by_role": baseline},
            "peak_pss": self.pss.as_dict(),
            "peak_rss": self.rss.as_dict(),
            "peak": self.pss.total,
            "ratio": self.pss.total / guest_bytes,
            "added": self.pss.total - base,
            "added_ratio": (self.pss.total - base) / guest_bytes,
            "rss_ratio": self.rss.total / guest_bytes,
            "pss_samples": self.pss.samples,
            "rss_samples": self.rss.samples,
            "pss_read_ms_mean": statistics.fmean(costs) * 1e3 if costs else None,
            "pss_read_ms_max": max(costs) * 1e3 if costs else None,
        }


# -- one run ------------------------------------------------------------------------------------


def _first(events: Iterable[dict[str, Any]], kind: str) -> dict[str, Any] | None:
    return next((e for e in events if e["event"] == kind), None)


def _last(events: Sequence[dict[str, Any]], kind: str) -> dict[str, Any] | None:
    return next((e for e in reversed(events) if e["event"] == kind), None)


def _record(
    spec: RunSpec,
    filled: dict[str, Any],
    src: dict[str, Any],
    dst: dict[str, Any],
    memory: dict[str, Any],
) -> dict[str, Any]:
    """One run's row of the JSON."""
    done = src["done"]
    events = src["events"]
    switchover = _first(events, "switchover")
    last_round = _last(events, "round")
    dst_resumed = _first(dst["events"], "resumed")
    details = done.get("details") or {}
    switch_to_running = None
    if switchover is not None and dst_resumed is not None:
        switch_to_running = dst_resumed["mono"] - switchover["mono"]
    postcopy: dict[str, Any] | None = None
    if done["mode"] == "postcopy":
        resumed = _first(events, "resumed")
        postcopy = {
            key: details.get(key)
            for key in (
                "fault_median_us",
                "fault_p99_us",
                "fault_max_us",
                "faults",
                "requested",
                "pushed",
                "seconds",
            )
        }
        postcopy["after_resume_seconds"] = (
            done["total_seconds"] - resumed["t"] if resumed is not None else None
        )
    bandwidth = last_round["bandwidth"] if last_round else None
    return {
        "index": spec.index,
        "size": spec.size,
        "size_label": format_size(spec.size),
        "rate": spec.rate,
        "rate_label": _rate_label(spec.rate),
        "mode": spec.mode,
        "repeat": spec.repeat,
        "guest_bytes": filled["guest_bytes"],
        "regions": filled["regions"],
        "fill_seconds": filled["fill_seconds"],
        "write_rate": src["write_rate"],
        "write_rate_after": dst["write_rate_after"],
        "mode_run": done["mode"],
        "total_seconds": done["total_seconds"],
        "downtime": done["downtime"],
        "guest_pause": done.get("guest_pause"),
        "guest_pause_destination": dst_resumed.get("guest_pause") if dst_resumed else None,
        "expected_downtime": switchover["expected_downtime"] if switchover else None,
        "switchover_reason": switchover["reason"] if switchover else None,
        "switchover_to_running": switch_to_running,
        "bytes_on_wire": done["bytes_on_wire"],
        "pages_moved": done["pages_moved"],
        "pages_copied": done["pages_copied"],
        "pages_zero": done["pages_zero"],
        "pages_requested": done["pages_requested"],
        "rounds": done["rounds"],
        "digest": done["digest"],
        "last_round_bandwidth": bandwidth,
        "last_round_dirty_rate": last_round["dirty_rate"] if last_round else None,
        "rate_below_bandwidth": None if bandwidth is None else src["write_rate"] < bandwidth,
        "postcopy": postcopy,
        "verify": dst["verify"],
        "verified": bool(dst["verify"]["ok"]),
        "memory": memory,
        "done": done,
        "events": events,
        "destination_events": dst["events"],
    }


def _prewarm(nbytes: int) -> float:
    """Touch ``nbytes`` of fresh memory on a few threads and free it; returns the seconds.

    On this kind of VM, memory freed a moment ago is fast to touch again and memory freed
    long ago is slow (the host has taken it back). A copy-mode destination allocates all of
    the guest's memory, so without this its speed depends on what ran before.
    """
    started = time.monotonic()
    scratch = Region.anonymous(nbytes, name="prewarm")
    try:
        step = -(-scratch.size // 4 // PAGE_SIZE) * PAGE_SIZE
        spans = [
            (scratch.address + off, min(step, scratch.size - off))
            for off in range(0, scratch.size, step)
        ]
        threads = [
            threading.Thread(target=mm.madvise, args=(a, n, Madv.POPULATE_WRITE)) for a, n in spans
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        scratch.close()
    return time.monotonic() - started


def _one_run(ctx: SpawnContext, spec: RunSpec, config: MigrateConfig) -> dict[str, Any]:
    """Run one migration between two fresh processes; raise unless its guest verified."""
    what = f"run {spec.index + 1} ({spec.label})"
    listen = f"@pageflip-bench-migrate-{os.getpid()}-{spec.index}-{os.urandom(4).hex()}"
    options = {"mode": spec.mode, "downtime_limit": config.downtime_limit}
    options["timeout"] = config.timeout
    children: list[_Child] = []
    sampler: _Sampler | None = None
    finished = False
    try:
        dst = _Child(
            ctx, "destination", _destination_main, (listen, config.timeout, config.verify_delay)
        )
        children.append(dst)
        src = _Child(
            ctx,
            "source",
            _source_main,
            (listen, spec.size, spec.rate, config.threads, options),
        )
        children.append(src)
        listening = dst.expect("listening", config.timeout, what)
        filled = src.expect("filled", config.timeout, what)
        time.sleep(config.warmup)
        # Right before the migration: freed memory stays warm only a second or two (the
        # kernel reports free pages to the host, which takes them back).
        # A flip allocates nothing: prewarming would only leave the kernel busy handing
        # the scratch memory back while the flip runs.
        warm = config.prewarm and spec.mode != "flip"
        prewarmed = _prewarm(filled["guest_bytes"]) if warm else None
        sampler = _Sampler(
            {"source": filled["pid"], "destination": listening["pid"]}, config.sample_interval
        )
        baseline = sampler.baseline()
        sampler.start()
        src.send("go")
        try:
            src_result = src.expect("done", config.timeout, what)
        except MigrateBenchmarkError as err:
            theirs = dst.error(2.0)
            raise MigrateBenchmarkError(
                f"{err}" + (f"; the destination said: {theirs}" if theirs else "")
            ) from None
        src.join(config.timeout, what)
        sampler.stop()
        dst_result = dst.expect("verified", config.timeout, what)
        dst.join(config.timeout, what)
        memory = sampler.result(baseline, filled["guest_bytes"])
        memory["interval"] = config.sample_interval
        record = _record(spec, filled, src_result, dst_result, memory)
        record["prewarm_seconds"] = prewarmed
        if not record["verified"]:
            problems = "; ".join(dst_result["verify"]["problems"][:5])
            raise MigrateBenchmarkError(f"{what}: the guest failed its check: {problems}")
        finished = True
        return record
    finally:
        if sampler is not None:
            with contextlib.suppress(MigrateBenchmarkError):
                sampler.stop()
        for child in children:
            child.stop(10.0 if finished else 2.0)


# -- the matrix ---------------------------------------------------------------------------------


def run(config: MigrateConfig, on_progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Run the matrix and return its results as a JSON-ready dict (see the module docstring).

    Raises :class:`MigrateBenchmarkError` (with the runs done so far in ``partial``) when a
    run fails: a migration error, a guest that fails its check, a process that dies.
    """
    specs = run_order(config)
    started = datetime.datetime.now(datetime.UTC)
    ctx = multiprocessing.get_context("spawn")
    runs: list[dict[str, Any]] = []
    ended: float | None = None
    for spec in specs:
        if on_progress is not None:
            on_progress(spec.index, len(specs), f"{spec.label} ({spec.repeat + 1}/{config.repeat})")
        if ended is not None:
            time.sleep(max(0.0, config.settle - (time.monotonic() - ended)))
        began = time.monotonic()
        try:
            record = _one_run(ctx, spec, config)
        except MigrateBenchmarkError as err:
            partial = _results(config, started, specs, runs)
            raise MigrateBenchmarkError(str(err), partial) from None
        record["since_previous"] = None if ended is None else began - ended
        record["wall_seconds"] = time.monotonic() - began
        ended = time.monotonic()
        runs.append(record)
    if on_progress is not None:
        on_progress(len(specs), len(specs), "done")
    return _results(config, started, specs, runs)


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(statistics.median(present)) if present else None


def _cells(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (size, rate, mode): the medians over its repeats."""
    groups: dict[tuple[int, int, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["size"], r["rate"], r["mode"]), []).append(r)
    cells = []
    for (size, rate, mode), rs in sorted(
        groups.items(), key=lambda kv: (kv[0][0], kv[0][1], MODES.index(kv[0][2]))
    ):
        post = [r["postcopy"] for r in rs if r["postcopy"]]
        cells.append(
            {
                "size": size,
                "size_label": format_size(size),
                "rate": rate,
                "rate_label": _rate_label(rate),
                "mode": mode,
                "n": len(rs),
                "guest_bytes": rs[0]["guest_bytes"],
                "write_rate": _median(r["write_rate"] for r in rs),
                "total_seconds": _median(r["total_seconds"] for r in rs),
                "downtime": _median(r["downtime"] for r in rs),
                "downtime_max": max(r["downtime"] for r in rs),
                "guest_pause": _median(r.get("guest_pause") for r in rs),
                "guest_pause_max": max(
                    (r["guest_pause"] for r in rs if r.get("guest_pause") is not None),
                    default=None,
                ),
                "expected_downtime": _median(r["expected_downtime"] for r in rs),
                "switchover_to_running": _median(r["switchover_to_running"] for r in rs),
                "bytes_on_wire": _median(r["bytes_on_wire"] for r in rs),
                "peak": _median(r["memory"]["peak"] for r in rs),
                "ratio": _median(r["memory"]["ratio"] for r in rs),
                "added": _median(r["memory"]["added"] for r in rs),
                "peak_rss": _median(r["memory"]["peak_rss"]["total"] for r in rs),
                "rounds": _median(r["rounds"] for r in rs),
                "pages_moved": _median(r["pages_moved"] for r in rs),
                "pages_copied": _median(r["pages_copied"] for r in rs),
                "pages_zero": _median(r["pages_zero"] for r in rs),
                "last_round_bandwidth": _median(r["last_round_bandwidth"] for r in rs),
                "fault_median_us": _median(p["fault_median_us"] for p in post) if post else None,
                "fault_p99_us": _median(p["fault_p99_us"] for p in post) if post else None,
                "faults": _median(p["faults"] for p in post) if post else None,
                "verified": all(r["verified"] for r in rs),
                "runs": [r["index"] for r in rs],
            }
        )
    return cells


def _results(
    config: MigrateConfig,
    started: datetime.datetime,
    specs: list[RunSpec],
    runs: list[dict[str, Any]],
) -> dict[str, Any]:
    cells = _cells(runs)
    result = {
        "benchmark": "migrate",
        "date": started.isoformat(timespec="seconds"),
        "machine": machine(),
        "config": {
            "sizes": list(config.sizes),
            "rates": list(config.rates),
            "modes": list(config.modes),
            "repeat": config.repeat,
            "downtime_limit": config.downtime_limit,
            "threads": config.threads,
            "warmup": config.warmup,
            "settle": config.settle,
            "sample_interval": config.sample_interval,
            "verify_delay": config.verify_delay,
            "timeout": config.timeout,
        },
        "order": {
            "scheme": ORDER.format(settle=config.settle),
            "sequence": [[s.size, s.rate, s.mode, s.repeat] for s in specs],
        },
        "notes": {
            "clock": CLOCK,
            "peak": PEAK.format(interval=config.sample_interval, share=PSS_SHARE),
            "guest_memory": "guest memory = the workload's regions: ram, journal (4 bytes "
            "per page of ram, rounded up to a page) and heartbeat (one page); each run's "
            "'regions' gives their sizes and its done event's 'regions' the pages of each",
            "write_rate": "the workload's own count of bytes written over the last second, "
            "read just before Source.run()",
            "statistic": f"median of {config.repeat} repeat(s) per (size, rate, mode)",
            "warmth": (
                "warm: just before each precopy or postcopy migration the driver touched and "
                "freed as much memory as the guest has, so the destination allocates memory "
                "freed a moment ago (docs/kernel.md, 'Memory warmth'); a flip allocates nothing"
                if config.prewarm
                else f"runs back to back ({config.settle:g} s between them): memory is warm in "
                "the sense of docs/kernel.md, 'Memory warmth', except that a run can allocate "
                "more than the runs before it freed"
                if config.settle < 15
                else f"{config.settle:g} s between runs, no prewarming: memory is cold in the "
                "sense of docs/kernel.md, 'Memory warmth'"
            ),
            "prewarm": config.prewarm,
            "qemu": QEMU_CONTEXT,
        },
        "complete": len(runs) == len(specs),
        "runs": runs,
        "cells": cells,
        "qemu_reference": [dict(r) for r in QEMU_REFERENCE],
    }
    result["targets"] = _targets(result)
    strict: dict[str, Any] = finite(result)
    return strict


# -- targets ------------------------------------------------------------------------------------


def _ms(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    ms = seconds * 1e3
    if ms < 10:
        return f"{ms:.2f} ms"
    if ms < 1000:
        return f"{ms:.0f} ms" if ms >= 100 else f"{ms:.1f} ms"
    return f"{seconds:.2f} s"


def _target(
    key: str, text: str, passed: bool | None, measured: str, value: float | None = None
) -> dict[str, Any]:
    return {"id": key, "text": text, "passed": passed, "measured": measured, "value": value}


def _qemu_for(size: int, rate: int) -> list[dict[str, Any]]:
    return [r for r in QEMU_REFERENCE if r["size"] == size and r["rate"] == rate]


def _targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the issue, judged from the measured numbers (cell medians)."""
    cells = result["cells"]
    limit = result["config"]["downtime_limit"]
    out: list[dict[str, Any]] = []
    sizes = sorted({c["size"] for c in cells})
    largest = sizes[-1] if sizes else None
    smallest = sizes[0] if sizes else None
    big = format_size(largest) if largest else "-"
    flips = [c for c in cells if c["mode"] == "flip"]

    # flip: downtime at the largest size, under writes.
    under = [c for c in flips if c["size"] == largest and c["rate"] > 0]
    worst = max(under, key=lambda c: c["downtime"], default=None)
    out.append(
        _target(
            "flip_downtime",
            f"flip: downtime <= {_ms(FLIP_DOWNTIME_LIMIT)} at the largest size ({big}) under "
            "writes",
            None if worst is None else worst["downtime"] <= FLIP_DOWNTIME_LIMIT,
            "no flip run with writes at the largest size"
            if worst is None
            else ", ".join(f"{_ms(c['downtime'])} at {c['rate_label']}" for c in under),
            None if worst is None else worst["downtime"],
        )
    )

    # flip: not growing with size (largest vs smallest, at each rate).
    ratios = []
    for c in flips:
        if c["size"] != largest or largest == smallest:
            continue
        small = next((s for s in flips if s["size"] == smallest and s["rate"] == c["rate"]), None)
        if small is not None and small["downtime"]:
            ratios.append((c["downtime"] / small["downtime"], c, small))
    worst_ratio = max(ratios, key=lambda x: x[0], default=None)
    out.append(
        _target(
            "flip_downtime_scaling",
            f"flip: downtime does not grow with size ({big} within {FLIP_SCALING_FACTOR:g}x "
            f"of {format_size(smallest) if smallest else '-'}, at every rate)",
            None if worst_ratio is None else worst_ratio[0] <= FLIP_SCALING_FACTOR,
            "needs flip runs at two sizes"
            if worst_ratio is None
            else ", ".join(
                f"{c['rate_label']}: {_ms(c['downtime'])} vs {_ms(s['downtime'])} ({x:.2f}x)"
                for x, c, s in ratios
            ),
            None if worst_ratio is None else worst_ratio[0],
        )
    )

    # flip: total time, every size and rate.
    slowest = max(flips, key=lambda c: c["total_seconds"], default=None)
    out.append(
        _target(
            "flip_total",
            f"flip: total time < {_ms(FLIP_TOTAL_LIMIT)} (every size and rate)",
            None if slowest is None else slowest["total_seconds"] < FLIP_TOTAL_LIMIT,
            "no flip run"
            if slowest is None
            else f"slowest {_ms(slowest['total_seconds'])} ({slowest['size_label']} at "
            f"{slowest['rate_label']})",
            None if slowest is None else slowest["total_seconds"],
        )
    )

    # flip: peak memory at the largest size.
    at_big = [c for c in flips if c["size"] == largest]
    fattest = max(at_big, key=lambda c: c["ratio"], default=None)
    out.append(
        _target(
            "flip_peak",
            f"flip: peak memory of source + destination <= {FLIP_PEAK_RATIO:g}x the guest's "
            f"memory (at {big})",
            None if fattest is None else fattest["ratio"] <= FLIP_PEAK_RATIO,
            "no flip run"
            if fattest is None
            else f"{fattest['ratio']:.3f}x ({human_size(fattest['peak'])} for "
            f"{human_size(fattest['guest_bytes'])}, at {fattest['rate_label']})",
            None if fattest is None else fattest["ratio"],
        )
    )

    # precopy vs QEMU, one row per precopy cell.
    for c in (c for c in cells if c["mode"] == "precopy"):
        refs = _qemu_for(c["size"], c["rate"])
        name = f"precopy {c['size_label']} at {c['rate_label']}: total below QEMU's unthrottled"
        if not refs:
            out.append(
                _target(
                    f"precopy_vs_qemu_{c['size_label']}_{c['rate']}",
                    name,
                    None,
                    f"{_ms(c['total_seconds'])}; no QEMU reference",
                    c["total_seconds"],
                )
            )
            continue
        strictest = min(refs, key=lambda r: r["total_seconds"])
        parts = []
        for r in refs:
            dt = ""
            if r.get("downtime") is not None:
                dt = f", downtime {_ms(r['downtime'])}"
            elif r.get("downtime_range"):
                lo, hi = r["downtime_range"]
                dt = f", downtime {_ms(lo)}-{_ms(hi)}"
            parts.append(f"QEMU {r['total_seconds']:g} s{dt} ({r['source']}: {r['note']})")
        out.append(
            _target(
                f"precopy_vs_qemu_{c['size_label']}_{c['rate']}",
                f"{name} ({strictest['total_seconds']:g} s)",
                c["total_seconds"] < strictest["total_seconds"],
                f"{_ms(c['total_seconds'])}, downtime {_ms(c['downtime'])}; vs " + "; ".join(parts),
                c["total_seconds"],
            )
        )

    # precopy downtime within the limit whenever the dirty rate is below the bandwidth.
    pre_runs = [r for r in result["runs"] if r["mode"] == "precopy"]
    judged = [r for r in pre_runs if r["rate_below_bandwidth"]]
    over = [r for r in judged if r["downtime"] > limit]
    worst_run = max(judged, key=lambda r: r["downtime"], default=None)
    skipped = len(pre_runs) - len(judged)
    out.append(
        _target(
            "precopy_downtime_limit",
            f"precopy: downtime <= the limit ({_ms(limit)}) in every run whose measured dirty "
            "rate is below the measured bandwidth",
            None if worst_run is None else not over,
            "no precopy run qualifies"
            if worst_run is None
            else f"{len(judged) - len(over)} of {len(judged)} runs within; worst "
            f"{_ms(worst_run['downtime'])} ({worst_run['size_label']} at "
            f"{worst_run['rate_label']})"
            + (f"; {skipped} run(s) not judged (rate >= bandwidth)" if skipped else ""),
            None if worst_run is None else worst_run["downtime"],
        )
    )

    # postcopy: running soon after the switchover at the largest size.
    posts = [c for c in cells if c["mode"] == "postcopy" and c["size"] == largest]
    late = max(
        (c for c in posts if c["switchover_to_running"] is not None),
        key=lambda c: c["switchover_to_running"],
        default=None,
    )
    out.append(
        _target(
            "postcopy_running",
            f"postcopy: destination running within {_ms(POSTCOPY_RUNNING_LIMIT)} of the "
            f"switchover at the largest size ({big})",
            None if late is None else late["switchover_to_running"] <= POSTCOPY_RUNNING_LIMIT,
            "no postcopy run at the largest size"
            if late is None
            else ", ".join(
                f"{_ms(c['switchover_to_running'])} at {c['rate_label']}" for c in posts
            ),
            None if late is None else late["switchover_to_running"],
        )
    )
    return out


def target_rows(result: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(target, measured, passed) for each target; passed None: not applicable here."""
    return [(t["text"], t["measured"], t["passed"]) for t in result["targets"]]


# -- presentation -------------------------------------------------------------------------------

#: Column titles of :func:`cell_rows`.
COLUMNS = (
    "size",
    "dirty rate",
    "mode",
    "writes measured",
    "total",
    "downtime",
    "guest saw",
    "expected",
    "switchover to running",
    "on the wire",
    "peak memory (x guest)",
    "added",
    "RSS sum (upper bound)",
    "rounds",
    "last round",
    "pages moved / copied / zero",
    "verified",
    "faults: n, median / p99",
)


def _count(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.0f}"


def cell_rows(result: dict[str, Any]) -> list[list[str]]:
    """One row of strings per (size, rate, mode) under :data:`COLUMNS` (medians)."""
    rows = []
    for c in result["cells"]:
        faults = "-"
        if c["mode"] == "postcopy" and c["faults"] is not None:
            faults = (
                f"{_count(c['faults'])}, {_count(c['fault_median_us'])} / "
                f"{_count(c['fault_p99_us'])} us"
            )
        rows.append(
            [
                c["size_label"],
                c["rate_label"],
                c["mode"],
                "-" if c["write_rate"] is None else f"{human_size(c['write_rate'])}/s",
                _ms(c["total_seconds"]),
                _ms(c["downtime"]),
                _ms(c.get("guest_pause")),
                _ms(c["expected_downtime"]) if c["mode"] == "precopy" else "-",
                _ms(c["switchover_to_running"]),
                human_size(c["bytes_on_wire"] or 0),
                f"{human_size(c['peak'] or 0)} "
                + ("(-)" if c["ratio"] is None else f"({c['ratio']:.2f}x)"),
                human_size(c["added"] or 0),
                human_size(c["peak_rss"] or 0),
                _count(c["rounds"]),
                "-"
                if c["last_round_bandwidth"] is None
                else f"{human_size(c['last_round_bandwidth'])}/s",
                f"{_count(c['pages_moved'])} / {_count(c['pages_copied'])} / "
                f"{_count(c['pages_zero'])}",
                "yes" if c["verified"] else "**no**",
                faults,
            ]
        )
    return rows


def markdown_table(result: dict[str, Any]) -> str:
    """The results and the targets as Markdown (what docs/benchmarks.md shows)."""
    machine = result["machine"]
    cfg = result["config"]
    lines = [
        f"**Migration matrix**, {len(result['runs'])} run(s), median of {cfg['repeat']} per "
        f"row, {result['date']}, Linux {machine['kernel']}, {machine.get('cpus')} x "
        f"{machine.get('cpu')}, {machine.get('memory_gib')} GiB; downtime limit "
        f"{_ms(cfg['downtime_limit'])}, {cfg['threads']} writer threads",
        "",
    ]
    if not result.get("complete", True):
        lines += ["**Incomplete: a run failed; these are the runs before it.**", ""]
    lines += [
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in cell_rows(result)]
    notes = result["notes"]
    lines += [
        "",
        f"Order: {result['order']['scheme']}. Memory: {notes['warmth']}.",
        f'Peak memory: {notes["peak"]}; "added" is the peak minus both processes\' Pss just '
        "before the migration; the RSS sum counts pages mapped by both processes twice.",
        f"Times: {notes['clock']}.",
        "",
        *markdown_targets(target_rows(result)),
    ]
    lines += ["", f"QEMU context: {notes['qemu']}"]
    return "\n".join(lines) + "\n"


#: Colour per mode and marker per dirty rate position in the plot.
_COLOURS = {"flip": "tab:green", "precopy": "tab:blue", "postcopy": "tab:orange"}
_STYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v")


def check_plot() -> None:
    """Raise :class:`~pageflip.FeatureUnavailable` unless :func:`plot` can work here (so that a
    long run can fail before it starts rather than after)."""
    try:
        import matplotlib.backends.backend_agg
        import matplotlib.figure
        import matplotlib.ticker  # noqa: F401
    except ImportError as err:
        raise FeatureUnavailable(
            "plotting needs matplotlib: install it with pip install 'pageflip[plot]'",
            feature="matplotlib",
            reason=str(err),
        ) from err


def plot(result: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Draw downtime and total time against memory size (log-log), one line per (mode, rate),
    and save a PNG at ``path``. Needs matplotlib (``pip install 'pageflip[plot]'``); it uses
    the Agg canvas directly, so pyplot and its global backend stay untouched."""
    check_plot()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, NullLocator

    cells = result["cells"]
    sizes = sorted({c["size"] for c in cells})
    rates = sorted({c["rate"] for c in cells})
    modes = [m for m in MODES if any(c["mode"] == m for c in cells)]
    fig = Figure(figsize=(12, 5.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharex=True)
    panels = (("downtime", "downtime (s)"), ("total_seconds", "total time (s)"))
    ticks = set(sizes) | {r["size"] for r in QEMU_REFERENCE if r["rate"] in rates}
    for ax, (key, label) in zip(axes, panels, strict=True):
        for mode in modes:
            for i, rate in enumerate(rates):
                points = sorted(
                    (c["size"], c[key])
                    for c in cells
                    if c["mode"] == mode and c["rate"] == rate and c[key] and c[key] > 0
                )
                if not points:
                    continue
                ax.plot(
                    [p[0] / GiB for p in points],
                    [p[1] for p in points],
                    color=_COLOURS[mode],
                    linestyle=_STYLES[i % len(_STYLES)],
                    marker=_MARKERS[i % len(_MARKERS)],
                    label=f"{mode}, {_rate_label(rate)}",
                )
        for ref in QEMU_REFERENCE:
            value = ref["total_seconds"] if key == "total_seconds" else ref.get("downtime")
            if value is None or ref["rate"] not in rates:
                continue
            ax.plot(
                [ref["size"] / GiB],
                [value],
                linestyle="none",
                marker=_MARKERS[rates.index(ref["rate"]) % len(_MARKERS)],
                fillstyle="none",
                color="black" if ref["source"] == "issue" else "grey",
                markersize=9,
                label=f"QEMU {format_size(ref['size'])}, {_rate_label(ref['rate'])} "
                f"({ref['source']})",
            )
        if key == "downtime":
            limit = result["config"]["downtime_limit"]
            for value, text, color in (
                (limit, "precopy limit", "tab:red"),
                (FLIP_DOWNTIME_LIMIT, "flip target", "tab:green"),
            ):
                ax.axhline(value, color=color, linewidth=0.8, linestyle="--")
                ax.annotate(
                    f"{text} {_ms(value)}",
                    (0.99, value),
                    xycoords=("axes fraction", "data"),
                    fontsize=8,
                    color=color,
                    va="bottom",
                    ha="right",
                )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(FixedLocator([s / GiB for s in sorted(ticks)]))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([format_size(s) for s in sorted(ticks)])
        ax.set_xlabel("guest memory")
        ax.set_ylabel(label)
        ax.grid(True, which="both", linewidth=0.3)
        ax.set_title(label.split(" (")[0])
    handles, labels = axes[1].get_legend_handles_labels()
    seen = dict(zip(labels, handles, strict=True))
    for h, lab in zip(*axes[0].get_legend_handles_labels(), strict=True):
        seen.setdefault(lab, h)
    fig.legend(list(seen.values()), list(seen), loc="outside right center", fontsize=8)
    machine = result["machine"]
    fig.suptitle(
        f"pageflip bench migrate, {result['date']}: Linux {machine['kernel']}, "
        f"{machine.get('cpus')} x {machine.get('cpu')}, {machine.get('memory_gib')} GiB "
        f"(median of {result['config']['repeat']})",
        fontsize=10,
    )
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=120)
    return out
