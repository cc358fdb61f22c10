"""The reference guest: a workload that dirties its memory at a set rate and can prove,
after any migration, that no write made before the pause was lost.

Memory layout (three movable regions, in this order):

``ram``
    ``size`` bytes (whole pages). Page ``p`` at version ``v`` holds two header words, then a
    body: word 0 is ``p``, word 1 is ``(v << 1) | busy`` (a seqlock: odd while the page is
    being rewritten), and the body is pool page ``(p*K1 + v*K2) % POOL_PAGES`` XOR a 64-bit
    constant ``c(p, v, seed)`` broadcast over the page. The pool is ``POOL_PAGES`` random
    pages drawn from the seed, so every page is different, incompressible (no long byte
    repeats for zstd), and cheap to make and check: a gather plus an XOR, done for a whole
    batch of pages at once with numpy fancy indexing.
``journal``
    One uint32 per ram page: the version page ``p`` is at.
``heartbeat``
    One page the heartbeat thread stamps (below): word 0 is :data:`HB_MAGIC`, words 1-2 the
    boot id of the host that wrote it and word 3 its time namespace (which
    ``CLOCK_MONOTONIC`` the stamp is on), word 4 the stamp, ``time.monotonic_ns()``. Its own
    region rather than a page after the journal, so that the journal stays one array and
    :meth:`Workload.restore` can refuse a layout without one by name and size.

Writers: ``threads`` worker threads; thread ``t`` owns the pages ``p`` with
``p % threads == t``. Every :data:`TICK` it rewrites a batch of distinct random owned pages,
as many as a token bucket on ``time.monotonic()`` allows for ``dirty_rate / threads``
bytes/s. A rewrite of page ``p`` from ``v`` to ``v+1`` goes: header word 1 odd (busy), new
body, ``journal[p] = v+1``, header word 1 ``= (v+1) << 1``. Every write adds one to the
journal and one to ``total_writes``, so *while paused* ``sum(journal) == total_writes``.

Verification (:meth:`Workload.verify`), also while the writers run:

* each page must be *consistent*: word 0 is ``p``, word 1 even and equal to
  ``journal[p] << 1``, body equal to the pattern of ``(p, journal[p])``. The header is read
  before and after the rest; a page whose header is odd or changed in between is being
  written now and is skipped (or judged by its first-touch record, below).
* after :meth:`Workload.restore`, the sum of the *pre-pause* versions of all pages must be
  the ``total_writes`` the source counted at its pause (carried in the state). A final round
  that never arrived leaves consistent but older pages: the sum comes out short.
* pre-pause versions are read from memory for pages not rewritten since the restore; the
  first time a worker rewrites a page after a restore it checks the page first (in the
  same vectorized way) and records its version, so a running guest keeps its proof.

Heartbeat: the guest's own view of a pause. A thread stamps the heartbeat page every
:data:`HEARTBEAT_INTERVAL` (about 15 us of CPU a beat, sleep and wake-up included: under
3% of one CPU at 0.5 ms, which comes out as a beat every 0.55-0.6 ms). It parks
with the workers on :meth:`Workload.pause` (one last stamp, then no write until
:meth:`Workload.resume`), so the stamp travels with the memory: the last one the source
wrote arrives in the page. At its first beat after every resume the thread reads the stamp
there before it writes its own: the difference is the *switchover gap*, the time the guest
saw no beat. Since the last stamp comes before ``pause()`` returns and the first after
``resume()`` does, it is never below the engine's downtime on one host; the excess is what
``pause()`` spends parking the workers (the heartbeat parks within an interval of the
request) and the time it takes the first beat to come after ``resume()``. For
:data:`HEARTBEAT_WINDOW` after that it keeps the largest gap between beats (a postcopy guest
stalls on page faults then; a Python guest waits for the GIL); the larger of the two is the
*observed pause* (:meth:`Workload.observed_pause`). Gaps outside those windows, while the
guest just runs, are kept apart for context (``max_gap_running`` in :meth:`Workload.status`):
they show the heartbeat's own jitter, the floor under any figure.

Caveat: stamps compare only on the same ``CLOCK_MONOTONIC``. Across hosts (a TCP migration)
the clocks differ, and so they do across reboots or time namespaces; the page names the boot
and the time namespace of its writer, and a stamp from another is not compared: the
switchover gap and the observed pause are None then, never a wrong figure. A state that says
which stamp the source wrote last also lets :meth:`Workload.verify` tell a heartbeat page
that did not arrive as it left (stale, lost): a problem, and no figure from it.

Memory ordering: the seqlock relies on loads and stores becoming visible in program order
(x86-64's TSO). Each numpy call finishes before the next starts, which is all it needs there.
"""

from __future__ import annotations

import _thread
import json
import logging
import math
import mmap
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Self

import numpy as np

# numpy imports numpy.random on the first use of np.random. A SIGTERM or Ctrl-C arriving
# while that import ran (the fill makes the first generator) was lost: the command went on
# serving. Imported with this module, before any control socket exists, it is out of the fill.
import numpy.random
import numpy.typing as npt

from .._sys import mm, procfs
from .._sys.flags import Madv
from ..errors import BadArgument, ClosedError, StateError
from ..memory import LOST_PAGE, PAGE_SIZE, HugePages, Region
from .base import MAX_STATE_BYTES, BadGuestState, Guest, VerifyReport, register

__all__ = ["Pattern", "Workload"]

logger = logging.getLogger("pageflip.guests")

#: 64-bit words per page, and how many of them are header.
WORDS = PAGE_SIZE // 8
HEADER_WORDS = 2
#: Random pages in the pool every page's body is drawn from.
POOL_PAGES = 256
#: Odd multipliers choosing a pool page for (page, version): consecutive versions of a page
#: cycle through every pool page.
K1 = np.uint64(0x9E3779B1)
K2 = np.uint64(0x85EBCA77)
#: How often a worker writes a batch (seconds).
TICK = 0.010
#: How much unused write budget a worker may save up (seconds' worth).
BURST = 0.1
#: Largest batch one worker writes at once (pages): bounds temporary memory and pause latency.
MAX_BATCH_PAGES = (16 << 20) // PAGE_SIZE
#: A worker checks for a pause between chunks of this many pages of a batch (about 0.3 ms
#: of writing each), so that pause() waits for one chunk, not for a whole batch (up to a
#: tick's worth of writes: milliseconds at 256 MiB/s).
PAUSE_CHUNK_PAGES = 64
#: Seconds a worker sleeps between two chunks of a batch. numpy lets go of the GIL for a
#: moment many times in a chunk and the worker takes it straight back, which the GIL's
#: switch interval does not count as a switch: another thread that waits for the GIL (the
#: heartbeat) got it only once the whole batch was written, 3.4 ms at 256 MiB/s with one
#: worker, which the heartbeat took for a pause. Asleep, the worker leaves it free.
CHUNK_BREATHER = 20e-6
#: Pages handled per step by the initial fill.
CHUNK_PAGES = (16 << 20) // PAGE_SIZE
#: Pages handled per step by verify(): small, so that few pages change while one step reads
#: them (a page rewritten between the two header reads of its step is skipped).
VERIFY_PAGES = (2 << 20) // PAGE_SIZE
#: Window over which status() measures the write rate (seconds).
RATE_WINDOW = 1.0
#: Problems listed in one VerifyReport, kept in memory, and carried in the saved state.
MAX_LISTED = 20
MAX_KEPT = 1000
MAX_CARRIED = 16
MAX_MESSAGE = 300
#: Version of the saved-state format (2: three regions, and the last heartbeat stamp).
STATE_FORMAT = 2
#: How often the heartbeat stamps its page (seconds); each beat costs about 15 us of CPU.
HEARTBEAT_INTERVAL = 0.0005
#: After a resume, how long the heartbeat's gaps count towards the pause it observed (s).
HEARTBEAT_WINDOW = 0.1
#: Word 0 of the heartbeat page ("pfbeat01"), and where its other words are.
HB_MAGIC = int.from_bytes(b"pfbeat01", "little")
HB_CLOCK = slice(1, 4)
HB_STAMP = 4

