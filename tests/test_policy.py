"""The precopy convergence policy, fed round figures recorded from real migrations.

The recorded rounds come from ``pageflip bench migrate`` (benchmarks/results/migrate.json:
the run's index, size and write rate name each one; every one of its precopy runs converged)
and from two small migrations that could not converge, of the kind test_migration.py runs
(32 MiB under 256 MiB/s of writes, rounds capped at 64 MiB/s), recorded as the policy was fed.
A RoundEvent does not carry the scan time: for the benchmark's rounds it is what the reported
expected downtime leaves over after the bytes' share
(``expected - 1.15 * dirty bytes / bandwidth - 0.03``).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pageflip import PAGE_SIZE
from pageflip.migration.policy import (
    STALLED_ROUNDS,
    SWITCHOVER_HEADROOM,
    Convergence,
    Decision,
    RoundFigures,
    expected_downtime,
)

MiB = 1 << 20
recorded = pytest.mark.skipif(PAGE_SIZE != 4096, reason="the rounds were recorded on 4 KiB pages")

#: (pages, seconds, dirty pages, scan seconds) per round, and the bandwidth the run reported
#: for each round, bytes per second.
Recorded = list[tuple[int, float, int, float, float]]

IDLE_256M: Recorded = [(65600, 0.156692, 0, 0.00028, 1714815208)]  # run 1
IDLE_1G: Recorded = [(262400, 0.667024, 0, 0.00068, 1611322543)]  # run 10
IDLE_4G: Recorded = [(1049600, 4.296181, 0, 0.005115, 1000693710)]  # run 28
W64_1G: Recorded = [(262400, 0.564004, 11234, 0.00435, 1905644584)]  # run 12: 62 ms expected
W256_1G: Recorded = [(262400, 0.601054, 41470, 0.004561, 1788176500)]  # run 17: 144 ms
W256_2G: Recorded = [  # run 26: 330 ms, then 142 ms
    (524800, 1.408805, 93203, 0.011943, 1525818738),
    (93203, 0.356181, 24053, 0.006132, 1071813348),
]
W256_4G: Recorded = [  # run 70: 768 ms, 247 ms (under the limit, not under 3/5 of it), 126 ms
    (1049600, 3.304843, 196272, 0.027072, 1300866994),
    (196272, 0.723113, 48972, 0.009286, 1111762055),
    (48972, 0.236788, 16671, 0.003569, 847124397),
]
W256_4G_SLOW: Recorded = [  # run 35: 1774 ms, 379 ms, 151 ms
    (1049600, 5.462175, 283795, 0.04514, 787078751),
    (283795, 1.12204, 74471, 0.010364, 1035992044),
    (74471, 0.328685, 22608, 0.006491, 928040025),
]
#: Writes (256 MiB/s) as fast as the rounds (capped at 64 MiB/s): each round leaves about
#: as much to send as it sent, about 600 ms expected each time, so precopy never converges.
#: 32 MiB, as in test_migration.py; these two were recorded with their scan times.
RUNAWAY_32M: Recorded = [  # max_rounds 3: forced
    (8201, 0.519973, 8089, 0.017348, 64602052),
    (8089, 0.508222, 8134, 0.000875, 65192991),
    (8134, 0.499234, 8104, 0.000811, 66736012),
]
RUNAWAY_32M_AGAIN: Recorded = [  # max_rounds 4, on_no_convergence postcopy: postcopy
    (8201, 0.511428, 8174, 0.000857, 65681353),
    (8174, 0.502082, 8104, 0.000826, 66683739),
    (8104, 0.496858, 8063, 0.000669, 66807762),
    (8063, 0.506801, 8066, 0.004212, 65165732),
]


def figures(rounds: Recorded) -> list[RoundFigures]:
    return [RoundFigures(p, s, d, scan) for p, s, d, scan, _ in rounds]


def feed(policy: Convergence, rounds: list[RoundFigures]) -> list[Decision]:
    """The decisions after each round, up to the first switchover."""
    decisions = []
    for one in rounds:
        decisions.append(policy.after(one))
        if decisions[-1] is not Decision.ANOTHER_ROUND:
            break
    return decisions


def precopy(**kwargs: Any) -> Convergence:
    """A policy with the default options (300 ms, 30 rounds) but for ``kwargs``."""
    return Convergence(**{"downtime_limit": 0.3, "max_rounds": 30, **kwargs})


# -- recorded runs: the decisions they made ------------------------------------------------


@recorded
@pytest.mark.parametrize(
    "rounds",
    [IDLE_256M, IDLE_1G, IDLE_4G, W64_1G, W256_1G, W256_2G, W256_4G, W256_4G_SLOW],
    ids=[
        "idle-256M",
        "idle-1G",
        "idle-4G",
        "64M/s-1G",
        "256M/s-1G",
        "256M/s-2G",
        "256M/s-4G",
        "256M/s-4G-slow",
    ],
)
def test_recorded_runs_converge_after_the_rounds_they_took(rounds: Recorded) -> None:
    policy = precopy()
    decisions = feed(policy, figures(rounds))
    assert decisions == [Decision.ANOTHER_ROUND] * (len(rounds) - 1) + [Decision.CONVERGED]
    assert policy.rounds == len(rounds)
    assert policy.expected <= SWITCHOVER_HEADROOM * 0.3


@recorded
def test_the_bandwidth_is_the_last_rounds_pages_over_its_time() -> None:
    policy = precopy()
    for one, (_, _, _, _, reported) in zip(figures(W256_4G), W256_4G, strict=True):
        policy.after(one)
        assert policy.bandwidth == pytest.approx(reported, rel=1e-5)


@recorded
def test_idle_converges_after_one_round_with_only_the_scan_expected() -> None:
    """Nothing was written: the pause is the scan; one round, then the paused one."""
    for rounds in (IDLE_256M, IDLE_1G, IDLE_4G):
        policy = precopy()
        assert policy.first() is Decision.ANOTHER_ROUND
        assert policy.after(figures(rounds)[0]) is Decision.CONVERGED
        assert policy.expected == rounds[0][3]


@recorded
def test_a_round_under_the_limit_but_not_under_its_headroom_is_followed_by_another() -> None:
    """Run 70's second round expected 247 ms: under the 300 ms limit, over 3/5 of it (the
    estimate erred by up to 1.55x); a third round brought it to 126 ms."""
    policy = precopy()
    first, second, third = figures(W256_4G)
    assert policy.after(first) is Decision.ANOTHER_ROUND
    assert policy.after(second) is Decision.ANOTHER_ROUND
    assert policy.target < policy.expected < 0.3
    assert policy.after(third) is Decision.CONVERGED
    assert policy.expected == pytest.approx(0.126267, abs=1e-5)


@recorded
def test_a_larger_limit_switches_over_a_round_earlier() -> None:
    policy = precopy(downtime_limit=0.5)  # 3/5 of it is 300 ms: 247 ms fits
    assert feed(policy, figures(W256_4G)) == [Decision.ANOTHER_ROUND, Decision.CONVERGED]


def test_an_estimate_exactly_at_the_target_switches_over_and_a_hair_above_does_not() -> None:
    """Nothing written: the estimate is the scan alone, so it can be put on the target."""
    target = precopy().target
    assert target == pytest.approx(SWITCHOVER_HEADROOM * 0.3)
    at = RoundFigures(pages=1000, seconds=0.01, dirty_pages=0, scan_seconds=target)
    above = RoundFigures(1000, 0.01, 0, math.nextafter(target, math.inf))
    assert precopy().after(at) is Decision.CONVERGED
    assert precopy().after(above) is Decision.ANOTHER_ROUND


# -- no convergence: max rounds, or rounds that cannot get there; then force or postcopy ----


#: A round of 512 MiB at 1 GiB/s that leaves half of it written again: 318 ms expected
#: against a 180 ms target, and each round would halve the bytes' part of it, so one more
#: round gets there. Fed again and again it never does: only max_rounds stops it.
HALVING = RoundFigures(
    pages=131072, seconds=131072 * PAGE_SIZE / (1 << 30), dirty_pages=65536, scan_seconds=0.0005
)


@recorded
def test_writes_as_fast_as_the_rounds_are_seen_not_to_converge_after_two_rounds() -> None:
    """The runaway run (recorded with max_rounds 3, which forced it after the third): each
    round left as much to send as it sent. Two rounds in a row show it: no third one, and
    the forced pause is said to be over the downtime limit."""
    policy = precopy()  # 30 rounds allowed
    decisions = feed(policy, figures(RUNAWAY_32M))
    assert decisions == [Decision.ANOTHER_ROUND, Decision.FORCED]
    assert policy.rounds == STALLED_ROUNDS == 2
    assert policy.expected == pytest.approx(0.6186, abs=1e-4)
    assert policy.why == (
        "precopy cannot converge: round 2 sent 8089 pages and 8134 were written meanwhile: "
        "each round leaves as much to send as it sent; switching over anyway, with an "
        "expected pause of 619 ms, OVER the 300 ms downtime limit"
    )
    for one in figures(RUNAWAY_32M):
        assert one.dirty_pages >= 0.98 * one.pages  # nothing shrinks: rounds cannot help
        assert one.dirty_rate == pytest.approx(policy.bandwidth, rel=0.05)


@recorded
def test_a_round_that_shrinks_what_is_left_too_slowly_counts_as_no_convergence() -> None:
    """The runaway run's first round left 98.6% of what it sent: at that rate the 180 ms
    target is 109 rounds away, past the 30 allowed."""
    policy = precopy()
    assert policy.after(figures(RUNAWAY_32M)[0]) is Decision.ANOTHER_ROUND
    assert policy._stall(figures(RUNAWAY_32M)[0]) == (
        "round 1 sent 8201 pages and 8089 were written meanwhile (99%): 109 more rounds to "
        "reach the 180 ms target, over the 30 allowed"
    )


@recorded
def test_one_hopeless_round_alone_does_not_stop_precopy() -> None:
    """A burst of writes in one round, then rounds that shrink fast: precopy goes on."""
    burst, *_ = figures(RUNAWAY_32M)
    calm = RoundFigures(pages=8089, seconds=0.1, dirty_pages=400, scan_seconds=0.001)
    policy = precopy()
    assert feed(policy, [burst, calm, calm]) == [Decision.ANOTHER_ROUND, Decision.CONVERGED]
    assert policy.why is None


@recorded
def test_writes_as_fast_as_the_rounds_fall_back_to_postcopy_when_allowed() -> None:
    policy = precopy(max_rounds=4, on_no_convergence="postcopy", postcopy_possible=True)
    assert feed(policy, figures(RUNAWAY_32M_AGAIN)) == [Decision.ANOTHER_ROUND, Decision.POSTCOPY]
    assert policy.bandwidth == pytest.approx(RUNAWAY_32M_AGAIN[1][4], rel=1e-6)
    assert policy.why is not None and policy.why.endswith("; switching to postcopy")


@recorded
def test_the_postcopy_fallback_is_forced_where_the_destination_cannot_page() -> None:
    """Over TCP there is no pager: the fallback is a forced switchover."""
    policy = precopy(max_rounds=4, on_no_convergence="postcopy", postcopy_possible=False)
    assert feed(policy, figures(RUNAWAY_32M_AGAIN))[-1] is Decision.FORCED
    assert policy.why is not None and "OVER the 300 ms downtime limit" in policy.why


def test_hugetlb_pages_all_written_every_round_stop_precopy_after_two() -> None:
    """The 4 GiB workload on 2 MiB pages under 256 MiB/s of random writes (benchmarks.md:
    31 rounds, 67.5 s and a forced 1.73 s pause): writes are tracked in whole huge pages, so
    every round leaves all of the memory to send again. Two rounds show it; with the
    postcopy fallback it goes postcopy, else the forced pause is said to be over the limit."""
    everything = 1 << 20  # 4 GiB of 4 KiB pages
    one = RoundFigures(pages=everything, seconds=4.0, dirty_pages=everything, scan_seconds=0.003)
    forced = precopy()
    assert feed(forced, [one] * 31) == [Decision.ANOTHER_ROUND, Decision.FORCED]
    assert forced.why is not None and "OVER the 300 ms downtime limit" in forced.why
    fallback = precopy(on_no_convergence="postcopy", postcopy_possible=True)
    assert feed(fallback, [one] * 31) == [Decision.ANOTHER_ROUND, Decision.POSTCOPY]


def test_rounds_that_still_shrink_what_is_left_go_on_to_max_rounds() -> None:
    """Each round leaves 80% of what it sent (400 ms expected against a 180 ms target): the
    target is 4-5 rounds away, past the 4 allowed, yet every round makes the forced pause
    shorter, so precopy does not stop early."""
    slow = RoundFigures(pages=131072, seconds=0.5, dirty_pages=104858, scan_seconds=0.0005)
    policy = precopy(max_rounds=4)
    assert policy.after(slow) is Decision.ANOTHER_ROUND
    assert policy.expected > 0.35
    assert policy._stall(slow) is None  # 80% written again: below STALL_SHARE
    decisions = feed(precopy(max_rounds=4), [slow] * 10)
    assert decisions == [Decision.ANOTHER_ROUND] * 3 + [Decision.FORCED]


def test_max_rounds_counts_every_round_fed() -> None:
    """Rounds that each foresee convergence within max_rounds but never reach it."""
    for max_rounds in (1, 2, 5, 30):
        policy = precopy(max_rounds=max_rounds)
        decisions = feed(policy, [HALVING] * 100)
        assert len(decisions) == max_rounds
        assert decisions[-1] is Decision.FORCED
        assert policy.why == (
            f"precopy did not converge in {max_rounds} round{'' if max_rounds == 1 else 's'}; "
            "switching over anyway, with an "
            "expected pause of 318 ms, OVER the 300 ms downtime limit"
        )


def test_a_forced_pause_within_the_limit_says_so() -> None:
    """Over the 3/5 target but under the limit itself: forced, and said to be within it."""
    policy = precopy(max_rounds=1, downtime_limit=0.4)
    assert policy.after(HALVING) is Decision.FORCED
    assert policy.why is not None
    assert policy.why.endswith("expected pause of 318 ms (the downtime limit is 400 ms)")


@recorded
def test_converging_on_the_last_allowed_round_is_not_forced() -> None:
    policy = precopy(max_rounds=3)
    assert feed(policy, figures(W256_4G)) == [
        Decision.ANOTHER_ROUND,
        Decision.ANOTHER_ROUND,
        Decision.CONVERGED,
    ]


# -- postcopy mode -------------------------------------------------------------------------


def test_a_pure_postcopy_switches_over_before_any_round() -> None:
    policy = precopy(postcopy_after_rounds=0, postcopy_possible=True)
    assert policy.first() is Decision.POSTCOPY
    assert policy.rounds == 0 and policy.expected == math.inf


@recorded
def test_postcopy_after_rounds_takes_over_even_when_precopy_would_converge() -> None:
    policy = precopy(postcopy_after_rounds=1, postcopy_possible=True)
    assert policy.first() is Decision.ANOTHER_ROUND
    assert policy.after(figures(IDLE_1G)[0]) is Decision.POSTCOPY
    policy = precopy(postcopy_after_rounds=2, postcopy_possible=True)
    assert feed(policy, figures(RUNAWAY_32M)) == [Decision.ANOTHER_ROUND, Decision.POSTCOPY]


def test_a_precopy_asks_for_a_first_round() -> None:
    assert precopy().first() is Decision.ANOTHER_ROUND
    assert precopy(on_no_convergence="postcopy").first() is Decision.ANOTHER_ROUND


# -- rounds that measured nothing ----------------------------------------------------------


def test_a_first_round_of_no_measurable_time_has_no_bandwidth_yet() -> None:
    policy = precopy()
    one = RoundFigures(pages=100, seconds=0.0, dirty_pages=10, scan_seconds=0.0)
    assert policy.after(one) is Decision.ANOTHER_ROUND
    assert policy.bandwidth == 0.0
    assert policy.expected == math.inf
    assert one.dirty_rate == 0.0


def test_a_round_of_no_time_or_no_pages_keeps_the_bandwidth_measured_before() -> None:
    policy = precopy()
    policy.after(RoundFigures(pages=25600, seconds=0.1, dirty_pages=5000, scan_seconds=0.001))
    measured = policy.bandwidth
    assert measured == pytest.approx(25600 * PAGE_SIZE / 0.1)
    policy.after(RoundFigures(pages=5000, seconds=0.0, dirty_pages=4000, scan_seconds=0.001))
    assert policy.bandwidth == measured
    policy.after(RoundFigures(pages=0, seconds=0.01, dirty_pages=4000, scan_seconds=0.001))
    assert policy.bandwidth == measured
    assert policy.expected == expected_downtime(4000 * PAGE_SIZE, measured, 0.001)


def test_nothing_written_converges_even_without_a_bandwidth() -> None:
    policy = precopy()
    assert policy.after(RoundFigures(0, 0.0, 0, 0.002)) is Decision.CONVERGED
    assert policy.expected == 0.002


def test_a_scan_longer_than_the_target_is_seen_not_to_converge() -> None:
    """Nothing written, but the scan alone is over the target: no round can help."""
    policy = precopy()
    slow_scan = RoundFigures(pages=1000, seconds=0.1, dirty_pages=0, scan_seconds=0.25)
    assert feed(policy, [slow_scan] * 5) == [Decision.ANOTHER_ROUND, Decision.FORCED]
    assert policy.why is not None
    assert "the pause's fixed part (280 ms, the last scan's included) is over the 180 ms" in (
        policy.why
    )
    assert policy.why.endswith("expected pause of 250 ms (the downtime limit is 300 ms)")


# -- the estimate --------------------------------------------------------------------------


def test_the_estimate_of_a_recorded_round() -> None:
    """Run 17: 41470 pages written at 1.79 GB/s, after a 4.6 ms scan: 144 ms expected."""
    assert expected_downtime(41470 * 4096, 1788176499.667418, 0.004561) == pytest.approx(
        0.143801, abs=1e-6
    )
    assert expected_downtime(0, 0.0, 0.003) == 0.003
    assert expected_downtime(1, 0.0, 0.003) == math.inf


sizes = st.integers(min_value=0, max_value=1 << 40)
rates = st.floats(min_value=1.0, max_value=1e12)
scans = st.floats(min_value=0.0, max_value=10.0)


@given(sizes, sizes, rates, scans)
def test_the_estimate_grows_with_what_is_left(
    a: int, b: int, bandwidth: float, scan: float
) -> None:
    low, high = sorted((a, b))
    assert expected_downtime(low, bandwidth, scan) <= expected_downtime(high, bandwidth, scan)
    assert expected_downtime(low, bandwidth, scan) >= scan


@given(sizes, rates, rates, scans)
def test_the_estimate_shrinks_with_bandwidth(left: int, a: float, b: float, scan: float) -> None:
    slow, fast = sorted((a, b))
    assert expected_downtime(left, fast, scan) <= expected_downtime(left, slow, scan)


round_figures = st.builds(
    RoundFigures,
    pages=st.integers(min_value=0, max_value=1 << 22),
    seconds=st.floats(min_value=0.0, max_value=100.0),
    dirty_pages=st.integers(min_value=0, max_value=1 << 22),
    scan_seconds=st.floats(min_value=0.0, max_value=1.0),
)


@given(
    st.lists(round_figures, min_size=1, max_size=40),
    st.integers(min_value=1, max_value=40),
    st.sampled_from(["force", "postcopy"]),
    st.booleans(),
)
def test_every_precopy_switches_over_within_max_rounds(
    rounds: list[RoundFigures], max_rounds: int, fallback: str, possible: bool
) -> None:
    policy = precopy(max_rounds=max_rounds, on_no_convergence=fallback, postcopy_possible=possible)
    decisions = feed(policy, rounds)
    assert all(d is Decision.ANOTHER_ROUND for d in decisions[:-1])
    assert len(decisions) <= max_rounds
    if len(rounds) >= max_rounds:
        assert decisions[-1] is not Decision.ANOTHER_ROUND
    assert policy.bandwidth >= 0.0
    last = decisions[-1]
    if last is Decision.CONVERGED:
        assert policy.expected <= policy.target and policy.why is None
    if last is Decision.POSTCOPY:
        assert possible and fallback == "postcopy"
    if last in (Decision.POSTCOPY, Decision.FORCED):
        assert policy.expected > policy.target and policy.why is not None
        # At max_rounds, or sooner once enough rounds in a row saw it could not converge.
        assert policy.rounds == max_rounds or (
            policy.rounds >= STALLED_ROUNDS and policy.why.startswith("precopy cannot converge")
        )


def test_the_decisions_name_the_switchover_reasons_events_give() -> None:
    """Displays and benchmarks read these reasons from SwitchoverEvent."""
    assert {d.value for d in Decision if d is not Decision.ANOTHER_ROUND} == {
        "converged",
        "postcopy",
        "forced",
    }
