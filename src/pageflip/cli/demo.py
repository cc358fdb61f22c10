"""``pageflip demo``: the ``make demo`` job, and a handoff of a numpy array."""

from __future__ import annotations

import sys

import click
from rich.console import Console

from ._base import RATE, SIZE, main


@main.group(invoke_without_command=True)
@click.option("--size", type=SIZE, default="1G", show_default=True, help="Guest memory.")
@click.option(
    "--dirty-rate",
    type=RATE,
    default="256M",
    show_default=True,
    help="Bytes per second the workload's threads rewrite while it migrates (0: idle).",
)
@click.pass_context
def demo(ctx: click.Context, size: int, dirty_rate: int) -> None:
    """Migrate a running 1 GiB workload by flip, then by precopy; live-update a service.

    Three processes: the workload, and two `pageflip incoming` destinations; the guest
    goes from the first to the second by flip (its pages move) and on to the third by
    precopy (its pages are copied while it keeps writing), and checks after each move that
    no write was lost. A side-by-side summary follows. Then an HTTP service holding an
    index of SIZE (at most 256 MiB; examples/live_service) is upgraded twice under load by
    `pageflip upgrade`: its memory and listening socket change owner, and no request may
    fail.
    """
    if ctx.invoked_subcommand is not None:
        return
    from ..demo_live import run_live_demo
    from ..demo_migration import run_migration_demo

    console = Console()
    if not run_migration_demo(size, dirty_rate, console=console):
        sys.exit(1)
    if not run_live_demo(console, min(size, 256 << 20)):
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
    from ..demo import run_demo

    result = run_demo(size, console=Console())
    if not result.verified:
        sys.exit(1)
