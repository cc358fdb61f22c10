"""What the load saw, summed up around a side's action."""

from __future__ import annotations

from collections import Counter
from itertools import pairwise

import numpy as np

from .load import Failure, Request
from .records import TrafficRecord
from .wrk import WrkResult

__all__ = ["summary"]


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _longest_gap(requests: list[Request], begin: float, end: float) -> float | None:
    """The longest time within [begin, end] in which no response completed."""
    done = sorted(r.start + r.latency for r in requests if begin <= r.start + r.latency <= end)
    if not done and not requests:
        return None
    marks = [begin, *done, end]
    return max(b - a for a, b in pairwise(marks))


def summary(
    requests: list[Request],
    failures: list[Failure],
    action: tuple[float, float],
    wrk: WrkResult | None = None,
) -> TrafficRecord:
    """The traffic record of one side; ``action`` is (begin, end) on CLOCK_MONOTONIC."""
    begin, end = action
    steady = [r.latency for r in requests if r.start + r.latency < begin]
    during = [r.latency for r in requests if r.start <= end and r.start + r.latency >= begin]
    kinds = Counter(f.kind for f in failures)
    requests_n = len(requests) + len(failures)
    failed = len(failures)
    if wrk is not None:
        requests_n = wrk["requests"]
        kinds = Counter(
            {
                "connect": wrk["errors_connect"],
                "read": wrk["errors_read"],
                "write": wrk["errors_write"],
                "timeout": wrk["errors_timeout"],
                "non_2xx": wrk["non_2xx"],
            }
        )
        failed = sum(kinds.values())
    return {
        "requests": requests_n,
        "failures": failed,
        "failures_by_kind": {k: v for k, v in kinds.items() if v},
        "first_failures": [f"{f.at - begin:+.3f} s {f.kind}: {f.detail}" for f in failures[:5]],
        "steady_p50": _percentile(steady, 50),
        "steady_p99": _percentile(steady, 99),
        "worst_during": max(during) if during else (wrk["latency_max"] if wrk else None),
        "longest_gap": _longest_gap(requests, begin, end) if wrk is None else None,
        "wrk": wrk,
    }
