"""Side-by-side table of two sets of `pageflip bench migrate` runs: before and after a change.

    python benchmarks/commit_point_table.py BEFORE.json[,BEFORE2.json...] AFTER.json[,...]

Medians per (size, dirty rate, mode) over every run in each set; the ratio is after/before.
docs/benchmarks.md ("The commit point's cost") shows its output for the files in
benchmarks/results/commit-point/.
"""

from __future__ import annotations

import json
import statistics
import sys
from typing import Any

Key = tuple[str, str, str]
MODES = ("flip", "precopy", "postcopy")


def load(paths: str) -> dict[Key, list[dict[str, Any]]]:
    out: dict[Key, list[dict[str, Any]]] = {}
    for path in paths.split(","):
        with open(path) as f:
            for run in json.load(f)["runs"]:
                key = (run["size_label"], run["rate_label"], run["mode"])
                out.setdefault(key, []).append(run)
    return out


def _ms(value: float) -> str:
    return f"{value * 1e3:.2f} ms" if value < 0.1 else f"{value * 1e3:.0f} ms"


def _s(value: float) -> str:
    return f"{value:.2f} s" if value >= 1 else f"{value * 1e3:.0f} ms"


def _order(key: Key) -> tuple[str, int, bool, int]:
    size, rate, mode = key
    return size[-1], int(size[:-1]), rate != "idle", MODES.index(mode)


def table(before: dict[Key, list[dict[str, Any]]], after: dict[Key, list[dict[str, Any]]]) -> str:
    lines = [
        "| size | writes | mode | runs (before / after) | downtime, before | downtime, after "
        "| ratio | guest saw, after | total, before | total, after | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(before.keys() & after.keys(), key=_order):
        old, new = before[key], after[key]
        down_old = statistics.median(r["downtime"] for r in old)
        down_new = statistics.median(r["downtime"] for r in new)
        total_old = statistics.median(r["total_seconds"] for r in old)
        total_new = statistics.median(r["total_seconds"] for r in new)
        seen = [r["guest_pause"] for r in new if r.get("guest_pause")]
        guest = _ms(statistics.median(seen)) if seen else "-"
        fmt = _ms if key[2] == "flip" else _s
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {len(old)} / {len(new)} | {_ms(down_old)} "
            f"| {_ms(down_new)} | {down_new / down_old:.2f}x | {guest} | {fmt(total_old)} "
            f"| {fmt(total_new)} | {total_new / total_old:.2f}x |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: commit_point_table.py BEFORE.json[,...] AFTER.json[,...]")
    print(table(load(sys.argv[1]), load(sys.argv[2])))
