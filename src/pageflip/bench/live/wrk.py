"""wrk as the load: run ``wrk --latency`` and read its report.

wrk counts a request on a connection the server closed after a ``Connection: close``
response as no error (it reconnects), like :class:`~.load.Load`; it does not retry, and it
gives no per-request times, so its figures cover the whole run. ``make wrk`` installs it.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
from typing import TypedDict

from ...errors import BenchmarkError

__all__ = ["WrkResult", "available", "parse", "start", "finish"]

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_TIME = r"([\d.]+)(us|ms|s|m|h)"


class WrkResult(TypedDict):
    """What ``wrk --latency`` reported (times in seconds; None: not in its output)."""

    requests: int
    duration: float
    errors_connect: int
    errors_read: int
    errors_write: int
    errors_timeout: int
    non_2xx: int
    latency_mean: float | None
    latency_max: float | None
    percentiles: dict[str, float]


def available() -> str | None:
    """wrk's path, or None."""
    return shutil.which("wrk")


def _seconds(number: str, unit: str) -> float:
    return float(number) * _UNITS[unit]


def parse(text: str) -> WrkResult:
    """The figures of a ``wrk --latency`` report (BenchmarkError if it has none)."""
    total = re.search(r"(\d+) requests in " + _TIME, text)
    if total is None:
        raise BenchmarkError(f"not a wrk report: {text.strip()[:200]!r}")
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    connect, read, write, timeout = (int(v) for v in errors.groups()) if errors else (0, 0, 0, 0)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    latency = re.search(r"Latency\s+" + _TIME + r"\s+" + _TIME + r"\s+" + _TIME, text)
    percentiles = {
        f"p{m.group(1)}": _seconds(m.group(2), m.group(3))
        for m in re.finditer(r"^\s+(\d+(?:\.\d+)?)%\s+" + _TIME + r"\s*$", text, re.MULTILINE)
    }
    return {
        "requests": int(total.group(1)),
        "duration": _seconds(total.group(2), total.group(3)),
        "errors_connect": connect,
        "errors_read": read,
        "errors_write": write,
        "errors_timeout": timeout,
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
        "latency_mean": _seconds(latency.group(1), latency.group(2)) if latency else None,
        "latency_max": _seconds(latency.group(5), latency.group(6)) if latency else None,
        "percentiles": percentiles,
    }


def start(port: int, duration: float, connections: int, threads: int = 2) -> subprocess.Popen[str]:
    """wrk against ``/search`` on ``port`` for ``duration`` seconds (a running process)."""
    path = available()
    if path is None:
        raise BenchmarkError("wrk is not installed (make wrk)")
    command = [
        path,
        f"-t{threads}",
        f"-c{max(connections, threads)}",
        f"-d{max(1, round(duration))}s",
        "--latency",
        f"http://127.0.0.1:{port}/search?q=1&k=5",
    ]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen[str], timeout: float) -> WrkResult:
    """Wait for wrk (stopped with SIGINT after ``timeout`` s, which makes it report)."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=10)
    return parse(out)
