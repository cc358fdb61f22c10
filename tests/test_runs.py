"""Page runs and their arithmetic (:mod:`pageflip.runs`), checked against plain page sets."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from pageflip.runs import (
    Runs,
    coarsen,
    cut_runs,
    pages_to_runs,
    runs_pages,
    runs_to_pages,
    split_runs,
    union_runs,
    widen_runs,
)

NPAGES = 512
page_sets = st.sets(st.integers(0, NPAGES - 1), max_size=200)


def runs_of(pages: set[int]) -> Runs:
    return pages_to_runs(np.array(sorted(pages), np.int64))


def well_formed(runs: Runs) -> bool:
    """Ascending, non-empty, neither overlapping nor touching."""
    if not len(runs):
        return True
    starts = runs[:, 0].astype(np.int64)
    counts = runs[:, 1].astype(np.int64)
    return bool((counts > 0).all() and (starts[1:] > starts[:-1] + counts[:-1]).all())


@given(page_sets)
def test_pages_and_runs_round_trip(pages: set[int]) -> None:
    runs = runs_of(pages)
    assert well_formed(runs)
    assert runs_pages(runs) == len(pages)
    assert runs_to_pages(runs).tolist() == sorted(pages)


@given(page_sets, page_sets)
def test_the_union_covers_both_and_nothing_else(a: set[int], b: set[int]) -> None:
    union = union_runs(runs_of(a), runs_of(b), NPAGES)
    assert well_formed(union)
    assert runs_to_pages(union).tolist() == sorted(a | b)


@given(page_sets, st.integers(0, 64))
def test_coarsen_closes_exactly_the_small_gaps(pages: set[int], gap: int) -> None:
    runs = runs_of(pages)
    merged = coarsen(runs, gap)
    covered = set(runs_to_pages(merged).tolist())
    assert covered >= pages  # every page still there
    assert well_formed(merged) and len(merged) <= len(runs)
    # What was added is only the gaps of at most ``gap`` pages, each whole.
    for first, count in merged.tolist():
        inside = [p for p in range(first, first + count) if p not in pages]
        for hole in np.split(np.array(inside), np.flatnonzero(np.diff(inside) != 1) + 1):
            assert len(hole) <= gap
    # Gaps left open are wider than ``gap``.
    starts = merged[:, 0].astype(np.int64)
    ends = starts + merged[:, 1].astype(np.int64)
    assert ((starts[1:] - ends[:-1]) > gap).all()


@given(page_sets, st.integers(1, 40))
def test_split_keeps_order_and_bounds_each_piece(pages: set[int], most: int) -> None:
    pieces = split_runs(runs_of(pages), most)
    assert all(0 < runs_pages(p) <= most for p in pieces)
    assert all(runs_pages(p) == most for p in pieces[:-1])  # only the last piece is short
    joined = [q for p in pieces for q in runs_to_pages(p).tolist()]
    assert joined == sorted(pages)


units = st.sampled_from([1, 2, 8, 64, 512])


@given(page_sets, units)
def test_widen_covers_whole_units_of_every_page_and_no_other(pages: set[int], unit: int) -> None:
    """The huge pages 4 KiB pages fall in (a region of NPAGES, a whole number of units)."""
    widened = widen_runs(runs_of(pages), unit, NPAGES)
    assert well_formed(widened)
    assert set(runs_to_pages(widened).tolist()) == {
        q for p in pages for q in range(p // unit * unit, p // unit * unit + unit)
    }


@given(page_sets, units)
def test_cut_splits_whole_units_from_the_rest(pages: set[int], unit: int) -> None:
    whole, rest = cut_runs(runs_of(pages), unit)
    covered = set(runs_to_pages(whole).tolist())
    assert all(first % unit == 0 and count % unit == 0 for first, count in whole.tolist())
    assert covered | set(runs_to_pages(rest).tolist()) == pages
    assert not covered & set(runs_to_pages(rest).tolist())
    # What is left over lies in units that miss a page: none of them could go whole.
    for page in runs_to_pages(rest).tolist():
        start = page // unit * unit
        assert not set(range(start, start + unit)) <= pages
    assert rest[:, 0].tolist() == sorted(rest[:, 0].tolist())


def test_empty_runs() -> None:
    empty = runs_of(set())
    assert empty.shape == (0, 2) and runs_pages(empty) == 0
    assert union_runs(empty, empty, NPAGES).shape == (0, 2)
    assert coarsen(empty, 4).shape == (0, 2)
    assert split_runs(empty, 4) == []
    assert widen_runs(empty, 512, NPAGES).shape == (0, 2)
    assert [part.shape for part in cut_runs(empty, 512)] == [(0, 2), (0, 2)]
