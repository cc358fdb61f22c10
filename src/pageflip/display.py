"""Terminal display of migration events (rich): the command line's, never the library's.

:class:`MigrationDisplay` takes the events of one migration (as dicts, the JSON lines of
:mod:`pageflip.migration.events`) and keeps a live view: one progress bar per round, so
that no bar ever runs backwards, the rate, and what is left; it says when the migration
passes its commit point, what pause the guest itself saw, and, if it fails, where the guest
is. :func:`summary_table` then sets done events side by side.

A figure that is missing, or not a finite number, shows as "-": never NaN or inf.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from .units import human_size

__all__ = [
    "MigrationDisplay",
    "fmt_count",
    "fmt_rate",
    "fmt_seconds",
    "fmt_size",
    "fmt_us",
    "region_line",
    "summary_table",
]

MISSING = "-"


def _finite(value: Any) -> float | None:
    """``value`` as a float if it is a finite number, else None (missing, NaN, inf, text)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def fmt_seconds(seconds: float | None) -> str:
    """``12.34 ms``, ``450 ms``, ``2.50 s``; "-" for a missing or non-finite figure."""
    s = _finite(seconds)
    if s is None:
        return MISSING
    if s < 1:
        return f"{s * 1e3:.2f} ms" if s < 0.1 else f"{s * 1e3:.0f} ms"
    return f"{s:.2f} s"


def fmt_us(micros: float | None) -> str:
    """A fault service time: ``8.5 us``, ``310 us``, ``1.20 ms``; "-" when missing."""
    us = _finite(micros)
    if us is None:
        return MISSING
    if us < 10:
        return f"{us:.1f} us"
    if us < 1000:
        return f"{us:.0f} us"
    return fmt_seconds(us / 1e6)


def fmt_rate(rate: float | None) -> str:
    """Bytes per second for people; "-" when missing or not positive."""
    r = _finite(rate)
    return f"{human_size(r)}/s" if r is not None and r > 0 else MISSING


def fmt_size(nbytes: float | None) -> str:
    """Bytes for people; "-" when missing."""
    n = _finite(nbytes)
    return MISSING if n is None else human_size(n)


def fmt_count(count: float | None) -> str:
    """A whole number; "-" when missing."""
    n = _finite(count)
    return MISSING if n is None else f"{n:.0f}"


def _pages(count: Any) -> str:
    n = _finite(count)
    if n is None:
        return "? pages"
    return "1 page" if n == 1 else f"{n:.0f} pages"


def region_line(region: dict[str, Any]) -> str:
    """One region of a done event: ``ram 8192 pages: 8192 moved``, ``journal 8 pages: 12
    copied, 2 zero`` (copies count every send: a page written between rounds goes again)."""
    sent = [
        f"{fmt_count(region.get(what))} {what}"
        for what in ("moved", "copied", "zero")
        if _finite(region.get(what))
    ]
    return (
        f"{region.get('name', '?')} {_pages(region.get('pages'))}: {', '.join(sent) or 'none sent'}"
    )


