"""The ``pageflip`` command: probe the kernel, benchmark handoffs, run the demo.

Subcommands (``pageflip --help``)::

    pageflip probe [--json]                      which kernel features work here
    pageflip bench handoff --size 1G [...]       time every way to hand N bytes over
    pageflip demo [--size 1G]                    move, then copy, 1 GiB between two processes

Errors pageflip raises on purpose (:class:`pageflip.PageflipError`) end the command with
``Type: message`` on stderr and exit status 1; anything else is a bug and shows a traceback.
Progress and colour go to stderr (rich), so that ``--json`` output on stdout stays clean.
The library itself never prints: everything here is the command line's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import pageflip

from .bench import format_size, parse_size
from .errors import PageflipError

__all__ = ["main"]


class _Group(click.Group):
    """A click group that turns a PageflipError into ``Type: message`` and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PageflipError as err:
            click.echo(f"{type(err).__name__}: {err}", err=True)
            ctx.exit(1)


if TYPE_CHECKING:
    _ParamType = click.ParamType[int]
else:  # click before 8.3 has no type parameters
    _ParamType = click.ParamType


class Size(_ParamType):
    """A byte count with an optional K, M, G or T suffix (powers of 1024): ``64M``, ``1G``."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except ValueError as err:
            self.fail(str(err), param, ctx)


SIZE = Size()


def _stderr_console() -> Console:
    return Console(stderr=True)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(pageflip.__version__, prog_name="pageflip")
def main() -> None:
    """Move memory between Linux processes without copying it."""


# -- probe ------------------------------------------------------------------------------------


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


# -- bench ------------------------------------------------------------------------------------


@main.group()
def bench() -> None:
    """Benchmarks that run real processes and report JSON."""


def _split_methods(values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(m.strip() for value in values for m in value.split(",") if m.strip())


@bench.command()
@click.option("--size", type=SIZE, default="1G", show_default=True, help="Bytes to hand over.")
@click.option(
    "--repeat",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Runs of each method (interleaved); the median is reported.",
)
@click.option(
    "--methods",
    multiple=True,
    metavar="M[,M...]",
    help="Methods to run (default: all). Repeat the option or separate by commas.",
)
@click.option(
    "--overhead-rounds",
    type=click.IntRange(min=0),
    default=1000,
    show_default=True,
    help="One-page gift + receive round trips for the overhead figure (0: skip).",
)
@click.option(
    "--touch-threads",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Threads that touch the moved pages (0: two if there are two CPUs).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
@click.option("--markdown", is_flag=True, help="Print the tables as Markdown on stdout.")
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the JSON results to this file.",
)
@click.option(
    "--progress/--no-progress", default=True, show_default=True, help="Show progress on stderr."
)
def handoff(
    size: int,
    repeat: int,
    methods: tuple[str, ...],
    overhead_rounds: int,
    touch_threads: int,
    as_json: bool,
    markdown: bool,
    output: Path | None,
    progress: bool,
) -> None:
    """Time handing SIZE bytes to another process: a move against every copy path.

    Methods: move, process_vm_readv, vmsplice-gift, vmsplice, stream (warm targets), the
    same copies into fresh memory (*-fresh), shared-memory and pickle-pipe. Each runs
    between two real processes; access time is until the receiver holds the data, "all
    pages" until every page was touched too. Ratios are to the move; copy rates are a
    fraction of a single-thread memcpy measured in the same run.
    """
    from .bench import handoff as bench_handoff

    chosen = _split_methods(methods) or bench_handoff.DEFAULT_METHODS
    unknown = [m for m in chosen if m not in bench_handoff.DEFAULT_METHODS]
    if unknown:
        raise click.BadParameter(
            f"unknown {', '.join(unknown)}; choose from {', '.join(bench_handoff.DEFAULT_METHODS)}",
            param_hint="--methods",
        )
    try:
        config = bench_handoff.HandoffConfig(
            size=size,
            repeat=repeat,
            methods=chosen,
            overhead_rounds=overhead_rounds,
            touch_threads=touch_threads,
        )
    except ValueError as err:
        raise click.BadParameter(str(err)) from None
    console = _stderr_console()
    if progress:
        with Progress(
            TextColumn("[bold]handoff {task.fields[size]}[/]"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=console,
            transient=True,
        ) as bar:
            task = bar.add_task("starting", total=None, size=format_size(config.nbytes))

            def on_progress(done: int, total: int, what: str) -> None:
                bar.update(task, completed=done, total=total, description=what)

            result = bench_handoff.run(config, on_progress)
    else:
        result = bench_handoff.run(config)
    text = json.dumps(result, indent=2)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text + "\n")
    if as_json:
        click.echo(text)
    elif markdown:
        click.echo(bench_handoff.markdown_table(result), nl=False)
    else:
        _print_handoff(result)
    if output is not None:
        console.print(f"results written to {output}")


def _print_handoff(result: dict[str, Any]) -> None:
    from .bench import handoff as bench_handoff

    console = Console()
    machine = result["machine"]
    table = Table(
        title=f"handoff of {result['size_label']}: median of {result['repeat']}",
        caption=(
            f"{result['date']} · Linux {machine['kernel']} · {machine.get('cpus')} x "
            f"{machine.get('cpu')} · {machine.get('memory_gib')} GiB\n"
            f"warm: already-touched target · fresh: allocated by the handoff · mapped: the "
            f"sender's pages\nall pages: for the move, plus {result['notes']['touch']}"
        ),
    )
    for i, name in enumerate(bench_handoff.COLUMNS):
        table.add_column(name, justify="left" if i < 2 else "right", no_wrap=i == 0)
    rows = bench_handoff.table_rows(result)
    for cells in rows:
        style = "bold green" if cells[0] == "move" else ("dim" if "reference" in cells[0] else "")
        table.add_row(*map(escape, cells), style=style)
    console.print(table)
    for row in result["results"].values():
        if row["semantics"] == "move":
            console.print(
                f"{row['key']}: fastest of {result['repeat']}: access "
                f"{row['access_min'] * 1e3:.2f} ms, every page {row['touched_min'] * 1e3:.1f} ms"
            )
    targets = Table(title="speed targets (from the numbers above)")
    targets.add_column("target")
    targets.add_column("measured")
    targets.add_column("met")
    for text, measured, passed in bench_handoff.target_rows(result):
        verdict = "[dim]n/a[/]" if passed is None else ("[green]yes[/]" if passed else "[red]no[/]")
        targets.add_row(escape(text), escape(measured), verdict)
    console.print(targets)
    over = result["overhead"]
    if over:
        console.print(
            f"one-page round trips ({over['rounds']}): median "
            f"{over['round_trip_median_us']:.0f} us (p10 {over['round_trip_p10_us']:.0f}, p90 "
            f"{over['round_trip_p90_us']:.0f}); CPU per call: gift "
            f"{over['gift_cpu_median_us']:.0f} us, receive {over['receive_cpu_median_us']:.0f} us"
        )


# -- demo -------------------------------------------------------------------------------------


@main.command()
@click.option(
    "--size",
    type=SIZE,
    default="1G",
    show_default=True,
    help="Bytes of the numpy array to hand over.",
)
def demo(size: int) -> None:
    """Move a numpy array to another process (same physical pages), then copy one.

    A child process receives SIZE bytes twice: first by a move (gift), then by a copy
    (send). It verifies the data each time and, as root, compares physical frame numbers.
    """
    from .demo import run_demo

    result = run_demo(size, console=Console())
    if not result.verified:
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
