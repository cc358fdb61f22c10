"""The ``pageflip`` command: probe the kernel, benchmark handoffs, run the demo.

Subcommands (``pageflip --help``)::

    pageflip probe [--json]                      which kernel features work here
    pageflip workload --control PATH [...]       start the reference workload (a guest)
    pageflip incoming --listen ADDR [...]        wait for a migrating guest, then host it
    pageflip migrate --to ADDR --mode MODE       migrate the guest at --control to ADDR
    pageflip status | verify | stop              ask the guest at --control
    pageflip bench handoff --size 1G [...]       time every way to hand N bytes over
    pageflip bench migrate [...]                 migration matrix: sizes x dirty rates x modes
    pageflip demo                                a 1 GiB workload migrated by flip and precopy
    pageflip demo handoff [--size 1G]            move, then copy, 1 GiB between two processes

Socket paths default from the environment: PAGEFLIP_CONTROL (a guest's control socket) and
PAGEFLIP_LISTEN (where ``incoming`` listens).

Errors pageflip raises on purpose (:class:`pageflip.PageflipError`) end the command with
``Type: message`` on stderr and exit status 1; anything else is a bug and shows a traceback.
Progress and colour go to stderr (rich), so that ``--json`` output on stdout stays clean.
The library itself never prints: everything here is the command line's.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import pageflip

from .bench import format_size, human_size, parse_size
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
    _DurationType = click.ParamType[float]
else:  # click before 8.3 has no type parameters
    _ParamType = click.ParamType
    _DurationType = click.ParamType


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


def _report_options(command: Any) -> Any:
    """The options every benchmark shares: how to report, and whether to show progress."""
    for option in reversed(
        [
            click.option("--json", "as_json", is_flag=True, help="Print the results as JSON."),
            click.option("--markdown", is_flag=True, help="Print the tables as Markdown."),
            click.option(
                "--output",
                type=click.Path(dir_okay=False, path_type=Path),
                help="Also write the JSON results to this file.",
            ),
            click.option(
                "--progress/--no-progress",
                default=True,
                show_default=True,
                help="Show progress on stderr.",
            ),
        ]
    ):
        command = option(command)
    return command


def _with_progress(show: bool, label: str, run: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    """``run(on_progress)`` under a progress bar on stderr (or ``run(None)``). When stderr is
    not a terminal (a log file, CI), each step is a plain line there instead."""
    if not show:
        return run(None)
    console = _stderr_console()
    if not console.is_terminal:
        started = time.monotonic()

        def print_line(done: int, total: int, what: str) -> None:
            elapsed = time.monotonic() - started
            click.echo(f"{label}: {done}/{total} [{elapsed:6.0f} s] {what}", err=True)

        return run(print_line)
    with Progress(
        TextColumn(f"[bold]{escape(label)}[/]"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("starting", total=None)

        def on_progress(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, description=what)

        return run(on_progress)


def _machine_line(result: dict[str, Any]) -> str:
    """Date and machine of a benchmark result, for a table's caption."""
    machine = result["machine"]
    return (
        f"{result['date']} · Linux {machine['kernel']} · {machine.get('cpus')} x "
        f"{machine.get('cpu')} · {machine.get('memory_gib')} GiB"
    )


def _targets_table(title: str, rows: Iterable[tuple[str, str, bool | None]]) -> Table:
    """A benchmark's speed targets, each with what was measured and whether it was met."""
    table = Table(title=title)
    table.add_column("target")
    table.add_column("measured")
    table.add_column("met")
    for text, measured, passed in rows:
        verdict = "[dim]n/a[/]" if passed is None else ("[green]yes[/]" if passed else "[red]no[/]")
        table.add_row(escape(text), escape(measured), verdict)
    return table


