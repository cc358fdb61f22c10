"""Handoff benchmark: hand N bytes from one process to another, every way there is, in one run.

What it answers: how long until a second process holds N bytes that the first one has, by a
pageflip move and by every copy path next to it. Each method runs between two real processes
(a *sender* and a *receiver*, started with ``spawn`` and warmed up before anything is timed):

========================  ===============================================================
``move``                  ``gift(Region.movable)`` -> ``receive()``: the pages change owner
``move-huge``             the same on 2 MiB hugetlb pages (``--huge``; needs a hugetlb pool)
``process_vm_readv``      ``send()`` -> ``receive_into(warm, copy_method="process_vm_readv")``
``vmsplice-gift``         ``gift(Region.anonymous)`` -> ``receive_into(warm, "vmsplice")``
``vmsplice``              ``send()`` -> ``receive_into(warm, copy_method="vmsplice")``
``stream``                ``send()`` -> ``receive_into(warm, copy_method="stream")``
``*-fresh``               the same copies into a new region: ``receive(copy_method=...)``
``shared-memory``         ``multiprocessing.shared_memory``: create, copy in, attach
``pickle-pipe``           pickled numpy arrays through ``multiprocessing.Pipe``
========================  ===============================================================

Timing: the sender stamps CLOCK_MONOTONIC (system-wide on Linux) just before it starts the
handoff; the receiver stamps it when it holds the data (*access*) and again once every page
has been touched (*all pages*; for copies the copy itself touched every page). The receiver is
already waiting when the sender starts. Methods run interleaved (every repeat runs each
method once) so that they see similar memory conditions; the median of the repeats is
reported. Outside the timed sections the receiver checks one 64-bit word per page against the
pattern the sender wrote, and pageflip rows are checked to have really moved (or copied).

A single-thread numpy memcpy between two already-touched buffers is measured in the same run
as the reference for copy rates, and the Python overhead of one-page transfers is measured as
the median of many gift + receive round trips.

:func:`run` returns a JSON-ready dict; :func:`table_rows` and :func:`markdown_table` lay it
out. Nothing here prints: progress goes to a callback.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import multiprocessing
import os
import resource
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import connection as mp_connection
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnContext
from multiprocessing.shared_memory import SharedMemory
from typing import Any, Literal, NotRequired, TypedDict

import numpy as np
import numpy.typing as npt

from .. import channel_pair
from .._children import Child, raise_failure, serve, stop_on_signals
from .._sys import huge as _huge
from ..channel import Channel, CopyMethod
from ..errors import BadArgument, FeatureUnavailable, PageflipError
from ..memory import PAGE_SIZE, Region
from ..units import format_size
from .common import BenchmarkError, machine, markdown_targets, now
from .pattern import fill, page_sample, sample_expected

__all__ = [
    "COLUMNS",
    "DEFAULT_METHODS",
    "METHODS",
    "BenchmarkError",
    "HandoffConfig",
    "HandoffResult",
    "HandoffRow",
    "HandoffTarget",
    "Method",
    "ProgressCallback",
    "markdown_table",
    "run",
    "table_rows",
    "target_rows",
]

GIB = 1 << 30
#: pickle-pipe sends the data as numpy arrays of at most this many bytes per message, so that
#: pickling (a copy on each side) never holds more than a few hundred MiB extra.
PICKLE_MESSAGE = 256 << 20
#: Seed of the data pattern the sender writes (see :mod:`pageflip.bench.pattern`).
SEED = 0x5EED_F11B
#: How long the parent waits, after the receiver said it is about to wait, before the sender
#: starts: enough for the receiver to block in its receive call.
ARM_DELAY = 0.02
#: One-page transfers per getrusage bracket in the overhead measurement.
OVERHEAD_BATCH = 250
#: Untimed one-page round trips before the overhead measurement.
OVERHEAD_WARMUP = 50
#: Each step (fill, transfer, ...) must finish within this many seconds.
STEP_TIMEOUT = 900.0
#: Size of the untimed warm-up run of every method (code paths, imports, the handshake).
WARMUP_SIZE = 1 << 20

TOUCH = (
    "np.add.reduce(a[::4096]) on the received uint8 array, split over {threads} thread(s): "
    "reads one byte per page"
)
CLOCK = "CLOCK_MONOTONIC via time.clock_gettime: system-wide, so sender and receiver compare"

#: Speed targets, by id: what each one demands.
TARGETS = {
    "move_access": "move: the receiver can access the data in under 5 ms (stated for 1 GiB)",
    "move_access_scaling": (
        "move at this size: every run's access within 2x of the median 1 GiB move, same run"
    ),
    "huge_access_scaling": (
        "move on 2 MiB pages at this size: every run's access within 2x of the median 1 GiB "
        "move on 2 MiB pages, same run"
    ),
    "huge_touched_vs_4k": (
        "move + touching every 4 KiB on 2 MiB pages at least 5x faster than on 4 KiB pages "
        "(stated for 1 GiB)"
    ),
    "huge_release": (
        "the writer's release (CPU time) of a moved region on 2 MiB pages < 2 ms (stated for 4 GiB)"
    ),
    "move_touched_vs_copy": (
        "move + touching every page faster than the fastest copy path in the same run"
    ),
    "copy_vs_memcpy": (
        "best pageflip copy fallback (warm target) >= 70% of the single-thread memcpy rate"
    ),
    "overhead": "Python overhead (user-space CPU) per one-page gift or receive < 100 us",
    "overhead_cpu": "all CPU (user + kernel) per one-page gift or receive < 100 us",
}


@dataclass(frozen=True)
class Method:
    """One way to hand the data over, as a row of the results."""

    #: Name on the command line (``--methods``) and in the JSON.
    key: str
    #: ``"move"`` (pages change owner) or ``"copy"``.
    semantics: Literal["move", "copy"]
    #: Where the data lands: ``"mapped"`` (the sender's pages), ``"warm"`` (an already-touched
    #: buffer, reused) or ``"fresh"`` (memory allocated by the handoff itself).
    target: Literal["mapped", "warm", "fresh"]
    #: What the sender and the receiver do, in one line.
    how: str
    #: The pageflip copy method the receiver asks for (None: not a pageflip copy).
    copy_method: CopyMethod | None = None
    #: Whether pageflip reports a Transfer (pages moved and copied) for this method.
    pageflip: bool = True
    #: Whether this is a pageflip copy fallback (what the memcpy target is about).
    fallback: bool = False


_METHOD_LIST = (
    Method("move", "move", "mapped", "gift(Region.movable) -> receive()"),
    Method(
        "move@1G",
        "move",
        "mapped",
        "the move at 1 GiB, for the size scaling target (added when --size > 1G)",
    ),
    Method(
        "move-huge",
        "move",
        "mapped",
        "gift(Region.movable(huge='hugetlb')) -> receive(): 2 MiB pages",
    ),
    Method(
        "move-huge@1G",
        "move",
        "mapped",
        "the move on 2 MiB pages at 1 GiB, for the size scaling target (added when --size > 1G)",
    ),
    Method(
        "process_vm_readv",
        "copy",
        "warm",
        "send() -> receive_into(warm, copy_method='process_vm_readv')",
        "process_vm_readv",
        fallback=True,
    ),
    Method(
        "vmsplice-gift",
        "copy",
        "warm",
        "gift(Region.anonymous) -> receive_into(warm, copy_method='vmsplice'): gift + readv",
        "vmsplice",
        fallback=True,
    ),
    Method(
        "vmsplice",
        "copy",
        "warm",
        "send() -> receive_into(warm, copy_method='vmsplice')",
        "vmsplice",
        fallback=True,
    ),
    Method(
        "stream",
        "copy",
        "warm",
        "send() -> receive_into(warm, copy_method='stream'): bytes over the Unix socket",
        "stream",
        fallback=True,
    ),
    Method(
        "process_vm_readv-fresh",
        "copy",
        "fresh",
        "send() -> receive(copy_method='process_vm_readv') into a new region",
        "process_vm_readv",
    ),
    Method(
        "vmsplice-fresh",
        "copy",
        "fresh",
        "send() -> receive(copy_method='vmsplice') into a new region",
        "vmsplice",
    ),
    Method(
        "stream-fresh",
        "copy",
        "fresh",
        "send() -> receive(copy_method='stream') into a new region",
        "stream",
    ),
    Method(
        "shared-memory",
        "copy",
        "fresh",
        "multiprocessing.shared_memory: create, copy in, send the name; the receiver attaches",
        pageflip=False,
    ),
    Method(
        "pickle-pipe",
        "copy",
        "fresh",
        f"multiprocessing.Pipe send()/recv() of numpy arrays (pickled, "
        f"{format_size(PICKLE_MESSAGE)} per message)",
        pageflip=False,
    ),
)

#: Every method by key, in table order.
METHODS: dict[str, Method] = {m.key: m for m in _METHOD_LIST}
#: Methods on huge pages: run only when asked for (``--huge``), since they need a hugetlb pool.
HUGE_METHODS: tuple[str, ...] = ("move-huge",)
#: What ``--methods`` runs by default: everything but the huge pages (the ``@1G`` rows are
#: added by size, not chosen).
DEFAULT_METHODS: tuple[str, ...] = tuple(
    k for k in METHODS if not k.endswith("@1G") and k not in HUGE_METHODS
)
#: The huge page size of the huge rows.
HUGE_PAGE = 2 << 20
#: Keys whose sender gifts a freshly filled movable region, and its ``huge`` argument.
_GIFTED: dict[str, Any] = {
    "move": False,
    "move@1G": False,
    "move-huge": "hugetlb",
    "move-huge@1G": "hugetlb",
}

#: Called before each step with (steps done, steps in all, what runs now).
ProgressCallback = Callable[[int, int, str], None]


@dataclass(frozen=True)
class HandoffConfig:
    """What to run: ``size`` bytes, each method ``repeat`` times, and the overhead rounds."""

    size: int
    repeat: int = 3
    methods: tuple[str, ...] = DEFAULT_METHODS
    overhead_rounds: int = 1000
    #: Threads that touch the received pages (0: two when there are two CPUs or more).
    touch_threads: int = 0

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS or m.endswith("@1G")]
        if unknown:
            raise BadArgument(
                f"unknown method(s) {unknown}; choose from {list(DEFAULT_METHODS + HUGE_METHODS)}",
                argument="methods",
            )
        if "move-huge" in self.methods and self.size % HUGE_PAGE:
            raise BadArgument(
                f"the huge page rows need a size that is a whole number of 2 MiB pages, "
                f"not {self.size} bytes",
                argument="size",
            )
        if not self.methods:
            raise BadArgument("choose at least one method", argument="methods")
        if self.size < PAGE_SIZE:
            raise BadArgument(
                f"the size must be at least one page ({PAGE_SIZE} bytes)", argument="size"
            )
        if self.repeat < 1:
            raise BadArgument("repeat must be at least 1", argument="repeat")
        if self.overhead_rounds < 0:
            raise BadArgument("overhead_rounds cannot be negative", argument="overhead_rounds")
        if self.touch_threads < 0:
            raise BadArgument("touch_threads cannot be negative", argument="touch_threads")

    @property
    def threads(self) -> int:
        """Threads that touch received pages: ``touch_threads``, or 2 (1 on one CPU)."""
        return self.touch_threads or min(2, os.cpu_count() or 1)

    @property
    def nbytes(self) -> int:
        """The size rounded up to whole pages: what is really handed over."""
        return -(-self.size // PAGE_SIZE) * PAGE_SIZE

    def keys(self) -> list[str]:
        """The methods to run, in table order (``move@1G`` added when it applies)."""
        chosen = set(self.methods)
        if "move" in chosen and self.nbytes > GIB:
            chosen.add("move@1G")
        if "move-huge" in chosen and self.nbytes > GIB:
            chosen.add("move-huge@1G")
        return [k for k in METHODS if k in chosen]


Bytes = npt.NDArray[np.uint8]


def _words(arr: Bytes) -> npt.NDArray[np.uint64]:
    return arr.view(np.uint64)


def _buffer(size: int, name: str) -> tuple[Region, Bytes]:
    """Page-aligned private memory on transparent huge pages, every page touched.

    Every buffer the benchmark copies from or into is page-aligned: a copy between buffers
    whose addresses differ modulo 64 (a plain ``np.empty`` array starts 16 bytes past a page)
    was measured 1.5-2x slower here, which would measure alignment rather than the path.
    """
    region = Region.anonymous(size, name=name, hugepages=True)
    arr = region.numpy(np.uint8)
    arr.fill(0)
    return region, arr


def _release(region: Region | None) -> None:
    if region is not None:
        with contextlib.suppress(PageflipError):
            region.close()


def _touch(arr: Bytes, pool: ThreadPoolExecutor | None, threads: int) -> None:
    """Read one byte of every page of ``arr``, so that every page is mapped.

    With a pool the pages are split evenly over its threads (numpy drops the GIL while it
    reduces), as pageflip splits a large process_vm_readv copy over two threads.
    """
    if pool is None or threads < 2:
        np.add.reduce(arr[::PAGE_SIZE])
        return
    pages = -(-arr.size // PAGE_SIZE)
    bounds = [pages * i // threads * PAGE_SIZE for i in range(threads + 1)]
    parts = [arr[lo:hi:PAGE_SIZE] for lo, hi in itertools.pairwise(bounds)]
    list(pool.map(np.add.reduce, parts))


# -- the two benchmark processes --------------------------------------------------------------


class _Sender:
    """Holds the source data (the pattern, written once) and hands it over on command."""

    def __init__(self, channel: Channel, peer: Connection) -> None:
        self.channel = channel
        self.peer = peer
        self.source: Bytes = np.empty(0, np.uint8)
        self.source_region: Region | None = None
        self.pending: Region | None = None
        self.shm: SharedMemory | None = None

    def do_setup(self, ctrl: Connection, size: int, touch_threads: int = 1) -> None:
        self.source_region, self.source = _buffer(size, "source")
        fill(_words(self.source), SEED)

    def do_prepare(self, ctrl: Connection, key: str, size: int) -> None:
        if key in _GIFTED:
            region = Region.movable(size, name="bench", huge=_GIFTED[key])
        elif key == "vmsplice-gift":
            region = Region.anonymous(size, name="bench", hugepages=True)  # like the source
        else:
            return
        try:
            arr = region.numpy(np.uint8)
            np.copyto(arr, self.source[:size])
            del arr
        except BaseException:
            region.close()
            raise
        self.pending = region

    def do_run(self, ctrl: Connection, key: str, size: int) -> dict[str, Any]:
        method = METHODS[key]
        transfer = None
        t0 = now()
        if key in _GIFTED or key == "vmsplice-gift":
            region, self.pending = self.pending, None
            assert region is not None, "prepare comes first"
            transfer = self.channel.gift(region)
        elif method.pageflip:
            transfer = self.channel.send(self.source[:size])
        elif key == "pickle-pipe":
            for start in range(0, size, PICKLE_MESSAGE):
                self.peer.send(self.source[start : min(start + PICKLE_MESSAGE, size)])
        elif key == "shared-memory":
            self.shm = shm = SharedMemory(create=True, size=size)
            dest: Bytes = np.ndarray((size,), np.uint8, buffer=shm.buf)
            np.copyto(dest, self.source[:size])
            del dest
            self.peer.send(shm.name)
            self.peer.recv()  # the receiver is done with the name
            self._drop_shm()
        return {"t0": t0, "transfer": None if transfer is None else transfer.as_dict()}

    def _drop_shm(self) -> None:
        shm, self.shm = self.shm, None
        if shm is not None:
            shm.close()
            shm.unlink()

    def do_overhead(self, ctrl: Connection, rounds: int) -> dict[str, list[float]]:
        wall: list[float] = []
        cpu: list[float] = []
        user = system = 0.0
        for first in range(0, rounds, OVERHEAD_BATCH):
            batch = []
            for i in range(first, min(first + OVERHEAD_BATCH, rounds)):
                region = Region.movable(PAGE_SIZE, name="tiny")
                region.numpy(np.uint8)[0] = i & 0xFF
                batch.append(region)
            # getrusage splits CPU time into user and kernel by sampling: it is only right
            # summed over many calls, so it brackets a batch of calls and nothing else.
            r0 = resource.getrusage(resource.RUSAGE_THREAD)
            for region in batch:
                w0, c0 = time.perf_counter(), time.thread_time()
                transfer = self.channel.gift(region)
                c1, w1 = time.thread_time(), time.perf_counter()
                if not transfer.moved:
                    raise BenchmarkError(f"a one-page gift did not move: {transfer}")
                wall.append(w1 - w0)
                cpu.append(c1 - c0)
            r1 = resource.getrusage(resource.RUSAGE_THREAD)
            user += r1.ru_utime - r0.ru_utime
            system += r1.ru_stime - r0.ru_stime
        return {"wall": wall, "cpu": cpu, "user": [user / rounds], "system": [system / rounds]}

    def close(self) -> None:
        _release(self.pending)
        with contextlib.suppress(OSError):
            self._drop_shm()
        self.source = np.empty(0, np.uint8)
        _release(self.source_region)
        self.channel.close()
        self.peer.close()


class _Receiver:
    """Holds the warm destination and takes the data on command, timing and checking it."""

    def __init__(self, channel: Channel, peer: Connection) -> None:
        self.channel = channel
        self.peer = peer
        self.dest: Bytes = np.empty(0, np.uint8)
        self.dest_region: Region | None = None
        self.expected: dict[int, npt.NDArray[np.uint64]] = {}
        self.pool: ThreadPoolExecutor | None = None
        self.threads = 1

    def do_setup(self, ctrl: Connection, size: int, touch_threads: int = 1) -> None:
        self.threads = touch_threads
        if touch_threads > 1:
            self.pool = ThreadPoolExecutor(touch_threads, thread_name_prefix="touch")
            list(self.pool.map(time.sleep, [0.01] * touch_threads))  # start the threads now
        self.dest_region, self.dest = _buffer(size, "warm target")

    def do_prepare(self, ctrl: Connection, key: str, size: int) -> None:
        if METHODS[key].target == "warm":
            # Clear the words that are checked, so that stale data from a previous run fails.
            page_sample(_words(self.dest[:size]))[:] = 0
        if size not in self.expected:
            self.expected[size] = sample_expected(size, SEED)

    def _check(self, sample: npt.NDArray[np.uint64], size: int) -> bool:
        return bool(np.array_equal(sample, self.expected[size]))

    def do_run(self, ctrl: Connection, key: str, size: int) -> dict[str, Any]:
        method = METHODS[key]
        ctrl.send(("armed",))
        transfer = None
        if method.semantics == "move":
            region, transfer = self.channel.receive()
            t_access = now()
            arr = region.numpy(np.uint8)
            _touch(arr, self.pool, self.threads)
            t_touched = now()
            ok = self._check(page_sample(_words(arr)), size)
            del arr
            region.close()
        elif method.target == "warm":
            assert method.copy_method is not None
            dest = self.dest[:size]
            transfer = self.channel.receive_into(dest, copy_method=method.copy_method)
            t_access = t_touched = now()
            ok = self._check(page_sample(_words(dest)), size)
        elif method.pageflip:
            assert method.copy_method is not None
            region, transfer = self.channel.receive(copy_method=method.copy_method)
            t_access = t_touched = now()
            arr = region.numpy(np.uint8)
            ok = self._check(page_sample(_words(arr)), size)
            del arr
            region.close()
        elif key == "pickle-pipe":
            pieces: list[Bytes] = []
            got = 0
            while got < size:
                piece = self.peer.recv()
                pieces.append(piece)
                got += piece.nbytes
            t_access = t_touched = now()
            ok = self._check(np.concatenate([page_sample(_words(p)) for p in pieces]), size)
            del pieces
        else:  # shared-memory
            name = self.peer.recv()
            # The children share the parent's resource tracker, which the sender's unlink()
            # updates: attaching needs no bookkeeping here.
            shm = SharedMemory(name=name)
            arr = np.ndarray((size,), np.uint8, buffer=shm.buf)
            t_access = now()
            _touch(arr, self.pool, self.threads)
            t_touched = now()
            self.peer.send("attached")
            ok = self._check(page_sample(_words(arr)), size)
            del arr
            shm.close()
        return {
            "t_access": t_access,
            "t_touched": t_touched,
            "verified": ok,
            "transfer": None if transfer is None else transfer.as_dict(),
        }

    def do_memcpy(self, ctrl: Connection, size: int) -> float:
        region, source = _buffer(size, "memcpy source")  # touched, like the destination
        try:
            dest = self.dest[:size]
            t0 = now()
            np.copyto(dest, source)
            seconds = now() - t0
            del source, dest
        finally:
            _release(region)
        return seconds

    def do_overhead(self, ctrl: Connection, rounds: int) -> dict[str, list[float]]:
        cpu: list[float] = []
        user = system = 0.0
        for first in range(0, rounds, OVERHEAD_BATCH):
            got = []
            r0 = resource.getrusage(resource.RUSAGE_THREAD)
            for _ in range(first, min(first + OVERHEAD_BATCH, rounds)):
                c0 = time.thread_time()
                got.append(self.channel.receive())
                cpu.append(time.thread_time() - c0)
            r1 = resource.getrusage(resource.RUSAGE_THREAD)
            user += r1.ru_utime - r0.ru_utime
            system += r1.ru_stime - r0.ru_stime
            for i, (region, transfer) in enumerate(got, start=first):
                head = int(region.numpy(np.uint8)[0])
                region.close()
                if not transfer.moved or head != i & 0xFF:
                    raise BenchmarkError(f"one-page round trip {i} went wrong: {transfer}")
        return {"cpu": cpu, "user": [user / rounds], "system": [system / rounds]}

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
        self.dest = np.empty(0, np.uint8)
        _release(self.dest_region)
        self.channel.close()
        self.peer.close()


def _worker_main(ctrl: Connection, role: str, channel: Channel, peer: Connection) -> None:
    """Entry point of a benchmark process: run commands from the parent until told to quit."""
    stop_on_signals()
    worker: _Sender | _Receiver = (
        _Sender(channel, peer) if role == "sender" else _Receiver(channel, peer)
    )
    try:
        serve(ctrl, lambda command, *args: getattr(worker, f"do_{command}")(ctrl, *args))
    finally:
        worker.close()
        ctrl.close()


class _Worker(Child):
    """The parent's handle on one benchmark process."""

    def __init__(self, ctx: SpawnContext, role: str, channel: Channel, peer: Connection) -> None:
        super().__init__(
            ctx, _worker_main, (role, channel, peer), role=role, name=f"pageflip-bench-{role}"
        )


