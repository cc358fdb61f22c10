"""Regions: movable and anonymous memory, views, slices, and the safety net on close."""

from __future__ import annotations

import mmap
import os
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pageflip as pf
from pageflip._sys import mm
from pageflip._sys.flags import Seal

PAGE = pf.PAGE_SIZE


def memfd_of(region: pf.Region) -> int:
    (extent,) = region.extents()
    assert extent.memfd is not None
    return extent.memfd.fd


def test_movable_region_is_a_sealed_memfd_rounded_to_pages() -> None:
    with pf.Region.movable(PAGE * 3 + 1, name="weights") as r:
        assert r.size == PAGE * 4
        assert r.address % PAGE == 0
        assert r.movable is True
        assert r.name == "weights"
        fd = memfd_of(r)
        seals = mm.get_seals(fd)
        assert seals & Seal.SHRINK and seals & Seal.GROW
        assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:pageflip:weights")
        with pytest.raises(PermissionError):
            os.ftruncate(fd, PAGE)


def test_anonymous_region_is_not_movable() -> None:
    with pf.Region.anonymous(5000, hugepages=True) as r:
        assert r.size == 2 * PAGE
        assert r.movable is False
        r.view()[:3] = b"abc"
        assert bytes(r.view(0, 3)) == b"abc"


@pytest.mark.parametrize("size", [0, -1])
def test_a_region_needs_a_positive_size(size: int) -> None:
    with pytest.raises(pf.SpanError, match="positive size"):
        pf.Region.movable(size)


def test_numpy_view_is_zero_copy() -> None:
    with pf.Region.movable(PAGE * 4) as r:
        a = r.numpy(np.uint32)
        assert a.size == PAGE
        a[:] = 7
        b = r.numpy(np.uint8, (4, PAGE))
        assert b[3, 0] == 7
        assert a.ctypes.data == r.address
        c = r.numpy(np.float64, 10, offset=PAGE)
        assert c.ctypes.data == r.address + PAGE
        del a, b, c


def test_numpy_that_does_not_fit_is_refused() -> None:
    with pf.Region.movable(PAGE) as r, pytest.raises(pf.SpanError, match="does not fit"):
        r.numpy(np.uint64, PAGE)


def test_close_with_live_view_raises_and_changes_nothing() -> None:
    r = pf.Region.movable(PAGE)
    arr = r.numpy(np.uint8)
    arr[0] = 42
    with pytest.raises(pf.BufferInUse) as info:
        r.close()
    assert info.value.count == 1 and info.value.region == "region"
    assert isinstance(info.value, BufferError) and isinstance(info.value, OSError)
    assert not r.closed and arr[0] == 42
    derived = arr[::2]  # a view of the view still holds the memory
    del arr
    with pytest.raises(pf.BufferInUse):
        r.close()
    del derived
    r.close()
    assert r.closed


def test_close_is_idempotent_and_closed_regions_say_so() -> None:
    r = pf.Region.movable(PAGE, name="gone")
    r.close()
    r.close()
    with pytest.raises(pf.ClosedError, match="'gone' is closed"):
        r.view()
    with pytest.raises(pf.ClosedError):
        r[0:PAGE]
    assert r.movable is False


def test_context_manager_closes() -> None:
    with pf.Region.movable(PAGE) as r:
        pass
    assert r.closed


def test_slices_need_page_alignment_and_bounds() -> None:
    with pf.Region.movable(PAGE * 4) as r:
        s = r[PAGE : 3 * PAGE]
        assert (s.offset, s.size, s.address) == (PAGE, 2 * PAGE, r.address + PAGE)
        assert s[PAGE:].offset == 2 * PAGE
        with pytest.raises(pf.SpanError, match="page-aligned"):
            r[100:PAGE]
        with pytest.raises(pf.SpanError, match="outside"):
            r[0 : 5 * PAGE]
        with pytest.raises(pf.SpanError, match="step"):
            r[0 : 2 * PAGE : 2]
        with pytest.raises(TypeError):
            r[0]  # type: ignore[index]
        with pytest.raises(pf.SpanError, match="outside"):
            r.view(0, 5 * PAGE)


@settings(max_examples=60, deadline=None)
@given(st.integers(-6, 6), st.integers(-6, 6))
def test_slice_bounds_match_python_semantics(a: int, b: int) -> None:
    with pf.Region.movable(PAGE * 4) as r:
        start, stop = a * PAGE, b * PAGE
        lo, hi = start + (r.size if start < 0 else 0), stop + (r.size if stop < 0 else 0)
        if 0 <= lo <= hi <= r.size:
            s = r[start:stop]
            assert (s.offset, s.size) == (lo, hi - lo)
        else:
            with pytest.raises(pf.SpanError):
                r[start:stop]


def test_give_away_part_makes_only_that_part_unreachable() -> None:
    with pf.Region.movable(PAGE * 3) as r:
        r.view()[:] = b"x" * r.size
        r.give_away(PAGE, 2 * PAGE)
        assert bytes(r.view(0, 1)) == b"x"
        assert bytes(r.view(2 * PAGE, 2 * PAGE + 1)) == b"x"
        with pytest.raises(pf.ClosedError, match="given away"):
            r.view(PAGE, PAGE + 1)
        assert r.movable is False


def test_replace_maps_another_memfd_over_part_of_a_region() -> None:
    donor = pf.Region.movable(PAGE * 2)
    donor.view()[:] = b"d" * donor.size
    fd = os.dup(memfd_of(donor))
    donor.close()
    with pf.Region.movable(PAGE * 4) as r:
        r.view()[:] = b"r" * r.size
        r.replace(PAGE, pf.memory.Memfd(fd), 0, 2 * PAGE)
        data = bytes(r.view())
        assert data == b"r" * PAGE + b"d" * 2 * PAGE + b"r" * PAGE
        assert r.movable is True
        assert len(r.extents()) == 3


def test_physical_frames_of_a_region() -> None:
    if os.geteuid() != 0:
        with pf.Region.movable(PAGE) as r:
            r.view()[0] = 1
            with pytest.raises(pf.FeatureUnavailable):
                pf.physical_frames(r)
        return
    with pf.Region.movable(PAGE * 2) as r:
        assert (pf.physical_frames(r) == 0).all()  # nothing touched yet
        r.view()[:] = b"\1" * r.size
        frames = pf.physical_frames(r)
        assert frames.shape == (2,) and (frames != 0).all()


def test_region_at_finds_buffers_made_from_a_region() -> None:
    from pageflip.memory import region_at, writable_address

    with pf.Region.movable(PAGE * 4) as r:
        arr = r.numpy(np.uint8, offset=PAGE)
        address, nbytes = writable_address(arr)
        found = region_at(address, nbytes)
        assert found is not None and found[0] is r and found[1] == PAGE
        del arr
    other = mmap.mmap(-1, PAGE)
    address, nbytes = writable_address(other)
    assert region_at(address, nbytes) is None
    other.close()


def test_errors_pickle_with_their_fields() -> None:
    err = pf.BufferInUse("in use", region="r", offset=0, length=PAGE, count=2)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is pf.BufferInUse
    assert (back.region, back.offset, back.length, back.count) == ("r", 0, PAGE, 2)
    assert str(back) == "in use"
    closed = pickle.loads(pickle.dumps(pf.PeerClosed("gone", phase="offer")))
    assert isinstance(closed, ConnectionError) and closed.phase == "offer"
    assert closed.errno == 104
