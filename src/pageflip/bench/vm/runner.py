"""Running the comparison: every (size, rate, mode) on both systems, back to back, in the
order of :func:`~.config.run_order`; the result with its cells, comparisons and targets."""

from __future__ import annotations

import datetime
import os
import shutil
import time
from collections.abc import Callable, Mapping
from typing import cast

from ...errors import BenchmarkError, VmBenchmarkError
from ..common import finite, machine
from ..migrate.sampling import COUNTERS
from .config import ORDER, ProgressCallback, VmConfig, VmRunSpec, run_order
from .pageflip_side import pageflip_vm_available, run_pageflip
from .qemu import qemu_version, run_qemu
from .records import VmConfigRecord, VmResult, VmRunRecord, blank_record
from .stats import cells, comparisons
from .targets import judge

__all__ = ["NOTES", "Runner", "check_systems", "default_runners", "results", "run"]

#: One system's way to do one run.
Runner = Callable[[VmRunSpec], VmRunRecord]

#: How each figure was measured, in words (the result's notes).
NOTES = {
    "total": "QEMU: query-migrate's total-time on the source; pageflip: the done event's "
    "total_seconds",
    "downtime": "as each system reports it: QEMU's downtime from query-migrate, pageflip's "
    "done event",
    "guest_pause": "the guest's own figure: the largest gap between two iterations of its main "
    "loop, counted from a P request on the source right before the migration was asked "
    "(QEMU: QMP's migrate; pageflip: the pageflip migrate command) to a P request on the "
    "destination once it completed; '-' when the guest cannot tell",
    "guest_switchover": "the guest's own figure for the pause itself: of its latest loop gaps "
    "longer than 1.5 ticks (a G request on the destination right after the migration), the "
    "longest that overlaps the moments the system stopped the guest and ran it again (QEMU: "
    "its STOP and RESUME events; pageflip: its switchover and resumed events), the guest's "
    "times placed on the host's clock by the arrival of the G answer; '-' when none does",
    "guest_quiet": "the control: once the run is over (after the guest's check), on the "
    "destination, the guest's largest loop gap over a window as long as the one the pause "
    "the guest saw was counted in, with no migration: what this host makes the guest see by "
    "itself then",
    "host_gap": "on the host: the last heartbeat line read from the source's console until "
    "the first from the destination's (includes up to one heartbeat period)",
    "switchover_to_running": "QEMU: the source's STOP event until the destination's RESUME "
    "event (QEMU's timestamps); pageflip: its switchover event until the destination's "
    "resumed event (CLOCK_MONOTONIC)",
    "bytes_moved": "QEMU: ram.transferred; pageflip: bytes_on_wire",
    "peak_memory": "the largest total memory of both processes and what the destination "
    "started, by "
    + COUNTERS.format(interval=0.05)
    + "; the ratio is to the guest's RAM; the RSS sum (an upper bound) is in the JSON",
    "qemu": "QEMU 7.2 with KVM, 1 vCPU, -cpu host,-arch-capabilities; migration over a unix "
    "socket; shared = memory-backend-file on /dev/shm with share=on and x-ignore-shared; "
    "precopy and postcopy with max-bandwidth 100 GB/s (unthrottled), downtime-limit 300 ms "
    "(default); postcopy-ram on both sides and migrate-start-postcopy right after migrate",
}


def default_runners() -> dict[str, Runner]:
    return {"qemu": run_qemu, "pageflip": run_pageflip}


def check_systems(config: VmConfig) -> str | None:
    """Raise :class:`VmBenchmarkError` (one line, saying what to do) unless every system of
    ``config`` can run here; returns QEMU's version when QEMU is one of them."""
    if not os.path.isfile(config.guest.kernel):
        raise VmBenchmarkError(f"no guest ELF at {config.guest.kernel}")
    version = None
    if "qemu" in config.systems:
        qemu = config.options.qemu
        if shutil.which(qemu) is None:
            raise VmBenchmarkError(f"{qemu} not found: install QEMU with `make qemu`")
        version = qemu_version(qemu)
        if version is None:
            raise VmBenchmarkError(f"{qemu} --version fails: reinstall QEMU with `make qemu`")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        raise VmBenchmarkError("/dev/kvm is missing or not accessible")
    if "pageflip" in config.systems and not pageflip_vm_available(config.options.pageflip):
        raise VmBenchmarkError(
            "pageflip vm is not available (not in this version); run QEMU alone with --systems qemu"
        )
    return version


