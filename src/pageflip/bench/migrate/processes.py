"""The two processes of a run, and the benchmark's handle on each.

``destination``
    listens with :class:`~pageflip.migration.destination.Destination`, receives the guest,
    lets it run for a moment and checks it (:meth:`~pageflip.guests.Workload.verify`).
``source``
    creates a :class:`~pageflip.guests.Workload` (the fill is not timed), waits for go,
    pauses and resumes it in place once (the control: :func:`pause_in_place`), reads the
    write rate the workload measured over the last second and migrates it with
    :class:`~pageflip.migration.source.Source`.

Each says what happened with one of the messages below, through a pipe to the benchmark.
Both stamp every event with CLOCK_MONOTONIC (system-wide, so their stamps compare).
"""

from __future__ import annotations

import contextlib
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing import connection as mp_connection
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnContext
from typing import TYPE_CHECKING, Any, TypeVar

from ... import _children
from ..._children import stop_on_signals
from ...errors import PageflipError
from ..common import now
from .config import MigrateBenchmarkError
from .records import Event

if TYPE_CHECKING:
    from ...guests import Workload

__all__ = ["Child", "Failed", "Filled", "Listening", "Migrated", "Verified", "pause_in_place"]


@dataclass(frozen=True)
class Listening:
    """The destination listens."""

    pid: int


@dataclass(frozen=True)
class Filled:
    """The source created and filled its workload (``regions``: name -> bytes)."""

    pid: int
    guest_bytes: int
    regions: dict[str, int]
    fill_seconds: float


@dataclass(frozen=True)
class Migrated:
    """The source's migration is done (``done``: its done event)."""

    done: Event
    events: list[Event]
    write_rate: float
    writes_before: int
    #: The guest's figures for a pause in place right before (see :func:`pause_in_place`).
    in_place: dict[str, float | None]


@dataclass(frozen=True)
class Verified:
    """The destination checked the guest it received (``verify``: the check's report)."""

    verify: dict[str, Any]
    events: list[Event]
    done: dict[str, object] | None
    postcopy: dict[str, Any] | None
    write_rate_after: float
    status: dict[str, object]


@dataclass(frozen=True)
class Failed:
    """A process failed: ``message`` says how (an error's one line, or a traceback)."""

    message: str
    events: list[Event] = field(default_factory=list)


_Message = TypeVar("_Message", Listening, Filled, Migrated, Verified)


def _event_recorder(events: list[Event]) -> Callable[[Any], None]:
    def on_event(event: Any) -> None:
        data: Event = event.as_dict()
        # When it happened (held-back events come late, stamped with their moment).
        data["mono"] = data.get("at", now())
        events.append(data)

    return on_event


def _failed(err: PageflipError, events: list[Event]) -> Failed:
    return Failed(f"{type(err).__name__}: {err}", list(events))


def source_main(
    conn: Connection,
    to: str,
    size: int,
    rate: int,
    threads: int,
    options: dict[str, Any],
    huge: str | None = None,
) -> None:
    """A run's source: create the workload (on ``huge`` pages if asked), wait for go,
    migrate it, report."""
    stop_on_signals()
    from ...guests import Workload
    from ...migration.source import MigrationOptions, Source

    guest = None
    try:
        started = now()
        pages: dict[str, Any] = {} if huge is None else {"huge": huge}
        try:
            guest = Workload.create(size, dirty_rate=rate, threads=threads, **pages)
        except PageflipError as err:  # no huge pages here, say: one line, not a traceback
            conn.send(_failed(err, []))
            return
        guest_bytes = sum(r.size for r in guest.regions)
        regions = {r.name: r.size for r in guest.regions}
        conn.send(Filled(os.getpid(), guest_bytes, regions, now() - started))
        command = conn.recv()
        if command[0] != "go":
            return
        in_place = pause_in_place(guest)
        events: list[Event] = []
        migration = Source(guest, to, MigrationOptions(**options), on_event=_event_recorder(events))
        write_rate = guest.write_rate()
        total_writes = guest.total_writes
        try:
            done = migration.run()
        except PageflipError as err:
            conn.send(_failed(err, events))
            return
        conn.send(Migrated(done.as_dict(), events, write_rate, total_writes, in_place))
    except EOFError:
        return  # the benchmark is gone
    except Exception:
        with contextlib.suppress(OSError, ValueError):
            conn.send(Failed(traceback.format_exc()))
    finally:
        if guest is not None:
            guest.close()
        conn.close()


