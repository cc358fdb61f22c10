"""What the benchmarks share: their error, their clock, the machine they ran on, strict JSON
(:func:`finite`), and the Markdown table of speed targets."""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from collections.abc import Iterable
from typing import Any, TypedDict

import numpy as np

from .. import __version__
from .._sys.procfs import procfs_path
from ..errors import BenchmarkError
from ..units import format_duration

__all__ = ["BenchmarkError", "TargetRecord", "finite", "machine", "markdown_targets", "now"]


def now() -> float:
    """CLOCK_MONOTONIC: one clock for every process of a run."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float (numpy's too) replaced by None, through
    dicts, lists and tuples: JSON has neither, and a result must pass ``allow_nan=False``."""
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def steal_seconds() -> float | None:
    """CPU time the hypervisor has taken from this machine since boot, all CPUs together
    (the steal column of ``/proc/stat``); None where the kernel does not count it. A run
    records how much fell into its migration: on a host that steals milliseconds at a time
    a pause measures the host, not the code."""
    text = _read(os.path.join(procfs_path(), "stat")) or ""
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu" and len(fields) > 8:
            return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    return None


def stolen_since(start: float | None) -> float | None:
    """Seconds stolen since :func:`steal_seconds` gave ``start`` (None if either is)."""
    end = steal_seconds()
    return None if start is None or end is None else max(0.0, end - start)


#: What the steal range of a set of runs measures, for the reports.
STOLEN = (
    "CPU time the hypervisor took from this machine during each run's migration (/proc/stat, steal)"
)


def stolen_range(values: Iterable[float | None]) -> str:
    """The least and most seconds stolen over runs, or the one figure all had ("" when
    none counted them)."""
    counted = [v for v in values if v is not None]
    if not counted:
        return ""
    least, most = format_duration(min(counted)), format_duration(max(counted))
    return least if least == most else f"{least} to {most}"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "pageflip": __version__,
        "root": os.geteuid() == 0,
    }
    cpuinfo = _read(os.path.join(procfs_path(), "cpuinfo")) or ""
    models = [
        ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")
    ]
    info["cpu"] = models[0] if models else None
    meminfo = _read(os.path.join(procfs_path(), "meminfo")) or ""
    for line in meminfo.splitlines():
        if line.startswith("MemTotal:"):
            info["memory_gib"] = round(int(line.split()[1]) / (1 << 20), 1)
    for name in ("enabled", "shmem_enabled"):
        text = _read(f"/sys/kernel/mm/transparent_hugepage/{name}") or ""
        if "[" in text:
            info[f"thp_{name}"] = text.split("[")[1].split("]")[0]
    return info


def markdown_targets(rows: Iterable[tuple[str, str, bool | None]]) -> list[str]:
    """The lines of a ``| target | measured | met |`` table from (text, measured, passed)."""
    lines = ["| target | measured | met |", "|---|---|---|"]
    for text, measured, passed in rows:
        verdict = "n/a" if passed is None else ("yes" if passed else "**no**")
        lines.append(f"| {text} | {measured} | {verdict} |")
    return lines


class TargetRecord(TypedDict):
    """One target, judged: ``passed`` None when this result cannot tell."""

    id: str
    text: str
    passed: bool | None
    measured: str
    value: float | None