#: The first two words of a page that never arrived (see pageflip.memory.LOST_PAGE).
_LOST_WORDS = (
    int.from_bytes(LOST_PAGE[:8], "little"),
    int.from_bytes(LOST_PAGE[8:16], "little"),
)
_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_PAGE_MUL = np.uint64(_GOLDEN)
_VERSION_MUL = np.uint64(0xD1B54A32D192ED03)
_ONE = np.uint64(1)

Pages = npt.NDArray[np.int64]
Words = npt.NDArray[np.uint64]
Bools = npt.NDArray[np.bool_]
#: ``progress(done_bytes, total_bytes)``, called while :meth:`Workload.create` fills memory.
Progress = Callable[[int, int], None]


def _splitmix64(x: int) -> int:
    """The splitmix64 finalizer on a Python int (for the per-seed key)."""
    x = (x + _GOLDEN) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class Pattern:
    """The content of every page at every version, for one seed.

    Public so that tests and tools can forge or check pages; the workload uses it for
    everything it writes and verifies.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        rng = np.random.default_rng(seed)
        top = np.iinfo(np.uint64).max
        raw = rng.integers(0, top, POOL_PAGES * WORDS, dtype=np.uint64, endpoint=True)
        #: POOL_PAGES random pages, (POOL_PAGES, WORDS) uint64.
        self.pool: Words = raw.reshape(POOL_PAGES, WORDS).copy()
        self._key = np.uint64(_splitmix64(seed & _MASK64))

    def index(self, pages: Pages, versions: Words) -> npt.NDArray[np.intp]:
        """The pool page each (page, version) is drawn from."""
        mixed = pages.astype(np.uint64) * K1
        mixed += versions * K2
        mixed &= np.uint64(POOL_PAGES - 1)
        return mixed.astype(np.intp)

    def constants(self, pages: Pages, versions: Words) -> Words:
        """``c(p, v)``: the 64-bit word XORed over page ``p``'s body at version ``v``."""
        z = pages.astype(np.uint64) * _PAGE_MUL
        z += versions * _VERSION_MUL
        z += self._key
        z ^= z >> np.uint64(30)
        z *= _MIX1
        z ^= z >> np.uint64(27)
        z *= _MIX2
        z ^= z >> np.uint64(31)
        return z

    def make(self, pages: Pages, versions: Words) -> Words:
        """Whole pages (header and body) for ``pages`` at ``versions``: (n, WORDS) uint64."""
        out = np.empty((pages.size, WORDS), dtype=np.uint64)
        self.make_into(out, pages, versions)
        return out

    def make_into(self, out: Words, pages: Pages, versions: Words) -> None:
        """Write the pages for ``pages`` at ``versions`` into ``out`` ((n, WORDS) uint64)."""
        np.take(self.pool, self.index(pages, versions), axis=0, out=out, mode="clip")
        out ^= self.constants(pages, versions)[:, None]
        out[:, 0] = pages
        out[:, 1] = versions << _ONE

    def body_matches(self, rows: Words, pages: Pages, versions: Words) -> Bools:
        """For each row of ``rows`` ((n, WORDS)), whether its body is that of ``versions``."""
        expected = np.take(self.pool, self.index(pages, versions), axis=0, mode="clip")
        body = expected[:, HEADER_WORDS:]
        body ^= self.constants(pages, versions)[:, None]
        matches: Bools = (rows[:, HEADER_WORDS:] == body).all(axis=1)
        return matches


@dataclass(slots=True)
class SavedState:
    """What :meth:`Workload.save_state` writes (as JSON) and :meth:`Workload.restore` reads."""

    seed: int
    size: int
    npages: int
    threads: int
    dirty_rate: float
    total_writes: int
    migrations: int
    created_wall: float
    paused_wall: float
    paused_monotonic: float
    heartbeat_ns: int
    problem_count: int = 0
    problems: list[str] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        # Not asdict(): it deep-copies field by field, and this runs inside the pause.
        data: dict[str, Any] = {"format": STATE_FORMAT, "kind": Workload.kind}
        data.update((name, getattr(self, name)) for name in _STATE_FIELDS)
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, state: bytes) -> SavedState:
        """Parse and check a saved state; :class:`BadGuestState` names what is wrong."""
        kind = Workload.kind
        data = _state_object(state)
        values = _state_numbers(data)
        problems = data.get("problems", [])
        if not isinstance(problems, list) or not all(isinstance(p, str) for p in problems):
            raise BadGuestState(
                "workload state field 'problems' is not a list of strings",
                kind=kind,
                field="problems",
            )
        saved = cls(**values, problems=problems)
        if saved.threads < 1:
            raise BadGuestState("workload state has no threads", kind=kind, field="threads")
        if saved.npages < 1 or saved.size != saved.npages * PAGE_SIZE:
            raise BadGuestState(
                f"workload state size {saved.size} is not {saved.npages} pages of {PAGE_SIZE}",
                kind=kind,
                field="size",
            )
        return saved


_STATE_FIELDS = tuple(f.name for f in fields(SavedState))


def _state_object(state: bytes) -> dict[str, Any]:
    """A saved state's JSON object, of this kind and format (SavedState.from_bytes)."""
    kind = Workload.kind
    if len(state) > MAX_STATE_BYTES:
        raise BadGuestState(
            f"workload state of {len(state)} bytes is over the {MAX_STATE_BYTES} limit",
            kind=kind,
            field="state",
        )
    try:
        data = json.loads(state)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadGuestState(f"workload state is not JSON: {err}", kind=kind, field="state") from err
    if not isinstance(data, dict):
        raise BadGuestState("workload state is not a JSON object", kind=kind, field="state")
    if data.get("kind") != kind:
        raise BadGuestState(
            f"state is for guest kind {data.get('kind')!r}, not {kind!r}",
            kind=kind,
            field="kind",
        )
    if data.get("format") != STATE_FORMAT:
        raise BadGuestState(
            f"workload state format {data.get('format')!r} is not {STATE_FORMAT}",
            kind=kind,
            field="format",
        )
    return data


def _state_numbers(data: dict[str, Any]) -> dict[str, Any]:
    """A saved state's numeric fields, each checked to be a non-negative number."""
    kind = Workload.kind
    ints = ("seed", "size", "npages", "threads", "total_writes", "migrations", "heartbeat_ns")
    floats = ("dirty_rate", "created_wall", "paused_wall", "paused_monotonic")
    values: dict[str, Any] = {}
    for name in ints + floats + ("problem_count",):
        value = data.get(name, 0 if name == "problem_count" else None)
        wanted = int if name in ints or name == "problem_count" else (int, float)
        if (
            isinstance(value, bool)
            or not isinstance(value, wanted)
            or value < 0
            or not math.isfinite(value)
        ):
            raise BadGuestState(
                f"workload state field {name!r} is {value!r}, not a non-negative number",
                kind=kind,
                field=name,
            )
        values[name] = value
    return values


