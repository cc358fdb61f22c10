"""``pageflip bench``: benchmarks that run real processes, report JSON, tables and targets."""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..bench.common import finite
from ..errors import BadArgument
from ..memory import HUGE_NAMES
from ..units import format_size
from ._base import DURATION, SIZE, main
from ._base import stderr_console as _stderr_console

if TYPE_CHECKING:
    from ..bench.handoff import HandoffResult
    from ..bench.live import LiveResult
    from ..bench.migrate import MigrateConfig, MigrateResult
    from ..bench.vm import VmConfig, VmResult

#: What a benchmark's run returns (its JSON-ready result).
_Result = TypeVar("_Result", bound=Mapping[str, Any])


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


def _with_progress(show: bool, label: str, run: Callable[[Any], _Result]) -> _Result:
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


def _machine_line(result: Mapping[str, Any]) -> str:
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
@click.option(
    "--huge",
    is_flag=True,
    help="Add the move on 2 MiB hugetlb pages (needs a pool holding SIZE twice over: "
    "sysctl -w vm.nr_hugepages=N, N = 2 x SIZE / 2 MiB).",
)
@_report_options
def handoff(
    size: int,
    repeat: int,
    methods: tuple[str, ...],
    overhead_rounds: int,
    touch_threads: int,
    huge: bool,
    as_json: bool,
    markdown: bool,
    output: Path | None,
    progress: bool,
) -> None:
    """Time handing SIZE bytes to another process: a move against every copy path.

    Methods: move, process_vm_readv, vmsplice-gift, vmsplice, stream (warm targets), the
    same copies into fresh memory (*-fresh), shared-memory and pickle-pipe; with --huge
    also move-huge, the move on 2 MiB hugetlb pages (the size must be whole 2 MiB pages,
    and the hugetlb pool must hold it twice over, as the sender fills the next region while
    the receiver may hold the last: sysctl -w vm.nr_hugepages=N). Each runs
    between two real processes; access time is until the receiver holds the data, "all
    pages" until every page was touched too. Ratios are to the move; copy rates are a
    fraction of a single-thread memcpy measured in the same run.
    """
    from ..bench import handoff as bench_handoff

    chosen = _split_methods(methods) or bench_handoff.DEFAULT_METHODS
    known = bench_handoff.DEFAULT_METHODS + bench_handoff.HUGE_METHODS
    unknown = [m for m in chosen if m not in known]
    if unknown:
        raise click.BadParameter(
            f"unknown {', '.join(unknown)}; choose from {', '.join(known)}",
            param_hint="--methods",
        )
    if huge and "move-huge" not in chosen:
        chosen = (*chosen, "move-huge")
    try:
        config = bench_handoff.HandoffConfig(
            size=size,
            repeat=repeat,
            methods=chosen,
            overhead_rounds=overhead_rounds,
            touch_threads=touch_threads,
        )
    except BadArgument as err:
        raise click.BadParameter(str(err)) from None
    console = _stderr_console()
    result = _with_progress(
        progress,
        f"handoff {format_size(config.nbytes)}",
        lambda on_progress: bench_handoff.run(config, on_progress),
    )
    text = json.dumps(finite(result), indent=2, allow_nan=False)
    _write_json(output, text)
    if as_json:
        click.echo(text)
    elif markdown:
        click.echo(bench_handoff.markdown_table(result), nl=False)
    else:
        _print_handoff(result)
    if output is not None:
        console.print(f"results written to {output}")