def _gather(workers: Sequence[_Worker], kind: str = "ok") -> list[Any]:
    """One message of ``kind`` from each worker, in order; the first failure raises."""
    results: dict[int, Any] = {}
    pending = {w.conn: (i, w) for i, w in enumerate(workers)}
    deadline = time.monotonic() + STEP_TIMEOUT
    while pending:
        left = deadline - time.monotonic()
        sentinels = {w.process.sentinel: w for _, w in pending.values()}
        ready = mp_connection.wait([*pending, *sentinels], max(0.0, left))
        if not ready:
            names = ", ".join(w.role for _, w in pending.values())
            raise BenchmarkError(f"the {names} did not answer within {STEP_TIMEOUT:.0f} s")
        for obj in ready:
            if isinstance(obj, int):
                if obj in sentinels and sentinels[obj].conn in pending:
                    worker = sentinels[obj]
                    if not worker.conn.poll():
                        worker.process.join(1)
                        code = worker.process.exitcode
                        raise BenchmarkError(f"the {worker.role} process died (exit code {code})")
                continue
            assert isinstance(obj, Connection)
            i, worker = pending.pop(obj)
            try:
                message = obj.recv()
            except EOFError:  # it died: its end of the pipe closed with nothing in it
                worker.process.join(1)
                code = worker.process.exitcode
                raise BenchmarkError(f"the {worker.role} process died (exit code {code})") from None
            if message[0] == "error":
                raise_failure(message, BenchmarkError, worker.role)
            if message[0] != kind:
                raise BenchmarkError(f"the {worker.role} said {message[0]!r}, expected {kind!r}")
            results[i] = message[1] if len(message) > 1 else None
    return [results[i] for i in range(len(workers))]