def run(
    config: VmConfig,
    on_progress: ProgressCallback | None = None,
    runners: Mapping[str, Runner] | None = None,
    check: bool = True,
) -> VmResult:
    """Run every run of ``config`` (see :mod:`pageflip.bench.vm`) and return the result.

    A run that fails (a migration that does not complete, a guest that finds a wrong page,
    a QEMU that does not start) is recorded with its ``error`` and the matrix goes on; the
    result's ``complete`` is False then. With ``check``, :func:`check_systems` runs first.
    ``runners`` replaces the systems' run functions (tests).
    """
    version = check_systems(config) if check else None
    chosen = dict(runners) if runners is not None else default_runners()
    specs = run_order(config)
    started = datetime.datetime.now(datetime.UTC)
    runs: list[VmRunRecord] = []
    ended: float | None = None
    for spec in specs:
        if on_progress is not None:
            on_progress(spec.index, len(specs), f"{spec.label} ({spec.repeat + 1}/{config.repeat})")
        if ended is not None:
            time.sleep(max(0.0, config.settle - (time.monotonic() - ended)))
        began = time.monotonic()
        try:
            record = chosen[spec.system](spec)
        except BenchmarkError as err:
            record = blank_record(spec)
            record["status"] = "error"
            record["error"] = " ".join(str(err).split())
        except OSError as err:
            record = blank_record(spec)
            record["status"] = "error"
            record["error"] = f"{type(err).__name__}: {err}"
        record["since_previous"] = None if ended is None else began - ended
        record["wall_s"] = time.monotonic() - began
        ended = time.monotonic()
        runs.append(record)
    if on_progress is not None:
        on_progress(len(specs), len(specs), "done")
    return results(config, started, specs, runs, version)


def results(
    config: VmConfig,
    started: datetime.datetime,
    specs: list[VmRunSpec],
    runs: list[VmRunRecord],
    version: str | None = None,
) -> VmResult:
    """The JSON-ready result of ``runs``; strict JSON: no NaN or infinity anywhere."""
    cell_list = cells(runs)
    comps = comparisons(cell_list)
    result: VmResult = {
        "benchmark": "vm",
        "date": started.isoformat(timespec="seconds"),
        "machine": machine(),
        "qemu_version": version,
        "config": _config(config),
        "order": {
            "scheme": ORDER.format(settle=config.settle),
            "sequence": [[s.system, s.size, s.rate, s.mode, s.repeat] for s in specs],
        },
        "notes": _notes(config),
        "complete": len(runs) == len(specs) and all(r["error"] is None for r in runs),
        "runs": runs,
        "cells": cell_list,
        "comparisons": comps,
        "targets": judge(runs, comps),
    }
    return cast(VmResult, finite(result))


def _notes(config: VmConfig) -> dict[str, str]:
    notes = dict(NOTES)
    if config.options.realtime:
        notes["realtime"] = (
            "both systems' vCPU threads ran SCHED_FIFO, priority 1, on the source and the "
            "destination (QEMU's found by query-cpus-fast; pageflip: vm run --realtime, which "
            "the destination takes over with the state)"
        )
    o = config.options
    on_huge = [s for s in config.systems if o.huge_for(s)]
    if on_huge:
        how = {
            "pageflip": "pageflip: vm run --huge hugetlb",
            "qemu": "QEMU: shared mode's file on a hugetlbfs mount of 2 MiB pages, precopy "
            "and postcopy a memory-backend-memfd with hugetlb=on",
        }
        name = {"pageflip": "pageflip", "qemu": "QEMU"}
        whose = "both systems'" if len(on_huge) == 2 else f"only {name[on_huge[0]]}'s"
        notes["huge_pages"] = (
            f"{whose} guest RAM on 2 MiB hugetlb pages ({'; '.join(how[s] for s in on_huge)})"
        )
        others = [s for s in config.systems if s not in on_huge]
        if others:
            notes["huge_pages"] += f"; {name[others[0]]}'s on 4 KiB pages"
    if o.huge_for("qemu"):
        notes["qemu"] = notes["qemu"].replace("file on /dev/shm", "file on hugetlbfs")
    if config.options.postcopy_after_first_pass:
        notes["qemu"] = notes["qemu"].replace(
            "right after migrate", "once the first pass over RAM was done"
        )
    return notes


def _config(config: VmConfig) -> VmConfigRecord:
    o = config.options
    return {
        "sizes": list(config.sizes),
        "rates": list(config.rates),
        "modes": list(config.modes),
        "systems": list(config.systems),
        "repeat": config.repeat,
        "settle": config.settle,
        "guest_kernel": config.guest.kernel,
        "guest_flavour": config.guest.flavour.name,
        "options": {
            "guest_settle": o.guest_settle,
            "hb_ms": o.hb_ms,
            "tick_us": o.tick_us,
            "seed": o.seed,
            "timeout": o.timeout,
            "sample_interval": o.sample_interval,
            "cpu": o.cpu,
            "machine": o.machine,
            "postcopy_after_first_pass": o.postcopy_after_first_pass,
            "realtime": o.realtime,
            "huge": o.huge,
            "huge_systems": [s for s in config.systems if o.huge_for(s)],
        },
    }
