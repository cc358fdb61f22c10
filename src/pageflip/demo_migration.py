"""``pageflip demo``: a running workload migrated twice, by flip and by precopy, each verified.

Three real processes, as an operator would run them by hand:

1. ``pageflip workload``: 1 GiB of memory whose worker threads keep rewriting random pages
   (256 MiB/s by default), journalling each write;
2. ``pageflip incoming`` twice, each a destination waiting on its own socket.

The guest goes from the workload process to the first destination by **flip** (its memfd
pages change owner: nothing is copied, the downtime does not depend on the size), then on
to the second by **precopy** (rounds of dirty pages while it keeps writing, then a short
pause). After each migration the guest checks its own memory (`pageflip verify`): every
write made before the pause must be there. A side-by-side table ends it. Every process and
socket file is cleaned up, also on failure or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import IO, Any

from rich.console import Console

from .display import MigrationDisplay, fmt_seconds, summary_table
from .errors import MigrationError, PageflipError, StateError
from .memory import PAGE_SIZE
from .migration.host import ControlClient
from .units import human_size

__all__ = ["run_migration_demo"]

#: Longest wait for a process to say it is ready (filling 1 GiB of cold memory is slow).
READY_TIMEOUT = 300.0
#: Longest wait for the last host to exit after it was asked to quit.
QUIT_WAIT = 10.0


class _Host:
    """One ``pageflip`` host process (workload or incoming) and its JSON lines."""

    def __init__(self, args: list[str], name: str) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pageflip", *args, "--json"],
            stdout=subprocess.PIPE,
            text=True,
        )

    def wait_for(self, event: str, timeout: float = READY_TIMEOUT) -> dict[str, Any]:
        """Read its JSON lines until ``event`` (its stderr shows its own progress)."""
        deadline = time.monotonic() + timeout
        out: IO[str] | None = self.proc.stdout
        assert out is not None
        while time.monotonic() < deadline:
            line = out.readline()
            if not line:
                raise StateError(
                    f"{self.name} exited (status {self.proc.wait()}) before '{event}'",
                    phase="demo",
                    needed=event,
                )
            message: dict[str, Any] = json.loads(line)
            if message.get("event") == event:
                return message
        raise StateError(f"{self.name} did not say '{event}' in {timeout} s", phase="demo")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@contextlib.contextmanager
def _hosts() -> Iterator[list[_Host]]:
    started: list[_Host] = []
    try:
        yield started
    finally:
        for host in started:
            host.stop()


def _migrate(console: Console, control: str, to: str, mode: str, title: str) -> dict[str, Any]:
    with ControlClient(control) as client, MigrationDisplay(console, title) as view:
        for event in client.migrate(to, mode=mode):
            view.event(event)
    if view.failed is not None or view.done is None:
        failed = view.failed or {}
        raise MigrationError(
            f"{mode} failed in {failed.get('phase')}: {failed.get('error')}",
            phase=str(failed.get("phase")),
            guest=str(failed.get("guest")),
        )
    return view.done


def _verify(console: Console, control: str) -> bool:
    with ControlClient(control, timeout=None) as client:
        report = client.request("verify")["report"]
    verdict = "[green]verified[/]" if report["ok"] else "[red]PROBLEMS[/]"
    console.print(
        f"guest's own check: {verdict}, {report['pages_checked']} pages checked "
        f"({report['pages_skipped']} being written, skipped) in {report['seconds']:.2f} s"
    )
    for problem in report["problems"]:
        console.print(f"  [red]-[/] {problem}")
    return bool(report["ok"])


def run_migration_demo(size: int, dirty_rate: int, console: Console) -> bool:
    """Run the demo; True when both migrations succeeded and the guest verified each time."""
    with tempfile.TemporaryDirectory(prefix="pageflip-demo-") as tmp, _hosts() as hosts:
        sockets = {name: os.path.join(tmp, f"{name}.sock") for name in ("a", "b", "c")}
        incoming = {name: os.path.join(tmp, f"in-{name}.sock") for name in ("b", "c")}
        console.rule(
            f"[bold]pageflip demo[/]: a {human_size(size)} workload writing "
            f"{human_size(dirty_rate)}/s, migrated by flip, then by precopy"
        )
        _start_hosts(console, hosts, size, dirty_rate, sockets, incoming)
        time.sleep(1.0)  # let the workers write for a moment
        results, ok = _migrate_twice(console, hosts, sockets, incoming)
        if results:
            console.print(summary_table(results, "both migrations, side by side"))
        if len(results) == 2:
            _compare(console, results[0][1], results[1][1])
        with contextlib.suppress(PageflipError, OSError), ControlClient(sockets["c"]) as c:
            c.request("quit")
        # Let the last host exit of its own accord, rather than be terminated (and say so).
        with contextlib.suppress(subprocess.TimeoutExpired):
            hosts[-1].proc.wait(QUIT_WAIT)
        return ok and len(results) == 2


def _start_hosts(
    console: Console,
    hosts: list[_Host],
    size: int,
    dirty_rate: int,
    sockets: dict[str, str],
    incoming: dict[str, str],
) -> None:
    """The workload (control socket a), ready, and destinations b and c, listening."""
    console.print(f"starting the workload (filling {human_size(size)} first)...")
    workload = _Host(
        [
            "workload",
            "--size",
            str(size),
            "--dirty-rate",
            str(dirty_rate),
            "--control",
            sockets["a"],
        ],
        "the workload",
    )
    hosts.append(workload)
    ready = workload.wait_for("ready")
    console.print(f"workload running, pid {ready['pid']}")
    for name in ("b", "c"):
        host = _Host(
            ["incoming", "--listen", incoming[name], "--control", sockets[name]],
            f"destination {name}",
        )
        hosts.append(host)
        host.wait_for("listening")


def _migrate_twice(
    console: Console, hosts: list[_Host], sockets: dict[str, str], incoming: dict[str, str]
) -> tuple[list[tuple[str, dict[str, Any]]], bool]:
    """Flip from a to b, then precopy from b to c, each verified at its destination: the
    report of each that succeeded, and whether all went well."""
    results: list[tuple[str, dict[str, Any]]] = []
    ok = True
    try:
        for label, src, dst, mode in (
            ("flip", "a", "b", "flip"),
            ("precopy", "b", "c", "precopy"),
        ):
            console.rule(f"{label}: {src} -> {dst}")
            done = _migrate(console, sockets[src], incoming[dst], mode, f"{label}")
            hosts[["a", "b", "c"].index(dst)].wait_for("running")
            time.sleep(0.5)  # the guest writes on at its new home
            verified = _verify(console, sockets[dst])
            ok = ok and verified
            results.append((label, {**done, "verified": "yes" if verified else "NO"}))
    except PageflipError as err:
        console.print(f"[red]{type(err).__name__}: {err}[/]")
        ok = False
    return results, ok


def _compare(console: Console, flip: dict[str, Any], precopy: dict[str, Any]) -> None:
    """The two migrations' pauses and costs, in a sentence."""
    console.print(
        f"flip paused the guest for {fmt_seconds(flip.get('downtime'))} (it saw "
        f"{fmt_seconds(flip.get('guest_pause'))}) and put {flip['bytes_on_wire']} bytes "
        f"on the wire; precopy paused it for {fmt_seconds(precopy.get('downtime'))} (it "
        f"saw {fmt_seconds(precopy.get('guest_pause'))}) after copying "
        f"{human_size(precopy['pages_copied'] * PAGE_SIZE)} in {precopy['rounds']} rounds."
    )
