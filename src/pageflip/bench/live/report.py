"""The table of ``pageflip bench live``: one row per side."""

from __future__ import annotations

import statistics

from ...units import human_size
from .records import LiveResult, SideRecord

__all__ = ["COLUMNS", "markdown", "rows"]

COLUMNS = (
    "side",
    "time (median / max)",
    "failed requests",
    "worst latency during",
    "steady p99",
    "longest gap",
    "service pause",
    "peak memory (x one copy)",
)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.1f} ms"


def _times(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return _ms(values[0])
    return f"{_ms(statistics.median(values))} / {_ms(max(values))} (n={len(values)})"


def _row(side: SideRecord) -> list[str]:
    traffic, memory = side["traffic"], side["memory"]
    if not side["available"] or traffic is None or memory is None:
        return [side["side"], "not available", *["-"] * (len(COLUMNS) - 2)]
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(traffic["failures_by_kind"].items()))
    failed = f"{traffic['failures']} of {traffic['requests']}" + (f" ({kinds})" if kinds else "")
    if side["rollbacks_ok"] is not None:
        failed += f"; rollbacks served on: {side['rollbacks_ok']}"
    ratio = f" ({memory['ratio']:.2f}x)" if memory["ratio"] else ""
    return [
        side["side"],
        _times(side["times"]),
        failed,
        _ms(traffic["worst_during"]),
        _ms(traffic["steady_p99"]),
        _ms(traffic["longest_gap"]),
        _times(side["pauses"]),
        human_size(memory["peak"]) + ratio,
    ]


def rows(result: LiveResult) -> list[list[str]]:
    return [_row(side) for side in result["sides"]]


def markdown(result: LiveResult) -> str:
    """live.md: the command, the machine, the table, the notes, and why a side did not run."""
    machine = result["machine"]
    lines = [
        f"`{result['command']}`",
        "",
        f"{result['date']} · Linux {machine['kernel']} · {machine.get('cpus')} x "
        f"{machine.get('cpu')} · {machine.get('memory_gib')} GiB · index "
        f"{human_size(result['config']['index_size'])}, {result['config']['connections']} "
        f"connections ({result['config']['load']})",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows(result)]
    lines.append("")
    lines += [f"- {name}: {text}" for name, text in result["notes"].items()]
    lines += [f"- {s['side']}: {s['reason']}" for s in result["sides"] if not s["available"]]
    return "\n".join(lines) + "\n"