def _write_json(output: Path | None, text: str) -> None:
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text + "\n")


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
@_report_options
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
    result = _with_progress(
        progress,
        f"handoff {format_size(config.nbytes)}",
        lambda on_progress: bench_handoff.run(config, on_progress),
    )
    text = json.dumps(result, indent=2)
    _write_json(output, text)
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
    table = Table(
        title=f"handoff of {result['size_label']}: median of {result['repeat']}",
        caption=(
            f"{_machine_line(result)}\n"
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
    console.print(
        _targets_table("speed targets (from the numbers above)", bench_handoff.target_rows(result))
    )
    over = result["overhead"]
    if over:
        console.print(
            f"one-page round trips ({over['rounds']}): median "
            f"{over['round_trip_median_us']:.0f} us (p10 {over['round_trip_p10_us']:.0f}, p90 "
            f"{over['round_trip_p90_us']:.0f}); CPU per call: gift "
            f"{over['gift_cpu_median_us']:.0f} us, receive {over['receive_cpu_median_us']:.0f} us"
        )


# -- guests and migration ----------------------------------------------------------------


def _default_control() -> str:
    return os.environ.get("PAGEFLIP_CONTROL", "/tmp/pageflip-workload.sock")


class Duration(_DurationType):
    """Seconds, or a number with ``ms``, ``s`` or ``us``: ``300ms``, ``0.3``, ``2s``."""

    name = "duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, (int, float)):
            return float(value)
        text = str(value).strip().lower()
        scale = 1.0
        for suffix, factor in (("ms", 1e-3), ("us", 1e-6), ("s", 1.0)):
            if text.endswith(suffix):
                text, scale = text[: -len(suffix)], factor
                break
        try:
            seconds = float(text) * scale
        except ValueError:
            self.fail(f"{value!r} is not a duration (e.g. 300ms, 0.5s)", param, ctx)
        if seconds <= 0:
            self.fail(f"{value!r} must be positive", param, ctx)
        return seconds


DURATION = Duration()

_control_option = click.option(
    "--control",
    default=_default_control,
    show_default="$PAGEFLIP_CONTROL or /tmp/pageflip-workload.sock",
    help="The guest's control socket.",
)


def _emit(as_json: bool, event: dict[str, Any], text: str) -> None:
    if as_json:
        click.echo(json.dumps(event), nl=True)
        sys.stdout.flush()
    else:
        _stderr_console().print(text)


def _host_until_gone(host: Any, as_json: bool) -> None:
    """Serve the guest until it leaves (migrated away, stopped) or we are told to end."""
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.is_set() and not host.wait(0.2):
            pass
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        outcome = host.outcome
        host.close()
    _emit(as_json, {"event": "exit", "outcome": outcome}, f"guest {outcome}; host exiting")


@main.command()
@click.option("--size", type=SIZE, default="1G", show_default=True, help="Bytes of memory.")
@click.option(
    "--dirty-rate",
    type=SIZE,
    default="256M",
    show_default=True,
    help="Bytes per second the worker threads rewrite (0: idle).",
)
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@_control_option
@click.option("--json", "as_json", is_flag=True, help="Print events as JSON lines on stdout.")
def workload(
    size: int, dirty_rate: int, threads: int, seed: int, control: str, as_json: bool
) -> None:
    """Start the reference workload and serve it on --control until it migrates away.

    It fills SIZE bytes of movable memory with incompressible pages, then its worker threads
    rewrite random pages at --dirty-rate, journalling every write, so that after any
    migration `pageflip verify` can prove that no write made before the pause was lost.
    """
    from .guests import Workload
    from .migration.host import GuestHost

    console = _stderr_console()
    with Progress(
        TextColumn(f"[bold]filling {format_size(size)}[/]"),
        BarColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("fill", total=size)
        guest = Workload.create(
            size,
            dirty_rate=dirty_rate,
            threads=threads,
            seed=seed,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    try:
        host = GuestHost(guest, control)
    except BaseException:
        guest.close()
        raise
    _emit(
        as_json,
        {"event": "ready", "control": control, "pid": os.getpid(), "size": guest.size},
        f"workload of {human_size(guest.size)} at {human_size(dirty_rate)}/s, "
        f"control socket {control} (pid {os.getpid()})",
    )
    _host_until_gone(host, as_json)


@main.command()
@click.option(
    "--listen",
    envvar="PAGEFLIP_LISTEN",
    required=True,
    help="Where to wait for the source: /path, @abstract or tcp:HOST:PORT.",
)
@_control_option
@click.option(
    "--timeout",
    type=DURATION,
    default="60s",
    show_default=True,
    help="Longest silence from the source before giving up.",
)
@click.option("--json", "as_json", is_flag=True, help="Print events as JSON lines on stdout.")
def incoming(listen: str, control: str, timeout: float, as_json: bool) -> None:
    """Wait on --listen for one migrating guest, run it, then serve it on --control."""
    from .migration.destination import Destination
    from .migration.host import GuestHost

    def on_event(event: Any) -> None:
        data = event.as_dict()
        _emit(as_json, data, f"incoming: {event.kind} {_event_text(data)}")

    destination = Destination(listen, on_event=on_event, timeout=timeout)
    _emit(
        as_json,
        {"event": "listening", "listen": listen, "pid": os.getpid()},
        f"waiting for a guest on {listen} (pid {os.getpid()})",
    )
    guest = destination.run()
    try:
        host = GuestHost(guest, control)
    except BaseException:
        guest.close()
        raise
    _emit(
        as_json,
        {"event": "running", "control": control, "pid": os.getpid()},
        f"the guest runs here; control socket {control}",
    )
    _host_until_gone(host, as_json)


def _event_text(event: dict[str, Any]) -> str:
    from .display import fmt_seconds

    kind = event.get("event")
    if kind == "resumed":
        return f"downtime {fmt_seconds(event['downtime'])}"
    if kind == "done":
        return (
            f"{event['mode']} in {fmt_seconds(event['total_seconds'])}, digests {event['digest']}"
        )
    if kind == "failed":
        return f"in {event['phase']}: {event['error']}"
    if kind == "setup":
        return f"{event['mode']} of {human_size(event['total_bytes'])}"
    return ""


@main.command()
@_control_option
@click.option("--to", "to", required=True, help="The destination: /path, @name or tcp:HOST:PORT.")
@click.option(
    "--mode",
    type=click.Choice(["auto", "flip", "precopy", "postcopy"]),
    default="auto",
    show_default=True,
    help="auto: flip when local and movable, else precopy.",
)
@click.option(
    "--downtime-limit",
    type=DURATION,
    default="300ms",
    show_default=True,
    help="Longest pause precopy may cause; it switches over at 3/5 of it expected.",
)
@click.option(
    "--max-bandwidth", type=SIZE, default=None, help="Bytes per second (default: no cap)."
)
@click.option("--max-rounds", type=click.IntRange(min=1), default=30, show_default=True)
@click.option(
    "--on-no-convergence",
    type=click.Choice(["force", "postcopy"]),
    default="force",
    show_default=True,
    help="After --max-rounds: switch over anyway, or go postcopy.",
)
@click.option(
    "--postcopy-after-rounds",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Precopy rounds before a postcopy switchover.",
)
@click.option("--compress", type=click.IntRange(1, 22), default=None, help="zstd level (TCP).")
@click.option("--json", "as_json", is_flag=True, help="Print every event as a JSON line.")
def migrate(
    control: str,
    to: str,
    mode: str,
    downtime_limit: float,
    max_bandwidth: int | None,
    max_rounds: int,
    on_no_convergence: str,
    postcopy_after_rounds: int,
    compress: int | None,
    as_json: bool,
) -> None:
    """Migrate the guest served at --control to the destination at --to.

    Prints a live progress display (or JSON lines with --json) and ends with the report:
    total time, downtime, bytes on the wire, pages moved, copied and zero, rounds.
    """
    from .display import MigrationDisplay, summary_table
    from .errors import MigrationError
    from .migration.host import ControlClient

    options: dict[str, Any] = {
        "mode": mode,
        "downtime_limit": downtime_limit,
        "max_bandwidth": max_bandwidth,
        "max_rounds": max_rounds,
        "on_no_convergence": on_no_convergence,
        "postcopy_after_rounds": postcopy_after_rounds,
        "compress": compress,
    }
    last: dict[str, Any] = {}
    with ControlClient(control) as client:
        if as_json:
            for event in client.migrate(to, **options):
                click.echo(json.dumps(event))
                sys.stdout.flush()
                last = event
        else:
            with MigrationDisplay(_stderr_console(), title=f"{control} -> {to}") as view:
                for event in client.migrate(to, **options):
                    view.event(event)
                    last = event
            if view.done is not None:
                Console().print(summary_table([(view.done["mode"], view.done)], "migration"))
    if last.get("event") == "failed":
        raise MigrationError(
            f"failed in phase {last['phase']} ({last['error_type']}: {last['error']}); "
            f"the guest runs on the {last['guest']}",
            phase=last["phase"],
            guest=last["guest"],
        )


@main.command()
@_control_option
@click.option("--json", "as_json", is_flag=True)
def status(control: str, as_json: bool) -> None:
    """Show the status of the guest at --control."""
    from .migration.host import ControlClient

    with ControlClient(control) as client:
        answer = client.request("status")
    if as_json:
        click.echo(json.dumps(answer))
        return
    table = Table(title=f"guest at {control} (pid {answer['pid']})")
    table.add_column("")
    table.add_column("")
    for key, value in answer["status"].items():
        table.add_row(escape(str(key)), escape(str(value)))
    Console().print(table)


@main.command()
@_control_option
@click.option("--json", "as_json", is_flag=True)
def verify(control: str, as_json: bool) -> None:
    """Ask the guest at --control to check its memory; exit 1 if it found a problem."""
    from .migration.host import ControlClient

    with ControlClient(control, timeout=None) as client:
        report = client.request("verify")["report"]
    if as_json:
        click.echo(json.dumps(report))
    else:
        verdict = "[green]ok[/]" if report["ok"] else "[red]PROBLEMS[/]"
        Console().print(
            f"{verdict}: {report['pages_checked']} pages checked, {report['pages_skipped']} "
            f"skipped (being written), in {report['seconds']:.2f} s"
        )
        for problem in report["problems"]:
            Console().print(f"  [red]-[/] {escape(problem)}")
    if not report["ok"]:
        sys.exit(1)


@main.command()
@_control_option
def stop(control: str) -> None:
    """Stop the guest at --control (its host process exits)."""
    from .migration.host import ControlClient

    with ControlClient(control) as client:
        client.request("quit")


# -- bench migrate (after DURATION, which its options use) ------------------------------------


@bench.command(name="migrate")
@click.option(
    "--sizes",
    default="256M,1G,4G",
    show_default=True,
    metavar="SIZE[,SIZE...]",
    help="Guest memory sizes.",
)
@click.option(
    "--rates",
    default="0,64M,256M",
    show_default=True,
    metavar="RATE[,RATE...]",
    help="Dirty rates, bytes per second (0: idle).",
)
@click.option(
    "--modes",
    default="flip,precopy,postcopy",
    show_default=True,
    metavar="MODE[,MODE...]",
    help="Migration modes.",
)
@click.option(
    "--repeat",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Runs of each (size, rate, mode), interleaved; tables show the median.",
)
@click.option(
    "--downtime-limit",
    type=DURATION,
    default="300ms",
    show_default=True,
    help="Precopy's downtime limit.",
)
@click.option(
    "--warmup",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Seconds between the workload's fill and the migration.",
)
@click.option(
    "--settle",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Seconds between runs (15 or more: cold memory, see KERNEL-NOTES).",
)
@click.option(
    "--prewarm/--no-prewarm",
    default=True,
    show_default=True,
    help="Touch and free the guest's size of memory before each migration (warm memory); "
    "--no-prewarm with --settle 15 gives cold runs.",
)
@_report_options
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also draw downtime and total time against size into this PNG (needs matplotlib).",
)
def bench_migrate(
    sizes: str,
    rates: str,
    modes: str,
    repeat: int,
    downtime_limit: float,
    warmup: float,
    settle: float,
    prewarm: bool,
    as_json: bool,
    markdown: bool,
    output: Path | None,
    plot_path: Path | None,
    progress: bool,
) -> None:
    """Migrate a running workload for every (size, dirty rate, mode) and compare.

    Each run starts a destination and a source process; the source fills a workload of
    SIZE bytes whose threads rewrite pages at RATE, waits --warmup seconds, and migrates it
    by flip, precopy or postcopy; the destination checks that no write was lost (a run
    that fails the check is an error). Recorded per run: total time, downtime, bytes on
    the wire, pages moved/copied, rounds, postcopy fault times, and the peak memory (Pss)
    of source and destination together. Runs are interleaved; the targets table is
    computed from the measured numbers.
    """
    from .bench import migrate as bench_migrate_module

    def split(text: str) -> list[str]:
        return [part.strip() for part in text.split(",") if part.strip()]

    try:
        size_list = tuple(SIZE.convert(v, None, None) for v in split(sizes))
    except click.BadParameter as err:
        raise click.BadParameter(err.message, param_hint="--sizes") from None
    rate_list = []
    for value in split(rates):
        text = value.lower().removesuffix("/s")
        if text in ("0", "idle"):
            rate_list.append(0)
            continue
        try:
            rate_list.append(SIZE.convert(text, None, None))
        except click.BadParameter as err:
            raise click.BadParameter(err.message, param_hint="--rates") from None
    try:
        config = bench_migrate_module.MigrateConfig(
            sizes=size_list,
            rates=tuple(rate_list),
            modes=tuple(split(modes)),
            repeat=repeat,
            downtime_limit=downtime_limit,
            warmup=warmup,
            settle=settle,
            prewarm=prewarm,
        )
    except ValueError as err:
        raise click.BadParameter(str(err)) from None
    if plot_path is not None:
        bench_migrate_module.check_plot()  # before a long run, not after it
    console = _stderr_console()
    try:
        result = _with_progress(
            progress,
            "migrate",
            lambda on_progress: bench_migrate_module.run(config, on_progress),
        )
    except bench_migrate_module.MigrateBenchmarkError as err:
        if output is not None and err.partial is not None:
            _write_json(output, json.dumps(err.partial, indent=2))
            console.print(f"results of the runs before the failure written to {output}")
        raise click.ClickException(f"MigrateBenchmarkError: {err}") from None
    text = json.dumps(result, indent=2, allow_nan=False)
    _write_json(output, text)
    if plot_path is not None:
        bench_migrate_module.plot(result, plot_path)
    if as_json:
        click.echo(text)
    elif markdown:
        click.echo(bench_migrate_module.markdown_table(result), nl=False)
    else:
        out = Console()
        shown = (
            "size",
            "dirty rate",
            "mode",
            "total",
            "downtime",
            "on the wire",
            "peak memory (x guest)",
            "rounds",
            "verified",
            "faults: n, median / p99",
        )
        picks = [bench_migrate_module.COLUMNS.index(name) for name in shown]
        table = Table(
            title=f"migration matrix: median of {result['config']['repeat']}",
            caption=f"{_machine_line(result)}\n"
            "all columns: --markdown; every run and event: --json",
        )
        for i, name in enumerate(shown):
            table.add_column(name, justify="left" if i < 3 else "right")
        for cells in bench_migrate_module.cell_rows(result):
            table.add_row(*(escape(cells[i]) for i in picks))
        out.print(table)
        out.print(
            _targets_table(
                "targets (from the numbers above)", bench_migrate_module.target_rows(result)
            )
        )
    if output is not None:
        console.print(f"results written to {output}")
    if plot_path is not None:
        console.print(f"plot written to {plot_path}")


# -- demo -------------------------------------------------------------------------------------


@main.group(invoke_without_command=True)
@click.option("--size", type=SIZE, default="1G", show_default=True, help="Guest memory.")
@click.option("--dirty-rate", type=SIZE, default="256M", show_default=True)
@click.pass_context
def demo(ctx: click.Context, size: int, dirty_rate: int) -> None:
    """Migrate a running 1 GiB workload twice: by flip, then by precopy, each verified.

    Three processes: the workload, and two `pageflip incoming` destinations; the guest
    goes from the first to the second by flip (its pages move) and on to the third by
    precopy (its pages are copied while it keeps writing), and checks after each move that
    no write was lost. A side-by-side summary ends it.
    """
    if ctx.invoked_subcommand is not None:
        return
    from .demo_migration import run_migration_demo

    if not run_migration_demo(size, dirty_rate, console=Console()):
        sys.exit(1)


@demo.command(name="handoff")
@click.option(
    "--size",
    type=SIZE,
    default="1G",
    show_default=True,
    help="Bytes of the numpy array to hand over.",
)
def demo_handoff(size: int) -> None:
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
