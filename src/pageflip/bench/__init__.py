"""Benchmarks behind ``pageflip bench``: each one runs real processes and returns plain data.

The benchmarks are clients of the library, not part of it. They never print: they report
progress through a callback and return a JSON-ready dict, so that the CLI (rich tables,
progress bars) and scripts under ``benchmarks/`` share one implementation.

``handoff``
    hands N bytes from one process to another, by a move and by every copy path.
``migrate``
    live-migrates a running workload for every (memory size, dirty rate, mode).

Sizes and durations are read and written by :mod:`pageflip.units`.
"""

from __future__ import annotations

__all__: list[str] = []
