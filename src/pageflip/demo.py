"""``pageflip demo``: hand a numpy array to another process, first by a move, then by a copy.

What it shows, with two real processes:

1. This process fills a numpy array in a :meth:`Region.movable <pageflip.Region.movable>`
   with a verifiable pattern and gifts it (:meth:`Channel.gift <pageflip.Channel.gift>`).
   The child receives it (:meth:`Channel.receive <pageflip.Channel.receive>`), checks every
   word and the xxh3 digest, and, as root, reads the physical frame numbers of its pages: they
   are the very frames this process filled. Nothing was copied.
2. The same with copy semantics: :meth:`Channel.send <pageflip.Channel.send>` of an
   anonymous region into the child's ``receive()``, verified again; the frames differ.

Both :class:`~pageflip.Transfer` reports are printed (the sender's: from the offer until the
receiver answered), with the ratio of their times. :func:`run_demo` is what the CLI calls;
it cleans up the child, the channel and every region whatever happens.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing import connection as mp_connection
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import numpy.typing as npt
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from . import channel_pair
from ._children import Child, raise_failure, serve, stop_on_signals
from .bench.pattern import fill, verify
from .channel import Channel, Transfer
from .errors import DemoError, FeatureUnavailable, PageflipError
from .memory import PAGE_SIZE, Region, physical_frames
from .units import format_size

__all__ = ["DemoError", "DemoResult", "PhaseResult", "run_demo"]

#: Seeds of the pattern in the move and the copy phase (different, so stale data shows).
MOVE_SEED = 0x00C0FFEE
COPY_SEED = 0x0BADCAFE
#: Longest wait for the child at any one step (seconds).
STEP_TIMEOUT = 600.0

Frames = npt.NDArray[np.uint64]


@dataclass(frozen=True)
class PhaseResult:
    """What one handover (move or copy) did and what the receiver found."""

    #: ``"move"`` or ``"copy"``.
    phase: str
    #: The sender's report: from the offer until the receiver answered.
    transfer: Transfer
    #: The receiver's report (its time includes waiting for the offer).
    received: Transfer
    #: Words that differ from the pattern (0: every word arrived right).
    wrong_words: int
    #: Whether the receiver's xxh3 digest equals the sender's.
    digest_match: bool
    #: Pages whose physical frame is the same on both sides; None when not checked.
    same_frames: int | None
    #: Pages compared.
    pages: int

    @property
    def verified(self) -> bool:
        """True when every word matched the pattern and the digests agree."""
        return self.wrong_words == 0 and self.digest_match


@dataclass(frozen=True)
class DemoResult:
    """Both phases of the demo, and why frames were not compared (if they were not)."""

    size: int
    move: PhaseResult
    copy: PhaseResult
    #: Why physical frames were not compared (None: they were).
    frames_skipped: str | None

    @property
    def verified(self) -> bool:
        """True when both handovers delivered the data intact."""
        return self.move.verified and self.copy.verified

    @property
    def speed_ratio(self) -> float:
        """How many times longer the copy took than the move (sender-side times)."""
        return self.copy.transfer.seconds / max(self.move.transfer.seconds, 1e-9)


# -- the receiving child ----------------------------------------------------------------------


def _frames(obj: Region) -> Frames | str:
    """Physical frames of ``obj``'s pages, or why they cannot be read here."""
    if os.geteuid() != 0:
        return "physical frame numbers need root (CAP_SYS_ADMIN)"
    try:
        return physical_frames(obj)
    except FeatureUnavailable as err:
        return str(err)


def _child_main(ctrl: Connection, channel: Channel) -> None:
    """The receiving process: receive, verify and report, once per phase."""
    stop_on_signals()
    try:
        serve(ctrl, lambda command, seed: _receive_and_check(channel, ctrl, seed), "result")
    finally:
        channel.close()
        ctrl.close()


def _receive_and_check(channel: Channel, ctrl: Connection, seed: int) -> dict[str, Any]:
    region, transfer = channel.receive()
    try:
        words = region.numpy(np.uint64)
        wrong, digest = verify(words, seed, on_chunk=lambda n: ctrl.send(("progress", n)))
        del words
        frames = _frames(region)  # every page was read just now: all present
        return {"transfer": transfer, "wrong": wrong, "digest": digest, "frames": frames}
    finally:
        region.close()


# -- the sending side (this process) ----------------------------------------------------------


class _Child(Child):
    """The receiving child process and the pipe that talks to it."""

    def __init__(self, channel: Channel) -> None:
        super().__init__(
            multiprocessing.get_context("spawn"),
            _child_main,
            (channel,),
            role="receiver",
            name="pageflip-demo-receiver",
            daemon=False,
        )

    def messages(self) -> Iterator[tuple[Any, ...]]:
        """Messages from the child until it stops; errors raise, death raises DemoError."""
        while True:
            ready = mp_connection.wait([self.conn, self.process.sentinel], STEP_TIMEOUT)
            if not ready:
                raise DemoError(f"the receiver did not answer within {STEP_TIMEOUT:.0f} s")
            if self.conn not in ready and not self.conn.poll():
                self.process.join(1)
                raise DemoError(f"the receiver died (exit code {self.process.exitcode})")
            try:
                message: tuple[Any, ...] = self.conn.recv()
            except EOFError:
                self.process.join(1)
                raise DemoError(f"the receiver died (exit code {self.process.exitcode})") from None
            if message[0] == "error":
                raise_failure(message, DemoError, "receiver")
            yield message

    def expect(self, kind: str) -> tuple[Any, ...]:
        for message in self.messages():
            if message[0] == kind:
                return message
        raise AssertionError("unreachable")  # pragma: no cover


