"""Running the matrix: one migration between two fresh processes per run, memory sampled
meanwhile, each run's record built from what both processes and the sampler reported."""

from __future__ import annotations

import contextlib
import datetime
import multiprocessing
import os
import threading
import time
from collections.abc import Iterable, Sequence
from multiprocessing.context import SpawnContext
from typing import Any

from ..._sys import mm
from ..._sys.flags import Madv
from ...memory import PAGE_SIZE, Region
from ...units import format_rate, format_size, human_size
from ..common import steal_seconds, stolen_since
from .config import MigrateBenchmarkError, MigrateConfig, ProgressCallback, RunSpec, run_order
from .processes import Child, Filled, Listening, Migrated, Verified, destination_main, source_main
from .records import Event, MemoryRecord, MigrateResult, PauseStep, PostcopyRecord, RunRecord
from .results import results
from .sampling import Sampler

__all__ = ["run"]


def run(config: MigrateConfig, on_progress: ProgressCallback | None = None) -> MigrateResult:
    """Run the matrix and return its results as a JSON-ready dict (see
    :mod:`pageflip.bench.migrate`).

    Raises :class:`MigrateBenchmarkError` (with the runs done so far in ``partial``) when a
    run fails: a migration error, a guest that fails its check, a process that dies.
    """
    specs = run_order(config)
    started = datetime.datetime.now(datetime.UTC)
    ctx = multiprocessing.get_context("spawn")
    runs: list[RunRecord] = []
    ended: float | None = None
    for spec in specs:
        if on_progress is not None:
            on_progress(spec.index, len(specs), f"{spec.label} ({spec.repeat + 1}/{config.repeat})")
        if ended is not None:
            time.sleep(max(0.0, config.settle - (time.monotonic() - ended)))
        began = time.monotonic()
        try:
            record = _one_run(ctx, spec, config)
        except MigrateBenchmarkError as err:
            partial = results(config, started, specs, runs)
            raise MigrateBenchmarkError(str(err), partial) from None
        record["since_previous"] = None if ended is None else began - ended
        record["wall_seconds"] = time.monotonic() - began
        ended = time.monotonic()
        runs.append(record)
    if on_progress is not None:
        on_progress(len(specs), len(specs), "done")
    return results(config, started, specs, runs)


def _one_run(ctx: SpawnContext, spec: RunSpec, config: MigrateConfig) -> RunRecord:
    """Run one migration between two fresh processes; raise unless its guest verified."""
    what = f"run {spec.index + 1} ({spec.label})"
    listen = f"@pageflip-bench-migrate-{os.getpid()}-{spec.index}-{os.urandom(4).hex()}"
    options = {"mode": spec.mode, "downtime_limit": config.downtime_limit}
    options["timeout"] = config.timeout
    children: list[Child] = []
    sampler: Sampler | None = None
    finished = False
    try:
        dst = Child(
            ctx, "destination", destination_main, (listen, config.timeout, config.verify_delay)
        )
        children.append(dst)
        src = Child(
            ctx,
            "source",
            source_main,
            (listen, spec.size, spec.rate, config.threads, options, config.huge),
        )
        children.append(src)
        listening = dst.expect(Listening, config.timeout, what)
        filled = src.expect(Filled, config.timeout, what)
        time.sleep(config.warmup)
        # Right before the migration: freed memory stays warm only a second or two (the
        # kernel reports free pages to the host, which takes them back).
        # A flip allocates nothing: prewarming would only leave the kernel busy handing
        # the scratch memory back while the flip runs.
        warm = config.prewarm and spec.mode != "flip"
        prewarmed = _prewarm(filled.guest_bytes) if warm else None
        pids = {"source": filled.pid, "destination": listening.pid}
        # Counters, not Pss: reading Pss walks every page table of both processes and holds
        # off their page faults meanwhile, which showed in the pauses measured.
        sampler = Sampler(pids, config.sample_interval, walk=False)
        baseline = sampler.baseline()
        sampler.start()
        steal = steal_seconds()
        migrated = _migrate(src, dst, config.timeout, what)
        stolen = stolen_since(steal)
        sampler.stop()
        verified = dst.expect(Verified, config.timeout, what)
        dst.join(config.timeout, what)
        memory = sampler.result(baseline, filled.guest_bytes)
        record = run_record(spec, filled, migrated, verified, memory, prewarmed)
        record["steal_seconds"] = stolen
        if not record["verified"]:
            problems = "; ".join(verified.verify["problems"][:5])
            raise MigrateBenchmarkError(f"{what}: the guest failed its check: {problems}")
        finished = True
        return record
    finally:
        if sampler is not None:
            with contextlib.suppress(MigrateBenchmarkError):
                sampler.stop()
        for child in children:
            child.stop(10.0 if finished else 2.0)


def _migrate(src: Child, dst: Child, timeout: float, what: str) -> Migrated:
    """Say go to the source and wait until it is done and gone; a failure says what the
    destination said too."""
    src.send("go")
    try:
        migrated = src.expect(Migrated, timeout, what)
    except MigrateBenchmarkError as err:
        theirs = dst.error(2.0)
        raise MigrateBenchmarkError(
            f"{err}" + (f"; the destination said: {theirs}" if theirs else "")
        ) from None
    src.join(timeout, what)
    return migrated