def _print_handoff(result: HandoffResult) -> None:
    from ..bench import handoff as bench_handoff

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
    help="Seconds between runs (15 or more: cold memory, see docs/kernel.md, 'Memory warmth').",
)
@click.option(
    "--prewarm/--no-prewarm",
    default=True,
    show_default=True,
    help="Touch and free the guest's size of memory before each migration (warm memory); "
    "--no-prewarm with --settle 15 gives cold runs.",
)
@click.option(
    "--huge",
    type=click.Choice(HUGE_NAMES),
    default=None,
    help="Put the workload's memory on huge pages (hugetlb needs a pool: sysctl -w "
    "vm.nr_hugepages=N). Precopy and postcopy destinations make the same kind of pages, so "
    "with them the pool must hold the size twice (a flip moves the very pages).",
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
    huge: str | None,
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
    that fails the check is an error). Recorded per run: total time, downtime and beside
    it the pause the guest itself saw, and what it sees of a pause in place with no
    migration (the control, right before each migration), bytes on the wire, pages
    moved/copied, rounds, postcopy fault times, and the peak memory (Pss) of source and
    destination together.
    Runs are interleaved; the targets table is computed from the measured numbers.
    """
    from ..bench import migrate as bench_migrate_module

    config = _migrate_config(
        sizes, rates, modes, repeat, downtime_limit, warmup, settle, prewarm, huge
    )
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
            _write_json(output, json.dumps(finite(err.partial), indent=2, allow_nan=False))
            console.print(f"results of the runs before the failure written to {output}")
        raise  # one line, MigrateBenchmarkError: ..., exit status 1 (see Group)
    text = json.dumps(finite(result), indent=2, allow_nan=False)
    _write_json(output, text)
    if plot_path is not None:
        bench_migrate_module.plot(result, plot_path)
    if as_json:
        click.echo(text)
    elif markdown:
        click.echo(bench_migrate_module.markdown_table(result), nl=False)
    else:
        _print_migrate(result)
    if output is not None:
        console.print(f"results written to {output}")
    if plot_path is not None:
        console.print(f"plot written to {plot_path}")


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _rate_list(rates: str) -> list[int]:
    """--rates: sizes per second, 0 or "idle" for none."""
    out = []
    for value in _split(rates):
        text = value.lower().removesuffix("/s")
        if text in ("0", "idle"):
            out.append(0)
            continue
        try:
            out.append(SIZE.convert(text, None, None))
        except click.BadParameter as err:
            raise click.BadParameter(err.message, param_hint="--rates") from None
    return out


def _migrate_config(
    sizes: str,
    rates: str,
    modes: str,
    repeat: int,
    downtime_limit: float,
    warmup: float,
    settle: float,
    prewarm: bool,
    huge: str | None = None,
) -> MigrateConfig:
    """The benchmark's configuration from its options (a bad one: click.BadParameter)."""
    from ..bench.migrate import MigrateConfig

    try:
        size_list = tuple(SIZE.convert(v, None, None) for v in _split(sizes))
    except click.BadParameter as err:
        raise click.BadParameter(err.message, param_hint="--sizes") from None
    try:
        return MigrateConfig(
            sizes=size_list,
            rates=tuple(_rate_list(rates)),
            modes=tuple(_split(modes)),
            repeat=repeat,
            downtime_limit=downtime_limit,
            warmup=warmup,
            settle=settle,
            prewarm=prewarm,
            huge=huge,
        )
    except BadArgument as err:
        raise click.BadParameter(str(err)) from None


#: The columns of the migration matrix the terminal table shows (--markdown: all).
_SHOWN = (
    "size",
    "dirty rate",
    "mode",
    "total",
    "downtime",
    "guest saw",
    "guest saw, paused in place",
    "on the wire",
    "peak memory (x guest)",
    "rounds",
    "verified",
    "faults: n, median / p99",
)


def _print_migrate(result: MigrateResult) -> None:
    """The matrix (medians) and the targets table, on the terminal."""
    from ..bench import migrate as bench_migrate_module

    out = Console()
    picks = [bench_migrate_module.COLUMNS.index(name) for name in _SHOWN]
    table = Table(
        title=f"migration matrix: median of {result['config']['repeat']}",
        caption=f"{_machine_line(result)}\nall columns: --markdown; every run and event: --json",
    )
    for i, name in enumerate(_SHOWN):
        table.add_column(name, justify="left" if i < 3 else "right")
    for cells in bench_migrate_module.cell_rows(result):
        table.add_row(*(escape(cells[i]) for i in picks))
    out.print(table)
    out.print(
        _targets_table("targets (from the numbers above)", bench_migrate_module.target_rows(result))
    )


# -- bench vm -------------------------------------------------------------------------------


def _default_guest_elf() -> str:
    """The project's guest ELF (built on demand by ``pageflip.vm.image``)."""
    from ..errors import VmBenchmarkError

    try:
        from ..vm.image import guest_elf  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise VmBenchmarkError(
            "no guest ELF in this version (pageflip.vm.image): give one with --guest"
        ) from None
    return str(guest_elf())


