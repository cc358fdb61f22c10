"""The records of a migration benchmark's result, as they go out in its JSON.

They are TypedDicts: the JSON is written as it is built and read back (recorded results under
``benchmarks/results/``) by the same code that lays it out, so a record is a dict with known
keys rather than an object to convert. Readers of recorded files tolerate keys that older
results lack (``.get``). An :data:`Event` is the library's event as ``as_dict()`` gives it,
plus ``mono``: the CLOCK_MONOTONIC moment it happened.
"""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict

from ..common import TargetRecord
from ..references import Reference

__all__ = [
    "Baseline",
    "BudgetRow",
    "CellRecord",
    "ConfigRecord",
    "Event",
    "MemoryRecord",
    "MigrateResult",
    "Notes",
    "OrderRecord",
    "PauseStep",
    "Peak",
    "PostcopyRecord",
    "Reference",
    "RunRecord",
    "TargetRecord",
]

#: One event of a migration, as the library reports it, plus ``mono``.
Event = dict[str, Any]


class Peak(TypedDict):
    """The largest sum seen of one measure (Pss or RSS), and what each role held."""

    total: int
    at_peak: dict[str, int]
    max_by_role: dict[str, int]


class Baseline(TypedDict):
    """Both processes' memory just before the migration started."""

    total: int
    by_role: dict[str, int]


class MemoryRecord(TypedDict):
    """What the sampler saw during one run (bytes; ratios to the guest's memory)."""

    guest_bytes: int
    baseline: Baseline
    peak_pss: Peak
    peak_rss: Peak
    peak: int
    ratio: float
    added: int
    added_ratio: float
    rss_ratio: float
    pss_samples: int
    rss_samples: int
    pss_read_ms_mean: float | None
    pss_read_ms_max: float | None
    interval: float
    method: str  # "pss" (smaps_rollup) or "counters" (status and meminfo: no walk)


class PostcopyRecord(TypedDict):
    """A postcopy run's page faults and fetches, from its done event's details."""

    fault_median_us: float | None
    fault_p99_us: float | None
    fault_max_us: float | None
    faults: int | None
    requested: int | None
    pushed: int | None
    seconds: float | None
    after_resume_seconds: float | None


class PauseStep(TypedDict):
    """One step of a switchover's pause: ``at`` seconds after the guest paused (negative:
    before), when ``side`` ("source" or "destination") finished ``step``."""

    step: str
    side: str
    at: float


class BudgetRow(TypedDict):
    """One step of the pause budget of a cell: the median of its duration over the cell's
    runs (``ms``: from the previous step's end to this one's, milliseconds)."""

    step: str
    side: str
    ms: float | None


class RunRecord(TypedDict):
    """One run of the matrix: what was asked, what happened, what was measured."""

    index: int
    size: int
    size_label: str
    rate: int
    rate_label: str
    mode: str
    repeat: int
    guest_bytes: int
    regions: dict[str, int]
    fill_seconds: float
    write_rate: float
    write_rate_after: float
    mode_run: str
    total_seconds: float
    downtime: float
    guest_pause: float | None
    guest_pause_destination: float | None
    #: The two parts of the guest's figure (its destination's heartbeat): the gap across the
    #: switchover, and the longest gap in the window after the resume.
    guest_switchover_gap: float | None
    guest_gap_after: float | None
    #: The control: the guest's figure for a pause in place, with nothing in between, right
    #: before the migration (``observed_pause`` of ``in_place``); ``in_place`` all of it.
    guest_pause_in_place: float | None
    in_place: dict[str, float | None]
    expected_downtime: float | None
    switchover_reason: str | None
    switchover_to_running: float | None
    bytes_on_wire: int
    pages_moved: int
    pages_copied: int
    pages_zero: int
    pages_requested: int
    rounds: int
    digest: str
    last_round_bandwidth: float | None
    last_round_dirty_rate: float | None
    rate_below_bandwidth: bool | None
    postcopy: PostcopyRecord | None
    verify: dict[str, Any]
    verified: bool
    memory: MemoryRecord
    done: Event
    events: list[Event]
    destination_events: list[Event]
    prewarm_seconds: float | None
    #: CPU time the hypervisor took from this machine during the migration (see
    #: :func:`pageflip.bench.common.steal_seconds`); set once the run is over.
    steal_seconds: NotRequired[float | None]
    #: Both sides' pause steps, merged in time order (on one host: one clock).
    pause_steps: list[PauseStep]
    #: Set by the matrix once the run is over.
    since_previous: NotRequired[float | None]
    wall_seconds: NotRequired[float]


class CellRecord(TypedDict):
    """One (size, rate, mode): the medians over its repeats."""

    size: int
    size_label: str
    rate: int
    rate_label: str
    mode: str
    n: int
    guest_bytes: int
    write_rate: float | None
    total_seconds: float | None
    downtime: float | None
    downtime_max: float
    guest_pause: float | None
    guest_pause_p90: float | None
    guest_pause_max: float | None
    guest_switchover_gap: float | None
    guest_gap_after: float | None
    guest_pause_in_place: float | None
    expected_downtime: float | None
    switchover_to_running: float | None
    bytes_on_wire: float | None
    peak: float | None
    ratio: float | None
    added: float | None
    peak_rss: float | None
    rounds: float | None
    pages_moved: float | None
    pages_copied: float | None
    pages_zero: float | None
    last_round_bandwidth: float | None
    fault_median_us: float | None
    fault_p99_us: float | None
    faults: float | None
    verified: bool
    runs: list[int]
    #: Where the pause went, step by step (medians), and the guest's own figure beyond it.
    pause_budget: list[BudgetRow]


class ConfigRecord(TypedDict):
    sizes: list[int]
    rates: list[int]
    modes: list[str]
    repeat: int
    downtime_limit: float
    threads: int
    warmup: float
    settle: float
    sample_interval: float
    verify_delay: float
    timeout: float
    #: The workload's huge pages (None: 4 KiB); absent from results made before it existed.
    huge: NotRequired[str | None]


class OrderRecord(TypedDict):
    scheme: str
    #: [size, rate, mode, repeat] of every run, in order.
    sequence: list[list[int | str]]


class Notes(TypedDict):
    """How the figures were measured, in words (shown under the tables)."""

    clock: str
    peak: str
    guest_memory: str
    write_rate: str
    statistic: str
    warmth: str
    prewarm: bool
    qemu: str


class MigrateResult(TypedDict):
    """What :func:`~pageflip.bench.migrate.run` returns and ``--json`` prints."""

    benchmark: str
    date: str
    machine: dict[str, Any]
    config: ConfigRecord
    order: OrderRecord
    notes: Notes
    complete: bool
    runs: list[RunRecord]
    cells: list[CellRecord]
    qemu_reference: list[Reference]
    targets: list[TargetRecord]
