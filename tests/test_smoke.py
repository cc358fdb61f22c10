"""Smoke test until the full suite lands: a gift between two threads moves the pages."""

import threading

import numpy as np

import pageflip as pf


def test_gift_moves_between_threads() -> None:
    a, b = pf.channel_pair()
    got: dict[str, object] = {}

    def reader() -> None:
        region, transfer = b.receive()
        got["sum"] = int(region.numpy(np.uint64).sum())
        got["transfer"] = transfer
        region.close()

    thread = threading.Thread(target=reader)
    thread.start()
    region = pf.Region.movable(1 << 20, "smoke")
    arr = region.numpy(np.uint64)
    arr[:] = np.arange(arr.size, dtype=np.uint64)
    expect = int(arr.sum())
    del arr
    transfer = a.gift(region)
    thread.join()
    a.close()
    b.close()
    assert transfer.moved and region.closed
    assert got["sum"] == expect
