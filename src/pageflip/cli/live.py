"""``pageflip upgrade``: live-update a service that uses :mod:`pageflip.live`.

The service (an :class:`~pageflip.live.Upgrader` with ``control=PATH``) starts a new
version of its own command line, hands it its memory, listening sockets and state, and
exits once the new one serves; if the new one fails, it is ended and the old one serves on.
Progress lines go to stderr; ``--json`` prints one JSON object (the report) on stdout.
Exit status 0: upgraded; 1: rolled back (the reason on one line) or no upgrade.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from ..errors import LiveError, UpgradeFailed, UpgradeRunning
from ._base import DURATION, main, stderr_console


@main.command("upgrade")
@click.option(
    "--control",
    envvar="PAGEFLIP_CONTROL",
    required=True,
    help="The service's control socket (Upgrader(control=...)); default $PAGEFLIP_CONTROL.",
)
@click.option(
    "--timeout",
    type=DURATION,
    default="30s",
    show_default=True,
    help="Longest wait for the new version to become ready (then it is rolled back).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def upgrade(control: str, timeout: float, as_json: bool) -> None:
    """Replace the service at --control with a new version of its own command line.

    Its memory (the same pages), listening sockets (the same sockets: no connection is
    refused) and state go to the new version; if that fails, the old one serves on.
    """
    from ..live import ServiceClient

    console = stderr_console()
    last: dict[str, Any] = {}
    with ServiceClient(control, timeout=timeout + 10) as client:
        for answer in client.upgrade(timeout):
            if answer.get("event") == "progress":
                console.print(f"upgrade: {answer.get('message')}", highlight=False)
            last = answer
    report = last.get("report") or {}
    if as_json:
        out = {"ok": last.get("event") == "upgraded", **report}
        if last.get("error"):
            out["error"] = last["error"]
        click.echo(json.dumps(out, allow_nan=False))
        sys.stdout.flush()
    if last.get("event") == "upgraded":
        if not as_json:
            pause = report.get("pause")
            console.print(
                f"upgraded: pid {report.get('old_pid')} -> {report.get('new_pid')} "
                f"(generation {report.get('generation')}), "
                f"{sum(r['bytes'] for r in report.get('regions', []))} bytes moved, "
                f"{len(report.get('listeners', []))} listener(s), "
                f"state {report.get('state_bytes') or 0} bytes, "
                f"pause {'-' if pause is None else f'{pause * 1000:.1f} ms'}",
                highlight=False,
            )
        return
    error = str(last.get("error") or "the service answered nothing")
    if not as_json:
        for line in report.get("stderr") or []:
            console.print(f"new version: {line}", highlight=False, markup=False)
    # The error is "Type: message" already: raise it as that type's one line.
    kind, _, message = error.partition(": ")
    if kind == "UpgradeFailed":
        raise UpgradeFailed(message, reason=message, stderr=report.get("stderr"))
    if kind == "UpgradeRunning":
        raise UpgradeRunning(message)
    raise LiveError(message if kind == "LiveError" else error)
