"""The pageflip.live side: ``pageflip upgrade`` again and again under load, some of them
with a new version that fails at start-up (a rollback: the old one must serve on)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from ...errors import BenchmarkError
from ..common import now
from .records import SideRecord
from .sides import START_TIMEOUT, Bench, live_available

__all__ = ["live_side", "pause_of"]

UPGRADE_TIMEOUT = 120.0


def unavailable(reason: str) -> SideRecord:
    return {
        "side": "pageflip live",
        "available": False,
        "reason": reason,
        "times": [],
        "pauses": [],
        "rollbacks_ok": None,
        "traffic": None,
        "memory": None,
        "reports": [],
    }


def pause_of(report: dict[str, Any]) -> float | None:
    """The service's own pause from an upgrade report: the first number under a key that
    names a pause (``pause``, ``pause_s``, ``paused``...), searched one level deep."""
    for key, value in report.items():
        if "pause" in key and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value) / 1e3 if key.endswith("_ms") else float(value)
    for value in report.values():
        if isinstance(value, dict) and (found := pause_of(value)) is not None:
            return found
    return None


def _upgrade(control: Path) -> tuple[int, dict[str, Any], str]:
    """Run ``pageflip upgrade --control ... --json``: status, report, stderr."""
    command = [sys.executable, "-m", "pageflip", "upgrade", "--control", str(control), "--json"]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=UPGRADE_TIMEOUT, check=False
    )
    report: dict[str, Any] = {}
    for line in done.stdout.splitlines()[::-1]:
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            report = value
            break
    return done.returncode, report, done.stderr.strip()


def live_side(bench: Bench, upgrades: int, rollbacks: int) -> SideRecord:
    """Upgrades, then rollbacks, under load; pageflip.live missing: "not available"."""
    reason = live_available()
    if reason is not None:
        bench.say(f"pageflip live: skipped, {reason}")
        return unavailable(reason)
    control = bench.tag / "app.sock"
    fail_flag = bench.tag / "fail-next-start"
    args = ["--control", str(control), "--port", "0", "--fail-if-exists", str(fail_flag)]
    old = bench.start(*args, "--index-size", str(bench.index_size))
    port = old.serving(START_TIMEOUT)["port"]

    def action() -> dict[str, Any]:
        times, pauses, reports, rollbacks_ok = [], [], [], 0
        for i in range(upgrades + rollbacks):
            failing = i >= upgrades
            bench.say(f"pageflip live: {'rollback' if failing else 'upgrade'} {i + 1}")
            if failing:
                fail_flag.touch()
            begin = now()
            status, report, err = _upgrade(control)
            elapsed = now() - begin
            fail_flag.unlink(missing_ok=True)
            reports.append(report)
            if failing:
                rollbacks_ok += status != 0
                continue
            if status != 0:
                raise BenchmarkError(f"pageflip upgrade {i + 1} failed ({status}): {err}")
            times.append(elapsed)
            if (pause := pause_of(report)) is not None:
                pauses.append(pause)
        return {"times": times, "pauses": pauses, "reports": reports, "rollbacks_ok": rollbacks_ok}

    try:
        return bench.measure("pageflip live", port, action)
    finally:
        bench.cleanup_services()
