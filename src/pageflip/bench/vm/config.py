"""What the VM comparison runs: its configuration, one run's spec, and the runs in order."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from ...errors import BadArgument
from ...units import format_rate, format_size
from .guest import PFGUEST, GuestFlavour, cmdline

__all__ = [
    "DEFAULT_RATES",
    "DEFAULT_SIZES",
    "MODES",
    "ORDER",
    "QEMU_MODES",
    "SYSTEMS",
    "GuestImage",
    "ProgressCallback",
    "VmConfig",
    "VmOptions",
    "VmRunSpec",
    "run_order",
]

MiB = 1 << 20
GiB = 1 << 30
MODES: tuple[str, ...] = ("flip", "precopy", "postcopy")
SYSTEMS: tuple[str, ...] = ("qemu", "pageflip")
#: QEMU's name for the mode it is compared in: its shared-memory handoff stands beside flip.
QEMU_MODES: dict[str, str] = {"flip": "shared", "precopy": "precopy", "postcopy": "postcopy"}
DEFAULT_SIZES: tuple[int, ...] = (1 * GiB, 4 * GiB)
DEFAULT_RATES: tuple[int, ...] = (0, 256 * MiB)

ORDER = (
    "interleaved: for each repeat, sizes then dirty rates in the order given, the modes "
    "rotated by one from one (size, rate) to the next; each mode's runs of both systems back "
    "to back, the system that goes first alternating from one pair to the next; "
    "{settle:g} s between runs, once every process of the previous run has exited"
)

#: Called before each run with (runs done, runs in all, what runs now).
ProgressCallback = Callable[[int, int, str], None]


@dataclass(frozen=True)
class GuestImage:
    """The guest ELF and how to drive it."""

    kernel: str
    flavour: GuestFlavour = PFGUEST


@dataclass(frozen=True)
class VmOptions:
    """How each run is done (times in seconds)."""

    #: Seconds the guest runs after READY before the migration (its rate settles).
    guest_settle: float = 2.0
    #: The guest's heartbeat period (ms) and its main loop's tick (us; None: its default).
    #: The pause the guest sees is measured to about one tick: 1000 us resolves
    #: milliseconds (the guest's default, 5000 us, is cheaper when idle).
    hb_ms: int = 20
    tick_us: int | None = 1000
    seed: int = 1
    #: Longest wait for a migration to complete; a precopy that does not converge by then is
    #: cancelled and the run is an error.
    timeout: float = 120.0
    #: Longest wait for the guest to boot and fill.
    boot_timeout: float = 300.0
    #: Longest wait for a guest's full check.
    verify_timeout: float = 300.0
    #: Seconds between memory samples.
    sample_interval: float = 0.05
    #: Seconds between query-migrate polls.
    poll_interval: float = 0.05
    qemu: str = "qemu-system-x86_64"
    #: ``-cpu host`` alone aborts QEMU 7.2 on this host (IA32_ARCH_CAPABILITIES).
    cpu: str = "host,-arch-capabilities"
    machine: str = "pc"
    #: QEMU postcopy: ``migrate-start-postcopy`` once the first pass over RAM is done
    #: (True) or right after ``migrate`` (False, as pageflip's postcopy starts).
    postcopy_after_first_pass: bool = False
    #: Where QEMU's shared-memory file goes (a tmpfs).
    shm_dir: str = "/dev/shm"
    #: Where each run's sockets go (None: a fresh directory under the system's temp dir).
    work_dir: str | None = None
    #: Both systems' vCPU threads SCHED_FIFO (priority 1): QEMU's, found by query-cpus-fast,
    #: and pageflip's (``vm run --realtime``), on the source and on the destination.
    realtime: bool = False
    #: The guest RAM of the systems in ``huge_systems`` on 2 MiB hugetlb pages ("hugetlb"),
    #: or 4 KiB pages (None): pageflip's ``vm run --huge hugetlb``; QEMU's shared mode a
    #: file on a hugetlbfs mount of 2 MiB pages, its other modes a hugetlb memfd backend.
    huge: str | None = None
    #: Which systems ``huge`` applies to; the others keep 4 KiB pages (QEMU's shared mode
    #: its file on ``shm_dir``).
    huge_systems: tuple[str, ...] = SYSTEMS

    def huge_for(self, system: str) -> str | None:
        """The huge pages ``system``'s guest RAM is on (None: 4 KiB pages)."""
        return self.huge if system in self.huge_systems else None

    #: How to start the ``pageflip`` command for the pageflip side.
    pageflip: tuple[str, ...] = field(default=(sys.executable, "-m", "pageflip"))


