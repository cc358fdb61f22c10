"""Per-page xxh3 digests of region memory, and the region digest built from them.

Each side keeps one 64-bit digest per page, recomputed for exactly the pages it sends or
receives. A region's digest is the xxh3 of its page digests in order, so comparing two
regions at switchover costs a hash of 8 bytes per page, not of the memory itself.
A page digest of :data:`ZERO_PAGE_DIGEST` marks a page of zeros.
"""

from __future__ import annotations

import gc

import numpy as np
import numpy.typing as npt
import xxhash

from .._sys.mm import PAGE_SIZE
from ..runs import Runs, runs_to_pages

ZERO_PAGE_DIGEST = xxhash.xxh3_64_intdigest(bytes(PAGE_SIZE))


def hash_pages(view: memoryview, offsets: list[int] | range) -> npt.NDArray[np.uint64]:
    """The xxh3 of the page at each byte offset of ``view``: one call per page (about 0.3 us
    each here), whatever the pages' layout; a loop per run would cost more than the hashing."""
    h = xxhash.xxh3_64_intdigest
    size = PAGE_SIZE
    return np.fromiter(map(h, (view[o : o + size] for o in offsets)), np.uint64, len(offsets))


def region_digest(page_digests: npt.NDArray[np.uint64]) -> int:
    """A region's digest: the xxh3 of its page digests in order."""
    return xxhash.xxh3_64_intdigest(page_digests.tobytes())


class PageDigests:
    """The digests of every page of one region's memory at ``address``."""

    def __init__(self, address: int, npages: int, view: memoryview) -> None:
        self.address = address
        self.npages = npages
        self.view = view  # the region's bytes; keeps its address valid
        self.digests: npt.NDArray[np.uint64] = np.full(npages, ZERO_PAGE_DIGEST, np.uint64)

    def update(self, runs: Runs) -> npt.NDArray[np.bool_]:
        """Rehash the pages in ``runs``; returns, per page of the runs in order, is-zero."""
        return self.update_pages(runs_to_pages(runs))

    def update_pages(self, pages: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        """Rehash ``pages`` (page indices); returns, per page, whether it is all zeros."""
        if not len(pages):
            return np.zeros(0, np.bool_)
        digests = hash_pages(self.view, (pages * PAGE_SIZE).tolist())
        self.digests[pages] = digests
        zero: npt.NDArray[np.bool_] = digests == np.uint64(ZERO_PAGE_DIGEST)
        return zero

    def set_zero(self, runs: Runs) -> None:
        """Record the pages in ``runs`` as zero pages without reading them."""
        for first, count in runs.tolist():
            self.digests[first : first + count] = ZERO_PAGE_DIGEST

    def region_digest(self) -> int:
        return region_digest(self.digests)

    def release(self) -> None:
        """Stop reading memory (the digests stay): the region may be handed on now."""
        self.view.release()


class GcPause:
    """Cyclic garbage collection off while a guest is paused waiting for us (a collection
    can take milliseconds); on again, as it was, once it runs: the two ends may be in
    different places. Idempotent both ways."""

    def __init__(self) -> None:
        self._was: bool | None = None

    def pause(self) -> None:
        if self._was is None:
            self._was = gc.isenabled()
            gc.disable()

    def resume(self) -> None:
        was, self._was = self._was, None
        if was:
            gc.enable()