def _bar(progress: Progress, text: str, total: int) -> TaskID:
    return progress.add_task(text, total=total)


def _phase(
    phase: str,
    child: _Child,
    channel: Channel,
    size: int,
    progress: Progress,
) -> tuple[PhaseResult, str | None]:
    """Fill, hand over (gift or send), and collect the child's verdict for one phase."""
    seed = MOVE_SEED if phase == "move" else COPY_SEED
    region = (
        Region.movable(size, name="demo-move")
        if phase == "move"
        else Region.anonymous(size, name="demo-copy")
    )
    try:
        task = _bar(progress, f"{phase}: fill a numpy array with the pattern", region.size)
        words = region.numpy(np.uint64)
        digest = fill(words, seed, on_chunk=lambda n: progress.update(task, completed=n))
        del words
        before = _frames(region)
        verb = "gift" if phase == "move" else "send"
        task = _bar(progress, f"{phase}: hand over ({verb})", region.size)
        child.conn.send(("receive", seed))
        transfer = channel.gift(region) if phase == "move" else channel.send(region)
        progress.update(task, completed=region.size)
        task = _bar(progress, f"{phase}: receiver verifies every word", region.size)
        report: dict[str, Any] = {}
        for message in child.messages():
            if message[0] == "progress":
                progress.update(task, completed=message[1])
            elif message[0] == "result":
                report = message[1]
                break
        pages = region.size // PAGE_SIZE
    finally:
        with contextlib.suppress(PageflipError):
            region.close()
    after = report["frames"]
    same = None
    skipped = None
    if isinstance(before, str) or isinstance(after, str):
        skipped = before if isinstance(before, str) else str(after)
    else:
        same = int(np.count_nonzero((before == after) & (before != 0)))
    result = PhaseResult(
        phase=phase,
        transfer=transfer,
        received=report["transfer"],
        wrong_words=report["wrong"],
        digest_match=report["digest"] == digest,
        same_frames=same,
        pages=pages,
    )
    return result, skipped


def run_demo(size: int = 1 << 30, *, console: Console | None = None) -> DemoResult:
    """Move, then copy, ``size`` bytes to a child process; verify both; print what happened.

    Returns the :class:`DemoResult`. Raises a PageflipError if pageflip fails, DemoError if
    the child does. The child, the channel and every region are cleaned up in every case.
    """
    console = console or Console()
    console.print(
        f"[bold]pageflip demo[/]: hand {format_size(size)} to another process, "
        "by a move and then by a copy"
    )
    a, b = channel_pair(timeout=STEP_TIMEOUT)
    child: _Child | None = None
    try:
        try:
            child = _Child(b)
        finally:
            b.close()
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            task = progress.add_task("start the receiving process", total=None)
            child.expect("ready")
            progress.remove_task(task)
            move, skipped = _phase("move", child, a, size, progress)
            copy, skipped_copy = _phase("copy", child, a, size, progress)
    finally:
        a.close()
        if child is not None:
            child.stop()
    result = DemoResult(
        size=move.transfer.nbytes, move=move, copy=copy, frames_skipped=skipped or skipped_copy
    )
    _show(result, console)
    return result


def _show(result: DemoResult, console: Console) -> None:
    table = Table(
        title=f"handing over {format_size(result.size)}",
        caption="moved/copied: pages; same frames: physical pages shared by both sides",
    )
    for name in ("", "method", "moved", "copied", "time", "data", "same frames"):
        table.add_column(name, justify="right" if name in ("moved", "copied", "time") else "left")
    for phase in (result.move, result.copy):
        t = phase.transfer
        frames = "-" if phase.same_frames is None else f"{phase.same_frames}/{phase.pages}"
        data = "[green]verified[/]" if phase.verified else f"[red]{phase.wrong_words} wrong[/]"
        table.add_row(
            phase.phase,
            escape(t.method),
            str(t.pages_moved),
            str(t.pages_copied),
            f"{t.seconds * 1e3:.2f} ms",
            data,
            frames,
        )
    console.print(table)
    console.print(f"move: {escape(str(result.move.transfer))}")
    console.print(f"copy: {escape(str(result.copy.transfer))}")
    console.print(
        f"the copy took [bold]{result.speed_ratio:.0f}x[/] as long as the move "
        "(sender's view: offer until the receiver answered)"
    )
    if result.verified:
        console.print(
            "data: [green]verified[/] both times (every 64-bit word against the pattern, "
            "and the xxh3 digests match)"
        )
    else:
        console.print("data: [red]NOT verified[/]: the receiver found wrong data")
    if result.frames_skipped is not None:
        console.print(f"physical frames: not compared ({escape(result.frames_skipped)})")
        return
    move, copy = result.move, result.copy
    if move.same_frames == move.pages and copy.same_frames == 0:
        console.print(
            f"physical frames: [green]the move kept the very same pages[/] "
            f"({move.same_frames}/{move.pages} frames identical); the copy used other "
            f"pages (0/{copy.pages} identical)"
        )
    else:
        console.print(
            f"physical frames: [red]unexpected[/]: move {move.same_frames}/{move.pages}, "
            f"copy {copy.same_frames}/{copy.pages} identical"
        )
