"""Migration benchmark: a matrix of memory size x dirty rate x mode, each run migrated for real.

What it answers: how long a live migration of a running workload takes, how long the workload
is paused, how many bytes cross the socket and how much memory source and destination use
together, for ``flip`` (the pages change owner), ``precopy`` (rounds of copies, then a short
stop-and-copy) and ``postcopy`` (run on the destination at once, fetch pages on fault).

Every run of the matrix starts two fresh processes (``spawn``, see :mod:`.processes`): a
``destination`` that receives the guest, lets it run for a moment and checks it (a run whose
guest fails the check is an error, not a data point), and a ``source`` that creates a
:class:`~pageflip.guests.Workload` of the size and dirty rate of the run (the fill is not
timed), waits until the benchmark says go, reads the write rate the workload measured over the
last second and migrates it, collecting every event with a ``CLOCK_MONOTONIC`` stamp
(system-wide, so source and destination stamps compare).

The benchmark's own process waits ``warmup`` seconds after the fill (the writers reach their
rate), reads both processes' memory (the *baseline*), starts a sampler thread and says go;
the sampler follows both processes, and the destination's helpers (the postcopy pager),
until the source has exited. See :class:`.sampling.Sampler` for what it reads and how often.

Runs are interleaved (:func:`run_order`): each repeat walks the sizes and rates in the order
given and runs every mode back to back for each (size, rate), rotating the order of the modes
by one from one (size, rate) to the next, so that no mode always runs first, right after the
previous size's memory was freed. Between runs both processes have exited (their memory is
free) and the benchmark waits ``settle`` seconds: with the default of 1 s memory is *warm* in
the sense of docs/kernel.md, "Memory warmth"; ``settle=15`` makes runs *cold*.

:func:`run` returns a JSON-ready dict (:class:`.records.MigrateResult`); :func:`markdown_table`
and :func:`target_rows` lay it out and :func:`plot` draws downtime and total time against
memory size. Nothing here prints: progress goes to a callback.

The parts, by job: :mod:`.config` (what to run), :mod:`.processes` and :mod:`.running` (running
the migrations), :mod:`.sampling` (memory), :mod:`.stats` and :mod:`.targets` (medians and the
targets, against QEMU's figures from :mod:`pageflip.bench.references`), :mod:`.results` (the
JSON), :mod:`.report` (tables and the plot), :mod:`.records` (the JSON's record types).
"""

from __future__ import annotations

from .config import (
    DEFAULT_RATES,
    DEFAULT_SIZES,
    MODES,
    MigrateBenchmarkError,
    MigrateConfig,
    ProgressCallback,
    RunSpec,
    run_order,
)
from .records import CellRecord, MigrateResult, RunRecord, TargetRecord
from .report import COLUMNS, cell_rows, check_plot, markdown_table, plot, target_rows
from .running import run
from .targets import QEMU_REFERENCE

__all__ = [
    "run",
    "MigrateConfig",
    "MigrateBenchmarkError",
    "markdown_table",
    "plot",
    "check_plot",
    "cell_rows",
    "target_rows",
    "run_order",
    "RunSpec",
    "ProgressCallback",
    "MigrateResult",
    "RunRecord",
    "CellRecord",
    "TargetRecord",
    "COLUMNS",
    "DEFAULT_RATES",
    "DEFAULT_SIZES",
    "MODES",
    "QEMU_REFERENCE",
]
