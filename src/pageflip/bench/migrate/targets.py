"""The targets of the issue, each judged from the measured numbers (cell medians), and QEMU's
figures (:mod:`pageflip.bench.references`) for the precopy comparison."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ...units import format_duration as _ms
from ...units import format_size, human_size
from ..references import Reference, qemu_references
from .records import CellRecord, RunRecord, TargetRecord

__all__ = [
    "FLIP_DOWNTIME_LIMIT",
    "FLIP_GUEST_MEDIAN",
    "FLIP_GUEST_P90",
    "FLIP_PEAK_RATIO",
    "FLIP_SCALING_FACTOR",
    "FLIP_TOTAL_LIMIT",
    "POSTCOPY_RUNNING_LIMIT",
    "QEMU_REFERENCE",
    "judge",
]

#: How long the source's pause may be judged "running within" for postcopy (seconds).
POSTCOPY_RUNNING_LIMIT = 0.050
#: Flip targets (seconds, and a ratio of the guest's memory).
FLIP_DOWNTIME_LIMIT = 0.002
FLIP_TOTAL_LIMIT = 0.010
FLIP_PEAK_RATIO = 1.1
#: What the guest may see of a flip's pause, by its own clock: median and 90th percentile.
FLIP_GUEST_MEDIAN = 0.001
FLIP_GUEST_P90 = 0.002
#: "Does not grow with size": the largest size's downtime within this factor of the smallest's.
FLIP_SCALING_FACTOR = 2.0

#: QEMU 7.2 + KVM localhost migration on this machine kind, unthrottled (``max-bandwidth``
#: lifted), for the precopy comparison; ``source`` says where each figure was stated (see
#: ``references.json``).
QEMU_REFERENCE: tuple[Reference, ...] = qemu_references()


@dataclass(frozen=True)
class _Matrix:
    """What the targets look at: the cells and runs of a result, and its downtime limit."""

    cells: list[CellRecord]
    runs: list[RunRecord]
    limit: float

    @property
    def sizes(self) -> list[int]:
        return sorted({c["size"] for c in self.cells})

    @property
    def largest(self) -> int | None:
        return self.sizes[-1] if self.sizes else None

    @property
    def smallest(self) -> int | None:
        return self.sizes[0] if self.sizes else None

    @property
    def big(self) -> str:
        return format_size(self.largest) if self.largest else "-"

    def of(self, mode: str) -> list[CellRecord]:
        return [c for c in self.cells if c["mode"] == mode]


def _target(
    key: str, text: str, passed: bool | None, measured: str, value: float | None = None
) -> TargetRecord:
    return {"id": key, "text": text, "passed": passed, "measured": measured, "value": value}


def judge(cells: list[CellRecord], runs: list[RunRecord], limit: float) -> list[TargetRecord]:
    """Each target of the issue, judged from the cells (and, for precopy's downtime limit,
    every run); ``limit`` is the precopy downtime limit the matrix ran with."""
    m = _Matrix(cells, runs, limit)
    out = [judge_one(m) for judge_one in _FLIP_TARGETS]
    out += [_precopy_vs_qemu(c) for c in m.of("precopy")]
    out.append(_precopy_downtime_limit(m))
    out.append(_postcopy_running(m))
    return out


def _flip_downtime(m: _Matrix) -> TargetRecord:
    """flip: downtime at the largest size, under writes."""
    under = [c for c in m.of("flip") if c["size"] == m.largest and c["rate"] > 0]
    worst = max(under, key=lambda c: c["downtime"] or 0.0, default=None)
    return _target(
        "flip_downtime",
        f"flip: downtime <= {_ms(FLIP_DOWNTIME_LIMIT)} at the largest size ({m.big}) under writes",
        None if worst is None else _le(worst["downtime"], FLIP_DOWNTIME_LIMIT),
        "no flip run with writes at the largest size"
        if worst is None
        else ", ".join(f"{_ms(c['downtime'])} at {c['rate_label']}" for c in under),
        None if worst is None else worst["downtime"],
    )


def _flip_downtime_scaling(m: _Matrix) -> TargetRecord:
    """flip: not growing with size (largest vs smallest, at each rate)."""
    flips = m.of("flip")
    ratios = []
    for c in flips:
        if c["size"] != m.largest or m.largest == m.smallest:
            continue
        small = next((s for s in flips if s["size"] == m.smallest and s["rate"] == c["rate"]), None)
        if small is not None and small["downtime"] and c["downtime"] is not None:
            ratios.append((c["downtime"] / small["downtime"], c, small))
    worst = max(ratios, key=lambda x: x[0], default=None)
    return _target(
        "flip_downtime_scaling",
        f"flip: downtime does not grow with size ({m.big} within {FLIP_SCALING_FACTOR:g}x "
        f"of {format_size(m.smallest) if m.smallest else '-'}, at every rate)",
        None if worst is None else worst[0] <= FLIP_SCALING_FACTOR,
        "needs flip runs at two sizes"
        if worst is None
        else ", ".join(
            f"{c['rate_label']}: {_ms(c['downtime'])} vs {_ms(s['downtime'])} ({x:.2f}x)"
            for x, c, s in ratios
        ),
        None if worst is None else worst[0],
    )


def _flip_total(m: _Matrix) -> TargetRecord:
    """flip: total time, every size and rate."""
    slowest = max(m.of("flip"), key=lambda c: c["total_seconds"] or 0.0, default=None)
    return _target(
        "flip_total",
        f"flip: total time < {_ms(FLIP_TOTAL_LIMIT)} (every size and rate)",
        None if slowest is None else _lt(slowest["total_seconds"], FLIP_TOTAL_LIMIT),
        "no flip run"
        if slowest is None
        else f"slowest {_ms(slowest['total_seconds'])} ({slowest['size_label']} at "
        f"{slowest['rate_label']})",
        None if slowest is None else slowest["total_seconds"],
    )


def _flip_peak(m: _Matrix) -> TargetRecord:
    """flip: peak memory at the largest size."""
    at_big = [c for c in m.of("flip") if c["size"] == m.largest]
    fattest = max(at_big, key=lambda c: c["ratio"] or 0.0, default=None)
    return _target(
        "flip_peak",
        f"flip: peak memory of source + destination <= {FLIP_PEAK_RATIO:g}x the guest's "
        f"memory (at {m.big})",
        None if fattest is None else _le(fattest["ratio"], FLIP_PEAK_RATIO),
        "no flip run"
        if fattest is None
        else f"{fattest['ratio'] or 0.0:.3f}x ({human_size(fattest['peak'] or 0)} for "
        f"{human_size(fattest['guest_bytes'])}, at {fattest['rate_label']})",
        None if fattest is None else fattest["ratio"],
    )


def _flip_guest_pause(m: _Matrix) -> TargetRecord:
    """flip: the pause the guest saw, median and 90th percentile, in every cell; the guest's
    figure for a pause in place (the control) stands beside each."""
    flips = [c for c in m.of("flip") if c["guest_pause"] is not None]
    worst = max(flips, key=lambda c: c["guest_pause"] or 0.0, default=None)
    passed = all(
        _lt(c["guest_pause"], FLIP_GUEST_MEDIAN) and _lt(c["guest_pause_p90"], FLIP_GUEST_P90)
        for c in flips
    )
    return _target(
        "flip_guest_pause",
        f"flip: the pause the guest saw: median < {_ms(FLIP_GUEST_MEDIAN)} and 90th percentile "
        f"< {_ms(FLIP_GUEST_P90)} in every cell",
        None if worst is None else passed,
        "no flip run where the guest could tell"
        if worst is None
        else "; ".join(
            f"{c['size_label']} at {c['rate_label']}: {_ms(c['guest_pause'])} / "
            f"{_ms(c['guest_pause_p90'])} (paused in place: {_ms(c['guest_pause_in_place'])})"
            for c in flips
        ),
        None if worst is None else worst["guest_pause"],
    )


def _flip_guest_vs_postcopy(m: _Matrix) -> TargetRecord:
    """flip: what the guest saw not above what it saw of postcopy's switchover (medians),
    at each size and rate that ran both."""
    posts = {(c["size"], c["rate"]): c for c in m.of("postcopy")}
    pairs = [
        (c, post)
        for c in m.of("flip")
        if (post := posts.get((c["size"], c["rate"]))) is not None
        and c["guest_pause"] is not None
        and post["guest_pause"] is not None
    ]
    return _target(
        "flip_guest_vs_postcopy",
        "flip: the pause the guest saw <= what it saw of postcopy's switchover (medians, same "
        "size and rate, same run)",
        all(_le(f["guest_pause"], p["guest_pause"] or 0.0) for f, p in pairs) if pairs else None,
        "no size and rate ran both"
        if not pairs
        else "; ".join(
            f"{f['size_label']} at {f['rate_label']}: {_ms(f['guest_pause'])} vs "
            f"{_ms(p['guest_pause'])}"
            for f, p in pairs
        ),
        max((f["guest_pause"] or 0.0) / (p["guest_pause"] or 1.0) for f, p in pairs)
        if pairs
        else None,
    )


_FLIP_TARGETS: tuple[Callable[[_Matrix], TargetRecord], ...] = (
    _flip_downtime,
    _flip_downtime_scaling,
    _flip_total,
    _flip_peak,
    _flip_guest_pause,
    _flip_guest_vs_postcopy,
)


def _qemu_for(size: int, rate: int) -> list[Reference]:
    return [r for r in QEMU_REFERENCE if r["size"] == size and r["rate"] == rate]


def _reference_text(ref: Reference) -> str:
    dt = ""
    if ref.get("downtime") is not None:
        dt = f", downtime {_ms(ref['downtime'])}"
    elif ref.get("downtime_range"):
        lo, hi = ref["downtime_range"]
        dt = f", downtime {_ms(lo)}-{_ms(hi)}"
    return f"QEMU {ref['total_seconds']:g} s{dt} ({ref['source']}: {ref['note']})"


def _precopy_vs_qemu(c: CellRecord) -> TargetRecord:
    """precopy vs QEMU, one row per precopy cell."""
    key = f"precopy_vs_qemu_{c['size_label']}_{c['rate']}"
    name = f"precopy {c['size_label']} at {c['rate_label']}: total below QEMU's unthrottled"
    refs = _qemu_for(c["size"], c["rate"])
    if not refs:
        measured = f"{_ms(c['total_seconds'])}; no QEMU reference"
        return _target(key, name, None, measured, c["total_seconds"])
    strictest = min(refs, key=lambda r: r["total_seconds"])
    return _target(
        key,
        f"{name} ({strictest['total_seconds']:g} s)",
        _lt(c["total_seconds"], strictest["total_seconds"]),
        f"{_ms(c['total_seconds'])}, downtime {_ms(c['downtime'])}; vs "
        + "; ".join(_reference_text(r) for r in refs),
        c["total_seconds"],
    )


def _precopy_downtime_limit(m: _Matrix) -> TargetRecord:
    """precopy downtime within the limit whenever the dirty rate is below the bandwidth."""
    pre_runs = [r for r in m.runs if r["mode"] == "precopy"]
    judged = [r for r in pre_runs if r["rate_below_bandwidth"]]
    over = [r for r in judged if r["downtime"] > m.limit]
    worst = max(judged, key=lambda r: r["downtime"], default=None)
    skipped = len(pre_runs) - len(judged)
    return _target(
        "precopy_downtime_limit",
        f"precopy: downtime <= the limit ({_ms(m.limit)}) in every run whose measured dirty "
        "rate is below the measured bandwidth",
        None if worst is None else not over,
        "no precopy run qualifies"
        if worst is None
        else f"{len(judged) - len(over)} of {len(judged)} runs within; worst "
        f"{_ms(worst['downtime'])} ({worst['size_label']} at {worst['rate_label']})"
        + (f"; {skipped} run(s) not judged (rate >= bandwidth)" if skipped else ""),
        None if worst is None else worst["downtime"],
    )


def _postcopy_running(m: _Matrix) -> TargetRecord:
    """postcopy: running soon after the switchover at the largest size."""
    posts = [c for c in m.of("postcopy") if c["size"] == m.largest]
    late = max(
        (c for c in posts if c["switchover_to_running"] is not None),
        key=lambda c: c["switchover_to_running"] or 0.0,
        default=None,
    )
    return _target(
        "postcopy_running",
        f"postcopy: destination running within {_ms(POSTCOPY_RUNNING_LIMIT)} of the "
        f"switchover at the largest size ({m.big})",
        None if late is None else _le(late["switchover_to_running"], POSTCOPY_RUNNING_LIMIT),
        "no postcopy run at the largest size"
        if late is None
        else ", ".join(f"{_ms(c['switchover_to_running'])} at {c['rate_label']}" for c in posts),
        None if late is None else late["switchover_to_running"],
    )


def _le(value: float | None, limit: float) -> bool:
    return value is not None and value <= limit


def _lt(value: float | None, limit: float) -> bool:
    return value is not None and value < limit
