"""Statistics over the runs: one cell per (size, rate, mode), the medians of its repeats."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable

from ...units import format_rate, format_size
from .config import MODES
from .records import BudgetRow, CellRecord, RunRecord

__all__ = ["BEYOND", "cells", "median", "p90", "pause_budget"]


def median(values: Iterable[float | None]) -> float | None:
    """The median of the values present (None: none is)."""
    present = [v for v in values if v is not None]
    return float(statistics.median(present)) if present else None


def p90(values: Iterable[float | None]) -> float | None:
    """The 90th percentile of the values present, by nearest rank (of three: the largest;
    None: none is)."""
    present = sorted(v for v in values if v is not None)
    return present[math.ceil(0.9 * len(present)) - 1] if present else None


def cells(runs: list[RunRecord]) -> list[CellRecord]:
    """One entry per (size, rate, mode): the medians over its repeats, in size, rate and
    :data:`MODES` order."""
    groups: dict[tuple[int, int, str], list[RunRecord]] = {}
    for r in runs:
        groups.setdefault((r["size"], r["rate"], r["mode"]), []).append(r)
    ordered = sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], MODES.index(kv[0][2])))
    return [_cell(size, rate, mode, rs) for (size, rate, mode), rs in ordered]


def _cell(size: int, rate: int, mode: str, rs: list[RunRecord]) -> CellRecord:
    post = [pc for r in rs if (pc := r["postcopy"])]
    return {
        "size": size,
        "size_label": format_size(size),
        "rate": rate,
        "rate_label": format_rate(rate),
        "mode": mode,
        "n": len(rs),
        "guest_bytes": rs[0]["guest_bytes"],
        "write_rate": median(r["write_rate"] for r in rs),
        "total_seconds": median(r["total_seconds"] for r in rs),
        "downtime": median(r["downtime"] for r in rs),
        "downtime_max": max(r["downtime"] for r in rs),
        "guest_pause": median(r.get("guest_pause") for r in rs),
        "guest_pause_p90": p90(r.get("guest_pause") for r in rs),
        "guest_pause_max": max(
            (pause for r in rs if (pause := r.get("guest_pause")) is not None), default=None
        ),
        "guest_switchover_gap": median(r.get("guest_switchover_gap") for r in rs),
        "guest_gap_after": median(r.get("guest_gap_after") for r in rs),
        "guest_pause_in_place": median(r.get("guest_pause_in_place") for r in rs),
        "expected_downtime": median(r["expected_downtime"] for r in rs),
        "switchover_to_running": median(r["switchover_to_running"] for r in rs),
        "bytes_on_wire": median(r["bytes_on_wire"] for r in rs),
        "peak": median(r["memory"]["peak"] for r in rs),
        "ratio": median(r["memory"]["ratio"] for r in rs),
        "added": median(r["memory"]["added"] for r in rs),
        "peak_rss": median(r["memory"]["peak_rss"]["total"] for r in rs),
        "rounds": median(r["rounds"] for r in rs),
        "pages_moved": median(r["pages_moved"] for r in rs),
        "pages_copied": median(r["pages_copied"] for r in rs),
        "pages_zero": median(r["pages_zero"] for r in rs),
        "last_round_bandwidth": median(r["last_round_bandwidth"] for r in rs),
        "fault_median_us": median(p["fault_median_us"] for p in post) if post else None,
        "fault_p99_us": median(p["fault_p99_us"] for p in post) if post else None,
        "faults": median(p["faults"] for p in post) if post else None,
        "verified": all(r["verified"] for r in rs),
        "runs": [r["index"] for r in rs],
        "pause_budget": pause_budget(rs),
    }


#: The budget's last row: what the guest saw of its pause beyond the engine's window (the
#: time to stop its writers before "paused", and to run again after "resumed").
BEYOND = ("guest", "beyond the engine's pause")


def pause_budget(rs: list[RunRecord]) -> list[BudgetRow]:
    """Per step (in the order of the first run that has it): the median time from the
    previous step's end to its end, in ms; then :data:`BEYOND`, the guest's own figure
    minus the engine's downtime."""
    durations: dict[tuple[str, str], list[float]] = {}
    for r in rs:
        previous: float | None = None
        for s in r.get("pause_steps", []):
            if previous is not None:
                durations.setdefault((s["side"], s["step"]), []).append(s["at"] - previous)
            previous = s["at"]
    rows: list[BudgetRow] = []
    for (side, step), values in durations.items():
        ms = median(values)
        rows.append({"step": step, "side": side, "ms": None if ms is None else ms * 1000})
    beyond = median(p - r["downtime"] for r in rs if (p := r.get("guest_pause")) is not None)
    if rows:
        rows.append(
            {"step": BEYOND[1], "side": BEYOND[0], "ms": None if beyond is None else beyond * 1000}
        )
    return rows