@dataclass(frozen=True)
class VmConfig:
    """What to run: every (size, rate, mode) on every system, ``repeat`` times. Sizes and
    rates in bytes (per second); ``settle`` seconds between runs."""

    guest: GuestImage
    sizes: tuple[int, ...] = DEFAULT_SIZES
    rates: tuple[int, ...] = DEFAULT_RATES
    modes: tuple[str, ...] = MODES
    systems: tuple[str, ...] = SYSTEMS
    repeat: int = 1
    settle: float = 2.0
    options: VmOptions = field(default_factory=VmOptions)

    def __post_init__(self) -> None:
        if not self.sizes or not self.rates or not self.modes or not self.systems:
            raise BadArgument("choose at least one size, dirty rate, mode and system")
        for name, given, known in (
            ("modes", self.modes, MODES),
            ("systems", self.systems, SYSTEMS),
        ):
            unknown = [x for x in given if x not in known]
            if unknown:
                raise BadArgument(
                    f"unknown {name} {unknown}; choose from {list(known)}", argument=name
                )
            if len(set(given)) != len(given):
                raise BadArgument(f"each of the {name} once, please", argument=name)
        unknown = [x for x in self.options.huge_systems if x not in SYSTEMS]
        if self.options.huge and not self.options.huge_systems:
            raise BadArgument("name the systems to put on huge pages", argument="huge_systems")
        if unknown:
            raise BadArgument(
                f"unknown huge-page systems {unknown}; choose from {list(SYSTEMS)}",
                argument="huge_systems",
            )
        if any(s <= 0 or s % MiB for s in self.sizes):
            raise BadArgument("guest sizes are whole MiB", argument="sizes")
        if any(r < 0 or r % MiB for r in self.rates):
            raise BadArgument("dirty rates are whole MiB/s (0: idle)", argument="rates")
        if self.repeat < 1:
            raise BadArgument("repeat must be at least 1", argument="repeat")
        if self.settle < 0 or self.options.guest_settle < 0:
            raise BadArgument("settle times cannot be negative", argument="settle")


@dataclass(frozen=True)
class VmRunSpec:
    """One run: one system migrating one guest once. ``pair`` numbers the (size, rate, mode,
    repeat) whose runs of both systems go back to back."""

    index: int
    system: str
    size: int
    rate: int
    mode: str
    repeat: int
    pair: int
    guest: GuestImage
    options: VmOptions

    @property
    def guest_ram(self) -> int:
        """The VM's memory: the guest's buffer plus what its kernel needs."""
        return self.size + self.guest.flavour.extra_ram

    @property
    def system_mode(self) -> str:
        """The mode by the system's own name (QEMU's ``shared`` for ``flip``)."""
        return QEMU_MODES[self.mode] if self.system == "qemu" else self.mode

    @property
    def cmdline(self) -> str:
        o = self.options
        return cmdline(self.guest.flavour, self.size, self.rate, o.hb_ms, o.seed, o.tick_us)

    @property
    def label(self) -> str:
        return (
            f"{self.system} {self.system_mode}, {format_size(self.size)} at "
            f"{format_rate(self.rate)}"
        )


def run_order(config: VmConfig) -> list[VmRunSpec]:
    """Every run in the order :func:`~pageflip.bench.vm.run` runs them (see :data:`ORDER`)."""
    specs: list[VmRunSpec] = []
    modes = list(config.modes)
    cell = 0
    pair = 0
    for r in range(config.repeat):
        for size in config.sizes:
            for rate in config.rates:
                shift = (cell + r) % len(modes)
                for mode in modes[shift:] + modes[:shift]:
                    systems = list(config.systems)
                    if pair % 2:
                        systems.reverse()
                    for system in systems:
                        specs.append(
                            VmRunSpec(
                                len(specs),
                                system,
                                size,
                                rate,
                                mode,
                                r,
                                pair,
                                config.guest,
                                config.options,
                            )
                        )
                    pair += 1
                cell += 1
    return specs