@bench.command(name="vm")
@click.option(
    "--sizes",
    default="1G,4G",
    show_default=True,
    metavar="SIZE[,SIZE...]",
    help="Guest sizes (its buffer; the VM has 256 MiB more).",
)
@click.option(
    "--rates",
    default="0,256M",
    show_default=True,
    metavar="RATE[,RATE...]",
    help="Dirty rates, bytes per second (0: idle).",
)
@click.option(
    "--modes",
    default="flip,precopy,postcopy",
    show_default=True,
    metavar="MODE[,MODE...]",
    help="pageflip's modes; QEMU runs shared (x-ignore-shared) beside flip.",
)
@click.option(
    "--systems",
    default="qemu,pageflip",
    show_default=True,
    metavar="SYSTEM[,SYSTEM]",
    help="qemu, pageflip or both.",
)
@click.option(
    "--repeat",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Runs of each (size, rate, mode, system); tables show the median.",
)
@click.option(
    "--settle",
    type=click.FloatRange(min=0),
    default=2.0,
    show_default=True,
    help="Seconds between runs.",
)
@click.option(
    "--guest-settle",
    type=click.FloatRange(min=0),
    default=2.0,
    show_default=True,
    help="Seconds the guest runs after READY before it is migrated.",
)
@click.option(
    "--guest",
    "guest_path",
    type=click.Path(exists=True, dir_okay=False),
    help="The guest ELF (default: pageflip.vm.image.guest_elf()).",
)
@click.option(
    "--guest-flavour",
    type=click.Choice(["pfguest", "miniguest"]),
    default="pfguest",
    show_default=True,
    help="How to drive the guest: its command-line keys, and whether it reports its pause.",
)
@click.option(
    "--timeout",
    type=DURATION,
    default="120s",
    show_default=True,
    help="Longest wait for one migration (a QEMU precopy still running is cancelled).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("benchmarks/results/vm"),
    show_default=True,
    help="Directory for vm.json, vm.md and (--plot) vm.png.",
)
@click.option(
    "--tick-us",
    type=click.IntRange(100, 10000),
    default=1000,
    show_default=True,
    help="The guest's loop tick (LAPIC timer period, us): a pause of D shows as a gap "
    "between D and D plus one tick, so this is the resolution of the pause the guest "
    "observes; each tick costs the host CPU (about 75 us on a PVM host).",
)
@click.option(
    "--realtime",
    is_flag=True,
    help="Both systems' vCPU threads SCHED_FIFO (priority 1), on source and destination: the "
    "host's other work then no longer shows in the guest's own gaps. Needs root, "
    "CAP_SYS_NICE or ulimit -r 1.",
)
@click.option(
    "--huge",
    type=click.Choice(["hugetlb"]),
    default=None,
    help="The guest RAM of the --huge-systems (both by default) on 2 MiB hugetlb pages: "
    "pageflip's vm run --huge hugetlb, "
    "QEMU's shared mode on a file in a hugetlbfs mount (mount -t hugetlbfs -o pagesize=2M "
    "none /dev/hugepages), its other modes on a hugetlb memfd. The pool must hold the "
    "largest VM twice for precopy and postcopy, once for flip (sysctl -w vm.nr_hugepages=N).",
)
@click.option(
    "--huge-systems",
    default="qemu,pageflip",
    show_default=True,
    metavar="SYSTEM[,SYSTEM]",
    help="Which systems --huge puts on huge pages; the other keeps 4 KiB pages (QEMU's "
    "shared mode then maps its file on /dev/shm).",
)
@click.option("--plot", "with_plot", is_flag=True, help="Also draw vm.png (needs matplotlib).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--markdown", is_flag=True, help="Print the tables as Markdown.")
@click.option(
    "--progress/--no-progress", default=True, show_default=True, help="Show progress on stderr."
)
def bench_vm(
    sizes: str,
    rates: str,
    modes: str,
    systems: str,
    repeat: int,
    settle: float,
    guest_settle: float,
    guest_path: str | None,
    guest_flavour: str,
    timeout: float,
    out_dir: Path,
    tick_us: int,
    realtime: bool,
    huge: str | None,
    huge_systems: str,
    with_plot: bool,
    as_json: bool,
    markdown: bool,
    progress: bool,
) -> None:
    """Migrate the same guest ELF with QEMU 7.2 and with pageflip's VMM, and compare.

    For every (size, rate, mode) QEMU's run and pageflip's run go back to back (which goes
    first alternates): QEMU's shared-memory mode (x-ignore-shared on a /dev/shm file) beside
    flip, QEMU's unthrottled precopy beside precopy, QEMU's postcopy beside postcopy.
    Recorded: total time and downtime as each system reports them, the pause the guest
    itself observed, the host-side heartbeat gap, switchover to running, bytes moved, peak
    memory of both processes. Writes vm.json and vm.md (and vm.png) under --out; a failed
    run is recorded and the rest go on (exit status 1 at the end). QEMU: `make qemu`.
    """
    from ..bench import vm as bench_vm_module
    from ..errors import VmBenchmarkError

    config = _vm_config(
        sizes,
        rates,
        modes,
        systems,
        repeat,
        settle,
        guest_settle,
        guest_path,
        guest_flavour,
        timeout,
        realtime,
        tick_us,
        huge,
        huge_systems,
    )
    if huge:
        _check_vm_huge(config)  # before a long run, not in each of its runs
    if realtime:
        from ..vm.machine import check_realtime

        check_realtime()  # before a long run, not in each of its runs
    if with_plot:
        bench_vm_module.check_plot()  # before a long run, not after it
    console = _stderr_console()
    result = _with_progress(
        progress, "vm", lambda on_progress: bench_vm_module.run(config, on_progress)
    )
    text = json.dumps(finite(result), indent=2, allow_nan=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / "vm.json", text)
    table = bench_vm_module.markdown_table(result)
    (out_dir / "vm.md").write_text(table)
    if with_plot:
        bench_vm_module.plot(result, out_dir / "vm.png")
    if as_json:
        click.echo(text)
    elif markdown:
        click.echo(table, nl=False)
    else:
        _print_vm(result)
    console.print(
        f"results written to {out_dir}/vm.json, vm.md" + (", vm.png" if with_plot else "")
    )
    failed = [r for r in result["runs"] if r["error"] is not None]
    if failed:
        first = failed[0]
        raise VmBenchmarkError(
            f"{len(failed)} of {len(result['runs'])} runs failed; the first (run "
            f"{first['index'] + 1}, {first['system']} {first['system_mode']}): {first['error']}"
        )


