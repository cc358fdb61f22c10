"""What every ``pageflip`` subcommand shares: the group and its one-line errors, the size
and duration types, consoles, JSON lines, and turning SIGTERM into an orderly exit."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NoReturn

import click
from rich.console import Console

import pageflip

from ..errors import BadArgument, GuestLost, PageflipError, one_line
from ..units import parse_size

#: Exit statuses, documented in ``pageflip --help`` and the README.
EXIT_OK = 0
EXIT_FAILED = 1  # a failure; for a migration: before the commit point, the guest is intact
EXIT_USAGE = 2
EXIT_LOST = 3  # after the commit point the destination failed: the guest is lost
EXIT_INTERRUPTED = 130  # 128 + SIGINT (143 for SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: unwind (closing sockets, removing socket files) and exit
    with 128 + the signal's number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Group(click.Group):
    """A click group whose every failure is one line on stderr and a documented exit status:
    a usage error (2), a PageflipError or OSError (1; 3 for a guest lost after the commit
    point), an interrupt (128 + signal). Anything else is a bug and shows a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        """Run the subcommand; an interrupt leaves it as :class:`_Stopped`, which click
        passes on untouched (it would print a blank line for a KeyboardInterrupt)."""
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as err:
            raise _Stopped(getattr(err, "signum", signal.SIGINT)) from err

    def main(self, *args: Any, **kwargs: Any) -> Any:
        """Run the command; its return value is the exit status (None: 0)."""
        kwargs["standalone_mode"] = False
        try:
            with _sigterm_interrupts():
                return super().main(*args, **kwargs)
        except _Stopped as stop:
            _interrupted(stop.signum)
        except click.UsageError as err:
            hint = f" (see {err.ctx.command_path} --help)" if err.ctx is not None else ""
            click.echo(f"UsageError: {' '.join(err.format_message().split())}{hint}", err=True)
            sys.exit(EXIT_USAGE)
        except click.ClickException as err:
            click.echo(f"{type(err).__name__}: {' '.join(err.format_message().split())}", err=True)
            sys.exit(err.exit_code)
        except (click.Abort, KeyboardInterrupt) as err:
            # Before a subcommand runs, click turns KeyboardInterrupt into Abort: the signal
            # is on its cause.
            _interrupted(getattr(err, "signum", getattr(err.__cause__, "signum", signal.SIGINT)))
        except GuestLost as err:
            click.echo(one_line(err), err=True)
            sys.exit(EXIT_LOST)
        except (PageflipError, OSError) as err:
            click.echo(one_line(err), err=True)
            sys.exit(EXIT_FAILED)


class _Stopped(Exception):
    """An interrupt on its way out of click (see :meth:`Group.invoke`)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _interrupted(signum: int) -> NoReturn:
    """Say which signal ended the command, on one line, and exit with 128 + its number."""
    if signum == signal.SIGINT and sys.stderr.isatty():
        click.echo(err=True)  # end the line of the terminal's ^C echo
    click.echo(f"Interrupted: {signal.Signals(signum).name}", err=True)
    sys.exit(128 + signum)


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C (an Interrupted in the main thread)."""

    def on_term(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread (tests calling main() from one)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


if TYPE_CHECKING:
    _ParamType = click.ParamType[int]
    _DurationType = click.ParamType[float]
else:  # click before 8.3 has no type parameters
    _ParamType = click.ParamType
    _DurationType = click.ParamType


class Size(_ParamType):
    """A byte count with an optional K, M, G or T suffix (powers of 1024): ``64M``, ``1G``.
    With ``zero``, 0 (or ``idle``) is taken too: a rate where 0 means none."""

    name = "size"

    def __init__(self, *, zero: bool = False) -> None:
        self.zero = zero

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int) and (value > 0 or (self.zero and value == 0)):
            return value
        text = str(value).strip().removesuffix("/s")
        if self.zero and (text.lower() == "idle" or _is_zero(text)):
            return 0
        try:
            return parse_size(text)
        except BadArgument as err:
            self.fail(str(err), param, ctx)


def _is_zero(text: str) -> bool:
    """Whether ``text`` is a size of nothing: ``0``, ``0M``, ``0.0 KiB``."""
    number = text.upper().rstrip("B").rstrip("I").rstrip("KMGT").strip()
    try:
        return float(number) == 0 and number.replace(".", "").isdigit()
    except ValueError:
        return False


SIZE = Size()
#: Bytes per second where 0 (or ``idle``) means none.
RATE = Size(zero=True)


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
        if not seconds > 0 or seconds == float("inf"):
            self.fail(f"{value!r} must be a positive, finite duration", param, ctx)
        return seconds


DURATION = Duration()


def stderr_console() -> Console:
    return Console(stderr=True)


def emit(as_json: bool, event: dict[str, Any], text: str) -> None:
    """One event: a JSON line on stdout with --json, else ``text`` on stderr."""
    if as_json:
        click.echo(json.dumps(event, allow_nan=False), nl=True)
        sys.stdout.flush()
    else:
        stderr_console().print(text)


def log_to(path: str | None) -> None:
    """The library's log (``pageflip`` loggers) to stderr, or to ``path``: warnings and
    errors of the engine and its pager, each a line with its time."""
    handler: logging.Handler = (
        logging.FileHandler(path) if path else logging.StreamHandler(sys.stderr)
    )
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s pageflip[{os.getpid()}] %(levelname)s %(message)s")
    )
    logger = logging.getLogger("pageflip")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if path else logging.WARNING)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(pageflip.__version__, prog_name="pageflip")
def main() -> None:
    """Move memory between Linux processes without copying it.

    \b
    Exit status: 0 success; 1 failure (for migrate: before the commit point, so the
    guest runs on the source, intact); 2 usage error; 3 the guest was lost after the
    commit point; 128+N interrupted by signal N. Every failure is one line on stderr.
    """