# -- the run ----------------------------------------------------------------------------------


@dataclass
class _Runs:
    """Raw measurements of one method over the repeats."""

    size: int
    access: list[float] = field(default_factory=list)
    touched: list[float] = field(default_factory=list)
    transfers: list[TransferRecord] = field(default_factory=list)
    sender_transfers: list[TransferRecord] = field(default_factory=list)


def _handoff(sender: _Worker, receiver: _Worker, key: str, size: int) -> tuple[Any, Any]:
    """One timed handoff: prepare both sides, arm the receiver, start the sender."""
    sender.send("prepare", key, size)
    receiver.send("prepare", key, size)
    _gather([sender, receiver])
    receiver.send("run", key, size)
    _gather([receiver], "armed")
    time.sleep(ARM_DELAY)
    sender.send("run", key, size)
    sent, received = _gather([sender, receiver])
    return sent, received


def _check_run(key: str, size: int, received: dict[str, Any]) -> None:
    """Raise BenchmarkError unless the data arrived intact and the method did what it says."""
    method = METHODS[key]
    if not received["verified"]:
        raise BenchmarkError(f"{key}: the receiver found wrong data")
    if not method.pageflip:
        return
    transfer = received["transfer"]
    pages = size // PAGE_SIZE
    if method.semantics == "move":
        if transfer["pages_copied"] != 0 or transfer["pages_moved"] != pages:
            raise BenchmarkError(f"{key}: expected a move of {pages} pages, got {transfer}")
    elif (
        transfer["pages_moved"] != 0
        or transfer["pages_copied"] != pages
        or transfer["method"] != method.copy_method
    ):
        raise BenchmarkError(
            f"{key}: expected a {method.copy_method} copy of {pages} pages, got {transfer}"
        )