def _vm_config(
    sizes: str,
    rates: str,
    modes: str,
    systems: str,
    repeat: int,
    settle: float,
    guest_settle: float,
    guest_path: str | None,
    guest_flavour: str,
    timeout: float,
    realtime: bool = False,
    tick_us: int = 1000,
    huge: str | None = None,
    huge_systems: str = "qemu,pageflip",
) -> VmConfig:
    """The VM comparison's configuration from its options (a bad one: click.BadParameter)."""
    from ..bench.vm import FLAVOURS, GuestImage, VmConfig, VmOptions

    try:
        size_list = tuple(SIZE.convert(v, None, None) for v in _split(sizes))
    except click.BadParameter as err:
        raise click.BadParameter(err.message, param_hint="--sizes") from None
    rate_list = tuple(_rate_list(rates))
    kernel = guest_path or _default_guest_elf()
    try:
        return VmConfig(
            guest=GuestImage(kernel, FLAVOURS[guest_flavour]),
            sizes=size_list,
            rates=rate_list,
            modes=tuple(_split(modes)),
            systems=tuple(_split(systems)),
            repeat=repeat,
            settle=settle,
            options=VmOptions(
                guest_settle=guest_settle,
                timeout=timeout,
                realtime=realtime,
                tick_us=tick_us,
                huge=huge,
                huge_systems=tuple(_split(huge_systems)),
            ),
        )
    except BadArgument as err:
        raise click.BadParameter(str(err)) from None


def _check_vm_huge(config: VmConfig) -> None:
    """Huge pages for the VM comparison: a hugetlbfs mount for QEMU's shared mode, and a
    2 MiB pool that holds the largest VM as often as its modes need it (one line each)."""
    from ..bench.vm import run_order
    from ..bench.vm.qemu import hugetlbfs_dir
    from ..errors import BenchmarkError
    from ..migration import room
    from ..stream import PageKind

    specs = run_order(config)
    try:
        if any(
            s.system == "qemu" and s.system_mode == "shared" and s.options.huge_for("qemu")
            for s in specs
        ):
            hugetlbfs_dir()
    except BenchmarkError as err:
        raise click.ClickException(str(err)) from None
    most = max(
        (
            s.guest_ram * (1 if s.mode == "flip" else 2)
            for s in specs
            if s.options.huge_for(s.system)
        ),
        default=0,
    )
    why = room.huge_pages_shortfall([(PageKind.HUGETLB, most)]) if most else None
    if why is not None:
        raise click.ClickException(f"--huge hugetlb cannot run here: {why}")


