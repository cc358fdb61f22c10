"""The end of ``pageflip demo``: a running HTTP service upgraded under load (pageflip.live).

The service is ``examples/live_service/app.py`` of this source tree (uvicorn, a numpy index
in a region, a request counter as its state). Clients hammer it while ``pageflip upgrade``
replaces it twice with a new process of the same code: the index's pages and the listening
socket change owner, nothing is reloaded, and no request may fail.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .bench.live.load import Load
from .bench.live.service import ServiceProcess, default_app, kill_tagged
from .units import human_size

__all__ = ["run_live_demo"]

#: The index of the demo's service (bytes, at most: no larger than the demo's workload) and
#: the upgrades it goes through.
INDEX_SIZE = 256 << 20
UPGRADES = 2
#: Seconds of load before the first upgrade and after the last.
SETTLE = 1.0
#: Longest wait for the service to serve, and for one upgrade.
START_TIMEOUT = 60.0
UPGRADE_TIMEOUT = 60.0


def _missing() -> str | None:
    """Why the live demo cannot run here (None: it can)."""
    if not default_app().exists():
        return f"{default_app()} is not here (the example ships with the source tree)"
    if importlib.util.find_spec("uvicorn") is None:
        return "uvicorn is not installed (pip install 'pageflip[live]')"
    return None


def _upgrade(control: Path) -> dict[str, Any]:
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pageflip", "upgrade", "--control", str(control), "--json"],
            check=False,
            capture_output=True,
            text=True,
            timeout=UPGRADE_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "reason": f"pageflip upgrade did not end in {UPGRADE_TIMEOUT:g} s"}
    try:
        report = json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        report = {"ok": False, "reason": out.stderr.strip() or f"exit status {out.returncode}"}
    return report if isinstance(report, dict) else {"ok": False, "reason": repr(report)}


def run_live_demo(console: Console, index_size: int = INDEX_SIZE) -> bool:
    """Upgrade the example service twice under load; True when every upgrade succeeded and
    no request failed (also True, with a note, where the example cannot run)."""
    why = _missing()
    if why is not None:
        console.print(f"[yellow]live update demo skipped[/]: {why}")
        return True
    console.rule(
        f"[bold]live update[/]: an HTTP service with a {human_size(index_size)} index, "
        f"upgraded {UPGRADES} times under load"
    )
    with tempfile.TemporaryDirectory(prefix="pageflip-demo-live-") as tmp:
        control = Path(tmp) / "app.sock"
        args = ["--index-size", str(index_size), "--port", "0", "--control", str(control)]
        service = ServiceProcess(default_app(), [*args, "--tag", tmp])
        load: Load | None = None
        try:
            serving = service.serving(START_TIMEOUT)
            console.print(
                f"service pid {serving['pid']} serves on 127.0.0.1:{serving['port']}; "
                f"16 clients send nearest-neighbour queries"
            )
            load = Load(serving["port"], 16, index_size // (64 * 4))
            load.start()
            time.sleep(SETTLE)
            reports = []
            for _ in range(UPGRADES):
                reports.append(_upgrade(control))
                _say(console, reports[-1])
            time.sleep(SETTLE)
            load.stop()
            return _summary(console, reports, load)
        finally:
            if load is not None:
                load.stop()
            kill_tagged(tmp)  # every generation: the upgrades started all but the first
            service.stop(timeout=5.0)


def _say(console: Console, report: dict[str, Any]) -> None:
    if not report.get("ok"):
        console.print(f"[red]upgrade failed[/]: {report.get('reason')}")
        return
    moved = sum(int(r.get("bytes", 0)) for r in report.get("regions", []))
    console.print(
        f"upgraded: pid {report.get('old_pid')} -> {report.get('new_pid')} "
        f"(generation {report.get('generation')}), {human_size(moved)} of index moved, "
        f"service paused {1e3 * float(report.get('pause') or 0):.1f} ms, "
        f"upgrade took {1e3 * float(report.get('total') or 0):.0f} ms"
    )


def _summary(console: Console, reports: list[dict[str, Any]], load: Load) -> bool:
    requests, failures = len(load.requests), len(load.failures)
    worst = max((r.latency for r in load.requests), default=0.0)
    table = Table(title="live update under load")
    for column in ("upgrades", "requests answered", "failed", "worst latency"):
        table.add_column(column, justify="right")
    ok_count = sum(1 for r in reports if r.get("ok"))
    colour = "green" if failures == 0 else "red"
    table.add_row(
        f"{ok_count} of {len(reports)}",
        str(requests),
        f"[{colour}]{failures}[/]",
        f"{1e3 * worst:.1f} ms",
    )
    console.print(table)
    for failure in load.failures[:5]:
        console.print(f"  [red]-[/] {failure.kind}: {failure.detail}")
    if load.error is not None:
        console.print(f"[red]the load failed[/]: {load.error}")
    return ok_count == len(reports) and failures == 0 and load.error is None
