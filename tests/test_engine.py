"""What Source and Destination share (pageflip.migration.engine.Side), on a side of its own:
its phase, the events it holds during a pause, a failure turned into a MigrationError."""

from __future__ import annotations

import time

import pytest

from pageflip.errors import MigrationError, PeerClosed
from pageflip.migration.destination import Destination
from pageflip.migration.engine import Side
from pageflip.migration.events import FailedEvent, MigrationEvent, PreparedEvent
from pageflip.migration.phases import SOURCE_TRANSITIONS, SourcePhase
from pageflip.migration.source import Source


class Probe(Side[SourcePhase]):
    """A side that records what it was asked to undo."""

    def __init__(self) -> None:
        self.events: list[MigrationEvent] = []
        self.undone: list[tuple[str, str]] = []
        super().__init__(
            SOURCE_TRANSITIONS, SourcePhase.IDLE, SourcePhase.FAILED, self.events.append, "probe"
        )

    def _undo(self, err: BaseException, phase: str) -> None:
        self.undone.append((type(err).__name__, phase))
        self._abort_link(err, phase)  # no link yet: nothing to say


def test_both_sides_are_sides() -> None:
    assert issubclass(Source, Side) and issubclass(Destination, Side)


def test_a_failure_undoes_then_fails_then_reports_the_phase() -> None:
    side = Probe()
    side._phases.advance(SourcePhase.SETUP)
    side._phases.advance(SourcePhase.PRECOPY)
    result = side._failed(PeerClosed("gone", phase="precopy"))
    assert isinstance(result, MigrationError)
    assert (result.phase, result.guest) == ("precopy", "source")
    assert "probe failed in phase precopy: PeerClosed: gone" in str(result)
    assert side.undone == [("PeerClosed", "precopy")]
    assert side.phase is SourcePhase.FAILED
    (event,) = side.events
    assert isinstance(event, FailedEvent)
    assert (event.phase, event.error_type, event.guest) == ("precopy", "PeerClosed", "source")
    assert event.error == str(result)


def test_a_migration_error_is_raised_as_it_is() -> None:
    side = Probe()
    err = MigrationError("refused", phase="setup", guest="source")
    assert side._failed(err) is err


def test_a_failure_in_a_phase_without_a_way_to_failed_stays_there() -> None:
    side = Probe()
    for phase in (SourcePhase.SETUP, SourcePhase.SWITCHOVER, SourcePhase.COMMITTED):
        side._phases.advance(phase)
    side._phases.advance(SourcePhase.DONE)
    side._failed(RuntimeError("late"))
    assert side.phase is SourcePhase.DONE


def test_held_events_wait_until_released_in_order() -> None:
    side = Probe()
    side._hold_events()
    side._emit(PreparedEvent(1.0))
    side._emit(PreparedEvent(2.0))
    side._let_held_go(after=60.0)  # not held long enough
    assert side.events == []
    side._release_events()
    assert [e.t for e in side.events] == [1.0, 2.0]
    side._emit(PreparedEvent(3.0))  # no longer held
    assert [e.t for e in side.events] == [1.0, 2.0, 3.0]


def test_events_held_too_long_go_out_and_later_ones_are_held_still() -> None:
    side = Probe()
    side._hold_events()
    side._emit(PreparedEvent(1.0))
    time.sleep(0.01)
    side._let_held_go(after=0.001)
    assert [e.t for e in side.events] == [1.0]
    side._emit(PreparedEvent(2.0))
    assert [e.t for e in side.events] == [1.0]
    side._release_events()
    assert [e.t for e in side.events] == [1.0, 2.0]


def test_an_observer_that_raises_does_not_break_the_side(caplog: pytest.LogCaptureFixture) -> None:
    side = Probe()

    def broken(event: MigrationEvent) -> None:
        raise ValueError("observer bug")

    side._on_event = broken
    side._emit(PreparedEvent(0.0))
    assert "migration event handler failed" in caplog.text


def test_time_is_counted_from_the_start_of_the_run() -> None:
    side = Probe()
    side._start = time.monotonic() - 5.0
    assert 5.0 <= side._t() < 6.0
    with pytest.raises(AssertionError):
        _ = side.link  # no link before the run connects