class _Steps:
    """Progress of a run: each step is announced before it starts."""

    def __init__(self, total: int, on_progress: ProgressCallback | None) -> None:
        self.total = total
        self.done = 0
        self.on_progress = on_progress

    def __call__(self, what: str) -> None:
        if self.on_progress is not None:
            self.on_progress(self.done, self.total, what)
        self.done += 1

    def finish(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.total, self.total, "done")


def run(config: HandoffConfig, on_progress: ProgressCallback | None = None) -> HandoffResult:
    """Run the handoff benchmark and return its results as a JSON-ready dict.

    Starts a sender and a receiver process, runs every method ``config.repeat`` times
    (interleaved), the memcpy reference and the overhead rounds, then stops both processes,
    also when something fails.
    """
    keys = config.keys()
    runs = {k: _Runs(GIB if k.endswith("@1G") else config.nbytes) for k in keys}
    _check_huge_pool([runs[k].size for k in keys if _GIFTED.get(k) == "hugetlb"])
    steps = 3 + config.repeat * (len(keys) + 1) + (1 if config.overhead_rounds else 0)
    step = _Steps(steps, on_progress)
    started = datetime.datetime.now(datetime.UTC)
    memcpy: list[float] = []
    overhead: dict[str, list[float]] = {}
    ctx = multiprocessing.get_context("spawn")
    workers: list[_Worker] = []
    step("starting the sender and receiver processes")
    a, b = channel_pair(timeout=STEP_TIMEOUT)
    link_a, link_b = ctx.Pipe()
    finished = False
    try:
        try:
            workers.append(_Worker(ctx, "sender", a, link_a))
            workers.append(_Worker(ctx, "receiver", b, link_b))
        finally:
            for end in (a, b, link_a, link_b):
                end.close()
        sender, receiver = workers
        _gather(workers, "ready")
        _set_up(sender, receiver, config, step)
        for r in range(config.repeat):
            _repeat(sender, receiver, runs, step, f"repeat {r + 1}/{config.repeat}")
            step(f"repeat {r + 1}/{config.repeat}: memcpy reference")
            receiver.send("memcpy", config.nbytes)
            memcpy.extend(_gather([receiver]))
        if config.overhead_rounds:
            step(f"overhead: {config.overhead_rounds} one-page round trips")
            overhead = _overhead_rounds(sender, receiver, config.overhead_rounds)
        finished = True
    finally:
        # After a failure or Ctrl-C a worker may be stuck in a transfer: do not wait long.
        for worker in workers:
            worker.stop(10.0 if finished else 1.0)
    step.finish()
    return _results(config, started, runs, memcpy, overhead)