class MigrationDisplay:
    """A live progress view of one migration on ``console``."""

    def __init__(self, console: Console, title: str = "migration") -> None:
        self.console = console
        self.title = title
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[left]}"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            console=console,
        )
        self._tasks: dict[int, TaskID] = {}
        self._postcopy: TaskID | None = None
        self.done: dict[str, Any] | None = None
        self.failed: dict[str, Any] | None = None

    def __enter__(self) -> MigrationDisplay:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def _round_task(self, number: int, total: int) -> TaskID:
        if number not in self._tasks:
            self._tasks[number] = self.progress.add_task(
                f"round {number}", total=max(total, 1), left="", rate=""
            )
        return self._tasks[number]

    def _say(self, text: str) -> None:
        self.progress.console.print(text)

    def event(self, event: dict[str, Any]) -> None:
        """Show one event (a dict as the engine reports it); kinds it does not know pass."""
        show = self._SHOW.get(str(event.get("event")))
        if show is not None:
            show(self, event)

    def _setup(self, event: dict[str, Any]) -> None:
        regions = ", ".join(
            f"{escape(str(r.get('name')))} {fmt_size(r.get('size'))}"
            + (f" on {escape(str(r['pages']))} pages" if r.get("pages", "4 KiB") != "4 KiB" else "")
            for r in event.get("regions") or []
        )
        features = ", ".join(str(f) for f in event.get("features") or []).lower()
        self._say(
            f"[bold]{escape(self.title)}[/]: {event.get('mode')} of "
            f"{fmt_size(event.get('total_bytes'))}"
            + (f" ({regions})" if regions else "")
            + f" to {escape(str(event.get('transport')))}"
            + (f" (shared features: {features})" if features else "")
        )

    def _progress(self, event: dict[str, Any]) -> None:
        total = event["sent_pages"] + event["remaining_pages"]
        self.progress.update(
            self._round_task(event["round"], total),
            total=max(total, 1),
            completed=event["sent_pages"],
            left=f"{event['remaining_pages']} pages left",
            rate=fmt_rate(event.get("rate")),
        )

    def _round(self, event: dict[str, Any]) -> None:
        self.progress.update(
            self._round_task(event["round"], event["pages"]),
            total=max(event["pages"], 1),
            completed=max(event["pages"], 1),
            left=f"{event['dirty_pages']} dirtied meanwhile",
            rate=fmt_rate(event.get("bandwidth")),
        )

    def _switchover(self, event: dict[str, Any]) -> None:
        reason = event.get("reason")
        expected = _finite(event.get("expected_downtime"))
        if event.get("why"):  # precopy stopped without converging
            self._say(f"[yellow]{escape(str(event['why']))}[/]")
        self._say(
            "switchover: the guest is paused; handing its memory over"
            if reason == "flip"
            else f"switchover ({escape(str(reason))}): the guest is paused; "
            f"{event.get('remaining_pages')} pages left"
            + ("" if expected is None else f", expected downtime {fmt_seconds(expected)}")
        )

    def _resumed(self, event: dict[str, Any]) -> None:
        self._say(
            f"[green]running on the destination[/], downtime "
            f"{fmt_seconds(event.get('downtime'))} "
            f"(the guest saw {fmt_seconds(event.get('guest_pause'))})"
        )

    def _recovering(self, event: dict[str, Any]) -> None:
        timeout = _finite(event.get("timeout"))
        self._say(
            f"[yellow]postcopy: the connection broke[/] "
            f"({escape(str(event.get('reason')))}); waiting "
            + ("" if timeout is None else f"up to {fmt_seconds(timeout)} ")
            + "for `pageflip migrate --resume`; the destination keeps pulling pages"
        )

    def _postcopy_event(self, event: dict[str, Any]) -> None:
        if self._postcopy is None:
            self._postcopy = self.progress.add_task("postcopy", total=None, left="", rate="")
        faults = ""
        if _finite(event.get("fault_median_us")) is not None:
            faults = (
                f", faults served in {fmt_us(event.get('fault_median_us'))} "
                f"(p99 {fmt_us(event.get('fault_p99_us'))})"
            )
        self.progress.update(
            self._postcopy,
            left=f"{event.get('remaining_pages')} pages left, "
            f"{event.get('requested_pages')} fetched on demand, "
            f"{event.get('pushed_pages')} pushed{faults}",
        )

    def _done(self, event: dict[str, Any]) -> None:
        self.done = event
        p = self.progress
        for task in self._tasks.values():
            p.update(task, completed=p.tasks[task].total)
        if self._postcopy is not None:
            p.update(self._postcopy, total=1, completed=1)

    def _failed(self, event: dict[str, Any]) -> None:
        # The command ends with the failure, on one line of its own: not said here too.
        self.failed = event

    _SHOW: ClassVar[dict[str, Callable[[MigrationDisplay, dict[str, Any]], None]]] = {
        "setup": _setup,
        "progress": _progress,
        "round": _round,
        "switchover": _switchover,
        "prepared": lambda self, event: self._say(
            "prepared: the destination holds the guest, ready to resume it"
        ),
        "commit": lambda self, event: self._say(
            "[bold]commit point[/]: the guest is the destination's now"
        ),
        "resumed": _resumed,
        "recovering": _recovering,
        "postcopy": _postcopy_event,
        "done": _done,
        "failed": _failed,
    }


def summary_table(rows: list[tuple[str, dict[str, Any]]], title: str) -> Table:
    """Done events side by side, one column each: the figures a migration reports.

    The engine's downtime (pause to resume) stands beside the pause the guest itself saw;
    pages are counted per region (``ram`` apart from the guest's own small regions);
    a postcopy adds its fault service times.
    """
    table = Table(title=title)
    table.add_column("")
    for label, _ in rows:
        table.add_column(escape(label), justify="right")

    def line(name: str, cells: list[str]) -> None:
        table.add_row(name, *cells)

    dones = [d for _, d in rows]
    details = [d.get("details") or {} for d in dones]
    line("mode", [str(d.get("mode") or MISSING) for d in dones])
    line("total time", [fmt_seconds(d.get("total_seconds")) for d in dones])
    line("downtime", [fmt_seconds(d.get("downtime")) for d in dones])
    line("pause the guest saw", [fmt_seconds(d.get("guest_pause")) for d in dones])
    line("rounds", [fmt_count(d.get("rounds")) for d in dones])
    line("bytes on the wire", [fmt_size(d.get("bytes_on_wire")) for d in dones])
    table.add_row(
        "pages by region",
        *(
            Text(
                "\n".join(region_line(r) for r in d.get("regions") or []) or MISSING, justify="left"
            )
            for d in dones
        ),
    )
    line("pages moved", [fmt_count(d.get("pages_moved")) for d in dones])
    line("pages copied", [fmt_count(d.get("pages_copied")) for d in dones])
    line("zero pages", [fmt_count(d.get("pages_zero")) for d in dones])
    postcopy = [
        d.get("mode") == "postcopy" or "fault_median_us" in x
        for d, x in zip(dones, details, strict=True)
    ]
    if any(postcopy):
        line(
            "faults (pages requested / pushed)",
            [
                f"{fmt_count(x.get('faults'))} ({fmt_count(x.get('requested'))} / "
                f"{fmt_count(x.get('pushed'))})"
                for x in details
            ],
        )
        line(
            "fault service median / p99",
            [
                f"{fmt_us(x.get('fault_median_us'))} / {fmt_us(x.get('fault_p99_us'))}"
                for x in details
            ],
        )
    line("digests", [escape(str(d.get("digest") or MISSING)) for d in dones])
    if any("verified" in d for d in dones):
        line("guest's own check", [escape(str(d.get("verified", MISSING))) for d in dones])
    return table
