"""Hosting and migrating guests: ``workload``, ``incoming``, ``migrate``, ``status``,
``verify``, ``stop`` and ``cancel``.

A host binds its control socket first (refusing a path a live process holds, replacing a
stale socket file) and only then does its long work, so that ``status`` answers at once and
``verify`` or ``migrate`` can wait for a guest still filling its memory. Every socket file a
command makes is removed when it ends, also on SIGINT and SIGTERM.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..display import fmt_seconds
from ..errors import GuestLost, MigrationError, PageflipError, SpanError, one_line
from ..memory import HUGE_NAMES
from ..units import format_size, human_size
from ._base import (
    DURATION,
    EXIT_FAILED,
    EXIT_LOST,
    RATE,
    SIZE,
    Interrupted,
    emit,
    log_to,
    main,
    stderr_console,
)

#: Seconds migrate and verify wait for a control socket that is not there yet (a host just
#: started, still importing): long enough for that, short enough for a typo.
CONTROL_WAIT = 3.0
#: Seconds after the start of its writes that a workload checks the rate it reaches.
RATE_CHECK_AFTER = 2.0
#: A workload warns when it writes less than this share of the rate asked for.
RATE_SHORTFALL = 0.8
#: Seconds between the looks of a waiting ``incoming`` at whether it was told to stop.
STOP_POLL = 0.2


def _default_control() -> str:
    return os.environ.get("PAGEFLIP_CONTROL", "/tmp/pageflip-workload.sock")


control_option = click.option(
    "--control",
    default=_default_control,
    show_default="$PAGEFLIP_CONTROL or /tmp/pageflip-workload.sock",
    help="The guest's control socket (a path, or @name for an abstract socket).",
)
json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print events as JSON lines on stdout."
)


def _auth_options(command: Any) -> Any:
    """How TCP peers authenticate (see pageflip.transport.TcpAuth)."""
    for option in reversed(
        [
            click.option(
                "--key-file",
                type=click.Path(dir_okay=False),
                help="TCP: a shared key both sides hold (mode 600; e.g. "
                "`openssl rand -hex 32`); peers prove it before anything else.",
            ),
            click.option(
                "--tls-cert", type=click.Path(dir_okay=False), help="TCP: our TLS certificate."
            ),
            click.option(
                "--tls-key", type=click.Path(dir_okay=False), help="TCP: its private key."
            ),
            click.option(
                "--tls-ca",
                type=click.Path(dir_okay=False),
                help="TCP: the CA that signed the peer's certificate.",
            ),
            click.option(
                "--insecure",
                is_flag=True,
                help="TCP beyond loopback without authentication: anyone who reaches the "
                "port is taken.",
            ),
        ]
    ):
        command = option(command)
    return command


def _auth_dict(**given: Any) -> dict[str, Any] | None:
    """The authentication options that were given (None: none), file names made absolute:
    the host that reads them has its own working directory."""
    chosen = {k: os.path.abspath(v) if isinstance(v, str) else v for k, v in given.items() if v}
    return chosen or None


def _address(text: str, option: str) -> Any:
    """The Address in ``text``; a bad one is a usage error of ``option``."""
    from ..transport import Address

    try:
        return Address.parse(text)
    except SpanError as err:
        raise click.BadParameter(str(err), param_hint=f"'{option}'") from None


def serve_host(host: Any, as_json: bool, tick: Callable[[], None] | None = None) -> None:
    """Serve the guest until it leaves (migrated away, stopped); SIGINT/SIGTERM end it."""
    try:
        while not host.wait(0.2):
            if tick is not None:
                tick()
    finally:
        outcome = host.outcome
        host.close()
    emit(as_json, {"event": "exit", "outcome": outcome}, f"guest {outcome}; host exiting")
    if outcome == "lost":
        sys.exit(EXIT_LOST)


# -- workload -----------------------------------------------------------------------------


@main.command()
@click.option("--size", type=SIZE, default="1G", show_default=True, help="Bytes of memory.")
@click.option(
    "--dirty-rate",
    type=RATE,
    default="256M",
    show_default=True,
    help="Bytes per second the worker threads rewrite (0: idle).",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Worker threads that write (each owns a share of the pages).",
)
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Seed of the page contents (the guest's identity in its own checks).",
)
@click.option(
    "--huge",
    type=click.Choice(HUGE_NAMES),
    default=None,
    help="Put the memory on huge pages (hugetlb needs a pool: sysctl -w vm.nr_hugepages=N; "
    "auto falls back to 4 KiB pages). A precopy or postcopy destination makes the same kind "
    "of pages (a second SIZE from the pool on this host); a flip moves these very pages.",
)
@control_option
@json_option
def workload(
    size: int,
    dirty_rate: int,
    threads: int,
    seed: int,
    huge: str | None,
    control: str,
    as_json: bool,
) -> None:
    """Start the reference workload and serve it on --control until it migrates away.

    It fills SIZE bytes of movable memory with incompressible pages, then its worker threads
    rewrite random pages at --dirty-rate, journalling every write, so that after any
    migration `pageflip verify` can prove that no write made before the pause was lost. Its
    heartbeat says how long the guest itself saw a migration pause it. The control socket
    answers while it fills (status: filling).
    """
    from ..guests import Workload
    from ..migration import room
    from ..migration.host import GuestHost

    if size <= 0:
        raise click.BadParameter("must be more than 0 bytes", param_hint="--size")
    why = room.shortfall(size + size // 1024 + (1 << 20), 0)
    if why is not None:
        raise SpanError(f"--size {format_size(size)} is more than this host can hold: {why}")
    filled = [0]
    host = GuestHost(
        None,
        control,
        outcome="filling",
        status=lambda: (
            {"state": "filling", "size": size, "filled": filled[0]} if host.guest is None else {}
        ),
    )
    try:
        options = {} if huge is None else {"huge": huge}
        guest = _fill(Workload, size, dirty_rate, threads, seed, filled, **options)
        host.attach(guest)
        emit(
            as_json,
            {"event": "ready", "control": control, "pid": os.getpid(), "size": guest.size},
            f"workload of {human_size(guest.size)} at {human_size(dirty_rate)}/s, "
            f"control socket {control} (pid {os.getpid()})",
        )
    except BaseException:
        host.close()
        raise
    serve_host(host, as_json, _rate_check(host, dirty_rate, as_json))


def _fill(
    cls: Any,
    size: int,
    dirty_rate: int,
    threads: int,
    seed: int,
    filled: list[int],
    **options: Any,
) -> Any:
    def progress(done: int, total: int) -> None:
        filled[0] = done
        if bar is not None:
            bar.update(task, completed=done, total=total)

    console = stderr_console()
    bar = None
    if console.is_terminal:
        bar = Progress(
            TextColumn(f"[bold]filling {format_size(size)}[/]"),
            BarColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        task = bar.add_task("fill", total=size)
        bar.start()
    try:
        return cls.create(
            size, dirty_rate=dirty_rate, threads=threads, seed=seed, progress=progress, **options
        )
    finally:
        if bar is not None:
            bar.stop()


def _rate_check(host: Any, asked: int, as_json: bool) -> Callable[[], None]:
    """Once, a moment after the writes start: warn if the guest writes well below --dirty-rate
    (the figure it reaches is this machine's ceiling)."""
    started = time.monotonic()
    done = [asked == 0]

    def tick() -> None:
        guest = host.guest
        if done[0] or guest is None or time.monotonic() - started < RATE_CHECK_AFTER:
            return
        done[0] = True
        reached = guest.write_rate()
        if reached < RATE_SHORTFALL * asked:
            emit(
                as_json,
                {"event": "warning", "dirty_rate": asked, "write_rate": reached},
                f"[yellow]warning[/]: --dirty-rate {human_size(asked)}/s is more than this "
                f"guest can write here: it reaches {human_size(reached)}/s",
            )

    return tick


# -- incoming -----------------------------------------------------------------------------


@main.command()
@click.option(
    "--listen",
    envvar="PAGEFLIP_LISTEN",
    required=True,
    help="Where to wait for the source: /path, @abstract or tcp:HOST:PORT (PORT 0: any).",
)
@control_option
@click.option(
    "--timeout",
    type=DURATION,
    default="60s",
    show_default=True,
    help="Longest silence from the source in any phase, also after the commit point.",
)
@click.option(
    "--log",
    "log_file",
    type=click.Path(dir_okay=False),
    help="Write the engine's and the pager's log here (default: stderr, warnings only).",
)
@click.option(
    "--replace",
    type=click.Path(),
    hidden=True,
    help="Live update: once the guest runs here, serve the control socket at this path as "
    "soon as the host before us lets it go (set by `pageflip vm upgrade`).",
)
@_auth_options
@json_option
def incoming(
    listen: str,
    control: str,
    timeout: float,
    log_file: str | None,
    replace: str | None,
    key_file: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    tls_ca: str | None,
    insecure: bool,
    as_json: bool,
) -> None:
    """Wait on --listen for a migrating guest, run it, then serve it on --control.

    Attempts that fail (a stray connection, a bad frame, a refused mode, a source that gives
    up) are logged and it goes on listening, until one migration succeeds. The control
    socket answers from the start (status: incoming) and serves the guest from the moment
    it resumes here; `pageflip stop` ends it while it waits. Exit status 3 if a postcopy
    guest was lost after the commit point.
    """
    from ..migration.host import GuestHost
    from ..transport import TcpAuth

    log_to(log_file)
    _vm_ready()
    auth = TcpAuth.from_options(
        key_file=key_file,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_ca=tls_ca,
        tls_server_name=None,
        insecure=insecure,
    )
    address = _address(listen, "--listen")
    if address.local and _same_socket(address.path, control):
        raise click.UsageError(f"--listen and --control are both {listen}: give each its own")
    attempts = _Attempts()
    host = GuestHost(None, control, outcome="incoming", status=attempts.status)
    attempts.host = host
    try:
        arrived = _listen_and_receive(address, auth, host, attempts, control, timeout, as_json)
        if arrived:
            emit(
                as_json,
                {"event": "running", "control": control, "pid": os.getpid()},
                f"the guest runs here; control socket {control}",
            )
            if replace is not None:
                _take_over(host, replace, timeout, as_json)
    except BaseException:
        host.close()
        raise
    serve_host(host, as_json)


def _take_over(host: Any, path: str, timeout: float, as_json: bool) -> None:
    """After a live update: serve the control socket at ``path`` once the old host let
    go of it (it exits right after the migration), and remove our temporary directory."""
    from ..migration.upgrade import take_over

    take_over(host, path, timeout)
    emit(
        as_json,
        {"event": "control", "control": path, "pid": os.getpid()},
        f"live update done: this process (pid {os.getpid()}) serves {path}",
    )


def _vm_ready() -> None:
    """A VM may arrive: its vCPU is stopped by a signal whose handler only the main
    thread can install."""
    from ..vm import install_kick_handler

    install_kick_handler()


def _same_socket(a: str, b: str) -> bool:
    if a.startswith("@") or b.startswith("@"):
        return a == b
    return os.path.abspath(a) == os.path.abspath(b)


class _Attempts:
    """Where ``incoming`` listens (once it does) and the Destination of the attempt under way
    (None between attempts): what its control socket's status tells."""

    def __init__(self) -> None:
        self.listening: str | None = None
        self.current: Any = None
        self.host: Any = None

    def status(self) -> dict[str, Any]:
        dest = self.current
        if dest is None:
            if self.listening is None or getattr(self.host, "guest", None) is not None:
                return {}
            return {"migration": {"listen": self.listening, "phase": "listening"}}
        info: dict[str, Any] = {"listen": dest.address, "phase": dest.phase.value}
        if dest.postcopy_remaining is not None:
            info["postcopy"] = f"{dest.postcopy_remaining} pages still at the source"
        return {"migration": info}


def _listen_and_receive(
    address: Any,
    auth: Any,
    host: Any,
    attempts: _Attempts,
    control: str,
    timeout: float,
    as_json: bool,
) -> bool:
    """Listen at ``address`` (a socket file there is claimed first), say where, and receive
    a guest there (see _receive); the listener is closed when it returns."""
    from ..control import claim_socket_path
    from ..migration.destination import Destination

    if address.local:
        claim_socket_path(address.path)
    listener = address.listen(auth=auth)
    try:
        where = listener.path
        attempts.listening = where
        emit(
            as_json,
            {"event": "listening", "listen": where, "pid": os.getpid(), "control": control},
            f"waiting for a guest on {where} (pid {os.getpid()}); control socket {control}",
        )
        return _receive(Destination, listener, host, attempts, timeout, as_json)
    finally:
        listener.close()


def _receive(
    cls: Any, listener: Any, host: Any, attempts: _Attempts, timeout: float, as_json: bool
) -> bool:
    """Run Destinations on ``listener`` until one migration succeeds (True), or until the
    host is told to stop (``pageflip stop``) while it waits for one (False)."""

    def on_event(event: Any) -> None:
        data = event.as_dict()
        emit(as_json, data, f"incoming: {event.kind} {_event_text(data)}")

    poller = select.poll()
    poller.register(listener.fileno(), select.POLLIN)
    while True:
        # Made before a source comes: its one-time costs (probes, warm-ups) do not keep
        # a source waiting.
        dest = cls(
            listener,
            on_event=on_event,
            timeout=timeout,
            on_resumed=lambda guest: _arrived(host, guest, as_json),
            accept_timeout=STOP_POLL,
        )
        attempts.current = dest
        # Wait for a source, looking now and then whether the host was told to stop.
        while not poller.poll(STOP_POLL * 1000):
            if host.wait(0):
                attempts.current = None
                return False
        try:
            dest.run()
            return True
        except (TimeoutError, BlockingIOError):
            if dest.phase.value != "listening":
                raise
            continue  # nobody came (a peer was refused before it was taken): look again
        except GuestLost:
            host.outcome = "lost"
            raise
        except MigrationError as err:
            if isinstance(err.__cause__, KeyboardInterrupt):
                raise err.__cause__ from None
            emit(
                as_json,
                {"event": "attempt-failed", "error": one_line(err), "phase": err.phase},
                f"[yellow]incoming: that attempt failed[/] ({one_line(err)}); still listening",
            )
        finally:
            attempts.current = None


def _arrived(host: Any, guest: Any, as_json: bool) -> None:
    """The guest runs here: serve it; a VM's console goes on on our stdout."""
    if hasattr(guest, "add_console_listener"):
        from .vm import console_printer

        guest.add_console_listener(console_printer(as_json))
    host.attach(guest)


def _event_text(event: dict[str, Any]) -> str:
    kind = event.get("event")
    if kind == "resumed":
        seen = event.get("guest_pause")
        return f"downtime {fmt_seconds(event['downtime'])}" + (
            f", the guest saw {fmt_seconds(seen)}" if seen is not None else ""
        )
    if kind == "done":
        return (
            f"{event['mode']} in {fmt_seconds(event['total_seconds'])}, digests {event['digest']}"
        )
    if kind == "failed":
        return f"in {event['phase']}: {event['error']}"
    if kind == "setup":
        return f"{event['mode']} of {human_size(event['total_bytes'])}"
    if kind == "postcopy":
        return f"{event['remaining_pages']} pages still at the source"
    if kind == "recovering":
        return f"the source's connection broke ({event['reason']}); waiting for it"
    return ""


# -- migrate ------------------------------------------------------------------------------


@main.command()
@control_option
@click.option("--to", "to", help="The destination: /path, @name or tcp:HOST:PORT.")
@click.option(
    "--mode",
    type=click.Choice(["auto", "flip", "precopy", "postcopy"]),
    default="auto",
    show_default=True,
    help="auto: flip when local and movable, else precopy. Flip and precopy move any "
    "pages; postcopy refuses memory on 1 GiB hugetlb pages in setup (it faults in whole "
    "pages: each fault would stall the guest while a GiB is copied).",
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
@click.option(
    "--max-rounds",
    type=click.IntRange(min=1),
    default=30,
    show_default=True,
    help="Precopy rounds before --on-no-convergence decides (sooner once two rounds in a "
    "row show that precopy cannot converge within them).",
)
@click.option(
    "--on-no-convergence",
    type=click.Choice(["force", "postcopy"]),
    default="force",
    show_default=True,
    help="When precopy cannot converge: switch over anyway (the display says so, and "
    "whether the expected pause is over --downtime-limit), or go postcopy (not with memory "
    "on 1 GiB hugetlb pages).",
)
@click.option(
    "--postcopy-after-rounds",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Precopy rounds before a postcopy switchover.",
)
@click.option("--compress", type=click.IntRange(1, 22), default=None, help="zstd level (TCP).")
@click.option(
    "--timeout",
    type=DURATION,
    default="60s",
    show_default=True,
    help="Longest wait for the destination: to connect, in each phase, and after the "
    "commit point for a broken postcopy to be taken up again (--resume).",
)
@click.option(
    "--keep-source-on-loss",
    is_flag=True,
    help="If the destination fails after the commit point, keep the source's paused copy "
    "(status and verify call it stale) instead of dropping it.",
)
@click.option(
    "--resume",
    "resume",
    is_flag=True,
    help="Take up the postcopy at --control whose connection broke (--to: a new address).",
)
@_auth_options
@click.option("--json", "as_json", is_flag=True, help="Print every event as a JSON line.")
def migrate(
    control: str,
    to: str | None,
    mode: str,
    downtime_limit: float,
    max_bandwidth: int | None,
    max_rounds: int,
    on_no_convergence: str,
    postcopy_after_rounds: int,
    compress: int | None,
    timeout: float,
    keep_source_on_loss: bool,
    resume: bool,
    key_file: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    tls_ca: str | None,
    insecure: bool,
    as_json: bool,
) -> None:
    """Migrate the guest served at --control to the destination at --to.

    Prints a live progress display (or JSON lines with --json) and ends with the report:
    total time, downtime (the engine's and the guest's own), bytes on the wire, pages moved,
    copied and zero per region, rounds, postcopy fault times. Ctrl-C or SIGTERM cancels a
    migration before its commit point: the guest runs on at the source. Exit status 1: it
    failed before the commit point (the guest runs on the source, intact); 3: after it
    (the guest is lost).
    """
    if to is None and not resume:
        raise click.UsageError("give --to (the destination), or --resume")
    options = _migrate_options(
        to,
        {
            "mode": mode,
            "downtime_limit": downtime_limit,
            "max_bandwidth": max_bandwidth,
            "max_rounds": max_rounds,
            "on_no_convergence": on_no_convergence,
            "postcopy_after_rounds": postcopy_after_rounds,
            "compress": compress,
            "timeout": timeout,
            "keep_source_on_loss": keep_source_on_loss,
            "wait": CONTROL_WAIT + timeout,
        },
        _auth_dict(
            key_file=key_file, tls_cert=tls_cert, tls_key=tls_key, tls_ca=tls_ca, insecure=insecure
        ),
    )
    if resume:
        options = {"resume": True}
    exit_with_outcome(_drive_migration(control, to, options, as_json))


def _drive_migration(
    control: str, to: str | None, options: dict[str, Any], as_json: bool
) -> dict[str, Any]:
    """Ask the host at ``control`` to migrate its guest and follow the events to the last,
    which it returns; a migration cancelled by SIGINT or SIGTERM ends the command here."""
    from ..migration.host import ControlClient

    last: dict[str, Any] = {}
    with (
        ControlClient(control, timeout=10, wait=CONTROL_WAIT) as client,
        _cancel_on_signal(control) as interrupted,
    ):
        events = client.migrate(to, **options)
        title = f"{control} -> {to}" if to else f"{control}: resuming"
        last = follow(events, title) if not as_json else echo_json(events)
    if interrupted and last.get("event") == "failed" and last.get("guest") == "source":
        click.echo(
            f"Interrupted: {signal.Signals(interrupted[0]).name}: the migration was cancelled "
            f"in phase {last.get('phase')}; the guest runs on the source",
            err=True,
        )
        sys.exit(128 + interrupted[0])
    return last


def _migrate_options(
    to: str | None, options: dict[str, Any], auth: dict[str, Any] | None
) -> dict[str, Any]:
    """What the guest's host is asked to do; a --to beyond this host without a way to
    authenticate is refused here (not in the host)."""
    if to is not None:
        from ..transport import require_auth

        address = _address(to, "--to")
        if not address.local and auth is None:
            require_auth("connect to", address.host, address.port, None)
    if auth is not None:
        options["auth"] = auth
    return options


def echo_json(events: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Each event as a JSON line as it comes; returns the last."""
    last: dict[str, Any] = {}
    for event in events:
        click.echo(json.dumps(event, allow_nan=False))
        sys.stdout.flush()
        last = event
    return last


def follow(events: Iterable[dict[str, Any]], title: str) -> dict[str, Any]:
    """The live display of a migration, then its report; returns the last event."""
    from ..display import MigrationDisplay, summary_table

    # The first event before the display starts: a request that fails (no guest, not a
    # control socket) is then one line, without the display's empty frame.
    stream = iter(events)
    first = next(stream, None)
    last: dict[str, Any] = {}
    with MigrationDisplay(stderr_console(), title=title) as view:
        for event in itertools.chain([first] if first is not None else [], stream):
            view.event(event)
            last = event
    if view.done is not None:
        Console().print(summary_table([(view.done["mode"], view.done)], "migration"))
    return last


@contextlib.contextmanager
def _cancel_on_signal(control: str) -> Iterator[list[int]]:
    """While a migration runs: the first SIGINT or SIGTERM asks the host to cancel it (the
    events go on until it says how the migration ended); a second one stops waiting. Yields
    a list that holds the signal's number once one came."""
    from ..migration.host import ControlClient

    came: list[int] = []

    def ask_cancel() -> None:
        try:
            with ControlClient(control, timeout=5) as other:
                other.request("cancel")
        except (OSError, PageflipError) as why:
            click.echo(f"could not cancel: {one_line(why)}", err=True)

    def on_signal(signum: int, frame: object) -> None:
        if came:
            raise Interrupted(signum)
        came.append(signum)
        threading.Thread(target=ask_cancel, daemon=True).start()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield came
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def exit_with_outcome(last: dict[str, Any]) -> None:
    """The exit status from the last event: 0 done, 1 failed (guest on the source), 3 lost."""
    if last.get("event") == "failed":
        lost = last.get("guest") == "lost"
        where = (
            "the guest is lost"
            + (" (the source keeps a stale, paused copy)" if last.get("stale_copy") else "")
            if lost
            else "the guest runs on the source"
        )
        kind = "GuestLost" if lost else "MigrationError"
        cause = "" if last["error_type"] == kind else f"{last['error_type']}: "
        click.echo(
            f"{kind}: failed in phase {last['phase']}: {cause}"
            f"{' '.join(str(last['error']).split())}; {where}",
            err=True,
        )
        sys.exit(EXIT_LOST if lost else EXIT_FAILED)
    if last.get("event") != "done":
        click.echo(
            "MigrationError: the source's host went away (killed?) before the migration "
            "ended: ask the destination where the guest is (pageflip status)",
            err=True,
        )
        sys.exit(EXIT_FAILED)


# -- status, verify, stop, cancel ---------------------------------------------------------


@main.command()
@control_option
@click.option("--json", "as_json", is_flag=True, help="Print the status as one JSON object.")
def status(control: str, as_json: bool) -> None:
    """Show the status of the guest at --control (or what its host is doing)."""
    from ..migration.host import ControlClient

    with ControlClient(control, timeout=5) as client:
        answer = client.request("status")
    if as_json:
        click.echo(json.dumps(answer, allow_nan=False))
        return
    table = Table(title=f"guest at {control} (pid {answer['pid']}): {answer['host']}")
    table.add_column("")
    table.add_column("")
    for key, value in answer["status"].items():
        table.add_row(escape(str(key)), escape(_plain(value, str(key))))
    Console().print(table)


#: Status fields shown for people in bytes, in bytes per second, in seconds and as moments
#: (``--json`` keeps the raw numbers).
_SIZES = frozenset({"size", "memory"})
_RATES = frozenset({"dirty_rate", "write_rate"})
_SECONDS = frozenset(
    {
        "interval",
        "window",
        "switchover_gap",
        "max_gap_after_resume",
        "observed_pause",
        "max_gap_running",
        "seconds",
    }
)
_MOMENTS = frozenset({"started", "booted"})


def _plain(value: Any, key: str = "") -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_plain(v, str(k))}" for k, v in value.items())
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if key in _SIZES:
        return human_size(value)
    if key in _RATES:
        return f"{human_size(value)}/s"
    if key in _SECONDS:
        return fmt_seconds(value)
    if key in _MOMENTS and value > 0:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
    return f"{value:.6g}" if isinstance(value, float) else str(value)


@main.command()
@control_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def verify(control: str, as_json: bool) -> None:
    """Ask the guest at --control to check its memory; exit 1 if it found a problem."""
    from ..migration.host import ControlClient

    with ControlClient(control, timeout=None, wait=CONTROL_WAIT) as client:
        report = client.request("verify")["report"]
    if as_json:
        click.echo(json.dumps(report, allow_nan=False))
    else:
        verdict = "[green]ok[/]" if report["ok"] else "[red]PROBLEMS[/]"
        seen = report.get("observed_pause")
        Console().print(
            f"{verdict}: {report['pages_checked']} pages checked, {report['pages_skipped']} "
            f"skipped (being written), in {report['seconds']:.2f} s"
            + (f"; the last pause the guest saw: {fmt_seconds(seen)}" if seen is not None else "")
        )
        for problem in report["problems"]:
            Console().print(f"  [red]-[/] {escape(problem)}")
    if not report["ok"]:
        sys.exit(EXIT_FAILED)


@main.command()
@control_option
def stop(control: str) -> None:
    """Stop the guest at --control (its host process exits)."""
    from ..migration.host import ControlClient

    with ControlClient(control, timeout=10) as client:
        client.request("quit")


@main.command()
@control_option
def cancel(control: str) -> None:
    """Cancel the migration running at --control (before its commit point: the guest runs on
    at the source)."""
    from ..migration.host import ControlClient

    with ControlClient(control, timeout=10) as client:
        client.request("cancel")
