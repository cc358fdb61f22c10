"""A verifiable data pattern for benchmarks and the demo: word ``i`` is ``i * GOLDEN + seed``.

Every 64-bit word depends on its index, so data that arrived shifted, truncated, stale (left
over from an earlier run) or zero-filled does not match. The whole pattern is checked chunk by
chunk (:func:`verify`, which also gives the xxh3 digest that :func:`fill` returned on the
writing side), or cheaply one word per page (:func:`page_sample`), which is what the
benchmark does outside its timed sections.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import xxhash

from ..memory import PAGE_SIZE

__all__ = ["CHUNK", "GOLDEN", "fill", "page_sample", "sample_expected", "verify"]

#: Odd 64-bit multiplier (the golden ratio), so that consecutive words differ in every byte.
GOLDEN = np.uint64(0x9E3779B97F4A7C15)
#: Bytes handled per step by :func:`fill` and :func:`verify` (bounds their temporary memory).
CHUNK = 64 << 20
_WORDS_PER_PAGE = PAGE_SIZE // 8
_WORDS_PER_CHUNK = CHUNK // 8

Words = npt.NDArray[np.uint64]
#: Called with the number of bytes done so far after each chunk.
OnChunk = Callable[[int], None]


def _expected(start: int, stop: int, seed: int, step: int = 1) -> Words:
    words = np.arange(start, stop, step, dtype=np.uint64)
    words *= GOLDEN
    words += np.uint64(seed)
    return words


def fill(words: Words, seed: int, *, on_chunk: OnChunk | None = None) -> str:
    """Write the pattern for ``seed`` into ``words`` (a uint64 array), one chunk at a time.

    Returns the xxh3-64 digest (hex) of the bytes written.
    """
    hasher = xxhash.xxh3_64()
    total = words.size
    for start in range(0, total, _WORDS_PER_CHUNK):
        stop = min(start + _WORDS_PER_CHUNK, total)
        chunk = words[start:stop]
        chunk[:] = _expected(start, stop, seed)
        hasher.update(chunk.data)
        if on_chunk is not None:
            on_chunk(stop * 8)
    return str(hasher.hexdigest())


def verify(words: Words, seed: int, *, on_chunk: OnChunk | None = None) -> tuple[int, str]:
    """Check ``words`` against the pattern for ``seed``, one chunk at a time.

    Returns how many words differ (0: all correct) and the xxh3-64 digest (hex) of the bytes,
    to compare with what :func:`fill` returned on the other side.
    """
    hasher = xxhash.xxh3_64()
    total = words.size
    wrong = 0
    for start in range(0, total, _WORDS_PER_CHUNK):
        stop = min(start + _WORDS_PER_CHUNK, total)
        chunk = words[start:stop]
        wrong += int(np.count_nonzero(chunk != _expected(start, stop, seed)))
        hasher.update(chunk.data)
        if on_chunk is not None:
            on_chunk(stop * 8)
    return wrong, str(hasher.hexdigest())


def page_sample(words: Words) -> Words:
    """Every 512th word of ``words``: one per page when ``words`` starts on a page boundary."""
    return words[::_WORDS_PER_PAGE]


def sample_expected(nbytes: int, seed: int) -> Words:
    """What :func:`page_sample` gives for ``nbytes`` of correct pattern."""
    return _expected(0, nbytes // 8, seed, _WORDS_PER_PAGE)