def _print_vm(result: VmResult) -> None:
    """The comparison and the targets, on the terminal."""
    from ..bench import vm as bench_vm_module

    out = Console()
    table = Table(
        title=f"VM migration, QEMU / pageflip (pageflip / QEMU): median of "
        f"{result['config']['repeat']}",
        caption=f"{_machine_line(result)} · {result.get('qemu_version') or 'QEMU not run'}\n"
        "all notes: --markdown; every run: --json",
    )
    for i, name in enumerate(bench_vm_module.COLUMNS):
        table.add_column(name, justify="left" if i < 3 else "right")
    for cells in bench_vm_module.comparison_rows(result):
        table.add_row(*map(escape, cells))
    out.print(table)
    for run in result["runs"]:
        if run["error"] is not None:
            out.print(
                f"[red]run {run['index'] + 1} ({escape(run['system'])} {run['system_mode']}, "
                f"{run['size_label']} at {run['rate_label']}) failed:[/] {escape(run['error'])}"
            )
    out.print(
        _targets_table("targets (from the numbers above)", bench_vm_module.target_rows(result))
    )


# -- bench live -----------------------------------------------------------------------------


@bench.command(name="live")
@click.option(
    "--index-size", type=SIZE, default="4G", show_default=True, help="The service's index."
)
@click.option(
    "--upgrades", type=click.IntRange(min=0), default=20, show_default=True, help="Upgrades."
)
@click.option(
    "--rollbacks",
    type=click.IntRange(min=0),
    default=5,
    show_default=True,
    help="Upgrades whose new version fails at start-up (the old one must serve on).",
)
@click.option(
    "--duration",
    type=DURATION,
    default="5s",
    show_default=True,
    help="Steady load before each side's action (its p99 is the steady-state figure).",
)
@click.option(
    "--connections", type=click.IntRange(min=1), default=16, show_default=True, help="Clients."
)
@click.option(
    "--load",
    type=click.Choice(["python", "wrk"]),
    default="python",
    show_default=True,
    help="The load: pageflip's own (every request timed) or wrk (`make wrk`).",
)
@click.option(
    "--app",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The service (default: examples/live_service/app.py of this source tree).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("benchmarks/results/live"),
    show_default=True,
    help="Directory for live.json and live.md.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def bench_live(
    index_size: int,
    upgrades: int,
    rollbacks: int,
    duration: float,
    connections: int,
    load: str,
    app: Path | None,
    out_dir: Path,
    as_json: bool,
) -> None:
    """Replace a running service under load three ways and compare, in one run.

    The service (examples/live_service) answers nearest-neighbour searches over an index
    of INDEX-SIZE bytes. Plain restart: stop it, start the new one, which loads the index
    from disk. Overlap restart: the new one loads its own copy beside the old one
    (SO_REUSEPORT), then the old one drains and exits. pageflip live: `pageflip upgrade`
    --upgrades times, then --rollbacks upgrades whose new version fails at start-up
    (reported "not available" without pageflip.live). Recorded for each: time, failed
    requests, the worst latency during the change beside the steady p99, the longest time
    without a response, the service's own pause, and the peak memory (Pss) of all its
    processes against one copy. Writes live.json and live.md under --out.
    """
    from ..bench import live as bench_live_module

    try:
        config = bench_live_module.LiveConfig(
            index_size=index_size,
            upgrades=upgrades,
            rollbacks=rollbacks,
            duration=duration,
            connections=connections,
            load=load,
            app=app,
        )
    except BadArgument as err:
        raise click.BadParameter(str(err)) from None
    started = time.monotonic()

    def say(text: str) -> None:
        click.echo(f"live [{time.monotonic() - started:6.1f} s] {text}", err=True)

    argv = sys.argv[sys.argv.index("live") + 1 :] if "live" in sys.argv else []
    result = bench_live_module.run(config, say, "pageflip bench live " + shlex.join(argv))
    text = json.dumps(finite(result), indent=2, allow_nan=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / "live.json", text)
    (out_dir / "live.md").write_text(bench_live_module.markdown(result))
    if as_json:
        click.echo(text)
    else:
        _print_live(result)
    _stderr_console().print(f"results written to {out_dir}/live.json, live.md")


def _print_live(result: LiveResult) -> None:
    from ..bench import live as bench_live_module

    size = format_size(result["config"]["index_size"])
    table = Table(
        title=f"replacing a service under load: index {size}",
        caption=f"{_machine_line(result)}\nhow each figure is measured: live.md; every run: --json",
    )
    for i, name in enumerate(bench_live_module.COLUMNS):
        table.add_column(name, justify="left" if i == 0 else "right")
    for cells in bench_live_module.rows(result):
        table.add_row(*map(escape, cells))
    Console().print(table)
