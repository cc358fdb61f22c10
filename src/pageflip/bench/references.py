"""Figures of other systems that the benchmarks compare with, read from ``references.json``
(shipped beside this module), each with the source that stated it."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any, NotRequired, TypedDict, cast

from ..units import parse_size

__all__ = ["Reference", "qemu_context", "qemu_references"]


class Reference(TypedDict):
    """A figure of another system (QEMU), with where it was stated (``source``)."""

    size: int
    rate: int
    total_seconds: float
    downtime: float | None
    downtime_range: NotRequired[list[float]]
    source: str
    note: str


@cache
def _data() -> dict[str, Any]:
    text = resources.files("pageflip.bench").joinpath("references.json").read_text()
    data: dict[str, Any] = json.loads(text)
    return data


def _bytes(value: int | str) -> int:
    return value if isinstance(value, int) else parse_size(value)


def qemu_references() -> tuple[Reference, ...]:
    """QEMU's localhost migration figures: size and rate in bytes (per second), times in
    seconds, ``source`` and ``note`` as stated in the data file."""
    figures: list[dict[str, Any]] = _data()["qemu"]["figures"]
    out = []
    for figure in figures:
        # Keep the file's order of keys: it is the order in a result's JSON.
        ref = {**figure, "size": _bytes(figure["size"]), "rate": _bytes(figure["rate"])}
        out.append(cast(Reference, ref))
    return tuple(out)


def qemu_context() -> str:
    """What QEMU does outside the compared figures, in one sentence with its sources."""
    text: str = _data()["qemu"]["context"]["text"]
    return text
