"""What a migration benchmark runs: its configuration, its runs in order, its error."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ...errors import BadArgument, MigrateBenchmarkError
from ...memory import HUGE_NAMES, PAGE_SIZE
from ...units import format_rate, format_size

__all__ = [
    "DEFAULT_RATES",
    "DEFAULT_SIZES",
    "MODES",
    "ORDER",
    "MigrateBenchmarkError",
    "MigrateConfig",
    "ProgressCallback",
    "RunSpec",
    "run_order",
]

MiB = 1 << 20
GiB = 1 << 30
MODES: tuple[str, ...] = ("flip", "precopy", "postcopy")
#: What ``huge`` takes (see :data:`pageflip.memory.HugePages`).
HUGE_CHOICES = HUGE_NAMES
DEFAULT_SIZES: tuple[int, ...] = (256 * MiB, 1 * GiB, 4 * GiB)
DEFAULT_RATES: tuple[int, ...] = (0, 64 * MiB, 256 * MiB)

ORDER = (
    "interleaved: for each repeat, sizes then dirty rates in the order given, every mode back "
    "to back for each (size, rate), the mode order rotated by one from one (size, rate) to "
    "the next; both processes exit (their memory is freed) and the benchmark waits "
    "{settle:g} s before the next run"
)

#: Called before each run with (runs done, runs in all, what runs now).
ProgressCallback = Callable[[int, int, str], None]


@dataclass(frozen=True)
class MigrateConfig:
    """What to run: every (size, rate, mode), ``repeat`` times. Sizes and rates in bytes
    (per second), times in seconds."""

    sizes: tuple[int, ...] = DEFAULT_SIZES
    rates: tuple[int, ...] = DEFAULT_RATES
    modes: tuple[str, ...] = MODES
    repeat: int = 1
    #: Precopy switches over once the rest would take at most this long (QEMU's default).
    downtime_limit: float = 0.3
    #: Writer threads of the workload.
    threads: int = 2
    #: Seconds between the end of the fill and the migration (the writers reach their rate).
    warmup: float = 1.0
    #: Seconds between runs, once both processes of the previous one have exited.
    settle: float = 1.0
    #: Just before each migration, touch and free as much memory as the destination will
    #: need, so that it gets warm memory (docs/kernel.md, "Memory warmth") whatever ran before.
    prewarm: bool = True
    #: Seconds between memory samples.
    sample_interval: float = 0.05
    #: Seconds the destination lets the guest run before it verifies it.
    verify_delay: float = 0.3
    #: Longest wait for any one step (a fill, a migration, a check), seconds.
    timeout: float = 900.0
    #: Huge pages for the workload's memory (``Region.movable(huge=...)``: "hugetlb",
    #: "hugetlb-1g", "thp" or "auto"); None: 4 KiB pages.
    huge: str | None = None

    def __post_init__(self) -> None:
        if not self.sizes or not self.rates or not self.modes:
            raise BadArgument("choose at least one size, one dirty rate and one mode")
        unknown = [m for m in self.modes if m not in MODES]
        if unknown:
            raise BadArgument(
                f"unknown mode(s) {unknown}; choose from {list(MODES)}", argument="modes"
            )
        if len(set(self.modes)) != len(self.modes):
            raise BadArgument("each mode once, please", argument="modes")
        if any(s < PAGE_SIZE for s in self.sizes):
            raise BadArgument(
                f"every size must be at least one page ({PAGE_SIZE} bytes)", argument="sizes"
            )
        if any(r < 0 for r in self.rates):
            raise BadArgument("dirty rates cannot be negative", argument="rates")
        if self.repeat < 1:
            raise BadArgument("repeat must be at least 1", argument="repeat")
        if self.downtime_limit <= 0:
            raise BadArgument("the downtime limit must be positive", argument="downtime_limit")
        if self.threads < 1:
            raise BadArgument("the workload needs at least one thread", argument="threads")
        if min(self.warmup, self.settle, self.verify_delay) < 0:
            raise BadArgument("warmup, settle and verify_delay cannot be negative")
        if self.sample_interval <= 0 or self.timeout <= 0:
            raise BadArgument("sample_interval and timeout must be positive")
        if self.huge not in (None, *HUGE_CHOICES):
            raise BadArgument(
                f"huge must be one of {list(HUGE_CHOICES)} or None, not {self.huge!r}",
                argument="huge",
            )


@dataclass(frozen=True)
class RunSpec:
    """One run of the matrix, in the order it runs."""

    index: int
    size: int
    rate: int
    mode: str
    repeat: int

    @property
    def label(self) -> str:
        return f"{format_size(self.size)} at {format_rate(self.rate)}, {self.mode}"


def run_order(config: MigrateConfig) -> list[RunSpec]:
    """Every run in the order :func:`~pageflip.bench.migrate.run` runs them (see
    :data:`ORDER`)."""
    specs: list[RunSpec] = []
    modes = list(config.modes)
    cell = 0
    for r in range(config.repeat):
        for size in config.sizes:
            for rate in config.rates:
                shift = (cell + r) % len(modes)
                for mode in modes[shift:] + modes[:shift]:
                    specs.append(RunSpec(len(specs), size, rate, mode, r))
                cell += 1
    return specs