def _prewarm(nbytes: int) -> float:
    """Touch ``nbytes`` of fresh memory on a few threads and free it; returns the seconds.

    On this kind of VM, memory freed a moment ago is fast to touch again and memory freed
    long ago is slow (the host has taken it back). A copy-mode destination allocates all of
    the guest's memory, so without this its speed depends on what ran before.
    """
    started = time.monotonic()
    scratch = Region.anonymous(nbytes, name="prewarm")
    errors: list[OSError] = []

    def touch(address: int, length: int) -> None:
        try:
            mm.madvise(address, length, Madv.POPULATE_WRITE)
        except OSError as err:  # said once, by the caller: never a thread's traceback
            errors.append(err)

    try:
        step = -(-scratch.size // 4 // PAGE_SIZE) * PAGE_SIZE
        spans = [
            (scratch.address + off, min(step, scratch.size - off))
            for off in range(0, scratch.size, step)
        ]
        threads = [threading.Thread(target=touch, args=span) for span in spans]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        scratch.close()
    if errors:
        raise MigrateBenchmarkError(
            f"could not touch {human_size(nbytes)} of memory before the run (--no-prewarm "
            f"skips it): {errors[0]}"
        )
    return time.monotonic() - started


# -- one run's record ---------------------------------------------------------------------------


def _first(events: Iterable[Event], kind: str) -> Event | None:
    return next((e for e in events if e["event"] == kind), None)


def _last(events: Sequence[Event], kind: str) -> Event | None:
    return next((e for e in reversed(events) if e["event"] == kind), None)


def _postcopy(done: Event, events: Sequence[Event]) -> PostcopyRecord | None:
    """A postcopy run's fault statistics (None for the other modes)."""
    if done["mode"] != "postcopy":
        return None
    details = done.get("details") or {}
    resumed = _first(events, "resumed")
    return {
        "fault_median_us": details.get("fault_median_us"),
        "fault_p99_us": details.get("fault_p99_us"),
        "fault_max_us": details.get("fault_max_us"),
        "faults": details.get("faults"),
        "requested": details.get("requested"),
        "pushed": details.get("pushed"),
        "seconds": details.get("seconds"),
        "after_resume_seconds": (
            done["total_seconds"] - resumed["t"] if resumed is not None else None
        ),
    }


def run_record(
    spec: RunSpec,
    filled: Filled,
    src: Migrated,
    dst: Verified,
    memory: MemoryRecord,
    prewarmed: float | None,
) -> RunRecord:
    """One run's row of the JSON."""
    done = src.done
    switchover = _first(src.events, "switchover")
    last_round = _last(src.events, "round")
    resumed = _first(dst.events, "resumed")
    switch_to_running = None
    if switchover is not None and resumed is not None:
        switch_to_running = resumed["mono"] - switchover["mono"]
    bandwidth = last_round["bandwidth"] if last_round else None
    heartbeat = dst.status.get("heartbeat")
    seen: dict[str, Any] = heartbeat if isinstance(heartbeat, dict) else {}
    return {
        "index": spec.index,
        "size": spec.size,
        "size_label": format_size(spec.size),
        "rate": spec.rate,
        "rate_label": format_rate(spec.rate),
        "mode": spec.mode,
        "repeat": spec.repeat,
        "guest_bytes": filled.guest_bytes,
        "regions": filled.regions,
        "fill_seconds": filled.fill_seconds,
        "write_rate": src.write_rate,
        "write_rate_after": dst.write_rate_after,
        "mode_run": done["mode"],
        "total_seconds": done["total_seconds"],
        "downtime": done["downtime"],
        "guest_pause": done.get("guest_pause"),
        "guest_pause_destination": resumed.get("guest_pause") if resumed else None,
        "guest_switchover_gap": seen.get("switchover_gap"),
        "guest_gap_after": seen.get("max_gap_after_resume"),
        "guest_pause_in_place": src.in_place.get("observed_pause"),
        "in_place": src.in_place,
        "expected_downtime": switchover["expected_downtime"] if switchover else None,
        "switchover_reason": switchover["reason"] if switchover else None,
        "switchover_to_running": switch_to_running,
        "bytes_on_wire": done["bytes_on_wire"],
        "pages_moved": done["pages_moved"],
        "pages_copied": done["pages_copied"],
        "pages_zero": done["pages_zero"],
        "pages_requested": done["pages_requested"],
        "rounds": done["rounds"],
        "digest": done["digest"],
        "last_round_bandwidth": bandwidth,
        "last_round_dirty_rate": last_round["dirty_rate"] if last_round else None,
        "rate_below_bandwidth": None if bandwidth is None else src.write_rate < bandwidth,
        "postcopy": _postcopy(done, src.events),
        "verify": dst.verify,
        "verified": bool(dst.verify["ok"]),
        "memory": memory,
        "done": done,
        "events": src.events,
        "destination_events": dst.events,
        "prewarm_seconds": prewarmed,
        "pause_steps": pause_steps(done, resumed),
    }


def pause_steps(done: Event, resumed: Event | None) -> list[PauseStep]:
    """The source's steps (its done event) and the destination's (its resumed event), in
    time order: both are on the host's one monotonic clock."""
    steps = [*done.get("pause_steps", []), *(resumed or {}).get("pause_steps", [])]
    return sorted(
        ({"step": s["step"], "side": s["side"], "at": float(s["at"])} for s in steps),
        key=lambda s: s["at"],
    )
