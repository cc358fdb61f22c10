"""Terminal display of migration events (rich): the command line's, never the library's.

:class:`MigrationDisplay` takes the events of one migration (as dicts, the JSON lines of
:mod:`pageflip.migration.events`) and keeps a live view: one progress bar per round, so
that no bar ever runs backwards, the rate, and what is left; then a summary table.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from .bench import human_size


def fmt_seconds(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms" if seconds < 0.1 else f"{seconds * 1e3:.0f} ms"
    return f"{seconds:.2f} s"


def fmt_rate(rate: float) -> str:
    return f"{human_size(rate)}/s" if rate > 0 else "-"


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

    def event(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        p = self.progress
        if kind == "setup":
            p.console.print(
                f"[bold]{self.title}[/]: {event['mode']} of {human_size(event['total_bytes'])}"
                f" to {event['transport']} ({', '.join(event['features']).lower()})"
            )
        elif kind == "progress":
            total = event["sent_pages"] + event["remaining_pages"]
            task = self._round_task(event["round"], total)
            p.update(
                task,
                total=max(total, 1),
                completed=event["sent_pages"],
                left=f"{event['remaining_pages']} pages left",
                rate=fmt_rate(event["rate"]),
            )
        elif kind == "round":
            task = self._round_task(event["round"], event["pages"])
            p.update(
                task,
                total=max(event["pages"], 1),
                completed=max(event["pages"], 1),
                left=f"{event['dirty_pages']} dirtied meanwhile",
                rate=fmt_rate(event["bandwidth"]),
            )
        elif kind == "switchover":
            p.console.print(
                f"switchover ({event['reason']}): {event['remaining_pages']} pages left, "
                f"expected downtime {fmt_seconds(event['expected_downtime'])}"
                if event["reason"] not in ("flip",)
                else "switchover: handing the memory over"
            )
        elif kind == "resumed":
            p.console.print(
                f"[green]running on the destination[/], downtime {fmt_seconds(event['downtime'])}"
            )
        elif kind == "postcopy":
            if self._postcopy is None:
                self._postcopy = p.add_task("postcopy", total=None, left="", rate="")
            p.update(
                self._postcopy,
                left=f"{event['remaining_pages']} pages left, "
                f"{event['requested_pages']} fetched on demand",
            )
        elif kind == "done":
            self.done = event
            for task in self._tasks.values():
                p.update(task, completed=p.tasks[task].total)
        elif kind == "failed":
            self.failed = event


def summary_table(rows: list[tuple[str, dict[str, Any]]], title: str) -> Table:
    """Done events side by side, one column each: the figures a migration reports."""
    table = Table(title=title)
    table.add_column("")
    for label, _ in rows:
        table.add_column(label, justify="right")

    def line(name: str, cells: list[str]) -> None:
        table.add_row(name, *cells)

    dones = [d for _, d in rows]
    line("mode", [str(d.get("mode", "")) for d in dones])
    line("total time", [fmt_seconds(d["total_seconds"]) for d in dones])
    line("downtime", [fmt_seconds(d["downtime"]) for d in dones])
    line("rounds", [str(d["rounds"]) for d in dones])
    line("bytes on the wire", [human_size(d["bytes_on_wire"]) for d in dones])
    line("pages moved", [str(d["pages_moved"]) for d in dones])
    line("pages copied", [str(d["pages_copied"]) for d in dones])
    line("zero pages", [str(d["pages_zero"]) for d in dones])
    line("digests", [str(d.get("digest", "")) for d in dones])
    if any("verified" in d for d in dones):
        line("guest's own check", [str(d.get("verified", "-")) for d in dones])
    return table
