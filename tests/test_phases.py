"""The phase machine of each side, as pageflip.migration.phases defines it: every legal
transition is taken, every other one raises a StateError naming where it was and where it
had to be."""

from __future__ import annotations

import enum
import itertools
from collections.abc import Mapping
from typing import Any

import pytest

from pageflip.errors import StateError
from pageflip.migration.phases import (
    COMMITTED_PHASES,
    DESTINATION_TRANSITIONS,
    SOURCE_TRANSITIONS,
    DestinationPhase,
    PhaseMachine,
    SourcePhase,
)

S = SourcePhase
D = DestinationPhase
Table = Mapping[Any, frozenset[Any]]
TABLES: list[tuple[str, Table, enum.Enum]] = [
    ("source", SOURCE_TRANSITIONS, S.IDLE),
    ("destination", DESTINATION_TRANSITIONS, D.LISTENING),
]


def pairs(table: Table) -> list[tuple[enum.Enum, enum.Enum]]:
    return list(itertools.product(table, repeat=2))


def reachable(table: Table, start: enum.Enum) -> set[enum.Enum]:
    seen = {start}
    todo = [start]
    while todo:
        for nxt in table[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


@pytest.mark.parametrize(("side", "table", "start"), TABLES, ids=[t[0] for t in TABLES])
def test_every_pair_of_phases_is_legal_exactly_when_the_table_says(
    side: str, table: Table, start: enum.Enum
) -> None:
    for here, there in pairs(table):
        machine = PhaseMachine(table, here)
        if there in table[here]:
            machine.advance(there)
            assert machine.phase is there
            assert machine.history == [here, there]
        else:
            with pytest.raises(StateError) as info:
                machine.advance(there)
            assert machine.phase is here  # nothing moved
            assert machine.history == [here]
            assert info.value.phase == here.value
            came_from = sorted(p.value for p in table if there in table[p])
            assert info.value.needed == (" or ".join(came_from) or "none")
            assert f"from phase {here.value} to {there.value}" in str(info.value)


@pytest.mark.parametrize(("side", "table", "start"), TABLES, ids=[t[0] for t in TABLES])
def test_every_phase_is_reachable_and_every_run_can_end(
    side: str, table: Table, start: enum.Enum
) -> None:
    assert set(table) == set(type(start))  # the table names every phase
    assert reachable(table, start) == set(table)
    ends = {p for p in table if not table[p]}
    assert {p.value for p in ends} == {"done", "failed", "lost"}
    for phase in table:
        assert reachable(table, phase) & ends, phase


@pytest.mark.parametrize(
    "path",
    [
        # flip: no rounds
        [S.IDLE, S.SETUP, S.SWITCHOVER, S.COMMITTED, S.DONE],
        # precopy
        [S.IDLE, S.SETUP, S.PRECOPY, S.SWITCHOVER, S.COMMITTED, S.DONE],
        # postcopy whose connection broke after the commit point and was taken up again
        [
            S.IDLE,
            S.SETUP,
            S.PRECOPY,
            S.SWITCHOVER,
            S.COMMITTED,
            S.POSTCOPY,
            S.RECOVERING,
            S.POSTCOPY,
            S.DONE,
        ],
        # failures before the commit point; the destination's ABORT after it
        [S.IDLE, S.FAILED],
        [S.IDLE, S.SETUP, S.PRECOPY, S.FAILED],
        [S.IDLE, S.SETUP, S.PRECOPY, S.SWITCHOVER, S.FAILED],
        [S.IDLE, S.SETUP, S.SWITCHOVER, S.COMMITTED, S.FAILED],
        # the destination failed after the commit point
        [S.IDLE, S.SETUP, S.SWITCHOVER, S.COMMITTED, S.LOST],
        [S.IDLE, S.SETUP, S.PRECOPY, S.SWITCHOVER, S.COMMITTED, S.POSTCOPY, S.RECOVERING, S.LOST],
    ],
)
def test_the_source_runs_of_the_phase_table(path: list[SourcePhase]) -> None:
    machine = PhaseMachine(SOURCE_TRANSITIONS, path[0])
    for phase in path[1:]:
        machine.advance(phase)
    assert machine.history == path


@pytest.mark.parametrize(
    "path",
    [
        [D.LISTENING, D.SETUP, D.RECEIVING, D.VERIFYING, D.PREPARED, D.RUNNING, D.DONE],
        [D.LISTENING, D.SETUP, D.RECEIVING, D.VERIFYING, D.PREPARED, D.POSTCOPY, D.RUNNING, D.DONE],
        [D.LISTENING, D.FAILED],
        [D.LISTENING, D.SETUP, D.RECEIVING, D.VERIFYING, D.PREPARED, D.FAILED],
        [D.LISTENING, D.SETUP, D.RECEIVING, D.VERIFYING, D.PREPARED, D.POSTCOPY, D.LOST],
    ],
)
def test_the_destination_runs_of_the_phase_table(path: list[DestinationPhase]) -> None:
    machine = PhaseMachine(DESTINATION_TRANSITIONS, path[0])
    for phase in path[1:]:
        machine.advance(phase)
    assert machine.history == path


def test_after_the_commit_point_the_source_never_goes_back() -> None:
    """From COMMITTED on nothing leads to a phase in which the source still runs the guest
    before a switchover; FAILED only from COMMITTED itself (the destination's ABORT before
    the guest ran there), never once it ran (POSTCOPY, RECOVERING, DONE)."""
    before = {S.IDLE, S.SETUP, S.PRECOPY, S.SWITCHOVER}
    assert not reachable(SOURCE_TRANSITIONS, S.COMMITTED) & before
    assert reachable(SOURCE_TRANSITIONS, S.COMMITTED) - {S.FAILED} == COMMITTED_PHASES
    for phase in (S.POSTCOPY, S.RECOVERING):
        assert S.FAILED not in reachable(SOURCE_TRANSITIONS, phase)
    assert not COMMITTED_PHASES & before


def test_a_running_destination_cannot_fail_only_finish_or_be_lost() -> None:
    for phase in (D.POSTCOPY, D.RUNNING):
        assert D.FAILED not in reachable(DESTINATION_TRANSITIONS, phase)
    assert DESTINATION_TRANSITIONS[D.RUNNING] == {D.DONE}
    assert D.LOST not in reachable(DESTINATION_TRANSITIONS, D.RUNNING)


@pytest.mark.parametrize(
    ("start", "to", "needed"),
    [
        (S.IDLE, S.COMMITTED, "switchover"),
        (S.SETUP, S.POSTCOPY, "committed or recovering"),
        (S.DONE, S.FAILED, "committed or idle or precopy or setup or switchover"),
        (S.SWITCHOVER, S.IDLE, "none"),
    ],
)
def test_an_illegal_source_transition_names_where_it_had_to_be(
    start: SourcePhase, to: SourcePhase, needed: str
) -> None:
    with pytest.raises(StateError) as info:
        PhaseMachine(SOURCE_TRANSITIONS, start).advance(to)
    assert (info.value.phase, info.value.needed) == (start.value, needed)


def test_require_names_the_phase_it_was_in_and_those_it_needed() -> None:
    machine = PhaseMachine(DESTINATION_TRANSITIONS, D.RECEIVING)
    machine.require(D.RECEIVING, D.VERIFYING)
    with pytest.raises(StateError) as info:
        machine.require(D.PREPARED, D.POSTCOPY)
    assert info.value.phase == "receiving"
    assert info.value.needed == "prepared or postcopy"
    assert "the migration is in receiving" in str(info.value)
