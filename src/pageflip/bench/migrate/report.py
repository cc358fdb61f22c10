"""A matrix's result laid out: rows of strings, Markdown, and a plot of downtime and total
time against memory size. Each reads the JSON as recorded, also results of earlier versions
(``benchmarks/results/``)."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ...errors import FeatureUnavailable
from ...units import format_duration as _ms
from ...units import format_rate, format_size, human_size
from ..common import STOLEN, markdown_targets, stolen_range
from ..references import Reference
from .config import MODES, GiB
from .records import CellRecord, MigrateResult
from .targets import FLIP_DOWNTIME_LIMIT, QEMU_REFERENCE

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = [
    "COLUMNS",
    "budget_markdown",
    "cell_rows",
    "check_plot",
    "markdown_table",
    "plot",
    "target_rows",
]

#: Column titles of :func:`cell_rows`.
COLUMNS = (
    "size",
    "dirty rate",
    "mode",
    "writes measured",
    "total",
    "downtime",
    "guest saw",
    "guest saw, paused in place",
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


def _per_second(rate: float | None) -> str:
    return "-" if rate is None else f"{human_size(rate)}/s"


def _faults(c: CellRecord) -> str:
    if c["mode"] != "postcopy" or c["faults"] is None:
        return "-"
    return f"{_count(c['faults'])}, {_count(c['fault_median_us'])} / {_count(c['fault_p99_us'])} us"


def _row(c: CellRecord) -> list[str]:
    return [
        c["size_label"],
        c["rate_label"],
        c["mode"],
        _per_second(c["write_rate"]),
        _ms(c["total_seconds"]),
        _ms(c["downtime"]),
        _ms(c.get("guest_pause")),
        _ms(c.get("guest_pause_in_place")),
        _ms(c["expected_downtime"]) if c["mode"] == "precopy" else "-",
        _ms(c["switchover_to_running"]),
        human_size(c["bytes_on_wire"] or 0),
        f"{human_size(c['peak'] or 0)} "
        + ("(-)" if c["ratio"] is None else f"({c['ratio']:.2f}x)"),
        human_size(c["added"] or 0),
        human_size(c["peak_rss"] or 0),
        _count(c["rounds"]),
        _per_second(c["last_round_bandwidth"]),
        f"{_count(c['pages_moved'])} / {_count(c['pages_copied'])} / {_count(c['pages_zero'])}",
        "yes" if c["verified"] else "**no**",
        _faults(c),
    ]


def cell_rows(result: MigrateResult) -> list[list[str]]:
    """One row of strings per (size, rate, mode) under :data:`COLUMNS` (medians)."""
    return [_row(c) for c in result["cells"]]


def target_rows(result: MigrateResult) -> list[tuple[str, str, bool | None]]:
    """(target, measured, passed) for each target; passed None: not applicable here."""
    return [(t["text"], t["measured"], t["passed"]) for t in result["targets"]]


def markdown_table(result: MigrateResult) -> str:
    """The results and the targets as Markdown (what docs/benchmarks.md shows)."""
    machine = result["machine"]
    cfg = result["config"]
    stolen = stolen_range(r.get("steal_seconds") for r in result["runs"])
    lines = [
        f"**Migration matrix**, {len(result['runs'])} run(s), median of {cfg['repeat']} per "
        f"row, {result['date']}, Linux {machine['kernel']}, {machine.get('cpus')} x "
        f"{machine.get('cpu')}, {machine.get('memory_gib')} GiB; downtime limit "
        f"{_ms(cfg['downtime_limit'])}, {cfg['threads']} writer threads"
        + (f", the workload on {cfg['huge']} huge pages" if cfg.get("huge") else ""),
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
        f'Peak memory: {notes["peak"]}; "added" is the peak minus the same measure just '
        "before the migration; the RSS sum counts pages mapped by both processes twice.",
        f"Times: {notes['clock']}.",
        *([f"Stolen: {STOLEN}: {stolen}."] if stolen else []),
        "",
        *markdown_targets(target_rows(result)),
    ]
    budget = budget_markdown(result, "flip")
    if budget:
        lines += ["", budget.rstrip("\n")]
    lines += ["", f"QEMU context: {notes['qemu']}"]
    return "\n".join(lines) + "\n"


def budget_markdown(result: MigrateResult, mode: str) -> str:
    """The pause budget of ``mode``'s cells as Markdown: one row per step (source and
    destination in time order), one column per cell, the median milliseconds each step
    took; "" when no cell of ``mode`` recorded steps (results of earlier versions)."""
    cells = [c for c in result["cells"] if c["mode"] == mode and c.get("pause_budget")]
    if not cells:
        return ""
    order: list[tuple[str, str]] = []
    for c in cells:
        for row in c["pause_budget"]:
            if (row["side"], row["step"]) not in order:
                order.append((row["side"], row["step"]))
    by_cell = [{(r["side"], r["step"]): r["ms"] for r in c["pause_budget"]} for c in cells]
    heads = [f"{c['size_label']}, {c['rate_label']}" for c in cells]
    lines = [
        f"**Pause budget, {mode}** (median ms per step: from the end of the step above to the "
        "end of this one; the source's and the destination's steps on the host's one clock; "
        "the last row is what the guest saw beyond the engine's pause)",
        "",
        "| side | step | " + " | ".join(heads) + " |",
        "|---|---|" + "|".join("---:" for _ in heads) + "|",
    ]
    for key in order:
        values = [cell.get(key) for cell in by_cell]
        shown = ["-" if v is None else f"{v:.3f}" for v in values]
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(shown) + " |")
    figures = [
        ("**downtime (engine)**", "downtime"),
        ("**guest saw**", "guest_pause"),
        ("guest: gap across the switchover", "guest_switchover_gap"),
        ("guest: longest gap in the window after", "guest_gap_after"),
        ("guest: 90th percentile of what it saw", "guest_pause_p90"),
        ("guest saw, paused in place (no migration)", "guest_pause_in_place"),
    ]
    records: list[Mapping[str, object]] = list(cells)
    for title, field in figures:
        lines.append(
            f"| | {title} | " + " | ".join(_ms_figure(r.get(field)) for r in records) + " |"
        )
    return "\n".join(lines) + "\n"


def _ms_figure(seconds: object) -> str:
    """Seconds as milliseconds with three decimals, as the budget shows them; "-" if absent
    (results of earlier versions, or a guest that could not tell)."""
    return f"{seconds * 1000:.3f}" if isinstance(seconds, (int, float)) else "-"


# -- the plot -----------------------------------------------------------------------------------

#: Colour per mode, line style and marker per dirty rate position in the plot.
_COLOURS = {"flip": "tab:green", "precopy": "tab:blue", "postcopy": "tab:orange"}
_STYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v")
#: The two panels: the cell's key and the axis label.
_Panel = Literal["downtime", "total_seconds"]
_PANELS: tuple[tuple[_Panel, str], ...] = (
    ("downtime", "downtime (s)"),
    ("total_seconds", "total time (s)"),
)


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


def plot(result: MigrateResult, path: str | os.PathLike[str]) -> Path:
    """Draw downtime and total time against memory size (log-log), one line per (mode, rate),
    and save a PNG at ``path``. Needs matplotlib (``pip install 'pageflip[plot]'``); it uses
    the Agg canvas directly, so pyplot and its global backend stay untouched."""
    check_plot()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cells = result["cells"]
    sizes = sorted({c["size"] for c in cells})
    rates = sorted({c["rate"] for c in cells})
    fig = Figure(figsize=(12, 5.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharex=True)
    ticks = set(sizes) | {r["size"] for r in QEMU_REFERENCE if r["rate"] in rates}
    for ax, (key, label) in zip(axes, _PANELS, strict=True):
        _plot_cells(ax, cells, rates, key)
        for ref in QEMU_REFERENCE:
            _plot_reference(ax, ref, rates, key)
        if key == "downtime":
            _plot_limits(ax, result["config"]["downtime_limit"])
        _size_axis(ax, sorted(ticks), label)
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


def _plot_cells(ax: Axes, cells: Iterable[CellRecord], rates: list[int], key: _Panel) -> None:
    """One line per (mode, rate) through the cells' ``key`` (positive values only)."""
    cells = list(cells)
    modes = [m for m in MODES if any(c["mode"] == m for c in cells)]
    for mode in modes:
        for i, rate in enumerate(rates):
            points = sorted(
                (c["size"], value)
                for c in cells
                if c["mode"] == mode and c["rate"] == rate and (value := c[key]) and value > 0
            )
            if not points:
                continue
            ax.plot(
                [p[0] / GiB for p in points],
                [p[1] for p in points],
                color=_COLOURS[mode],
                linestyle=_STYLES[i % len(_STYLES)],
                marker=_MARKERS[i % len(_MARKERS)],
                label=f"{mode}, {format_rate(rate)}",
            )


