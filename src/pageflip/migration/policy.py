"""When precopy switches over: the convergence policy, without I/O.

After each precopy round the source hands the round's figures (:class:`RoundFigures`) to a
:class:`Convergence`, which estimates the bandwidth and the pause a switchover would cause
now, and decides (:class:`Decision`):

- ``POSTCOPY`` once a postcopy migration has had the rounds it asked for;
- ``CONVERGED`` once the expected pause is at most :data:`SWITCHOVER_HEADROOM` of the
  downtime limit;
- when precopy cannot converge, ``POSTCOPY`` if the options allow it and the destination
  can page on demand, else ``FORCED`` (switch over whatever the pause). It cannot after
  ``max_rounds``, and it is seen not to, sooner, when :data:`STALLED_ROUNDS` rounds in a row
  leave at least :data:`STALL_SHARE` of what they sent to send again and too much to reach
  the target within ``max_rounds`` (a guest on hugetlb pages that writes all over its
  memory leaves all of it: its writes are tracked in whole huge pages). Rounds that still
  shrink what is left go on to ``max_rounds``: each makes a forced pause shorter;
- otherwise ``ANOTHER_ROUND``.

:attr:`Convergence.why` then says, in one line, why precopy stopped without converging and
what comes of it: postcopy, or a forced pause, and whether that is over the downtime limit.

Nothing here measures time or touches a socket: the source measures, and the tests feed
rounds recorded from real migrations (tests/test_policy.py).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from .._sys.mm import PAGE_SIZE
from ..units import format_duration

#: The last round runs while the guest is paused and costs more than its bytes at the last
#: round's bandwidth: a final scan for written pages, the destination hashing the last
#: pages and checking every digest, the restore and resume. Measured here: about 1.15 times
#: the bytes' time plus 30 ms, plus the scan.
SWITCHOVER_SLOWDOWN = 1.15
SWITCHOVER_FIXED = 0.03
#: Precopy switches over when the expected downtime is at most this fraction of the limit.
#: On this noisy VM the paused round ran up to 1.55x longer than estimated from the round
#: before (2 GiB under 256 MiB/s: 219 ms expected, 340 ms measured; 108 runs of
#: ``pageflip bench migrate``). One more round costs a fraction of a second and shrinks what
#: is left by the ratio of dirty rate to bandwidth.
SWITCHOVER_HEADROOM = 0.6
#: Rounds in a row that must foresee no convergence before precopy stops early: one round
#: may be a burst of writes.
STALLED_ROUNDS = 2
#: The share of a round's pages written again meanwhile at and above which more rounds are
#: not worth their time: below it each round still shrinks the pause a forced switchover
#: would take, so precopy goes on to max_rounds even when it cannot reach its target.
STALL_SHARE = 0.9


def expected_downtime(remaining_bytes: int, bandwidth: float, scan_seconds: float) -> float:
    """How long a switchover now would keep the guest paused, in seconds."""
    if remaining_bytes == 0:
        return scan_seconds
    if bandwidth <= 0:
        return float("inf")
    return SWITCHOVER_SLOWDOWN * remaining_bytes / bandwidth + SWITCHOVER_FIXED + scan_seconds


class Decision(enum.Enum):
    """What to do after a round; a switchover's value is the reason its event gives."""

    ANOTHER_ROUND = "another round"
    CONVERGED = "converged"  # what is left fits the downtime limit, with headroom
    POSTCOPY = "postcopy"  # switch over now; the destination fetches the rest on demand
    FORCED = "forced"  # no convergence within max_rounds: switch over whatever the pause