def _check_huge_pool(sizes: list[int]) -> None:
    """The huge page rows (of these sizes) hold their region twice over at most: the sender
    fills the next one while the receiver may still hold the last. FeatureUnavailable,
    naming the sysctl that reserves enough, when the 2 MiB pool has fewer free pages."""
    if not sizes:
        return
    need = 2 * max(sizes) // HUGE_PAGE
    pool = _huge.pool(HUGE_PAGE)
    if pool.available >= need:
        return
    why = (
        f"the huge page rows hold a region of {format_size(max(sizes))} twice over (the "
        f"sender fills the next one while the receiver may still hold the last): {need} "
        f"pages of 2 MiB, and the {pool.describe()}; to reserve enough: "
        f"{pool.setting_for(need)}"
    )
    raise FeatureUnavailable(why, feature="hugetlb_2m", reason=why)


def _set_up(sender: _Worker, receiver: _Worker, config: HandoffConfig, step: _Steps) -> None:
    """Fill the sender's data and the receiver's targets, then run every method once,
    untimed (code paths, imports, the handshake)."""
    size = config.nbytes
    step(f"writing {format_size(size)} of pattern (sender), touching the target (receiver)")
    sender.send("setup", size)
    receiver.send("setup", size, config.threads)
    _gather([sender, receiver])
    step("warm-up: every method once, untimed")
    methods = config.keys()
    for key in methods:
        # A huge region is at least one huge page (the size is a whole number of them).
        warm = min(HUGE_PAGE if _GIFTED.get(key) else WARMUP_SIZE, size)
        _, received = _handoff(sender, receiver, key, warm)
        _check_run(key, warm, received)


