"""A matrix's result: its runs, their cells and targets, and how everything was measured."""

from __future__ import annotations

import datetime
from typing import cast

from ..common import finite, machine
from ..references import qemu_context
from .config import ORDER, MigrateConfig, RunSpec
from .records import ConfigRecord, MigrateResult, Notes, RunRecord
from .sampling import COUNTERS
from .stats import cells
from .targets import QEMU_REFERENCE, judge

__all__ = ["CLOCK", "results"]

CLOCK = (
    "downtime: the source's pause until the destination's resume (the source's DoneEvent); "
    "guest saw: the pause the guest measured itself, the longest gap in its own heartbeat "
    "around the migration (the DoneEvent's guest_pause; the destination's resumed event "
    "gives the same figure, kept as guest_pause_destination; '-' when the guest could not "
    "tell; in the pause budget, its two parts: the gap across the switchover and the "
    "longest gap in the window after the resume); guest saw, paused in place: the control, "
    "the same figure for the guest paused and resumed where it runs with nothing in between, "
    "right before the migration (what the guest sees of itself on this machine at that "
    "moment); total: the source's Source.run() start until done; switchover to running: the "
    "source's switchover event until the destination's resumed event, both stamped with "
    "CLOCK_MONOTONIC (system-wide)"
)


def results(
    config: MigrateConfig,
    started: datetime.datetime,
    specs: list[RunSpec],
    runs: list[RunRecord],
) -> MigrateResult:
    """The JSON-ready result of ``runs`` (all of ``specs``, or the ones before a failure);
    strict JSON: no NaN or infinity anywhere."""
    cell_list = cells(runs)
    result: MigrateResult = {
        "benchmark": "migrate",
        "date": started.isoformat(timespec="seconds"),
        "machine": machine(),
        "config": _config(config),
        "order": {
            "scheme": ORDER.format(settle=config.settle),
            "sequence": [[s.size, s.rate, s.mode, s.repeat] for s in specs],
        },
        "notes": _notes(config),
        "complete": len(runs) == len(specs),
        "runs": runs,
        "cells": cell_list,
        "qemu_reference": [r.copy() for r in QEMU_REFERENCE],
        "targets": judge(cell_list, runs, config.downtime_limit),
    }
    return cast(MigrateResult, finite(result))


def _config(config: MigrateConfig) -> ConfigRecord:
    return {
        "sizes": list(config.sizes),
        "rates": list(config.rates),
        "modes": list(config.modes),
        "repeat": config.repeat,
        "downtime_limit": config.downtime_limit,
        "threads": config.threads,
        "warmup": config.warmup,
        "settle": config.settle,
        "sample_interval": config.sample_interval,
        "verify_delay": config.verify_delay,
        "timeout": config.timeout,
        "huge": config.huge,
    }


def _notes(config: MigrateConfig) -> Notes:
    return {
        "clock": CLOCK,
        "peak": COUNTERS.format(interval=config.sample_interval),
        "guest_memory": "guest memory = the workload's regions: ram, journal (4 bytes "
        "per page of ram, rounded up to a page) and heartbeat (one page); each run's "
        "'regions' gives their sizes and its done event's 'regions' the pages of each",
        "write_rate": "the workload's own count of bytes written over the last second, "
        "read just before Source.run()",
        "statistic": f"median of {config.repeat} repeat(s) per (size, rate, mode)",
        "warmth": _warmth(config),
        "prewarm": config.prewarm,
        "qemu": qemu_context(),
    }


def _warmth(config: MigrateConfig) -> str:
    if config.prewarm:
        return (
            "warm: just before each precopy or postcopy migration the driver touched and "
            "freed as much memory as the guest has, so the destination allocates memory "
            "freed a moment ago (docs/kernel.md, 'Memory warmth'); a flip allocates nothing"
        )
    if config.settle < 15:
        return (
            f"runs back to back ({config.settle:g} s between them): memory is warm in "
            "the sense of docs/kernel.md, 'Memory warmth', except that a run can allocate "
            "more than the runs before it freed"
        )
    return (
        f"{config.settle:g} s between runs, no prewarming: memory is cold in the "
        "sense of docs/kernel.md, 'Memory warmth'"
    )