#: How long :func:`pause_in_place` waits for the guest's figure to settle (seconds): its
#: heartbeat's window after a resume, and room for a slow wake-up.
IN_PLACE_WAIT = 1.0


def pause_in_place(guest: Workload) -> dict[str, float | None]:
    """The control beside each migration: pause the guest and resume it where it runs, with
    nothing in between, and return what its heartbeat says of that pause (``observed_pause``,
    ``switchover_gap``, ``max_gap_after_resume``: seconds, None where it cannot tell). What
    it reports of a migration's pause can be no better on this machine at this moment: the
    difference is what the migration costs the guest."""
    guest.pause()
    guest.resume()
    guest.observed_pause(IN_PLACE_WAIT)
    heartbeat = guest.status()["heartbeat"]
    assert isinstance(heartbeat, dict)
    return {key: heartbeat.get(key) for key in IN_PLACE_KEYS}


#: The heartbeat's figures :func:`pause_in_place` keeps.
IN_PLACE_KEYS = ("observed_pause", "switchover_gap", "max_gap_after_resume")


def destination_main(conn: Connection, listen: str, timeout: float, verify_delay: float) -> None:
    """A run's destination: receive the guest, let it run, check it, report."""
    stop_on_signals()
    from ...guests import Workload
    from ...migration.destination import Destination

    events: list[Event] = []
    guest: Workload | None = None
    try:
        try:
            destination = Destination(
                listen, on_event=_event_recorder(events), timeout=timeout, accept_timeout=timeout
            )
        except PageflipError as err:
            conn.send(_failed(err, []))
            return
        conn.send(Listening(os.getpid()))
        try:
            received = destination.run()
        except PageflipError as err:
            conn.send(_failed(err, events))
            return
        assert isinstance(received, Workload)
        guest = received
        time.sleep(verify_delay)
        write_rate = guest.write_rate()
        report = guest.verify()
        conn.send(
            Verified(
                report.as_dict(),
                events,
                destination.done,
                destination.postcopy,
                write_rate,
                guest.status(),
            )
        )
    except Exception:
        with contextlib.suppress(OSError, ValueError):
            conn.send(Failed(traceback.format_exc(), events))
    finally:
        if guest is not None:
            guest.close()
        conn.close()


class Child(_children.Child):
    """The benchmark's handle on one process of a run."""

    def __init__(self, ctx: SpawnContext, role: str, target: Any, args: tuple[Any, ...]) -> None:
        super().__init__(ctx, target, args, role=role, name=f"pageflip-bench-migrate-{role}")

    def expect(self, kind: type[_Message], timeout: float, what: str) -> _Message:
        """The next message, which must be a ``kind``; a failure or silence raises."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            ready = mp_connection.wait([self.conn, self.process.sentinel], max(0.0, left))
            if self.conn in ready or self.conn.poll():
                try:
                    message = self.conn.recv()
                except EOFError:
                    message = None
                if message is not None:
                    return self._check(message, kind, what)
            if not self.process.is_alive():
                self.process.join(1)
                raise MigrateBenchmarkError(
                    f"{what}: the {self.role} process died (exit code {self.process.exitcode})"
                )
            if not ready:
                raise MigrateBenchmarkError(
                    f"{what}: the {self.role} did not answer within {timeout:.0f} s"
                )

    def _check(self, message: object, kind: type[_Message], what: str) -> _Message:
        if isinstance(message, kind):
            return message
        if isinstance(message, Failed):
            raise MigrateBenchmarkError(f"{what}: the {self.role} failed: {message.message}")
        name = type(message).__name__.lower()
        raise MigrateBenchmarkError(
            f"{what}: the {self.role} said {name!r}, expected {kind.__name__.lower()!r}"
        )

    def error(self, wait: float) -> str | None:
        """The process's error message, if it sends one within ``wait`` seconds."""
        with contextlib.suppress(OSError, EOFError, ValueError):
            if self.conn.poll(wait):
                message = self.conn.recv()
                if isinstance(message, Failed):
                    return message.message
        return None

    def join(self, timeout: float, what: str) -> None:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise MigrateBenchmarkError(
                f"{what}: the {self.role} did not exit within {timeout:.0f} s"
            )