def _repeat(
    sender: _Worker, receiver: _Worker, runs: dict[str, _Runs], step: _Steps, label: str
) -> None:
    """One timed handoff of every method, in table order."""
    for key, row in runs.items():
        step(f"{label}: {key}")
        sent, received = _handoff(sender, receiver, key, row.size)
        _check_run(key, row.size, received)
        row.access.append(received["t_access"] - sent["t0"])
        row.touched.append(received["t_touched"] - sent["t0"])
        row.transfers.append(received["transfer"])
        row.sender_transfers.append(sent["transfer"])


def _overhead_rounds(sender: _Worker, receiver: _Worker, rounds: int) -> dict[str, list[float]]:
    """``rounds`` one-page gift + receive round trips (after untimed warm-up rounds): wall
    and CPU time of each, and getrusage's user/system split."""
    total = OVERHEAD_WARMUP + rounds
    receiver.send("overhead", total)
    sender.send("overhead", total)
    sent, received = _gather([sender, receiver])
    return {
        "wall": sent["wall"][OVERHEAD_WARMUP:],
        "gift_cpu": sent["cpu"][OVERHEAD_WARMUP:],
        "receive_cpu": received["cpu"][OVERHEAD_WARMUP:],
        "gift_user": sent["user"],
        "gift_system": sent["system"],
        "receive_user": received["user"],
        "receive_system": received["system"],
    }


# -- records ----------------------------------------------------------------------------------


#: A transfer as the channel reports it (``Transfer.as_dict()``); None where there is none.
TransferRecord = dict[str, Any] | None


class HandoffRow(TypedDict):
    """One method's results (seconds; rates in GiB/s; ratios to the move)."""

    key: str
    how: str
    semantics: str
    target: str
    fallback: bool
    size: int
    access_seconds: list[float]
    touched_seconds: list[float]
    access_median: float
    touched_median: float
    access_min: float
    touched_min: float
    gib_per_s: float
    ratio_to_move_access: float | None
    ratio_to_move_touched: float | None
    fraction_of_memcpy: float | None
    pages_moved: int | None
    pages_copied: int | None
    reported_method: str | None
    transfers: list[TransferRecord]
    sender_transfers: list[TransferRecord]
    #: Median of the writer's release after a gift (``Transfer.release``: wall time, so it
    #: shares the CPUs with the receiver touching the pages and freeing them), if it gifted.
    release_median: float | None
    #: Median CPU time of that release (``Transfer.release_cpu``): the teardown's own cost.
    release_cpu_median: float | None


class HandoffTarget(TypedDict):
    """One speed target, judged: ``passed`` None when not measured."""

    id: str
    text: str
    measured: float | None
    limit: float | None
    unit: str
    passed: bool | None
    fastest_copy: NotRequired[str]
    best_fallback: NotRequired[str]


class Overhead(TypedDict, total=False):
    """The one-page round trips (microseconds); empty when none ran."""

    rounds: int
    what: str
    round_trip_median_us: float
    round_trip_p10_us: float
    round_trip_p90_us: float
    gift_cpu_median_us: float
    receive_cpu_median_us: float
    gift_user_us: float
    gift_system_us: float
    receive_user_us: float
    receive_system_us: float


class Memcpy(TypedDict):
    """The single-thread memcpy reference."""

    what: str
    seconds: list[float]
    median: float
    gib_per_s: float


class HandoffNotes(TypedDict):
    clock: str
    touch: str
    targets: str
    order: str
    statistic: str


class HandoffResult(TypedDict):
    """What :func:`run` returns and ``--json`` prints."""

    benchmark: str
    date: str
    machine: dict[str, Any]
    size: int
    size_label: str
    repeat: int
    touch_threads: int
    methods: list[str]
    notes: HandoffNotes
    memcpy: Memcpy
    results: dict[str, HandoffRow]
    overhead: Overhead
    targets: list[HandoffTarget]


# -- results ----------------------------------------------------------------------------------


