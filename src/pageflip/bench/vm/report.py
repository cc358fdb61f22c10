"""A VM comparison laid out: QEMU and pageflip side by side per (size, rate, mode) with the
ratio pageflip / QEMU of each figure, the targets, and a plot (matplotlib, optional)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ...units import format_duration as _ms
from ...units import human_size
from ..common import STOLEN, markdown_targets, stolen_range
from ..migrate.report import check_plot
from .records import METRICS, CellRecord, ComparisonRecord, VmResult
from .stats import figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = [
    "COLUMNS",
    "METRIC_TITLES",
    "check_plot",
    "comparison_rows",
    "format_ratio",
    "markdown_table",
    "plot",
    "target_rows",
]

#: Column title of each compared figure.
METRIC_TITLES: dict[str, str] = {
    "total_s": "total",
    "downtime_s": "downtime (as reported)",
    "guest_pause_s": "pause the guest saw",
    "guest_switchover_s": "guest's gap at the switchover",
    "guest_quiet_s": "guest saw with no migration (control)",
    "host_gap_s": "heartbeat gap (host)",
    "switchover_to_running_s": "switchover to running",
    "bytes_moved": "bytes moved",
    "peak_memory": "peak memory, both (x guest RAM)",
}

#: Column titles of :func:`comparison_rows`: each figure is "QEMU / pageflip (ratio)".
COLUMNS: tuple[str, ...] = (
    "guest",
    "writes",
    "mode (QEMU / pageflip)",
    "runs",
    *(METRIC_TITLES[m] for m in METRICS),
    "verify bad pages",
)


def format_ratio(value: float | None) -> str:
    """``0.012x``, ``0.45x``, ``3.1x``, ``120x``; "-" for none."""
    if value is None or not math.isfinite(value):
        return "-"
    if value >= 10:
        return f"{value:.0f}x"
    return f"{value:.2g}x" if value >= 0.01 else f"{value:.1g}x"


def _figure(metric: str, cell: CellRecord | None) -> str:
    value = figure(cell, metric)
    if cell is None or value is None:
        return "-"
    if metric == "bytes_moved":
        return human_size(value)
    if metric == "peak_memory":
        ratio = cell["peak_memory_ratio"]
        return f"{human_size(value)} ({ratio:.2f}x)" if ratio is not None else human_size(value)
    return _ms(value)


def _pair(metric: str, c: ComparisonRecord) -> str:
    q, p = _figure(metric, c["qemu"]), _figure(metric, c["pageflip"])
    ratio = c["ratios"].get(metric)
    return f"{q} / {p}" + (f" ({format_ratio(ratio)})" if ratio is not None else "")


def _runs(cell: CellRecord | None) -> str:
    if cell is None:
        return "-"
    return f"{cell['n']}" + (f" ({cell['errors']} failed)" if cell["errors"] else "")


def _bad(cell: CellRecord | None) -> str:
    if cell is None or cell["verify_bad"] is None:
        return "-"
    return str(cell["verify_bad"]) if cell["verify_bad"] == 0 else f"**{cell['verify_bad']}**"


def comparison_rows(result: VmResult) -> list[list[str]]:
    """One row of strings per (size, rate, mode) under :data:`COLUMNS`."""
    rows = []
    for c in result["comparisons"]:
        q, p = c["qemu"], c["pageflip"]
        qemu_mode = q["system_mode"] if q else ("shared" if c["mode"] == "flip" else c["mode"])
        rows.append(
            [
                c["size_label"],
                c["rate_label"],
                f"{qemu_mode} / {c['mode']}",
                f"{_runs(q)} / {_runs(p)}",
                *(_pair(m, c) for m in METRICS),
                f"{_bad(q)} / {_bad(p)}",
            ]
        )
    return rows


def target_rows(result: VmResult) -> list[tuple[str, str, bool | None]]:
    """(target, measured, passed) for each target; passed None: not judged here."""
    return [(t["text"], t["measured"], t["passed"]) for t in result["targets"]]


def _stolen(result: VmResult) -> str:
    """The steal range per system ("" if the kernel does not count it): where it is
    milliseconds, so is the noise in the pauses."""
    parts = []
    for system in ("qemu", "pageflip"):
        span = stolen_range(r["steal_s"] for r in result["runs"] if r["system"] == system)
        if span:
            parts.append(f"{system} {span}")
    return f"{STOLEN}: " + ", ".join(parts) if parts else ""


def _errors(result: VmResult) -> list[str]:
    return [
        f"- run {r['index'] + 1} ({r['system']} {r['system_mode']}, {r['size_label']} at "
        f"{r['rate_label']}): {r['error']}"
        for r in result["runs"]
        if r["error"] is not None
    ]


def markdown_table(result: VmResult) -> str:
    """The comparison and the targets as Markdown (what docs/benchmarks.md shows)."""
    machine = result["machine"]
    cfg = result["config"]
    lines = [
        f"**VM migration, QEMU / pageflip**, {len(result['runs'])} run(s), median of "
        f"{cfg['repeat']} per cell, {result['date']}, Linux {machine['kernel']}, "
        f"{machine.get('cpus')} x {machine.get('cpu')}, {machine.get('memory_gib')} GiB; "
        f"{result.get('qemu_version') or 'QEMU not run'}; guest {cfg['guest_flavour']}",
        "",
        "Each figure: QEMU / pageflip (pageflip / QEMU); guest = the guest's buffer, its VM "
        "has 256 MiB more.",
        "",
    ]
    if not result["complete"]:
        lines += ["**Incomplete: some runs failed (listed below the table).**", ""]
    lines += [
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in comparison_rows(result)]
    notes = result["notes"]
    lines += ["", *(f"- {k.replace('_', ' ')}: {v}" for k, v in notes.items())]
    stolen = _stolen(result)
    if stolen:
        lines.append(f"- stolen: {stolen}")
    errors = _errors(result)
    if errors:
        lines += ["", "Failed runs:", "", *errors]
    lines += ["", *markdown_targets(target_rows(result))]
    return "\n".join(lines) + "\n"


# -- the plot -----------------------------------------------------------------------------------

#: The panels: the metric, its axis label, whether the axis is logarithmic.
_PANELS: tuple[tuple[str, str, bool], ...] = (
    ("total_s", "total time (s)", True),
    ("guest_pause_s", "pause the guest saw (s)", True),
    ("host_gap_s", "heartbeat gap, host (s)", True),
    ("downtime_s", "downtime as reported (s)", True),
    ("peak_memory_ratio", "peak memory of both / guest RAM", False),
)
_COLOURS = {"qemu": "tab:grey", "pageflip": "tab:green"}


def plot(result: VmResult, path: str | os.PathLike[str]) -> Path:
    """Bars of QEMU beside pageflip for each (size, rate, mode), one panel per figure
    (total, guest-observed pause, host-side heartbeat gap, reported downtime, peak memory);
    saves a PNG at ``path``. Needs matplotlib (``pip install 'pageflip[plot]'``); uses the
    Agg canvas directly."""
    check_plot()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    comps = result["comparisons"]
    fig = Figure(figsize=(max(8.0, 1.1 * len(comps) + 3), 11.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(_PANELS), 1, sharex=True)
    labels = [f"{c['size_label']}\n{c['rate_label']}\n{c['mode']}" for c in comps]
    for ax, (metric, label, log) in zip(axes, _PANELS, strict=True):
        _bars(ax, comps, metric, log)
        ax.set_ylabel(label, fontsize=8)
    axes[-1].set_xticks(range(len(comps)), labels, fontsize=8)
    axes[0].legend(fontsize=8, loc="upper left")
    machine = result["machine"]
    fig.suptitle(
        f"pageflip bench vm, {result['date']}: Linux {machine['kernel']}, "
        f"{machine.get('cpus')} x {machine.get('cpu')} (QEMU shared mode in the flip columns; "
        f"median of {result['config']['repeat']})",
        fontsize=9,
    )
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=110)
    return out


def _bars(ax: Axes, comps: list[ComparisonRecord], metric: str, log: bool) -> None:
    width = 0.38
    for offset, system in ((-width / 2, "qemu"), (width / 2, "pageflip")):
        xs, ys = [], []
        for i, c in enumerate(comps):
            cell = c["qemu"] if system == "qemu" else c["pageflip"]
            value = figure(cell, metric)
            if value is not None and value > 0:
                xs.append(i + offset)
                ys.append(value)
        ax.bar(
            xs,
            ys,
            width,
            color=_COLOURS[system],
            label="QEMU 7.2" if system == "qemu" else "pageflip",
        )
    if log:
        ax.set_yscale("log")
    ax.grid(True, axis="y", which="both", linewidth=0.3)
