"""Per-page xxh3 digests of region memory, and the region digest built from them.

Each side keeps one 64-bit digest per page, recomputed for exactly the pages it sends or
receives. A region's digest is the xxh3 of its page digests in order, so comparing two
regions at switchover costs a hash of 8 bytes per page, not of the memory itself.
A page digest of :data:`ZERO_PAGE_DIGEST` marks a page of zeros.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import xxhash

from .._sys.mm import PAGE_SIZE
from ..dirty import Runs

ZERO_PAGE_DIGEST = xxhash.xxh3_64_intdigest(bytes(PAGE_SIZE))


class PageDigests:
    """The digests of every page of one region's memory at ``address``."""

    def __init__(self, address: int, npages: int, view: memoryview) -> None:
        self.address = address
        self.npages = npages
        self._view = view  # the region's bytes; keeps its address valid
        self.digests: npt.NDArray[np.uint64] = np.full(npages, ZERO_PAGE_DIGEST, np.uint64)

    def update(self, runs: Runs) -> npt.NDArray[np.bool_]:
        """Rehash the pages in ``runs``; returns, per page of the runs in order, is-zero."""
        h = xxhash.xxh3_64_intdigest
        view = self._view
        parts = []
        for first, count in runs.tolist():
            start, stop = first * PAGE_SIZE, (first + count) * PAGE_SIZE
            pages = (view[o : o + PAGE_SIZE] for o in range(start, stop, PAGE_SIZE))
            digests = np.fromiter(map(h, pages), np.uint64, count)
            self.digests[first : first + count] = digests
            parts.append(digests)
        if not parts:
            return np.zeros(0, np.bool_)
        zero: npt.NDArray[np.bool_] = np.concatenate(parts) == np.uint64(ZERO_PAGE_DIGEST)
        return zero

    def region_digest(self) -> int:
        return xxhash.xxh3_64_intdigest(self.digests.tobytes())

    def release(self) -> None:
        self._view.release()


def sample_digest(view: memoryview, npages: int, seed: int, samples: int = 16) -> int:
    """xxh3 of a few pages chosen by ``seed`` (and the first and last): flip's identity check."""
    rng = np.random.default_rng(seed)
    picks = sorted({0, npages - 1, *rng.integers(0, npages, min(samples, npages)).tolist()})
    h = xxhash.xxh3_64()
    for p in picks:
        h.update(view[p * PAGE_SIZE : (p + 1) * PAGE_SIZE])
    return h.intdigest()