def _plot_reference(ax: Axes, ref: Reference, rates: list[int], key: _Panel) -> None:
    """QEMU's figure for ``key``, as an open marker (black: the issue's; grey: ours)."""
    value = ref["total_seconds"] if key == "total_seconds" else ref.get("downtime")
    if value is None or ref["rate"] not in rates:
        return
    ax.plot(
        [ref["size"] / GiB],
        [value],
        linestyle="none",
        marker=_MARKERS[rates.index(ref["rate"]) % len(_MARKERS)],
        fillstyle="none",
        color="black" if ref["source"] == "issue" else "grey",
        markersize=9,
        label=f"QEMU {format_size(ref['size'])}, {format_rate(ref['rate'])} ({ref['source']})",
    )


def _plot_limits(ax: Axes, limit: float) -> None:
    """The precopy downtime limit and the flip target, as labelled horizontal lines."""
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


def _size_axis(ax: Axes, ticks: list[int], label: str) -> None:
    """Log-log axes, memory sizes as ticks, the panel's labels and title."""
    from matplotlib.ticker import FixedLocator, NullLocator

    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(FixedLocator([s / GiB for s in ticks]))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([format_size(s) for s in ticks])
    ax.set_xlabel("guest memory")
    ax.set_ylabel(label)
    ax.grid(True, which="both", linewidth=0.3)
    ax.set_title(label.split(" (", maxsplit=1)[0])
