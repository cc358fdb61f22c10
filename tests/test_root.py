"""Proofs that need root: physical frame numbers, and peers of another uid.

As root (CAP_SYS_ADMIN), /proc/self/pagemap shows physical frame numbers: a move must leave
the reader holding the very frames the writer had, and a copy must not.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

import pageflip as pf
import peers
from helpers import IS_ROOT, join, run_thread

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="needs root (CAP_SYS_ADMIN) for PFNs")

PAGE = pf.PAGE_SIZE


def filled_region(size: int, movable: bool = True) -> pf.Region:
    region = pf.Region.movable(size) if movable else pf.Region.anonymous(size)
    region.numpy()[:] = np.random.default_rng(1).integers(0, 256, region.size, dtype=np.uint8)
    return region


def test_receive_holds_the_writers_frames() -> None:
    a, b = pf.channel_pair(timeout=30)
    region = filled_region(64 * PAGE)
    before = pf.physical_frames(region)
    assert (before != 0).all()
    thread, out = run_thread(lambda: b.receive(populate=True))
    a.gift(region)
    got, t = join(thread, out)
    assert t.moved
    assert (pf.physical_frames(got) == before).all()
    got.close()
    a.close()
    b.close()


def test_receive_into_holds_the_writers_frames() -> None:
    a, b = pf.channel_pair(timeout=30)
    region = filled_region(16 * PAGE)
    before = pf.physical_frames(region)
    with pf.Region.anonymous(32 * PAGE) as dest:
        dest.numpy()[:] = 1
        old = pf.physical_frames(dest)
        thread, out = run_thread(lambda: b.receive_into(dest[8 * PAGE : 24 * PAGE]))
        a.gift(region)
        assert join(thread, out).moved
        bytes(dest.view())  # fault the new mapping in
        after = pf.physical_frames(dest)
        assert (after[8:24] == before).all()
        assert (after[:8] == old[:8]).all() and (after[24:] == old[24:]).all()
    a.close()
    b.close()


@pytest.mark.parametrize("method", ["process_vm_readv", "vmsplice", "stream"])
def test_a_copy_is_never_reported_as_a_move(method: str) -> None:
    a, b = pf.channel_pair(timeout=30)
    for source in (filled_region(8 * PAGE), filled_region(8 * PAGE, movable=False)):
        before = pf.physical_frames(source)
        gift = not source.movable
        thread, out = run_thread(lambda: b.receive(copy_method=method, populate=True))  # type: ignore[arg-type]
        sent = a.gift(source) if gift else a.send(source)
        got, t = join(thread, out)
        after = pf.physical_frames(got)
        assert t.pages_moved == sent.pages_moved == 0 and t.pages_copied == 8
        assert t.method == method and not t.moved
        assert not np.isin(after, before).any()  # not one frame in common
        got.close()
        source.close()
    a.close()
    b.close()


def test_pread_copy_is_never_reported_as_a_move() -> None:
    a, b = pf.channel_pair(timeout=30)
    region = filled_region(8 * PAGE)
    before = pf.physical_frames(region)
    thread, out = run_thread(lambda: b.receive(move=False, populate=True))
    a.gift(region)
    got, t = join(thread, out)
    assert t.method == "pread" and t.pages_moved == 0
    assert not np.isin(pf.physical_frames(got), before).any()
    got.close()
    a.close()
    b.close()


def test_spawned_child_gets_the_same_frames(spawn: Any) -> None:
    a, b = pf.channel_pair(timeout=60)
    results = spawn.Queue()
    child = spawn.Process(target=peers.receive_and_report, args=(b, results))
    child.start()
    b.close()
    region = filled_region(4 << 20)
    before = [int(x) for x in pf.physical_frames(region)]
    a.gift(region)
    got = results.get(timeout=60)
    child.join(30)
    a.close()
    results.close()
    results.join_thread()
    assert got["frames"] == before


@pytest.mark.parametrize("any_uid", [False, True])
def test_listener_checks_the_peer_uid(spawn: Any, any_uid: bool) -> None:
    # An abstract socket: no file permissions between us and the other uid.
    path = f"@pageflip-test-{os.getpid()}-{any_uid}"
    results = spawn.Queue()
    with pf.Channel.listen(path, any_uid=any_uid) as listener:
        child = spawn.Process(target=peers.connect_as, args=(path, 65534, results))
        child.start()
        if any_uid:
            channel = listener.accept(timeout=30)
            channel.close()
        else:
            with pytest.raises(pf.PeerRejected) as info:
                listener.accept(timeout=30)
            assert info.value.uid == 65534 and info.value.pid == child.pid
            assert isinstance(info.value, PermissionError)
        verdict = results.get(timeout=60)
    child.join(30)
    results.close()
    results.join_thread()
    if any_uid:
        assert verdict == "closed"  # accepted, then closed by us
    else:  # the connecting side learns that it was refused, and why
        assert verdict.startswith("rejected: ") and "uid 65534" in verdict, verdict
