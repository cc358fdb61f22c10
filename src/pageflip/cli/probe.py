"""``pageflip probe``: which kernel features work here, and why others do not."""

from __future__ import annotations

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import pageflip

from ._base import main


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def probe(as_json: bool) -> None:
    """Show which kernel features pageflip can use here, and why others are missing."""
    report = pageflip.probe()
    if as_json:
        click.echo(report.to_json())
        return
    table = Table(
        title=f"pageflip {pageflip.__version__} on Linux {report.kernel} ({report.machine})"
    )
    table.add_column("feature", style="bold", no_wrap=True)
    table.add_column("available")
    table.add_column("detail")
    table.add_column("purpose", style="dim")
    for feature in report.values():
        mark = "[green]yes[/]" if feature.available else "[red]no[/]"
        table.add_row(escape(feature.name), mark, escape(feature.detail), escape(feature.purpose))
    Console().print(table)