@dataclass(frozen=True, slots=True)
class RoundFigures:
    """What one precopy round measured."""

    #: Pages the round sent (pages of zeros included: they were read and hashed too).
    pages: int
    #: From its first page to the destination's ROUND_ACK.
    seconds: float
    #: Pages written while it ran: what the next round, or the pause, must send.
    dirty_pages: int
    #: The scan that found them; the pause repeats it.
    scan_seconds: float

    @property
    def dirty_rate(self) -> float:
        """Bytes written per second while the round ran (0 for a round that took no time)."""
        return self.dirty_pages * PAGE_SIZE / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Convergence:
    """Fed each round's figures, decides when precopy switches over (module docstring)."""

    #: The longest pause precopy may cause, in seconds.
    downtime_limit: float
    #: Rounds without converging before ``on_no_convergence`` decides.
    max_rounds: int
    #: "force" or "postcopy".
    on_no_convergence: str = "force"
    #: A postcopy migration: rounds before postcopy takes over (None: not a postcopy).
    postcopy_after_rounds: int | None = None
    #: Whether the destination can page on demand (else a postcopy becomes FORCED).
    postcopy_possible: bool = True
    #: Switch over once the expected pause is at most this fraction of the limit.
    headroom: float = SWITCHOVER_HEADROOM

    #: Rounds fed so far.
    rounds: int = field(default=0, init=False)
    #: Bytes per second of the last round that moved pages in measurable time (0: none yet).
    bandwidth: float = field(default=0.0, init=False)
    #: Seconds a switchover now would pause the guest (infinite before the first round).
    expected: float = field(default=math.inf, init=False)
    #: Why precopy stopped without converging, and what comes of it (None until it does).
    why: str | None = field(default=None, init=False)
    #: Rounds in a row that foresaw no convergence.
    _stalled: int = field(default=0, init=False, repr=False)

    @property
    def target(self) -> float:
        """The expected pause at or under which precopy has converged, in seconds."""
        return self.headroom * self.downtime_limit

    def first(self) -> Decision:
        """Before any round: a postcopy that asked for no rounds switches over at once."""
        if self.postcopy_after_rounds == 0:
            return self._postcopy()
        return Decision.ANOTHER_ROUND

    def after(self, figures: RoundFigures) -> Decision:
        """Take one round's figures; what to do next."""
        self.rounds += 1
        moved = figures.pages * PAGE_SIZE
        if figures.seconds > 0 and moved:
            self.bandwidth = moved / figures.seconds
        # A round of no pages, or of no measurable time, leaves the estimate as it was.
        self.expected = expected_downtime(
            figures.dirty_pages * PAGE_SIZE, self.bandwidth, figures.scan_seconds
        )
        if self.postcopy_after_rounds is not None and self.rounds >= self.postcopy_after_rounds:
            return self._postcopy()
        if self.expected <= self.target:
            return Decision.CONVERGED
        if self.rounds >= self.max_rounds:
            rounds = f"{self.rounds} round{'' if self.rounds == 1 else 's'}"
            return self._no_convergence(f"precopy did not converge in {rounds}")
        stall = self._stall(figures)
        self._stalled = self._stalled + 1 if stall else 0
        if stall and self._stalled >= STALLED_ROUNDS:
            return self._no_convergence(f"precopy cannot converge: {stall}")
        return Decision.ANOTHER_ROUND

    def _stall(self, figures: RoundFigures) -> str | None:
        """Why this round foresees that precopy cannot reach its target within max_rounds,
        if it does: each further round would leave the same share of what it sends to be
        sent again, shrinking the bytes of the expected pause by that share."""
        if not math.isfinite(self.expected):
            return None  # no bandwidth measured yet: nothing to judge by
        fixed = SWITCHOVER_FIXED + figures.scan_seconds
        room, left = self.target - fixed, self.expected - fixed
        if room <= 0:
            return (
                f"the pause's fixed part ({format_duration(fixed)}, the last scan's included) "
                f"is over the {format_duration(self.target)} target"
            )
        share = figures.dirty_pages / figures.pages if figures.pages else math.inf
        written = (
            f"round {self.rounds} sent {figures.pages} pages and {figures.dirty_pages} were "
            "written meanwhile"
        )
        if share >= 1:
            return f"{written}: each round leaves as much to send as it sent"
        if share < STALL_SHARE:
            return None  # another round still shrinks the pause a forced switchover takes
        rounds = math.log(room / left) / math.log(share)
        if self.rounds + rounds <= self.max_rounds:
            return None
        return (
            f"{written} ({share:.0%}): {math.ceil(rounds)} more rounds to reach the "
            f"{format_duration(self.target)} target, over the {self.max_rounds} allowed"
        )

    def _no_convergence(self, why: str) -> Decision:
        """No convergence: postcopy where allowed and possible, else a forced switchover."""
        decision = self._postcopy() if self.on_no_convergence == "postcopy" else Decision.FORCED
        limit = format_duration(self.downtime_limit)
        if decision is Decision.POSTCOPY:
            then = "switching to postcopy"
        elif self.expected > self.downtime_limit:
            then = (
                f"switching over anyway, with an expected pause of "
                f"{format_duration(self.expected)}, OVER the {limit} downtime limit"
            )
        else:
            then = (
                f"switching over anyway, with an expected pause of "
                f"{format_duration(self.expected)} (the downtime limit is {limit})"
            )
        self.why = f"{why}; {then}"
        return decision

    def _postcopy(self) -> Decision:
        return Decision.POSTCOPY if self.postcopy_possible else Decision.FORCED
