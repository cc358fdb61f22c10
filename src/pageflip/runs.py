"""Page runs: sets of pages as ``(first page, page count)`` rows, and their arithmetic.

Dirty tracking reports runs, the migration stream carries them, digests are taken over them.
Every function here is vectorized with numpy (no per-page Python loop): a 4 GiB guest has a
million pages.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "Runs",
    "coarsen",
    "cut_runs",
    "pages_to_runs",
    "runs_pages",
    "runs_to_pages",
    "split_runs",
    "union_runs",
    "widen_runs",
]

#: Page runs: an (n, 2) array of (first page, page count), in ascending order.
Runs = npt.NDArray[np.uint64]


def runs_pages(runs: Runs) -> int:
    """How many pages the runs cover."""
    return int(runs[:, 1].sum()) if len(runs) else 0


def runs_to_pages(runs: Runs) -> npt.NDArray[np.int64]:
    """The page indices the runs cover, ascending (vectorized, no per-page loop)."""
    if not len(runs):
        return np.empty(0, np.int64)
    counts = runs[:, 1].astype(np.int64)
    starts = runs[:, 0].astype(np.int64)
    offsets = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(
        np.cumsum(counts) - counts, counts
    )
    return np.repeat(starts, counts) + offsets


def pages_to_runs(pages: npt.NDArray[np.integer[Any]]) -> Runs:
    """Runs of consecutive pages from ascending page indices (vectorized)."""
    if not len(pages):
        return np.empty((0, 2), np.uint64)
    pages = pages.astype(np.int64)
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(pages)]))
    return np.stack([pages[starts], ends - starts], axis=1).astype(np.uint64)


def split_runs(runs: Runs, max_pages: int) -> list[Runs]:
    """The runs cut into consecutive pieces of at most ``max_pages`` pages each."""
    pieces: list[Runs] = []
    current: list[tuple[int, int]] = []
    room = max_pages
    for run_first, run_count in runs.tolist():
        first, count = run_first, run_count
        while count:
            take = min(count, room)
            current.append((first, take))
            first += take
            count -= take
            room -= take
            if room == 0:
                pieces.append(np.array(current, np.uint64))
                current, room = [], max_pages
    if current:
        pieces.append(np.array(current, np.uint64))
    return pieces


def union_runs(a: Runs, b: Runs, npages: int) -> Runs:
    """Sorted, non-overlapping runs covering the pages of both (pages below ``npages``)."""
    if not len(a) and not len(b):
        return a
    mask = np.zeros(npages, np.bool_)
    for runs in (a, b):
        if len(runs):
            mask[runs_to_pages(runs)] = True
    return pages_to_runs(np.flatnonzero(mask))


def coarsen(runs: Runs, max_gap: int) -> Runs:
    """The runs with every gap of at most ``max_gap`` pages between them closed.

    Dropping a range of pages at the destination costs a syscall (about 10 us here) plus
    freeing its pages (under 1 us each): closing small gaps trades a few clean pages, which
    are merely fetched again later, for fewer syscalls inside the downtime.
    """
    if len(runs) < 2:
        return runs
    starts = runs[:, 0].astype(np.int64)
    ends = starts + runs[:, 1].astype(np.int64)
    open_gap = (starts[1:] - ends[:-1]) > max_gap
    firsts = np.flatnonzero(np.concatenate(([True], open_gap)))
    lasts = np.concatenate((firsts[1:] - 1, [len(runs) - 1]))
    return np.stack([starts[firsts], ends[lasts] - starts[firsts]], axis=1).astype(np.uint64)


def widen_runs(runs: Runs, unit: int, npages: int) -> Runs:
    """The runs grown to whole units of ``unit`` pages (each start rounded down, each end up,
    to at most ``npages``), those that then touch or overlap merged: the huge pages a set of
    4 KiB pages falls in."""
    if unit <= 1 or not len(runs):
        return runs
    starts = runs[:, 0].astype(np.int64) // unit * unit
    ends = np.minimum(-(-(runs[:, 0] + runs[:, 1]).astype(np.int64) // unit) * unit, npages)
    # Ascending, non-overlapping runs keep their ends in order when widened: closing the
    # gaps of at most 0 pages merges those that now touch or overlap.
    widened = np.stack([starts, ends - starts], axis=1).astype(np.uint64)
    return coarsen(widened, 0)


def cut_runs(runs: Runs, unit: int) -> tuple[Runs, Runs]:
    """The runs cut at every multiple of ``unit`` pages: (the whole units they cover, the
    rest), each sorted."""
    if not len(runs):
        return runs, runs
    first = runs[:, 0].astype(np.int64)
    end = first + runs[:, 1].astype(np.int64)
    lo = -(-first // unit) * unit
    hi = end // unit * unit
    whole = hi > lo
    head_end = np.where(whole, lo, end)
    tail_start = np.where(whole, hi, end)
    head = np.stack([first, head_end - first], axis=1)[head_end > first]
    tail = np.stack([tail_start, end - tail_start], axis=1)[end > tail_start]
    rest = np.concatenate([head, tail])
    rest = rest[np.argsort(rest[:, 0], kind="stable")]
    units = np.stack([lo[whole], (hi - lo)[whole]], axis=1)
    return units.astype(np.uint64), rest.astype(np.uint64)