def _median(values: Iterable[float]) -> float:
    return float(statistics.median(values))


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def _row(key: str, runs: _Runs, move: _Runs | None, memcpy_rate: float) -> HandoffRow:
    method = METHODS[key]
    access = _median(runs.access)
    touched = _median(runs.touched)
    rate = runs.size / touched / GIB
    last = runs.transfers[-1] if runs.transfers else None
    return {
        "key": key,
        "how": method.how,
        "semantics": method.semantics,
        "target": method.target,
        "fallback": method.fallback,
        "size": runs.size,
        "access_seconds": runs.access,
        "touched_seconds": runs.touched,
        "access_median": access,
        "touched_median": touched,
        "access_min": min(runs.access),
        "touched_min": min(runs.touched),
        "gib_per_s": rate,
        "ratio_to_move_access": _ratio(access, _median(move.access) if move else None),
        "ratio_to_move_touched": _ratio(touched, _median(move.touched) if move else None),
        "fraction_of_memcpy": rate / memcpy_rate if method.semantics == "copy" else None,
        "pages_moved": None if last is None else last["pages_moved"],
        "pages_copied": None if last is None else last["pages_copied"],
        "reported_method": None if last is None else last["method"],
        "transfers": runs.transfers,
        "sender_transfers": runs.sender_transfers,
        "release_median": _release_median(runs.sender_transfers, "release"),
        "release_cpu_median": _release_median(runs.sender_transfers, "release_cpu"),
    }


def _release_median(transfers: list[TransferRecord], field: str) -> float | None:
    releases = [t[field] for t in transfers if t is not None and t.get("release")]
    return _median(releases) if releases else None


def _target(key: str, measured: float | None, limit: float | None, unit: str) -> HandoffTarget:
    passed = None if measured is None or limit is None else measured < limit
    return {
        "id": key,
        "text": TARGETS[key],
        "measured": measured,
        "limit": limit,
        "unit": unit,
        "passed": passed,
    }


def _targets(
    rows: dict[str, HandoffRow], memcpy_rate: float, overhead: Overhead
) -> list[HandoffTarget]:
    move = rows.get("move")
    move_1g = rows.get("move@1G")
    copies = [r for r in rows.values() if r["semantics"] == "copy"]
    fallbacks = [r for r in copies if r["fallback"]]
    ms = 1e3
    out = [
        _target("move_access", move["access_median"] * ms if move else None, 5.0, "ms"),
        _scaling_target("move_access_scaling", move, move_1g),
        _target(
            "move_touched_vs_copy",
            move["touched_median"] * ms if move else None,
            min(r["touched_median"] for r in copies) * ms if copies else None,
            "ms",
        ),
    ]
    best = max((r["gib_per_s"] for r in fallbacks), default=None)
    fraction = None if best is None else best / memcpy_rate
    # "at least 70%": a fraction of 0.7 or more passes.
    copy_target = _target("copy_vs_memcpy", fraction, 0.7, "fraction of memcpy")
    copy_target["passed"] = None if fraction is None else fraction >= 0.7
    out.append(copy_target)
    out += _huge_targets(rows)
    user = [overhead[k] for k in ("gift_user_us", "receive_user_us") if k in overhead]
    out.append(_target("overhead", max(user) if user else None, 100.0, "us"))
    cpu = [overhead[k] for k in ("gift_cpu_median_us", "receive_cpu_median_us") if k in overhead]
    out.append(_target("overhead_cpu", max(cpu) if cpu else None, 100.0, "us"))
    for target in out:
        if target["id"] == "move_touched_vs_copy" and copies:
            fastest = min(copies, key=lambda r: r["touched_median"])
            target["fastest_copy"] = fastest["key"]
        if target["id"] == "copy_vs_memcpy" and fallbacks:
            target["best_fallback"] = max(fallbacks, key=lambda r: r["gib_per_s"])["key"]
    return out


def _scaling_target(key: str, row: HandoffRow | None, row_1g: HandoffRow | None) -> HandoffTarget:
    """Every run's access of ``row`` within 2x of the median 1 GiB one (``row_1g``)."""
    return _target(
        key,
        max(row["access_seconds"]) * 1e3 if row and row_1g else None,
        2 * row_1g["access_median"] * 1e3 if row_1g else None,
        "ms",
    )


def _huge_targets(rows: dict[str, HandoffRow]) -> list[HandoffTarget]:
    """The targets of the huge page rows (not measured without ``--huge``)."""
    huge, huge_1g, move = rows.get("move-huge"), rows.get("move-huge@1G"), rows.get("move")
    ms = 1e3
    release = None if huge is None else huge["release_cpu_median"]
    return [
        _scaling_target("huge_access_scaling", huge, huge_1g),
        _target(
            "huge_touched_vs_4k",
            huge["touched_median"] * ms if huge and move else None,
            move["touched_median"] / 5 * ms if huge and move else None,
            "ms",
        ),
        _target("huge_release", None if release is None else release * ms, 2.0, "ms"),
    ]


def _overhead(overhead: dict[str, list[float]]) -> Overhead:
    """The overhead rounds summed up: round trip percentiles, CPU per call."""
    wall_us = np.array(overhead["wall"]) * 1e6
    return {
        "rounds": len(wall_us),
        "what": "sender's gift() of a one-page movable region until the receiver's DONE; "
        "the receiver loops receive() + close()",
        "round_trip_median_us": float(np.median(wall_us)),
        "round_trip_p10_us": float(np.percentile(wall_us, 10)),
        "round_trip_p90_us": float(np.percentile(wall_us, 90)),
        "gift_cpu_median_us": float(np.median(overhead["gift_cpu"]) * 1e6),
        "receive_cpu_median_us": float(np.median(overhead["receive_cpu"]) * 1e6),
        # getrusage's split of the same calls (mean over all rounds): user-space time is
        # the Python overhead; system time is the kernel's share (syscalls, page tables).
        "gift_user_us": overhead["gift_user"][0] * 1e6,
        "gift_system_us": overhead["gift_system"][0] * 1e6,
        "receive_user_us": overhead["receive_user"][0] * 1e6,
        "receive_system_us": overhead["receive_system"][0] * 1e6,
    }


