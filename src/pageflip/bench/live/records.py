"""The JSON-ready records of ``pageflip bench live``."""

from __future__ import annotations

from typing import Any, TypedDict

from .wrk import WrkResult

__all__ = ["ConfigRecord", "LiveResult", "MemoryRecord", "SideRecord", "TrafficRecord"]


class TrafficRecord(TypedDict):
    """What the load saw (seconds). ``worst_during`` is the longest request that overlapped
    the side's action; ``steady_p99`` the 99th percentile before the action began;
    ``longest_gap`` the longest time during the action in which no response completed."""

    requests: int
    failures: int
    failures_by_kind: dict[str, int]
    first_failures: list[str]
    steady_p50: float | None
    steady_p99: float | None
    worst_during: float | None
    longest_gap: float | None
    wrk: WrkResult | None


class MemoryRecord(TypedDict):
    """Pss of every process of the service: one copy before the action, the peak during it."""

    one_copy: int
    peak: int
    ratio: float | None
    samples: int


class SideRecord(TypedDict):
    """One way to replace the service under load, or why it did not run."""

    side: str
    available: bool
    reason: str | None
    times: list[float]
    pauses: list[float]
    rollbacks_ok: int | None
    traffic: TrafficRecord | None
    memory: MemoryRecord | None
    reports: list[dict[str, Any]]


class ConfigRecord(TypedDict):
    index_size: int
    upgrades: int
    rollbacks: int
    duration: float
    connections: int
    load: str


class LiveResult(TypedDict):
    benchmark: str
    date: str
    machine: dict[str, Any]
    command: str
    config: ConfigRecord
    notes: dict[str, str]
    sides: list[SideRecord]
