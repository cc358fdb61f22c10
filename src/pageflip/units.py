"""Sizes, rates and durations as people and command lines write them.

:func:`parse_size` and :func:`format_size` read and write the exact byte counts that options
take (``64M``, ``1G``, ``4G``); :func:`human_size` rounds for reading (``1.5 GiB``);
:func:`format_rate` names a write rate (``idle``, ``64M/s``); :func:`format_duration` spells
seconds with the precision a table wants (``1.22 ms``, ``450 ms``, ``2.50 s``). Any layer may
import this module: it imports nothing of pageflip but the errors.
"""

from __future__ import annotations

import math
import re

from .errors import BadArgument

__all__ = ["format_duration", "format_rate", "format_size", "human_size", "parse_size"]

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in ``text``: a number with an optional binary suffix (``4096``, ``64M``, ``1.5G``).

    K, M, G and T are powers of 1024 (``KiB``, ``MB`` and ``kb`` mean the same). Raises
    :class:`~pageflip.errors.BadArgument` (a ValueError) for anything else, and for sizes that
    are not a positive whole number of bytes.
    """
    match = _SIZE.match(text)
    if match is None:
        raise BadArgument(f"{text!r} is not a size: use a number with K, M, G or T, e.g. 64M")
    number, unit = match.groups()
    value = float(number) * _UNITS[unit.upper()]
    if value != int(value) or value <= 0:
        raise BadArgument(f"{text!r} is not a positive whole number of bytes")
    return int(value)


def format_size(nbytes: int) -> str:
    """The shortest exact spelling of ``nbytes`` in the units :func:`parse_size` reads: ``1G``."""
    for unit in ("T", "G", "M", "K"):
        scale = _UNITS[unit]
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale}{unit}"
    return str(nbytes)


def human_size(nbytes: float) -> str:
    """``nbytes`` for people: ``1.5 GiB``, ``640 KiB``, ``512 B``."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" or value >= 100 else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def format_rate(rate: float) -> str:
    """A write rate in bytes per second as :func:`format_size` spells it: ``64M/s``; 0 is
    ``idle``."""
    return "idle" if rate == 0 else f"{format_size(int(rate))}/s"


def format_duration(seconds: float | None) -> str:
    """``1.22 ms``, ``12.3 ms``, ``450 ms``, ``2.50 s``; "-" for a missing or non-finite
    figure."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    ms = seconds * 1e3
    if ms < 10:
        return f"{ms:.2f} ms"
    if ms < 1000:
        return f"{ms:.0f} ms" if ms >= 100 else f"{ms:.1f} ms"
    return f"{seconds:.2f} s"
