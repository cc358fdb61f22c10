"""When precopy switches over: the convergence policy, without I/O.

After each precopy round the source hands the round's figures (:class:`RoundFigures`) to a
:class:`Convergence`, which estimates the bandwidth and the pause a switchover would cause
now, and decides (:class:`Decision`):

- ``POSTCOPY`` once a postcopy migration has had the rounds it asked for;
- ``CONVERGED`` once the expected pause is at most :data:`SWITCHOVER_HEADROOM` of the
  downtime limit;
- after ``max_rounds`` without converging, ``POSTCOPY`` if the options allow it and the
  destination can page on demand, else ``FORCED`` (switch over whatever the pause);
- otherwise ``ANOTHER_ROUND``.

Nothing here measures time or touches a socket: the source measures, and the tests feed
rounds recorded from real migrations (tests/test_policy.py).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from .._sys.mm import PAGE_SIZE

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
            return self._postcopy() if self.on_no_convergence == "postcopy" else Decision.FORCED
        return Decision.ANOTHER_ROUND

    def _postcopy(self) -> Decision:
        return Decision.POSTCOPY if self.postcopy_possible else Decision.FORCED
