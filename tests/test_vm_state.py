"""pageflip.vm.state without a VM: the local APIC timer caught up with the time its state
stood still (a migration's pause), and when the state may not say how long that was."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pageflip._sys.procfs import clock_identity
from pageflip.errors import BadGuestState
from pageflip.vm import state
from pageflip.vm.state import (
    APIC_IRR,
    APIC_LVTT,
    APIC_TDCR,
    APIC_TMCCT,
    APIC_TMICT,
    lapic_caught_up,
)

PERIODIC = 1 << 17
TSC_DEADLINE = 2 << 17
MASKED = 1 << 16
VECTOR = 0x20
#: TDCR: divide by 1 (0b1011) and by 16 (0b0011).
BY_1, BY_16 = 0b1011, 0b0011


def _page(lvtt: int, tmict: int, tmcct: int, tdcr: int = BY_1) -> bytes:
    regs = bytearray(1024)
    for offset, value in ((APIC_LVTT, lvtt), (APIC_TMICT, tmict), (APIC_TMCCT, tmcct)):
        struct.pack_into("<I", regs, offset, value)
    struct.pack_into("<I", regs, APIC_TDCR, tdcr)
    return bytes(regs)


def _count(regs: bytes) -> int:
    return int(struct.unpack_from("<I", regs, APIC_TMCCT)[0])


def _pending(regs: bytes, vector: int = VECTOR) -> bool:
    word = struct.unpack_from("<I", regs, APIC_IRR + 0x10 * (vector // 32))[0]
    return bool(word >> (vector % 32) & 1)


def test_a_timer_with_time_left_counts_down_by_the_pause_over_its_divider() -> None:
    regs = _page(PERIODIC | VECTOR, 1_000_000, 600_000, BY_16)
    after = lapic_caught_up(regs, 1_600_000)  # 1.6 ms: 100 000 counts at 1 ns x 16
    assert _count(after) == 500_000 and not _pending(after)
    assert after[:APIC_TMCCT] == regs[:APIC_TMCCT]  # nothing else changed


def test_a_periodic_tick_that_fell_in_the_pause_is_pending_and_the_next_keeps_its_phase() -> None:
    regs = _page(PERIODIC | VECTOR, 1_000_000, 300_000)
    after = lapic_caught_up(regs, 2_450_000)  # ran out at 0.3 ms, then 2 periods and 0.15
    assert _pending(after)
    assert _count(after) == 1_000_000 - 150_000


def test_a_one_shot_that_ran_out_is_pending_and_stopped() -> None:
    after = lapic_caught_up(_page(VECTOR, 1_000_000, 300_000), 400_000)
    assert _pending(after) and _count(after) == 0


def test_a_masked_timer_counts_on_but_raises_nothing() -> None:
    after = lapic_caught_up(_page(MASKED | PERIODIC | VECTOR, 1000, 300), 1000)
    assert not _pending(after) and _count(after) == 300  # ran out at 300, 700 into the next


def test_a_periodic_timer_read_between_its_end_and_its_rearming_is_due() -> None:
    after = lapic_caught_up(_page(PERIODIC | VECTOR, 1000, 0), 300)
    assert _pending(after) and _count(after) == 700


@pytest.mark.parametrize(
    "regs",
    [
        _page(TSC_DEADLINE | VECTOR, 0, 0),  # its deadline is an MSR on the TSC, which ran on
        _page(PERIODIC | VECTOR, 0, 0),  # never started
        _page(VECTOR, 1000, 0),  # a one-shot that has fired already
    ],
)
def test_a_timer_that_is_not_counting_is_left_as_it_is(regs: bytes) -> None:
    assert lapic_caught_up(regs, 10**9) == regs


def test_the_vector_lands_in_its_own_irr_word() -> None:
    after = lapic_caught_up(_page(PERIODIC | 0xEF, 1000, 10), 20)
    assert _pending(after, 0xEF) and not _pending(after, VECTOR)


@given(
    period=st.integers(1, 10**7),
    left=st.integers(1, 10**7),
    first=st.integers(0, 10**8),
    second=st.integers(0, 10**8),
)
def test_catching_up_twice_is_catching_up_once_by_the_sum(
    period: int, left: int, first: int, second: int
) -> None:
    regs = _page(PERIODIC | VECTOR, period, min(left, period))
    once = lapic_caught_up(regs, first + second)
    twice = lapic_caught_up(lapic_caught_up(regs, first), second)
    assert _count(once) == _count(twice)
    assert 1 <= _count(once) <= period
    assert _pending(once) == _pending(twice)


def test_the_time_it_stood_still_is_known_only_on_the_same_clock() -> None:
    ours = list(clock_identity())
    assert state._lapic_read_at({"at_ns": 123, "clock": ours}) == 123
    assert state._lapic_read_at(None) is None  # a state from before the record
    other_boot = [ours[0] ^ 1, *ours[1:]]
    assert state._lapic_read_at({"at_ns": 123, "clock": other_boot}) is None
    other_namespace = [*ours[:2], ours[2] + 1]
    assert state._lapic_read_at({"at_ns": 123, "clock": other_namespace}) is None
    for bad in ("soon", {"at_ns": "x", "clock": ours}, {"at_ns": 1}):
        with pytest.raises(BadGuestState, match="lapic_read"):
            state._lapic_read_at(bad)
