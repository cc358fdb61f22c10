"""The benchmark guest as the host sees it: its kernel command line, the lines it prints on
its serial console, and the single-character requests it takes there.

Sans-I/O: :func:`parse_line` turns one console line into a typed record and the ``*_request``
functions give the bytes to send; reading and writing the console is :mod:`.console`'s job.

The guest (``pageflip.vm.image.guest_elf()``) is a PVH ELF booted with ``-kernel`` and
``-append "mb=N rate=R hb=MS seed=S tick_us=U"``. It fills N MiB of its RAM (above 16 MiB;
the guest's RAM is N + 256 MiB), prints ``READY``, rewrites R MiB/s of distinct pages and
prints a heartbeat every MS ms. On input it answers:

``V``       ``VERIFY bad=<pages> pages=<P> ms=<T>``: every page re-checked
``P``       ``PAUSE max_us=<U> at_n=<hb> tick_us=<U> iters=<n>``: the largest gap between two
            iterations of its main loop since the previous ``P`` (then it starts over): the
            pause the guest itself observed
``G<ms>;``  ``GAPS n=<count> k=<listed> g1=<us> e1=<us> ... now=<us>``: its loop gaps longer
            than 1.5 ticks that ended in the last ``ms`` milliseconds (of its latest 1024;
            oldest first), each with the guest time its end came, and the guest time the line
            was printed (all in microseconds since ``READY``): what :meth:`Gaps.spanning`
            places on the host's clock to find the gap of the pause
``R<n>;``   ``RATE <n>``: a new dirty rate, MiB/s
``Q``       ``BYE``

An older guest without ``P`` (the *miniguest*, keys ``ml_mb`` etc.) is described by
:data:`MINIGUEST`; with it the guest-observed pause is unknown and only the host-side gap
between heartbeats tells.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ...errors import BadArgument

__all__ = [
    "FLAVOURS",
    "MINIGUEST",
    "PFGUEST",
    "ConsoleLine",
    "GAPS_MARGIN",
    "Fault",
    "Gaps",
    "GuestFlavour",
    "Heartbeat",
    "Pause",
    "RateSet",
    "Ready",
    "Started",
    "Verify",
    "Bye",
    "cmdline",
    "gaps_request",
    "parse_line",
    "pause_request",
    "quit_request",
    "rate_request",
    "verify_request",
]

MiB = 1 << 20
#: Seconds of a ``G`` request's window before the moment the guest was stopped.
GAPS_MARGIN = 0.5


@dataclass(frozen=True)
class GuestFlavour:
    """How one guest binary is driven: its command-line keys, and whether it answers ``P``.
    A key of None is not passed."""

    name: str
    mb: str
    rate: str
    hb: str
    seed: str
    tick_us: str | None
    has_pause: bool
    #: RAM the guest needs beyond its buffer (page tables, metadata at 8-16 MiB).
    extra_ram: int = 256 * MiB


#: The project's guest (``pageflip.vm.image.guest_elf()``).
PFGUEST = GuestFlavour("pfguest", "mb", "rate", "hb", "seed", "tick_us", has_pause=True)
#: The older miniguest: same console lines, ``ml_`` keys, no ``P`` request.
MINIGUEST = GuestFlavour("miniguest", "ml_mb", "ml_rate", "ml_hb", "ml_seed", None, has_pause=False)
FLAVOURS: dict[str, GuestFlavour] = {f.name: f for f in (PFGUEST, MINIGUEST)}


def cmdline(
    flavour: GuestFlavour, size: int, rate: int, hb_ms: int, seed: int, tick_us: int | None
) -> str:
    """The ``-append`` text for a guest of ``size`` bytes rewriting ``rate`` bytes/s (both
    whole MiB)."""
    if size % MiB or rate % MiB or size <= 0 or rate < 0:
        raise BadArgument(
            f"the guest takes whole MiB: size {size}, rate {rate} bytes/s", argument="size"
        )
    parts = [
        "console=ttyS0",
        f"{flavour.mb}={size // MiB}",
        f"{flavour.rate}={rate // MiB}",
        f"{flavour.hb}={hb_ms}",
        f"{flavour.seed}={seed}",
    ]
    if flavour.tick_us is not None and tick_us is not None:
        parts.append(f"{flavour.tick_us}={tick_us}")
    return " ".join(parts)


# -- what the guest prints --------------------------------------------------------------------


@dataclass(frozen=True)
class Started:
    """``PFGUEST start ...`` (or ``MINIGUEST start ...``): the guest booted."""

    fields: dict[str, int]


@dataclass(frozen=True)
class Ready:
    """``READY mb=N [pages=P] fill_ms=T``: filled, the workload runs."""

    mb: int
    pages: int | None
    fill_ms: int


@dataclass(frozen=True)
class Heartbeat:
    """``HB n=.. t=.. dirtied=.. rate=.. [gap_us=..]``: ``t`` is the guest's clock (ms),
    ``rate`` MiB/s measured since the previous heartbeat."""

    n: int
    t_ms: int
    dirtied: int
    rate: int
    gap_us: int | None


@dataclass(frozen=True)
class Pause:
    """``PAUSE max_us=.. at_n=.. tick_us=.. iters=..``: the largest gap the guest saw."""

    max_us: int
    at_n: int
    tick_us: int
    iters: int

    @property
    def seconds(self) -> float:
        return self.max_us / 1e6


@dataclass(frozen=True)
class Gaps:
    """``GAPS n=.. k=.. g1=.. e1=.. ... now=..``: the guest's long loop gaps of the window
    asked for (oldest first; ``count`` of them since READY): each its length and the guest
    time its end came, in microseconds since READY; ``now_us``: the guest time the line was
    printed (its last field)."""

    count: int
    gaps: tuple[tuple[int, int], ...]
    now_us: int

    def spanning(
        self, line_at: float, start: float, end: float, slack: float = 0.001
    ) -> float | None:
        """The longest gap that overlaps the host's moments ``start`` .. ``end`` (seconds,
        CLOCK_MONOTONIC), in seconds; None when none does.

        ``line_at`` is when this line's end reached the host: the guest printed ``now`` just
        before it, so a guest time ``t`` is ``line_at - (now - t)`` on the host's clock
        (off by the line's last bytes' way out and the guest's clock calibration, well
        under ``slack`` within seconds)."""
        found = [
            length
            for length, end_us in self.gaps
            if (gap_end := line_at - (self.now_us - end_us) / 1e6) >= start - slack
            and gap_end - length / 1e6 <= end + slack
        ]
        return max(found) / 1e6 if found else None


@dataclass(frozen=True)
class Verify:
    """``VERIFY bad=.. pages=.. ms=..``: ``bad`` pages of ``pages`` were wrong."""

    bad: int
    pages: int
    ms: int


@dataclass(frozen=True)
class RateSet:
    """``RATE n``: the guest took a new dirty rate (MiB/s)."""

    rate: int


@dataclass(frozen=True)
class Bye:
    """``BYE``: the guest stops."""


@dataclass(frozen=True)
class Fault:
    """A line that says the guest broke (an exception, not enough RAM)."""

    text: str


ConsoleLine = Started | Ready | Heartbeat | Pause | Gaps | Verify | RateSet | Bye | Fault

_KEYWORD = re.compile(
    r"(?:^|[^A-Za-z_])(?P<kw>PFGUEST start|MINIGUEST start|READY|HB|PAUSE|GAPS|VERIFY|RATE|BYE)"
    r"(?=\s|$)(?P<rest>.*)"
)
_FAULT = re.compile(r"GUEST-EXCEPTION|GUEST-ERROR|PANIC")
_PAIR = re.compile(r"([a-z_0-9]+)=(-?\d+)")


def _fields(rest: str) -> dict[str, int]:
    return {k: int(v) for k, v in _PAIR.findall(rest)}


def _need(fields: dict[str, int], *keys: str) -> bool:
    return all(k in fields for k in keys)


def parse_line(text: str) -> ConsoleLine | None:
    """The record for one console line (without its newline); None for any other line, or
    for a known keyword whose fields are incomplete (a line torn by serial noise)."""
    if _FAULT.search(text):
        return Fault(text.strip())
    match = _KEYWORD.search(text)
    if match is None:
        return None
    kw, rest = match["kw"], match["rest"]
    f = _fields(rest)
    if kw.endswith("start"):
        return Started(f)
    if kw == "READY":
        return Ready(f["mb"], f.get("pages"), f["fill_ms"]) if _need(f, "mb", "fill_ms") else None
    if kw == "HB":
        if not _need(f, "n", "t", "dirtied", "rate"):
            return None
        return Heartbeat(f["n"], f["t"], f["dirtied"], f["rate"], f.get("gap_us"))
    if kw == "PAUSE":
        if not _need(f, "max_us"):
            return None
        return Pause(f["max_us"], f.get("at_n", 0), f.get("tick_us", 0), f.get("iters", 0))
    if kw == "GAPS":
        if not _need(f, "n", "k", "now"):
            return None
        listed = range(1, f["k"] + 1)
        if not _need(f, *(f"{key}{i}" for i in listed for key in "ge")):
            return None
        gaps = tuple((f[f"g{i}"], f[f"e{i}"]) for i in listed)
        return Gaps(f["n"], gaps, f["now"])
    if kw == "VERIFY":
        if not _need(f, "bad", "pages"):
            return None
        return Verify(f["bad"], f["pages"], f.get("ms", 0))
    if kw == "RATE":
        number = rest.split()
        return RateSet(int(number[0])) if number and number[0].isdigit() else None
    return Bye()


# -- what the host sends ----------------------------------------------------------------------


def pause_request() -> bytes:
    """Ask for the largest pause since the previous request (and start over)."""
    return b"P"


def gaps_request(window: float) -> bytes:
    """Ask for the long loop gaps that ended in the last ``window`` seconds (nothing starts
    over)."""
    if window <= 0:
        raise BadArgument("the window of gaps must be positive", argument="window")
    return b"G%d;" % max(1, math.ceil(window * 1000))


def verify_request() -> bytes:
    """Ask the guest to re-check every page."""
    return b"V"


def rate_request(mib_per_s: int) -> bytes:
    """Set a new dirty rate (MiB/s)."""
    if mib_per_s < 0:
        raise BadArgument("a dirty rate cannot be negative", argument="mib_per_s")
    return b"R%d;" % mib_per_s


def quit_request() -> bytes:
    """Ask the guest to stop."""
    return b"Q"
