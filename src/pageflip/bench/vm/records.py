"""The records of the VM comparison, as they go out in its JSON. Both systems' runs are
:class:`VmRunRecord`, so that the table compares like with like.

TypedDicts, as in :mod:`pageflip.bench.migrate.records`: the JSON is written as it is built
and read back by the same code that lays it out. Times in seconds, sizes in bytes.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict, cast

from ...units import format_rate, format_size
from ..common import TargetRecord
from ..migrate.records import MemoryRecord
from .config import VmRunSpec

__all__ = [
    "METRICS",
    "CellRecord",
    "ComparisonRecord",
    "MemoryRecord",
    "System",
    "TargetRecord",
    "VmConfigRecord",
    "VmMode",
    "VmResult",
    "VmRunRecord",
    "add_memory",
    "blank_record",
]

System = Literal["qemu", "pageflip"]
#: The row a run belongs to; QEMU's shared-memory mode is the ``flip`` row.
VmMode = Literal["flip", "precopy", "postcopy"]

#: The figures compared side by side, in table order.
METRICS: tuple[str, ...] = (
    "total_s",
    "downtime_s",
    "guest_pause_s",
    "guest_switchover_s",
    "guest_quiet_s",
    "host_gap_s",
    "switchover_to_running_s",
    "bytes_moved",
    "peak_memory",
)


class VmRunRecord(TypedDict):
    """One migration of one guest by one system: what was asked, what each side said."""

    index: int
    pair: int
    repeat: int
    system: System
    mode: VmMode
    #: The mode by the system's own name (``shared`` for QEMU's flip row).
    system_mode: str
    size: int
    size_label: str
    rate: int
    rate_label: str
    #: The VM's memory (guest buffer + 256 MiB).
    guest_ram: int
    #: Total migration time as the system reports it (QEMU: ``total-time``).
    total_s: float | None
    #: Downtime as the system reports it (QEMU: ``downtime``; pageflip: its done event).
    downtime_s: float | None
    #: The guest's own figure: the largest gap between two iterations of its main loop around
    #: the migration (None: the guest cannot tell).
    guest_pause_s: float | None
    #: The guest's own figure for the pause itself: its loop gap that spans the moments the
    #: system stopped and restarted it (None: no gap longer than 1.5 ticks did, or the guest
    #: cannot tell). Stalls at other moments of the migration count only in guest_pause_s.
    guest_switchover_s: float | None
    #: The control: the guest's largest loop gap on the destination, once the run is over
    #: (after its check), over a window as long as the one guest_pause_s counted, with no
    #: migration: what this host makes the guest see by itself at that moment.
    guest_quiet_s: float | None
    #: On the host: the last heartbeat line from the source until the first from the
    #: destination (includes up to one heartbeat period).
    host_gap_s: float | None
    #: CPU time the hypervisor took from this machine from just before the migration to
    #: the guest's report of its pause (``/proc/stat``'s steal; None where not counted).
    steal_s: float | None
    #: The source stopping the guest until the destination runs it (QEMU: the STOP and
    #: RESUME events' timestamps; pageflip: its switchover and resumed events).
    switchover_to_running_s: float | None
    setup_s: float | None
    bytes_moved: int | None
    #: Largest Pss sum of both processes (pages both map counted once).
    peak_memory: int | None
    peak_memory_ratio: float | None
    #: Largest RSS sum (counts shared pages twice: an upper bound).
    peak_rss: int | None
    memory: MemoryRecord | None
    #: Pages the guest found wrong on the destination (must be 0), and how many it checked.
    verify_bad: int | None
    verify_pages: int | None
    #: The guest's dirty rate measured by its heartbeats just before the migration (bytes/s).
    write_rate: float | None
    boot_s: float | None
    status: str
    error: str | None
    #: System-specific figures (QEMU: postcopy requests and bytes, blocktime, dirty syncs).
    details: dict[str, Any]
    notes: list[str]
    wall_s: NotRequired[float]
    since_previous: NotRequired[float | None]


class CellRecord(TypedDict):
    """One system's runs of one (size, rate, mode): medians over the repeats (errors left
    out)."""

    system: System
    mode: VmMode
    system_mode: str
    size: int
    size_label: str
    rate: int
    rate_label: str
    guest_ram: int
    n: int
    errors: int
    total_s: float | None
    downtime_s: float | None
    guest_pause_s: float | None
    guest_pause_max_s: float | None
    guest_switchover_s: float | None
    guest_quiet_s: float | None
    host_gap_s: float | None
    switchover_to_running_s: float | None
    bytes_moved: float | None
    peak_memory: float | None
    peak_memory_ratio: float | None
    verify_bad: int | None
    runs: list[int]


class ComparisonRecord(TypedDict):
    """One (size, rate, mode): both systems' medians and pageflip / QEMU per metric (None
    where either side lacks the figure or QEMU's is 0)."""

    size: int
    size_label: str
    rate: int
    rate_label: str
    mode: VmMode
    qemu: CellRecord | None
    pageflip: CellRecord | None
    ratios: dict[str, float | None]


class VmConfigRecord(TypedDict):
    sizes: list[int]
    rates: list[int]
    modes: list[str]
    systems: list[str]
    repeat: int
    settle: float
    guest_kernel: str
    guest_flavour: str
    options: dict[str, Any]


class VmResult(TypedDict):
    """What :func:`~pageflip.bench.vm.run` returns and ``--json`` prints."""

    benchmark: str
    date: str
    machine: dict[str, Any]
    qemu_version: str | None
    config: VmConfigRecord
    order: dict[str, Any]
    notes: dict[str, str]
    complete: bool
    runs: list[VmRunRecord]
    cells: list[CellRecord]
    comparisons: list[ComparisonRecord]
    targets: list[TargetRecord]


def blank_record(spec: VmRunSpec) -> VmRunRecord:
    """A run's record before anything was measured (every figure None)."""
    return {
        "index": spec.index,
        "pair": spec.pair,
        "repeat": spec.repeat,
        "system": cast(System, spec.system),
        "mode": cast(VmMode, spec.mode),
        "system_mode": spec.system_mode,
        "size": spec.size,
        "size_label": format_size(spec.size),
        "rate": spec.rate,
        "rate_label": format_rate(spec.rate),
        "guest_ram": spec.guest_ram,
        "total_s": None,
        "downtime_s": None,
        "guest_pause_s": None,
        "guest_switchover_s": None,
        "guest_quiet_s": None,
        "host_gap_s": None,
        "steal_s": None,
        "switchover_to_running_s": None,
        "setup_s": None,
        "bytes_moved": None,
        "peak_memory": None,
        "peak_memory_ratio": None,
        "peak_rss": None,
        "memory": None,
        "verify_bad": None,
        "verify_pages": None,
        "write_rate": None,
        "boot_s": None,
        "status": "not run",
        "error": None,
        "details": {},
        "notes": [],
    }


def add_memory(record: VmRunRecord, memory: MemoryRecord) -> None:
    """Fill the record's memory figures from what the sampler saw."""
    record["memory"] = memory
    record["peak_memory"] = memory["peak"]
    record["peak_memory_ratio"] = memory["ratio"]
    record["peak_rss"] = memory["peak_rss"]["total"]