def _zeroed_table(n: int) -> Pages:
    """``n`` int64 zeros in a private anonymous mapping of their own: its pages are mapped
    on first write, whatever the allocator would have reused (np.zeros may or may not), and
    they are 4 KiB pages (numpy advises huge pages for its large arrays)."""
    memory = mmap.mmap(-1, n * 8, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(memory, dtype=np.int64, count=n)  # keeps the mapping alive


def _map_table(table: Pages) -> None:
    """Map every page of a :func:`_zeroed_table` now: MADV_POPULATE_WRITE, which writes
    nothing and does not hold the GIL while the kernel works; where the kernel lacks it
    (before 5.14), the zeros are written again."""
    try:
        mm.madvise(table.ctypes.data, mm.page_round_up(table.nbytes), Madv.POPULATE_WRITE)
    except OSError as err:
        logger.debug("MADV_POPULATE_WRITE on the first-touch table: %s", err)
        table.fill(0)


def _journal_bytes(npages: int) -> int:
    return math.ceil(npages * 4 / PAGE_SIZE) * PAGE_SIZE


@dataclass(slots=True)
class _PauseSeen:
    """What the heartbeat saw around the guest's latest pause (seconds).

    ``switchover_gap``: from the last stamp before the pause to the first after the resume,
    None when the last one cannot be compared (``unknown`` says why). ``max_gap_after``: the
    largest gap between beats in the :data:`HEARTBEAT_WINDOW` after the first (no window
    when there was no stamp before: a new guest). ``settled`` once that window is over (or
    cut short by the next pause).
    """

    switchover_gap: float | None
    unknown: str | None = None
    windowed: bool = True
    max_gap_after: float = 0.0
    settled: bool = False

    @property
    def observed(self) -> float | None:
        if self.switchover_gap is None:
            return None
        return max(self.switchover_gap, self.max_gap_after)


def _diagnose(
    page: int, word0: int, word1: int, journal: int, content_is: Callable[[int], bool]
) -> str:
    """Say what is wrong with one inconsistent page, from one read of its header words and
    journal entry; ``content_is(v)`` tells whether its body is that of version ``v``."""
    if (word0, word1) == _LOST_WORDS:
        return (
            f"page {page}: it never arrived: postcopy lost its source, and pageflip marked "
            "the page in place of its data"
        )
    header = word1 >> 1
    if word1 & 1:
        return (
            f"page {page}: torn: its header is busy (write of version {header + 1} in "
            "progress), so it was copied mid-write"
        )
    if word0 != page:
        return f"page {page}: its header names page {word0}: content from another page"
    if header != journal:
        if content_is(header):
            if header < journal:
                return (
                    f"page {page}: content is version {header} but the journal says "
                    f"{journal}: the page is stale, a write to it was lost"
                )
            return (
                f"page {page}: content is version {header}, newer than the journal's "
                f"{journal}: the journal entry is stale or altered"
            )
        if content_is(journal):
            return (
                f"page {page}: header says version {header} but content and journal say "
                f"{journal}: the header is corrupted"
            )
        return (
            f"page {page}: header says version {header}, journal says {journal}, and the "
            "content matches neither"
        )
    return (
        f"page {page}: content does not match version {journal}, on which header and journal "
        "agree: the page body is corrupted or stale"
    )


def _sum_problem(got: int, made: int) -> str:
    """The problem when the pre-pause versions do not add up to the writes made."""
    if got < made:
        return (
            f"pre-pause versions add up to {got} writes but the source made {made} before "
            f"its pause: {made - got} write(s) lost (a final round not delivered?)"
        )
    return (
        f"pre-pause versions add up to {got} writes but the source made only {made} "
        f"before its pause: {got - made} too many (memory or state from another run?)"
    )


@register
class Workload(Guest):
    """The reference guest: ``threads`` workers rewrite random pages at ``dirty_rate`` bytes/s.

    Make one with :meth:`create` (running unless ``paused=True``) or :meth:`restore`
    (paused; its workers start at the first :meth:`resume`). Thread-safe: :meth:`verify` and
    :meth:`status` may run from any thread while the workers write. Close it (or use it as a
    context manager): its threads (workers and heartbeat) keep it alive until then.
    """

    kind: ClassVar[str] = "workload"

    def __init__(
        self,
        ram: Region,
        journal: Region,
        heartbeat: Region,
        *,
        seed: int,
        threads: int,
        dirty_rate: float,
        total_writes: int = 0,
        migrations: int = 0,
        created_wall: float | None = None,
        restored: bool = False,
        carried: list[str] | None = None,
        carried_count: int = 0,
        last_beat: int = 0,
    ) -> None:
        # Private: use Workload.create() or Workload.restore().
        npages = ram.size // PAGE_SIZE
        self._ram_region: Region | None = ram
        self._journal_region: Region | None = journal
        self._heartbeat_region: Region | None = heartbeat
        self._ram: Words | None = ram.numpy(np.uint64, (npages, WORDS))
        self._journal: npt.NDArray[np.uint32] | None = journal.numpy(np.uint32, npages)
        self._beat_page: Words | None = heartbeat.numpy(np.uint64, WORDS)
        self._npages = npages
        self._seed = seed
        self._threads = threads
        self._dirty_rate = float(dirty_rate)
        self._pattern_obj: Pattern | None = None
        self._pattern_lock = threading.Lock()
        self._base_writes = total_writes
        #: Writes made by each worker since this object was made (each its own slot).
        self._counts = [0] * threads
        self._migrations = migrations
        self._created_wall = time.time() if created_wall is None else created_wall
        #: After a restore: each page's pre-pause version + 1 once a worker has rewritten it,
        #: 0 before (private memory, not part of any region). A restore ahead of the pause
        #: maps its pages then (see restore_ahead); after a restore inside the pause, where
        #: mapping them would lengthen the pause, the writers' first writes map them.
        self._pre: Pages | None = _zeroed_table(npages) if restored else None
        self._restored_writes = total_writes

        self._rate_lock = threading.Lock()
        self._rate_log: deque[tuple[float, int]] = deque()

        self._init_run_control()
        self._init_problems(migrations, carried or [], carried_count)
        self._init_heartbeat(last_beat, restored=restored)

    def _init_run_control(self) -> None:
        """Part of __init__: what starts, pauses and stops the workers (made paused)."""
        lock = threading.RLock()
        self._cond = threading.Condition(lock)
        #: What a worker idle between two batches waits on (the same lock): a pause does not
        #: wake it, it counts as parked meanwhile (see _run).
        self._ticks = threading.Condition(lock)
        #: What the parked heartbeat waits on (the same lock): a resume wakes it first, since
        #: its first beat ends the pause the guest observes.
        self._beat_park = threading.Condition(lock)
        self._pause_requested = True
        self._stopping = False
        #: Set with every pause or stop request: the heartbeat waits on it between beats, so
        #: that it parks at once instead of at the end of its interval (inside the pause).
        self._beat_wake = threading.Event()
        self._parked: list[bool] = []
        self._workers: list[threading.Thread] = []
        #: Set when no launch of the workers is in flight (see _start_workers).
        self._launched = threading.Event()
        self._launched.set()
        #: Why the last launch could not start every thread (see prepare_resume).
        self._launch_error: BaseException | None = None
        self._run_epoch = 0
        self._paused_at: float | None = time.monotonic()
        self._paused_wall = time.time()
        self._resumed_at: float | None = None
        self._released = False
        self._closed = False
        #: Held by verify() while it reads memory, and by release/close before they drop it.
        self._use_lock = threading.Lock()

    def _init_problems(self, migrations: int, carried: list[str], carried_count: int) -> None:
        """Part of __init__: the problems found, with those ``carried`` from before."""
        self._problems_lock = threading.Lock()
        self._page_problems: dict[int, str] = {}
        self._other_problems: list[str] = []
        self._problem_count = 0
        self._carry(migrations, carried, carried_count)
        self._last_verify_problems = 0

    def _carry(self, migrations: int, carried: list[str], carried_count: int) -> None:
        """The problems a restored workload carries from before (its only ones so far)."""
        with self._problems_lock:
            self._other_problems = [f"before migration {migrations}: {text}" for text in carried]
            self._problem_count = max(carried_count, len(self._other_problems))

    def _init_heartbeat(self, last_beat: int, *, restored: bool) -> None:
        """Part of __init__: the heartbeat's figures, and the arrival check of a restore."""
        #: The heartbeat's figures, guarded by _hb_cond (notified at each first beat after a
        #: resume, when a window settles, and when the heartbeat parks or ends).
        self._hb_cond = threading.Condition()
        #: The run (_run_epoch) the heartbeat last beat in, and what it saw at its start.
        self._hb_epoch = 0
        self._hb_seen: _PauseSeen | None = None
        #: Largest gap between beats outside the windows after a resume (ns; 0: none yet).
        self._hb_max_running = 0
        self._hb_stopped = False
        #: The last stamp written before the latest pause (ns; 0: none): it goes in the state.
        self._hb_last = last_beat
        #: After a restore, until checked once: the stamp the source's state says it left.
        self._arrival_lock = threading.Lock()
        self._arrival_expected: int | None = last_beat if restored else None
        #: What that check found wrong, until the first run here takes it.
        self._arrival_problem: str | None = None

    @property
    def _pattern(self) -> Pattern:
        """The page pattern, made on first use (not in restore(): that is downtime)."""
        pattern = self._pattern_obj
        if pattern is None:
            with self._pattern_lock:
                if self._pattern_obj is None:
                    self._pattern_obj = Pattern(self._seed)
                pattern = self._pattern_obj
        return pattern

    # -- construction -------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        size: int = 1 << 30,
        dirty_rate: float = 256 << 20,
        threads: int = 2,
        seed: int = 0,
        progress: Progress | None = None,
        *,
        paused: bool = False,
        huge: HugePages = False,
    ) -> Self:
        """A new workload of ``size`` bytes (rounded up to pages), every page at version 0.

        ``dirty_rate`` is in bytes per second over all ``threads`` (0: the workers idle).
        ``progress(done_bytes, total_bytes)`` follows the initial fill, which takes seconds
        for a GiB. The workload starts running unless ``paused``. ``huge`` puts its memory
        on huge pages, as ``Region.movable(huge=...)`` does (its size then rounds up to them).
        """
        if threads < 1:
            raise BadArgument(
                f"a workload needs at least one thread, not {threads}", argument="threads"
            )
        if dirty_rate < 0 or not math.isfinite(dirty_rate):
            raise BadArgument(
                f"dirty_rate must be a non-negative number, not {dirty_rate}",
                argument="dirty_rate",
            )
        if seed < 0:
            raise BadArgument(f"seed must be non-negative, not {seed}", argument="seed")
        regions: list[Region] = []
        try:
            regions.append(ram := Region.movable(size, name="ram", huge=huge))
            journal_bytes = _journal_bytes(ram.size // PAGE_SIZE)
            regions.append(journal := Region.movable(journal_bytes, name="journal"))
            regions.append(heartbeat := Region.movable(PAGE_SIZE, name="heartbeat"))
            guest = cls(ram, journal, heartbeat, seed=seed, threads=threads, dirty_rate=dirty_rate)
        except BaseException as err:
            # A half-built guest in the traceback's frames still holds views: let them go.
            traceback.clear_frames(err.__traceback__)
            for region in regions:
                region.close()
            raise
        try:
            guest._fill(progress)
            logger.info(
                "workload of %d bytes, %d thread(s), dirty rate %d bytes/s, seed %d",
                ram.size,
                threads,
                dirty_rate,
                seed,
            )
            if not paused:
                guest.resume()
        except BaseException as err:
            # The frames of the traceback still hold views of the memory: let them go first.
            traceback.clear_frames(err.__traceback__)
            guest.close()
            raise
        return guest

    def _fill(self, progress: Progress | None) -> None:
        ram = self._arrays()[0]
        total = self._npages * PAGE_SIZE
        for lo in range(0, self._npages, CHUNK_PAGES):
            hi = min(lo + CHUNK_PAGES, self._npages)
            pages = np.arange(lo, hi, dtype=np.int64)
            self._pattern.make_into(ram[lo:hi], pages, np.zeros(hi - lo, dtype=np.uint64))
            if progress is not None:
                progress(hi * PAGE_SIZE, total)

    @classmethod
    def restore(cls, regions: list[Region], state: bytes) -> Self:
        """Rebuild a workload, paused, on ``regions`` (ram, journal, heartbeat) with a saved
        ``state``.

        Raises :class:`~pageflip.guests.base.BadGuestState` if the state does not parse or
        the regions are not the ones it describes (names and sizes); the regions stay the
        caller's then. Reads no memory: that waits for :meth:`verify` and the first resume.
        """
        saved = SavedState.from_bytes(state)
        if len(regions) != 3:
            raise BadGuestState(
                f"a workload has 3 regions (ram, journal, heartbeat), got {len(regions)}",
                kind=cls.kind,
                field="regions",
            )
        ram, journal, heartbeat = regions
        for index, (region, name, size) in enumerate(
            (
                (ram, "ram", saved.size),
                (journal, "journal", _journal_bytes(saved.npages)),
                (heartbeat, "heartbeat", PAGE_SIZE),
            )
        ):
            if region.closed:
                raise BadGuestState(f"the {name} region is closed", kind=cls.kind, field=name)
            if region.name != name:
                raise BadGuestState(
                    f"region {index} should be the {name} region, it is named {region.name!r}",
                    kind=cls.kind,
                    field=name,
                )
            if region.size != size:
                raise BadGuestState(
                    f"the {name} region has {region.size} bytes, the state says {size}",
                    kind=cls.kind,
                    field=name,
                )
        guest = cls(
            ram,
            journal,
            heartbeat,
            seed=saved.seed,
            threads=saved.threads,
            dirty_rate=saved.dirty_rate,
            total_writes=saved.total_writes,
            migrations=saved.migrations + 1,
            created_wall=saved.created_wall,
            restored=True,
            carried=saved.problems,
            carried_count=saved.problem_count,
            last_beat=saved.heartbeat_ns,
        )
        logger.info(
            "workload restored (migration %d): %d bytes, %d writes before the pause",
            guest._migrations,
            saved.size,
            saved.total_writes,
        )
        return guest

    # -- properties ---------------------------------------------------------------------

    @property
    def regions(self) -> list[Region]:
        """``[ram, journal, heartbeat]``; empty once released or closed."""
        regions = (self._ram_region, self._journal_region, self._heartbeat_region)
        return [r for r in regions if r is not None]

    @property
    def size(self) -> int:
        """Bytes of ram (the journal and the heartbeat page come on top)."""
        return self._npages * PAGE_SIZE

    @property
    def npages(self) -> int:
        return self._npages

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def threads(self) -> int:
        return self._threads

    @property
    def migrations(self) -> int:
        """How many times this workload's memory was restored somewhere else."""
        return self._migrations

    @property
    def dirty_rate(self) -> float:
        """Bytes per second the workers try to rewrite (all threads together)."""
        return self._dirty_rate

    @dirty_rate.setter
    def dirty_rate(self, rate: float) -> None:
        if rate < 0 or not math.isfinite(rate):
            raise BadArgument(
                f"dirty_rate must be a non-negative number, not {rate}", argument="dirty_rate"
            )
        self._dirty_rate = float(rate)

    @property
    def total_writes(self) -> int:
        """Page writes since creation (across migrations); exact while paused."""
        return self._base_writes + sum(self._counts)

    @property
    def paused(self) -> bool:
        """True between pause() and resume() (and for good once released or closed)."""
        return self._pause_requested

    def write_rate(self) -> float:
        """Bytes per second written over the last :data:`RATE_WINDOW` (or since resume)."""
        now = time.monotonic()
        window = RATE_WINDOW
        if self._resumed_at is not None and now - self._resumed_at < window:
            window = max(now - self._resumed_at, TICK)
        with self._rate_lock:
            self._prune_rate(now)
            pages = sum(n for t, n in self._rate_log if t >= now - window)
        return pages * PAGE_SIZE / window

    def _prune_rate(self, now: float) -> None:
        log = self._rate_log
        while log and log[0][0] < now - RATE_WINDOW:
            log.popleft()

    # -- running ------------------------------------------------------------------------

    def _check_usable(self, doing: str) -> None:
        if self._closed:
            raise ClosedError(f"cannot {doing}: the workload is closed", what="workload")
        if self._released:
            raise ClosedError(f"cannot {doing}: the workload released its regions", what="workload")

    def _all_parked(self) -> bool:
        return all(self._parked)

    def pause(self) -> float:
        """Park every worker between two batches; returns the monotonic time they all were.

        A page is never left half-written: workers only park between batches.
        """
        if self._closed:
            raise ClosedError("cannot pause: the workload is closed", what="workload")
        with self._cond:
            self._pause_requested = True
            self._beat_wake.set()
            self._cond.notify_all()
            self._cond.wait_for(self._all_parked)
            if self._paused_at is None:
                self._paused_at = time.monotonic()
                self._paused_wall = time.time()
                logger.debug("workload paused at %d writes", self.total_writes)
            return self._paused_at

    def resume(self) -> float:
        """Release the workers (starting them the first time); returns the monotonic time.

        After :meth:`prepare_resume` the threads are there already: nothing can fail."""
        self._check_usable("resume")
        with self._cond:
            if not self._pause_requested and self._resumed_at is not None:
                return self._resumed_at
            self._pause_requested = False
            self._beat_wake.clear()
            self._paused_at = None
            self._run_epoch += 1
            self._resumed_at = time.monotonic()
            if not self._parked:
                self._start_workers()
            self._beat_park.notify_all()
            self._cond.notify_all()
            logger.debug("workload resumed")
            return self._resumed_at

    @classmethod
    def warm_up(cls) -> None:
        """numpy's first random generator in a process costs about 20 ms (it loads and seeds
        its machinery); every worker makes one when it starts: pay that here."""
        np.random.default_rng(0).integers(0, 2, 1)

    def prepare_resume(self) -> None:
        """Start the worker and heartbeat threads now, parked, so that resume() only lets
        them go and cannot fail on them: a process that cannot have them (a pids limit)
        fails here, before a migration's commit point."""
        self._check_usable("prepare to resume")
        with self._cond:
            if self._parked:
                return  # started already
            self._parked = [False] * (self._threads + 1)
            self._launched.clear()
        self._launch()
        error, self._launch_error = self._launch_error, None
        if error is not None:
            self._stop_workers()
            with self._cond:
                self._parked = []
                self._stopping = False
            raise error
        with self._cond:  # each has done its start-up work: resume() only wakes them
            self._cond.wait_for(self._all_parked)

    def _start_workers(self) -> None:
        # With self._cond held. Thread.start() waits until the new thread runs, which on an
        # idle vCPU can take milliseconds, and resume() sits inside a migration's downtime:
        # a short-lived launcher thread starts the workers instead, and resume() returns.
        # One slot per worker, and the last for the heartbeat: pause() waits for each.
        self._parked = [False] * (self._threads + 1)
        self._launched.clear()
        _thread.start_new_thread(self._launch, ())

    def _launch(self) -> None:
        """Start the heartbeat and the workers. A thread that cannot start is recorded as a
        problem (and its slot as parked, so that pause() does not wait for it forever)."""
        slots = [self._threads, *range(self._threads)]
        try:
            # The heartbeat first: its first beat marks the end of the pause it observes.
            beat = threading.Thread(
                target=self._heartbeat, name="pageflip-workload-heartbeat", daemon=True
            )
            workers = [
                threading.Thread(
                    target=self._run, args=(t,), name=f"pageflip-workload-{t}", daemon=True
                )
                for t in range(self._threads)
            ]
            for slot, worker in zip(slots, [beat, *workers], strict=True):
                try:
                    worker.start()
                except RuntimeError as err:  # "can't start new thread": EAGAIN, a pids limit
                    self._launch_error = err
                    self._add_problem(None, f"thread {worker.name} could not start: {err}")
                    with self._cond:
                        for rest in slots[slots.index(slot) :]:
                            self._parked[rest] = True
                        self._cond.notify_all()
                    return
                with self._cond:
                    self._workers.append(worker)
        finally:
            self._launched.set()

    def _stop_workers(self) -> None:
        with self._cond:
            self._pause_requested = True
            self._stopping = True
            self._beat_wake.set()
            self._beat_park.notify_all()
            self._cond.notify_all()
            self._ticks.notify_all()
        self._launched.wait()
        for worker in self._workers:
            worker.join()
        self._workers = []

    def _run(self, t: int) -> None:
        """Worker ``t``: write batches of its pages at its share of the rate until stopped."""
        rng = np.random.default_rng([self._seed, self._migrations, t])
        owned = (self._npages - t + self._threads - 1) // self._threads
        tokens = 0.0
        last: float | None = None
        try:
            while True:
                with self._cond:
                    if self._stopping or self._pause_requested:
                        self._parked[t] = True
                        self._cond.notify_all()
                        self._cond.wait_for(lambda: self._stopping or not self._pause_requested)
                        if self._stopping:
                            return
                        self._parked[t] = False
                        last = None
                now = time.monotonic()
                if last is None:
                    last, tokens = now, 0.0
                rate = self._dirty_rate / (self._threads * PAGE_SIZE)  # pages/s, this thread
                tokens = min(tokens + (now - last) * rate, max(rate * BURST, 1.0))
                last = now
                count = min(int(tokens), MAX_BATCH_PAGES, owned)
                if count > 0:
                    tokens -= self._write_batch(t, rng, owned, count)
                delay = TICK - (time.monotonic() - now)
                if delay > 0:
                    with self._cond:
                        # Idle until the next tick, between two batches: as good as parked,
                        # so that a pause neither wakes this thread nor waits for it (it looks
                        # at the pause again before it writes).
                        epoch = self._run_epoch
                        self._parked[t] = True
                        self._cond.notify_all()
                        if self._ticks.wait_for(lambda: self._stopping, delay):
                            return  # stopping
                        if not self._pause_requested:
                            self._parked[t] = False
                        if self._run_epoch != epoch:
                            last = None  # paused and resumed meanwhile: no tokens for that
        except Exception as err:
            logger.exception("workload worker %d failed", t)
            self._add_problem(None, f"worker {t} stopped: {type(err).__name__}: {err}")
        finally:
            with self._cond:
                self._parked[t] = True
                self._cond.notify_all()

    # -- the heartbeat --------------------------------------------------------------------

    def _heartbeat(self) -> None:
        """The heartbeat thread: beat from each resume to the next pause, until stopped."""
        slot = self._threads
        try:
            while True:
                with self._cond:
                    if self._stopping or self._pause_requested:
                        self._parked[slot] = True
                        self._cond.notify_all()
                        with self._hb_cond:  # observed_pause() waiters: no beat is coming
                            self._hb_cond.notify_all()
                        self._beat_park.wait_for(
                            lambda: self._stopping or not self._pause_requested
                        )
                        if self._stopping:
                            return
                        self._parked[slot] = False
                    epoch = self._run_epoch
                    page = self._beat_page
                assert page is not None  # dropped only once the threads are stopped
                self._hb_last = self._beat_run(page, epoch)
                del page
        except Exception as err:
            logger.exception("workload heartbeat failed")
            self._add_problem(None, f"heartbeat stopped: {type(err).__name__}: {err}")
        finally:
            with self._cond:
                self._parked[slot] = True
                self._cond.notify_all()
            with self._hb_cond:
                self._hb_stopped = True
                self._hb_cond.notify_all()

    def _beat_run(self, page: Words, epoch: int) -> int:
        """Beat from a resume until the next pause (or stop); returns the last stamp (ns).

        The first beat reads the stamp left in the page before it writes its own: the
        switchover gap. Only this thread writes the page, and only between resume and pause.
        """
        self._check_arrival(page)
        with self._arrival_lock:  # only the first run here compares with the source's stamp
            unknown, self._arrival_problem = self._arrival_problem, None
        word0, clock, previous = int(page[0]), tuple(page[HB_CLOCK].tolist()), int(page[HB_STAMP])
        first = time.monotonic_ns()
        ours = procfs.clock_identity()
        page[HB_CLOCK] = ours
        page[0] = HB_MAGIC
        page[HB_STAMP] = first
        if unknown is not None:
            seen = _PauseSeen(None, "the heartbeat page did not arrive as the source left it")
        elif previous == 0 and word0 == 0:
            # Nothing to compare with (a new guest): no pause, every gap is a running one.
            seen = _PauseSeen(None, "no heartbeat before this run", windowed=False, settled=True)
        elif word0 != HB_MAGIC:
            seen = _PauseSeen(None, "the heartbeat page held no heartbeat")
        elif ours[0] == ours[1] == 0:
            seen = _PauseSeen(None, "this host's boot id is unknown")
        elif clock != ours:
            seen = _PauseSeen(
                None, "the last stamp is from another boot or time namespace (another host?)"
            )
        elif previous > first:
            seen = _PauseSeen(None, "the last stamp is later than the first after the resume")
        else:
            seen = _PauseSeen((first - previous) / 1e9)
        with self._hb_cond:
            self._hb_epoch = epoch
            self._hb_seen = seen
            self._hb_cond.notify_all()
        last = first
        if not seen.settled:
            last, paused = self._beats(page, last, first + round(HEARTBEAT_WINDOW * 1e9), seen)
            with self._hb_cond:
                seen.settled = True
                self._hb_cond.notify_all()
            if paused:
                return last
        return self._beats(page, last, None, None)[0]

    def _beats(
        self, page: Words, last: int, until: int | None, seen: _PauseSeen | None
    ) -> tuple[int, bool]:
        """Stamp ``page`` every :data:`HEARTBEAT_INTERVAL` until ``until`` (ns, or for good),
        keeping the largest gap in ``seen`` (or as a running gap if None). Returns the last
        stamp, and whether a pause (or stop) ended the beats (after one last stamp)."""
        wait, clock, interval = self._beat_wake.wait, time.monotonic_ns, HEARTBEAT_INTERVAL
        largest = 0 if seen is not None else self._hb_max_running
        while True:
            wait(interval)
            now = clock()
            page[HB_STAMP] = now
            gap, last = now - last, now
            if gap > largest:
                largest = gap
                if seen is not None:
                    seen.max_gap_after = gap / 1e9
                else:
                    self._hb_max_running = gap
            if self._pause_requested or self._stopping:
                return last, True
            if until is not None and now >= until:
                return last, False

    def _check_arrival(self, page: Words) -> None:
        """Once after a restore, before the page changes: whether the heartbeat page holds the
        last stamp the source's state names. If not, a problem, kept for the first run."""
        with self._arrival_lock:
            expected, self._arrival_expected = self._arrival_expected, None
            if expected is None:
                return
            word0, stamp = int(page[0]), int(page[HB_STAMP])
            if (word0 == HB_MAGIC and stamp == expected) or word0 == stamp == expected == 0:
                return
            if word0 != HB_MAGIC:
                text = (
                    "the heartbeat page holds no heartbeat, yet the source's state names its "
                    f"last stamp ({expected} ns): the page was lost"
                )
            elif stamp < expected:
                text = (
                    f"the heartbeat page's last stamp is {(expected - stamp) / 1e6:.3f} ms "
                    "older than the one the source wrote before its pause: the page is stale, "
                    "a write to it was lost"
                )
            else:
                text = (
                    f"the heartbeat page's last stamp is {(stamp - expected) / 1e6:.3f} ms "
                    "later than the one the source wrote before its pause (memory or state "
                    "from another run?)"
                )
            self._arrival_problem = text
        self._add_problem(None, text)

    def observed_pause(self, timeout: float = 0.0) -> float | None:
        """The largest gap the heartbeat saw around the latest pause (seconds): the
        switchover gap or a longer one in the :data:`HEARTBEAT_WINDOW` after it.

        None before the first beat after a resume, for a guest that had never run before
        that resume, and when the last stamp before the pause cannot be compared with this
        host's clock (another boot: see the module docstring) or did not arrive as the
        source left it. Waits up to ``timeout`` seconds for the figure to be final (the
        window over); with 0, or when the wait ends first, the figure as it stands.
        """
        with self._hb_cond:
            if timeout > 0:
                self._hb_cond.wait_for(self._hb_final, timeout)
            seen = self._hb_seen if self._hb_epoch == self._run_epoch else None
            return None if seen is None else seen.observed

    def _hb_final(self) -> bool:
        """Whether the heartbeat's figure for the latest resume can no longer change."""
        if self._hb_stopped or self._closed or self._released:
            return True
        if self._hb_epoch != self._run_epoch:  # resumed, no beat yet: unless it is parked
            return self._pause_requested and bool(self._parked) and self._parked[-1]
        return self._hb_seen is None or self._hb_seen.settled

    def _heartbeat_status(self) -> dict[str, object]:
        """The heartbeat's figures for status() (seconds; None where unknown)."""
        with self._hb_cond:
            seen = self._hb_seen if self._hb_epoch == self._run_epoch else None
            why: str | None
            if seen is not None:
                why = seen.unknown
            elif self._run_epoch:
                why = "no beat since the resume"
            else:
                why = "not run here yet"
            running = self._hb_max_running
            return {
                "interval": HEARTBEAT_INTERVAL,
                "window": HEARTBEAT_WINDOW,
                "switchover_gap": None if seen is None else seen.switchover_gap,
                "max_gap_after_resume": seen.max_gap_after if seen and seen.windowed else None,
                "observed_pause": None if seen is None else seen.observed,
                "settled": self._hb_final(),
                "unknown_because": why,
                "max_gap_running": running / 1e9 if running else None,
            }

    def _write_batch(self, t: int, rng: np.random.Generator, owned: int, count: int) -> int:
        """Rewrite ``count`` distinct random pages owned by worker ``t`` to their next version,
        :data:`PAUSE_CHUNK_PAGES` at a time; a pause asked meanwhile stops it after the chunk
        under way (a pause waits for one chunk, not for a whole batch). Returns the pages
        rewritten."""
        picks = np.sort(rng.choice(owned, size=count, replace=False, shuffle=False))
        batch: Pages = picks.astype(np.int64) * self._threads + t
        written = 0
        for start in range(0, count, PAUSE_CHUNK_PAGES):
            if start:
                time.sleep(CHUNK_BREATHER)
                if self._pause_requested or self._stopping:
                    break
            pages = batch[start : start + PAUSE_CHUNK_PAGES]
            self._write_pages(pages)
            written += pages.size
        self._counts[t] += written
        now = time.monotonic()
        with self._rate_lock:
            self._rate_log.append((now, written))
            self._prune_rate(now)
        return written

    def _write_pages(self, pages: Pages) -> None:
        """Rewrite ``pages`` (distinct, of one worker) to their next version."""
        ram, journal = self._arrays()
        if self._pre is not None:
            fresh = pages[self._pre[pages] == 0]
            if fresh.size:
                self._first_touch(fresh)
        old = journal[pages].astype(np.uint64)
        new = old + _ONE
        data = self._pattern.make(pages, new)
        ram[pages, 1] = (old << _ONE) | _ONE  # busy: a reader now skips the page
        ram[pages, HEADER_WORDS:] = data[:, HEADER_WORDS:]
        ram[pages, 0] = data[:, 0]
        journal[pages] = new.astype(np.uint32)  # before the header: see verify()
        ram[pages, 1] = data[:, 1]

    def _first_touch(self, pages: Pages) -> None:
        """Check pages about to be rewritten for the first time since the restore, and record
        their pre-pause versions. Only their owner writes them, so they are not changing."""
        ram, journal = self._arrays()
        assert self._pre is not None
        rows = ram[pages]
        versions = journal[pages].astype(np.uint64)
        body_ok = self._pattern.body_matches(rows, pages, versions)
        found = self._problems_in(rows, pages, rows[:, 0], rows[:, 1], versions, body_ok)
        self._pre[pages] = versions.astype(np.int64) + 1
        for page, text in found:
            self._add_problem(page, f"{text} (found when first rewritten after the restore)")

    # -- checking -----------------------------------------------------------------------

    def _problems_in(
        self,
        rows: Words,
        pages: Pages,
        word0: Words,
        word1: Words,
        versions: Words,
        body_ok: Bools,
        judge: Bools | None = None,
    ) -> list[tuple[int, str]]:
        """The inconsistent pages among ``pages`` (those in ``judge``, if given), each with
        what is wrong with it; [] when all are right.

        ``word0``, ``word1``, ``versions`` (the journal) and ``body_ok`` are what one read of
        the pages found; ``rows`` is their memory, read again only to say which version an
        inconsistent page's content is.
        """
        good = (
            (word0 == pages.astype(np.uint64))
            & ((word1 & _ONE) == 0)
            & ((word1 >> _ONE) == versions)
            & body_ok
        )
        bad = ~good if judge is None else judge & ~good
        found = []
        for i in np.flatnonzero(bad)[:MAX_KEPT].tolist():
            row, page = rows[i : i + 1], pages[i : i + 1]

            def content_is(version: int, row: Words = row, page: Pages = page) -> bool:
                versions = np.array([version], dtype=np.uint64)
                return bool(self._pattern.body_matches(row, page, versions)[0])

            text = _diagnose(
                int(page[0]), int(word0[i]), int(word1[i]), int(versions[i]), content_is
            )
            found.append((int(page[0]), text))
        return found

    def _add_problem(self, page: int | None, text: str) -> None:
        logger.warning("workload: %s", text)
        with self._problems_lock:
            if page is None:
                self._problem_count += 1
                if len(self._other_problems) < MAX_KEPT:
                    self._other_problems.append(text)
            elif page not in self._page_problems:
                self._problem_count += 1
                if len(self._page_problems) < MAX_KEPT:
                    self._page_problems[page] = text

    def verify(self) -> VerifyReport:
        """Check every page, and after a restore that no write made before the pause was lost.

        Safe while the workers run: pages being written are skipped (or, after a restore,
        judged by the check made when a worker first rewrote them).
        """
        started = time.monotonic()
        with self._use_lock:
            self._check_usable("verify")
            if self._beat_page is not None:
                self._check_arrival(self._beat_page)
            found, checked, skipped, sums = self._scan()
        with self._problems_lock:
            for page, text in self._page_problems.items():
                found.setdefault(page, text)
            others = list(self._other_problems)
            kept = len(self._page_problems) + len(self._other_problems)
            unlisted_earlier = self._problem_count - kept
        problems = sums + others + [found[p] for p in sorted(found)]
        count = len(problems) + max(unlisted_earlier, 0)
        listed = problems[:MAX_LISTED]
        if count > len(listed):
            listed.append(f"... and {count - len(listed)} more problem(s)")
        self._last_verify_problems = count
        report = VerifyReport(
            ok=count == 0,
            pages_checked=checked,
            pages_skipped=skipped,
            problems=listed,
            seconds=time.monotonic() - started,
            observed_pause=self.observed_pause(),
        )
        if count:
            logger.warning("workload verify: %d problem(s), first: %s", count, listed[0])
        else:
            logger.debug("workload verify ok: %d pages checked, %d skipped", checked, skipped)
        return report

    def _is_paused(self) -> bool:
        # With self._cond held.
        return self._pause_requested and self._all_parked()

    def _scan(self) -> tuple[dict[int, str], int, int, list[str]]:
        """One pass over memory for verify(): (problems by page, pages checked, pages
        skipped, problems with the write count). Its arrays die when it returns."""
        ram, journal = self._arrays()
        pre_all = self._pre
        with self._cond:
            paused_epoch = self._run_epoch if self._is_paused() else None
            writes_before = self.total_writes
        found: dict[int, str] = {}
        checked = skipped = 0
        pre_pause_sum = journal_sum = 0
        for lo in range(0, self._npages, VERIFY_PAGES):
            hi = min(lo + VERIFY_PAGES, self._npages)
            pages = np.arange(lo, hi, dtype=np.int64)
            rows = ram[lo:hi]
            # A seqlock read: header, then journal and body, then the header again. A writer
            # sets the header busy before it touches the rest and stores the journal before
            # the final header, so equal even headers mean a page read whole.
            before = rows[:, 1].copy()
            versions = journal[lo:hi].astype(np.uint64)
            word0 = rows[:, 0].copy()
            body_ok = self._pattern.body_matches(rows, pages, versions)
            after = rows[:, 1].copy()
            stable = before == after
            idle = (before & _ONE) == 0
            journal_sum += int(versions.sum())
            if pre_all is None:
                judge = stable & idle
                known = judge
            else:
                # Read after the page: a worker records a page before it first writes it, so
                # a page still unrecorded here was not written during the reads above, and
                # a busy header on it can only have come with the memory: a torn page.
                pre = pre_all[lo:hi].copy()
                touched = pre > 0
                judge = stable & (idle | ~touched)
                known = judge | touched
                pre_pause_sum += int(np.where(touched, pre - 1, versions.astype(np.int64)).sum())
            checked += int(np.count_nonzero(known))
            skipped += int(known.size - np.count_nonzero(known))
            for page, text in self._problems_in(
                rows, pages, word0, before, versions, body_ok, judge
            ):
                found.setdefault(page, text)
        sums = self._write_count_problems(
            pre_pause_sum if pre_all is not None else None,
            journal_sum,
            paused_epoch,
            writes_before,
        )
        return found, checked, skipped, sums

    def _write_count_problems(
        self,
        pre_pause_sum: int | None,
        journal_sum: int,
        paused_epoch: int | None,
        writes_before: int,
    ) -> list[str]:
        """The end of _scan(): whether the versions it summed add up to the writes made.

        After a restore, the pre-pause versions (``pre_pause_sum``) must add up to the writes
        the source made; otherwise the journal (``journal_sum``) must add up to the writes
        made, a check that holds only if the workload stayed paused in the same run
        (``paused_epoch``) with ``writes_before`` writes through the whole scan.
        """
        with self._cond:
            still_paused = self._is_paused() and self._run_epoch == paused_epoch
            writes_after = self.total_writes
        sums: list[str] = []
        if pre_pause_sum is not None:
            if pre_pause_sum != self._restored_writes:
                sums.append(_sum_problem(pre_pause_sum, self._restored_writes))
        elif (
            paused_epoch is not None
            and still_paused
            and writes_after == writes_before
            and journal_sum != writes_before
        ):
            sums.append(
                f"the journal adds up to {journal_sum} writes but {writes_before} were made"
            )
        return sums

    # -- state and status ---------------------------------------------------------------

    def save_state(self) -> bytes:
        """The workload's state as JSON (well under a KiB); the workload must be paused."""
        if self._closed:
            raise ClosedError("cannot save state: the workload is closed", what="workload")
        with self._cond:
            if not self._pause_requested or not self._all_parked():
                raise StateError(
                    "save_state() needs a paused workload", phase="running", needed="paused"
                )
            paused_monotonic = self._paused_at if self._paused_at is not None else 0.0
        return self._saved(paused_monotonic).to_bytes()

    def state_preview(self) -> bytes:
        """The state as it stands, running or not (a flip's destination restores the
        workload ahead from it; see :meth:`finish_restore`)."""
        if self._closed:
            raise ClosedError("cannot preview the state: the workload is closed", what="workload")
        return self._saved(0.0).to_bytes()

    def about_to_pause(self) -> None:
        """Run the save's code once while the workload runs (see Guest.about_to_pause)."""
        if not self._closed:
            self.state_preview()

    def _saved(self, paused_monotonic: float) -> SavedState:
        with self._problems_lock:
            messages = self._other_problems + [
                self._page_problems[p] for p in sorted(self._page_problems)
            ]
            count = self._problem_count
        return SavedState(
            seed=self._seed,
            size=self.size,
            npages=self._npages,
            threads=self._threads,
            dirty_rate=self._dirty_rate,
            total_writes=self.total_writes,
            migrations=self._migrations,
            created_wall=self._created_wall,
            paused_wall=self._paused_wall,
            paused_monotonic=paused_monotonic,
            heartbeat_ns=self._hb_last,
            problem_count=count,
            problems=[text[:MAX_MESSAGE] for text in messages[:MAX_CARRIED]],
        )

    @classmethod
    def restore_ahead(cls, regions: list[Region], preview: bytes) -> Self:
        """As :meth:`Guest.restore_ahead`, and what the workers' first writes after the
        resume would otherwise pay for while holding the GIL is paid now:

        * the page pattern (made on first use: 2.5 ms);
        * the memory of the first-touch table (8 bytes per page, mapped on first write).
          It was a numpy array, whose memory numpy advises for huge pages: each first write
          into a 2 MiB stretch of it faulted in a zeroed huge page, 6-9 ms of one writer's
          CPU at a time in the 100 ms after the resume of a 4 GiB workload, and the
          heartbeat waited behind it for the GIL. Now it is a mapping of its own, of 4 KiB
          pages, mapped here.
        """
        guest = super().restore_ahead(regions, preview)
        guest._pattern  # noqa: B018  # made on first use
        if guest._pre is not None:
            _map_table(guest._pre)
        return guest

    def finish_restore(self, state: bytes) -> None:
        """Restored ahead (from a :meth:`state_preview`, workers started and parked): take
        what changed while the source ran on (writes, rate, problems, the heartbeat's last
        stamp) from the ``state`` saved in the pause. :class:`BadGuestState` if it is the
        state of another workload; then nothing changed here."""
        saved = SavedState.from_bytes(state)
        with self._cond:
            if self._run_epoch or self._counts != [0] * self._threads:
                raise StateError(
                    "finish_restore() is for a workload restored ahead and never resumed",
                    phase="resumed",
                    needed="restored",
                )
        mine = (self._seed, self._npages, self._threads, self._migrations, self._created_wall)
        theirs = (
            saved.seed,
            saved.npages,
            saved.threads,
            saved.migrations + 1,
            saved.created_wall,
        )
        if mine != theirs:
            raise BadGuestState(
                f"the state is of another workload (seed, pages, threads, migration, created: "
                f"{theirs[:4]}, {theirs[4]:.6f}) than the preview it was restored from "
                f"({mine[:4]}, {mine[4]:.6f})",
                kind=self.kind,
                field="state",
            )
        self._base_writes = self._restored_writes = saved.total_writes
        self._dirty_rate = float(saved.dirty_rate)
        self._carry(self._migrations, saved.problems, saved.problem_count)
        self._hb_last = saved.heartbeat_ns
        with self._arrival_lock:
            self._arrival_expected = saved.heartbeat_ns
            self._arrival_problem = None

    def status(self) -> dict[str, object]:
        """Size, rate asked and measured, writes, pause state, migrations, problems."""
        with self._problems_lock:
            problems = max(self._problem_count, self._last_verify_problems)
        pre = self._pre
        return {
            "kind": self.kind,
            "size": self.size,
            "npages": self._npages,
            "threads": self._threads,
            "seed": self._seed,
            "dirty_rate": self._dirty_rate,
            "write_rate": self.write_rate(),
            "total_writes": self.total_writes,
            "paused": self.paused,
            "released": self._released,
            "closed": self._closed,
            "migrations": self._migrations,
            "first_touched": None if pre is None else int(np.count_nonzero(pre)),
            "problems": problems,
            "heartbeat": self._heartbeat_status(),
        }

    # -- letting go ---------------------------------------------------------------------

    def _arrays(self) -> tuple[Words, npt.NDArray[np.uint32]]:
        ram, journal = self._ram, self._journal
        if ram is None or journal is None:
            raise ClosedError("the workload no longer has its memory", what="workload")
        return ram, journal

    def _drop_arrays(self) -> list[Region]:
        """Forget the numpy views and the regions; returns the regions."""
        with self._use_lock:
            self._ram = None
            self._journal = None
            self._beat_page = None
            regions = self.regions
            self._ram_region = self._journal_region = self._heartbeat_region = None
        return regions

    def release_regions(self) -> list[Region]:
        """Stop the threads and hand ``[ram, journal, heartbeat]`` over, no view left on them.

        The workload must be paused; it stays paused for good and owns nothing afterwards.
        """
        self._check_usable("release regions")
        with self._cond:
            if not self._pause_requested:
                raise StateError(
                    "release_regions() needs a paused workload", phase="running", needed="paused"
                )
        self._stop_workers()
        regions = self._drop_arrays()
        self._released = True
        logger.debug("workload released its regions")
        return regions

    def close(self) -> None:
        """Stop the threads (joined) and close the regions still owned. Idempotent."""
        if self._closed:
            return
        self._stop_workers()
        regions = self._drop_arrays()
        self._closed = True
        error: BaseException | None = None
        for region in regions:
            try:
                region.close()
            except Exception as err:
                error = error or err
        if error is not None:
            raise error

    def __repr__(self) -> str:
        state = (
            "closed"
            if self._closed
            else "released"
            if self._released
            else "paused"
            if self.paused
            else "running"
        )
        return (
            f"<Workload {self.size} bytes, {self._threads} thread(s), "
            f"{self._dirty_rate:.0f} B/s, {state}>"
        )