def _results(
    config: HandoffConfig,
    started: datetime.datetime,
    runs: dict[str, _Runs],
    memcpy: list[float],
    overhead: dict[str, list[float]],
) -> HandoffResult:
    size = config.nbytes
    memcpy_median = _median(memcpy)
    memcpy_rate = size / memcpy_median / GIB
    move = runs.get("move")
    rows = {key: _row(key, r, move, memcpy_rate) for key, r in runs.items()}
    over = _overhead(overhead) if overhead else Overhead()
    return {
        "benchmark": "handoff",
        "date": started.isoformat(timespec="seconds"),
        "machine": machine(),
        "size": size,
        "size_label": format_size(size),
        "repeat": config.repeat,
        "touch_threads": config.threads,
        "methods": list(runs),
        "notes": {
            "clock": CLOCK,
            "touch": TOUCH.format(threads=config.threads),
            "targets": "warm: an already-touched buffer, reused by every repeat; fresh: "
            "memory the handoff allocates (first touch during the copy); mapped: the "
            "sender's own pages (a move allocates nothing)",
            "order": "interleaved: each repeat runs every method once, in table order, "
            "back to back, freeing each method's memory before the next (memory is warm "
            "in the sense of docs/kernel.md, 'Memory warmth')",
            "statistic": f"median of {config.repeat} repeat(s)",
        },
        "memcpy": {
            "what": "np.copyto between two already-touched, page-aligned THP buffers in the "
            "receiver, 1 thread",
            "seconds": memcpy,
            "median": memcpy_median,
            "gib_per_s": memcpy_rate,
        },
        "results": rows,
        "overhead": over,
        "targets": _targets(rows, memcpy_rate, over),
    }


# -- presentation -----------------------------------------------------------------------------

#: Column titles of :func:`table_rows`.
COLUMNS = (
    "method",
    "target",
    "access ms",
    "all pages ms",
    "GiB/s",
    "x move",
    "x move+touch",
    "of memcpy",
    "moved/copied pages",
)


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    if ms < 10:
        return f"{ms:.2f}"
    if ms < 100:
        return f"{ms:.1f}"
    return f"{ms:.0f}"


def _times(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.2f}" if x < 10 else f"{x:.0f}"


def table_rows(result: HandoffResult) -> list[list[str]]:
    """The results as rows of strings under :data:`COLUMNS`, memcpy reference last."""
    rows = []
    for row in result["results"].values():
        fraction = row["fraction_of_memcpy"]
        pages = "-" if row["pages_moved"] is None else f"{row['pages_moved']}/{row['pages_copied']}"
        rows.append(
            [
                row["key"],
                row["target"],
                _ms(row["access_median"]),
                _ms(row["touched_median"]),
                f"{row['gib_per_s']:.2f}",
                _times(row["ratio_to_move_access"]),
                _times(row["ratio_to_move_touched"]),
                "-" if fraction is None else f"{fraction:.0%}",
                pages,
            ]
        )
    memcpy = result["memcpy"]
    rows.append(
        [
            "memcpy (reference)",
            "warm",
            _ms(memcpy["median"]),
            _ms(memcpy["median"]),
            f"{memcpy['gib_per_s']:.2f}",
            "-",
            "-",
            "100%",
            "-",
        ]
    )
    return rows


def _measured(target: HandoffTarget) -> str:
    value, limit, unit = target["measured"], target["limit"], target["unit"]
    if value is None:
        return "not measured"
    if unit == "fraction of memcpy":
        text = f"{value:.0%} of memcpy (needs >= {limit:.0%})"
    else:
        text = f"{value:.3g} {unit} (needs < {limit:.3g} {unit})"
    extra = target.get("fastest_copy") or target.get("best_fallback")
    return f"{text}, vs {extra}" if extra else text


def target_rows(result: HandoffResult) -> list[tuple[str, str, bool | None]]:
    """(target, measured vs limit, passed) for each speed target; passed None: not measured."""
    return [(t["text"], _measured(t), t["passed"]) for t in result["targets"]]


def markdown_table(result: HandoffResult) -> str:
    """The results, targets and overhead as Markdown (what docs/benchmarks.md shows)."""
    machine = result["machine"]
    lines = [
        f"**{result['size_label']}**, median of {result['repeat']}, {result['date']}, "
        f"Linux {machine['kernel']}, {machine.get('cpus')} x {machine.get('cpu')}, "
        f"{machine.get('memory_gib')} GiB",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(result)]
    moves = [r for r in result["results"].values() if r["semantics"] == "move"]
    if moves:
        best = ", ".join(
            f"{r['key']} {_ms(r['access_min'])} ms ({_ms(r['touched_min'])} ms with every page)"
            for r in moves
        )
        lines += ["", f"Fastest of the {result['repeat']} runs: {best}."]
        released = [r for r in moves if r.get("release_median") is not None]
        if released:
            freed = ", ".join(
                f"{r['key']} {_ms(r['release_cpu_median'] or 0.0)} ms of CPU "
                f"({_ms(r['release_median'] or 0.0)} ms in all)"
                for r in released
            )
            lines += [
                "",
                "The writer's release of its mapping, after the reader had "
                f"the pages (Transfer.release_cpu and release, medians): {freed}.",
            ]
    lines += ["", *markdown_targets(target_rows(result))]
    over = result["overhead"]
    if over:
        lines += [
            "",
            f"One-page round trips ({over['rounds']}): median {over['round_trip_median_us']:.0f}"
            f" us (p10 {over['round_trip_p10_us']:.0f}, p90 {over['round_trip_p90_us']:.0f});"
            f" CPU per call: gift {over['gift_cpu_median_us']:.0f} us, receive "
            f"{over['receive_cpu_median_us']:.0f} us (median), of which user space (Python):"
            f" gift {over.get('gift_user_us', float('nan')):.0f} us, receive "
            f"{over.get('receive_user_us', float('nan')):.0f} us, kernel: gift "
            f"{over.get('gift_system_us', float('nan')):.0f} us, receive "
            f"{over.get('receive_system_us', float('nan')):.0f} us (means).",
        ]
    return "\n".join(lines) + "\n"
