"""Statistics over the runs: one cell per (system, size, rate, mode), the medians of its
completed repeats, and one comparison per (size, rate, mode) with pageflip / QEMU ratios."""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from typing import Any, cast

from ...units import format_rate, format_size
from .config import MODES, QEMU_MODES, SYSTEMS
from .records import METRICS, CellRecord, ComparisonRecord, System, VmMode, VmRunRecord

__all__ = ["cells", "comparisons", "figure", "median", "ratio", "system_label"]


def median(values: Iterable[float | None]) -> float | None:
    """The median of the values present (None: none is)."""
    present = [v for v in values if v is not None]
    return float(statistics.median(present)) if present else None


def ratio(pageflip: float | None, qemu: float | None) -> float | None:
    """pageflip / QEMU; None when either is missing or QEMU's is 0."""
    if pageflip is None or qemu is None or qemu == 0:
        return None
    return pageflip / qemu


def _key(size: int, rate: int, mode: str) -> tuple[int, int, int]:
    return size, rate, MODES.index(mode)


def cells(runs: list[VmRunRecord]) -> list[CellRecord]:
    """One entry per (system, size, rate, mode) in size, rate, mode and system order."""
    groups: dict[tuple[str, int, int, str], list[VmRunRecord]] = {}
    for r in runs:
        groups.setdefault((r["system"], r["size"], r["rate"], r["mode"]), []).append(r)
    ordered = sorted(
        groups.items(),
        key=lambda kv: (*_key(kv[0][1], kv[0][2], kv[0][3]), SYSTEMS.index(kv[0][0])),
    )
    return [_cell(rs) for _, rs in ordered]


def _cell(rs: list[VmRunRecord]) -> CellRecord:
    first = rs[0]
    ok = [r for r in rs if r["error"] is None]
    pauses = [p for r in ok if (p := r["guest_pause_s"]) is not None]
    bad = [b for r in rs if (b := r["verify_bad"]) is not None]
    return {
        "system": first["system"],
        "mode": first["mode"],
        "system_mode": first["system_mode"],
        "size": first["size"],
        "size_label": first["size_label"],
        "rate": first["rate"],
        "rate_label": first["rate_label"],
        "guest_ram": first["guest_ram"],
        "n": len(rs),
        "errors": len(rs) - len(ok),
        "total_s": median(r["total_s"] for r in ok),
        "downtime_s": median(r["downtime_s"] for r in ok),
        "guest_pause_s": median(pauses),
        "guest_pause_max_s": max(pauses, default=None),
        "guest_switchover_s": median(r["guest_switchover_s"] for r in ok),
        "guest_quiet_s": median(r["guest_quiet_s"] for r in ok),
        "host_gap_s": median(r["host_gap_s"] for r in ok),
        "switchover_to_running_s": median(r["switchover_to_running_s"] for r in ok),
        "bytes_moved": median(r["bytes_moved"] for r in ok),
        "peak_memory": median(r["peak_memory"] for r in ok),
        "peak_memory_ratio": median(r["peak_memory_ratio"] for r in ok),
        "verify_bad": max(bad, default=None),
        "runs": [r["index"] for r in rs],
    }


def comparisons(cell_list: list[CellRecord]) -> list[ComparisonRecord]:
    """One entry per (size, rate, mode): both systems' cells and pageflip / QEMU for each
    of :data:`~.records.METRICS`."""
    by_key: dict[tuple[int, int, str], dict[str, CellRecord]] = {}
    for c in cell_list:
        by_key.setdefault((c["size"], c["rate"], c["mode"]), {})[c["system"]] = c
    out: list[ComparisonRecord] = []
    for (size, rate, mode), systems in sorted(by_key.items(), key=lambda kv: _key(*kv[0])):
        qemu, pf = systems.get("qemu"), systems.get("pageflip")
        ratios: dict[str, float | None] = {}
        for metric in METRICS:
            ratios[metric] = ratio(figure(pf, metric), figure(qemu, metric))
        out.append(
            {
                "size": size,
                "size_label": format_size(size),
                "rate": rate,
                "rate_label": format_rate(rate),
                "mode": cast(VmMode, mode),
                "qemu": qemu,
                "pageflip": pf,
                "ratios": ratios,
            }
        )
    return out


def figure(cell: CellRecord | None, metric: str) -> float | None:
    """One of :data:`~.records.METRICS` of a cell (None: no cell, or no figure)."""
    if cell is None:
        return None
    value = cast(dict[str, Any], cell).get(metric)
    return None if value is None else float(value)


def system_label(system: System, mode: str) -> str:
    """``QEMU shared`` / ``pageflip flip``: a system and its name for the mode."""
    return f"QEMU {QEMU_MODES[mode]}" if system == "qemu" else f"pageflip {mode}"
