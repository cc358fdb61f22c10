"""Dirty tracking: exactly the written pages, none lost to a race with the scan."""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import pageflip as pf
from pageflip.dirty import DirtyTracker
from pageflip.runs import pages_to_runs, runs_pages, runs_to_pages, split_runs

PAGE = pf.PAGE_SIZE


def pages_of(runs: np.ndarray) -> list[int]:
    return [int(p) for p in runs_to_pages(runs)]


def test_runs_to_pages_expands_runs() -> None:
    runs = np.array([[2, 3], [10, 1], [20, 2]], np.uint64)
    assert pages_of(runs) == [2, 3, 4, 10, 20, 21]
    assert runs_pages(runs) == 6
    assert pages_of(np.empty((0, 2), np.uint64)) == []


@given(st.sets(st.integers(0, 300)), st.integers(1, 7))
def test_pages_and_runs_convert_both_ways(pages: set[int], size: int) -> None:
    ordered = np.array(sorted(pages), np.int64)
    runs = pages_to_runs(ordered)
    assert pages_of(runs) == sorted(pages)
    assert all(int(b[0]) > int(a[0]) + int(a[1]) for a, b in itertools.pairwise(runs))
    pieces = split_runs(runs, size)
    assert all(runs_pages(p) <= size for p in pieces)
    assert [p for piece in pieces for p in pages_of(piece)] == sorted(pages)


@pytest.mark.parametrize("kind", ["movable", "anonymous"])
def test_collect_returns_exactly_the_written_pages(kind: str) -> None:
    make = pf.Region.movable if kind == "movable" else pf.Region.anonymous
    with make(64 * PAGE) as a, make(16 * PAGE) as b:
        a.numpy()[: 8 * PAGE] = 1  # populated before tracking starts: not dirty
        with DirtyTracker([a, b]) as tracker:
            assert [pages_of(r) for r in tracker.collect()] == [[], []]
            arr_a, arr_b = a.numpy(), b.numpy()
            arr_a[3 * PAGE] = 7
            arr_a[40 * PAGE + 5 : 42 * PAGE] = 7  # two pages, one of them never touched before
            arr_b[15 * PAGE] = 1
            first = tracker.collect()
            assert pages_of(first[0]) == [3, 40, 41]
            assert pages_of(first[1]) == [15]
            assert [pages_of(r) for r in tracker.collect()] == [[], []]  # protected again
            arr_a[3 * PAGE] = 8
            assert pages_of(tracker.collect()[0]) == [3]
            _ = arr_a[50 * PAGE]  # a read is not a write
            assert pages_of(tracker.collect()[0]) == []
            del arr_a, arr_b


def test_no_write_is_lost_to_a_concurrent_scan() -> None:
    """A writer thread logs every page it writes; the collected union must cover the log."""
    npages = 512
    with pf.Region.movable(npages * PAGE) as region:
        arr = region.numpy(np.uint64).reshape(npages, -1)
        written: list[int] = []
        stop = threading.Event()
        rng = np.random.default_rng(7)
        with DirtyTracker([region]) as tracker:

            def writer(arr: np.ndarray = arr) -> None:
                while not stop.is_set():
                    batch = rng.integers(0, npages, 16)
                    arr[batch, 0] += 1
                    written.extend(int(p) for p in batch)

            thread = threading.Thread(target=writer)
            thread.start()
            seen: set[int] = set()
            for _ in range(200):
                seen.update(pages_of(tracker.collect()[0]))
            stop.set()
            thread.join()
            seen.update(pages_of(tracker.collect()[0]))  # after the writer stopped
        del arr, writer
        assert written and set(written) <= seen


def test_bad_ranges_and_states_are_refused() -> None:
    with pytest.raises(pf.SpanError, match="whole pages"):
        DirtyTracker([(PAGE + 1, PAGE)])
    with pf.Region.movable(PAGE) as region:
        tracker = DirtyTracker([region])
        with pytest.raises(pf.StateError, match="not started"):
            tracker.collect()
        tracker.start()
        with pytest.raises(pf.StateError, match="already started"):
            tracker.start()
        tracker.close()
        tracker.close()
        with pytest.raises(pf.ClosedError):
            tracker.collect()


def test_stop_frees_writes_even_if_the_range_moved_away() -> None:
    with pf.Region.movable(4 * PAGE) as region:
        tracker = DirtyTracker([region])
        tracker.start()
        region.numpy()[0] = 1
        tracker.stop()
        region.numpy()[0] = 2  # no longer tracked, still writable
        assert region.numpy()[0] == 2
    scratch = pf.Region.movable(2 * PAGE)
    tracker = DirtyTracker([scratch])
    tracker.start()
    scratch.close()  # unmapped while tracked: stop() must not fail
    tracker.close()
