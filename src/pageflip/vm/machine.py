"""The virtual machine: one KVM VM with one vCPU, its RAM in movable regions, a run loop.

A :class:`Machine` is built on regions that already exist (fresh ones for a boot, received
ones after a migration), registers each as a KVM memory slot, creates the in-kernel irqchip
(it runs the local APIC timer the guest sleeps on) and one vCPU whose CPUID is what KVM
supports. A thread runs ``KVM_RUN`` and answers the guest's port I/O (:mod:`.devices`).

Guest-physical layout: RAM from 0 up to 3 GiB, the rest from 4 GiB up (the hole holds the
local APIC and I/O APIC, which KVM emulates only where no memory slot lies); each piece is
its own region and memory slot. Boot (:meth:`Machine.boot`) copies a PVH kernel in and
writes the ``hvm_start_info`` block, its memory map and the command line below 1 MiB.

Pausing: another thread sets ``kvm_run.immediate_exit`` and sends the vCPU thread a signal
(:data:`KICK_SIGNAL`), which makes ``KVM_RUN`` return EINTR; with ``immediate_exit`` set KVM
also completes a pending port read first, so a parked vCPU's state is whole and can be saved.

State (:meth:`Machine.save`, :meth:`Machine.load`): see :mod:`.state` for what is saved and
the order in which it is put back.

Real-time vCPU (:meth:`Machine.set_realtime`): the guest sleeps on its timer between ticks,
and each wake-up waits for the host's scheduler. With the vCPU thread in the normal class,
any other busy thread on the host (a migration's own work, a process starting) can delay it
by a scheduler slice; as ``SCHED_FIFO`` it runs as soon as it wakes
(``benchmarks/vcpu_gaps.py``; docs/benchmarks.md, "Real-time vCPUs").

A pause at a halt (:meth:`Machine.await_halt`): a migration's pause waits, a moment at most,
for the guest to halt between its timer ticks, which it learns from the vCPU's KVM
statistics, and pauses it then: the guest had nothing to run until its next interrupt.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .._sys import kvm, mm
from .._sys.flags import PROT_RW, Map
from ..errors import (
    BadArgument,
    BadGuestState,
    BadImage,
    FeatureUnavailable,
    GuestStopped,
    SpanError,
    StateError,
    VmError,
)
from ..memory import PAGE_SIZE, Region
from . import state
from .devices import COM1, Devices
from .elf import PvhImage

__all__ = [
    "KICK_SIGNAL",
    "HOLE_END",
    "HOLE_START",
    "REALTIME_PRIORITY",
    "Machine",
    "Slot",
    "check_realtime",
    "install_kick_handler",
]

log = logging.getLogger("pageflip.vm")

#: RAM below this guest-physical address is in the first slot; the rest starts at HOLE_END.
HOLE_START = 3 << 30
HOLE_END = 4 << 30
#: Where the boot information goes (below 1 MiB, above the real-mode IVT and BDA).
START_INFO = 0x6000
MEMMAP = 0x7000
CMDLINE = 0x8000
MAX_CMDLINE = 0x1000
#: The first byte a kernel image may use; memory below it is the boot area above.
KERNEL_MIN = 0x100000
#: The memory map reports low RAM up to here (the EBDA and BIOS area above are not RAM).
LOW_RAM_END = 0x9FC00
#: Smallest guest RAM pageflip builds (the boot area, a kernel, its page tables).
MIN_MEMORY = 16 << 20
#: ``hvm_start_info`` magic (XEN_HVM_START_MAGIC_VALUE).
HVM_START_MAGIC = 0x336EC578

#: The interpreter's switch interval in a process that runs a vCPU thread (seconds).
SWITCH_INTERVAL = 0.0005
#: The SCHED_FIFO priority of a real-time vCPU thread (``pageflip vm run --realtime``): the
#: lowest, above every normal thread and below the kernel's own real-time threads.
REALTIME_PRIORITY = 1
#: Longest resume() waits for the vCPU thread to leave its park (seconds): a bound, it
#: takes tens of microseconds.
RESUME_HANDOFF = 0.05

#: Longest a migration's pause waits for the guest to halt (seconds; see
#: :meth:`Machine.await_halt`): a guest on a 1 ms tick halts within it once per tick.
HALT_WAIT = 0.002

#: The signal that kicks a vCPU thread out of KVM_RUN (a no-op handler is installed for it).
KICK_SIGNAL = signal.SIGRTMIN + 4


def _ignore_kick(signum: int, frame: object) -> None:
    return


class _HaltWatch:
    """Whether a vCPU is halted now, and how often it has halted, from its KVM statistics
    (``blocking``, ``halt_exits``): read by ``pread`` while the vCPU thread is inside
    ``KVM_RUN``, which no vCPU ioctl can do."""

    def __init__(self, fd: int, blocking: int, halts: int) -> None:
        self.fd = fd
        self._start = min(blocking, halts)
        self._span = max(blocking, halts) + 8 - self._start
        self._blocking = blocking - self._start
        self._halts = halts - self._start

    @classmethod
    def open(cls, vcpu: int) -> _HaltWatch | None:
        """The watch of vCPU fd ``vcpu``; None on a kernel without these statistics."""
        try:
            fd = kvm.ioctl(vcpu, kvm.GET_STATS_FD)
        except OSError:
            return None  # before Linux 5.14: no binary statistics
        try:
            os.set_inheritable(fd, False)
            offsets = kvm.stats_offsets(fd)
            return cls(fd, offsets["blocking"], offsets["halt_exits"])
        except (OSError, ValueError, KeyError):  # "blocking" came in Linux 5.16
            os.close(fd)
            return None

    def read(self) -> tuple[bool, int]:
        """(halted now, halts so far)."""
        data = os.pread(self.fd, self._span, self._start)
        return (
            struct.unpack_from("=Q", data, self._blocking)[0] != 0,
            struct.unpack_from("=Q", data, self._halts)[0],
        )

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


def install_kick_handler() -> None:
    """Install the no-op handler for :data:`KICK_SIGNAL` (must run in the main thread once,
    before a VM is built from another thread; a Machine built in the main thread does it)."""
    if signal.getsignal(KICK_SIGNAL) is not _ignore_kick:
        signal.signal(KICK_SIGNAL, _ignore_kick)


def _kick_ready() -> None:
    if signal.getsignal(KICK_SIGNAL) is _ignore_kick:
        return
    if threading.current_thread() is not threading.main_thread():
        raise VmError(
            "pageflip.vm needs its signal handler: call pageflip.vm.install_kick_handler() "
            "from the main thread before building a VM in another thread",
            kind="vm",
        )
    install_kick_handler()


def schedule_thread(tid: int, priority: int) -> None:
    """Make thread ``tid`` SCHED_FIFO at ``priority``, or normal (0); FeatureUnavailable,
    saying what gives the right, where this process may not."""
    policy = os.SCHED_FIFO if priority else os.SCHED_OTHER
    try:
        os.sched_setscheduler(tid, policy, os.sched_param(priority))
    except PermissionError:
        raise FeatureUnavailable(
            f"a real-time vCPU (SCHED_FIFO {priority}) needs root, CAP_SYS_NICE or an "
            f"RLIMIT_RTPRIO of at least {priority} (ulimit -r {priority}); run without "
            "--realtime",
            feature="realtime",
            reason="sched_setscheduler: permission denied",
        ) from None


def check_realtime(priority: int = REALTIME_PRIORITY) -> None:
    """FeatureUnavailable if this process may not run a vCPU thread SCHED_FIFO at
    ``priority``: a short-lived thread tries it on itself (before a guest boots, or before a
    benchmark's first run)."""
    failed: list[BaseException] = []

    def attempt() -> None:
        try:
            schedule_thread(threading.get_native_id(), priority)
        except BaseException as err:
            failed.append(err)

    thread = threading.Thread(target=attempt, name="pageflip-realtime-check")
    thread.start()
    thread.join()
    if failed:
        raise failed[0]


@dataclass(frozen=True, slots=True)
class Slot:
    """A KVM memory slot: guest-physical ``gpa``, ``size`` bytes, region ``index``."""

    index: int
    gpa: int
    size: int

    @property
    def end(self) -> int:
        return self.gpa + self.size


def layout(memory: int) -> list[Slot]:
    """The memory slots for ``memory`` bytes of RAM: below the 3 GiB hole, then above 4 GiB."""
    if memory % PAGE_SIZE or memory < MIN_MEMORY:
        raise SpanError(
            f"guest memory must be whole pages and at least {MIN_MEMORY >> 20} MiB, "
            f"got {memory} bytes",
            length=memory,
        )
    low = min(memory, HOLE_START)
    slots = [Slot(0, 0, low)]
    if memory > low:
        slots.append(Slot(1, HOLE_END, memory - low))
    return slots


def _open_kvm() -> int:
    try:
        fd = os.open(kvm.DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError as err:
        raise FeatureUnavailable(
            f"{kvm.DEVICE} does not exist: this host has no KVM (load kvm-intel, kvm-amd or "
            "kvm-pvm, or run on a host that offers virtualization)",
            feature="kvm",
        ) from err
    except PermissionError as err:
        raise FeatureUnavailable(
            f"{kvm.DEVICE}: permission denied: run as root or join the group that owns it "
            "(usually kvm)",
            feature="kvm",
        ) from err
    try:
        version = kvm.ioctl(fd, kvm.GET_API_VERSION)
    except BaseException:
        os.close(fd)
        raise
    if version != kvm.API_VERSION:
        os.close(fd)
        raise FeatureUnavailable(
            f"{kvm.DEVICE} speaks KVM API {version}, pageflip needs {kvm.API_VERSION}",
            feature="kvm",
        )
    return fd


def kvm_available() -> str | None:
    """None when a VM can be built here, else why not (for skips and ``pageflip probe``)."""
    try:
        fd = _open_kvm()
    except FeatureUnavailable as err:
        return str(err)
    os.close(fd)
    return None


def _supported_cpuid(system_fd: int) -> Any:
    """KVM's supported CPUID, made the CPUID of vCPU 0: the APIC ID it reports (leaf 1 EBX
    bits 31-24, leaves 0xB and 0x1F EDX) is that of the host CPU the call happened to run
    on, so two VMs built on one host would otherwise differ there."""
    for count in (64, 128, 256, 1024):
        buf = kvm.buffer_with_entries(kvm.Cpuid2Header, kvm.CpuidEntry2, count)
        buf.head.nent = count
        try:
            kvm.ioctl(system_fd, kvm.GET_SUPPORTED_CPUID, buf)
        except OSError as err:
            if err.errno == 7:  # E2BIG: more entries than room
                continue
            raise
        for entry in buf.entries[: buf.head.nent]:
            if entry.function == 1:
                entry.ebx &= 0x00FFFFFF
            elif entry.function in (0xB, 0x1F):
                entry.edx = 0
        return buf
    raise VmError("KVM_GET_SUPPORTED_CPUID returned more than 1024 entries", kind="vm")


def msr_indices(system_fd: int) -> list[int]:
    """The MSRs KVM saves and restores (KVM_GET_MSR_INDEX_LIST)."""
    head = kvm.MsrListHeader()
    head.nmsrs = 0
    with contextlib.suppress(OSError):
        kvm.ioctl(system_fd, kvm.GET_MSR_INDEX_LIST, head)
    buf = kvm.buffer_with_entries(kvm.MsrListHeader, kvm.u32, max(head.nmsrs, 1))
    buf.head.nmsrs = head.nmsrs
    kvm.ioctl(system_fd, kvm.GET_MSR_INDEX_LIST, buf)
    return [int(buf.entries[i]) for i in range(buf.head.nmsrs)]


class Machine:
    """One VM, one vCPU, RAM in ``regions`` (laid out by :func:`layout`).

    The machine does not own the regions: :meth:`close` leaves them to the caller. It is
    built stopped; :meth:`boot` or :meth:`load` gives the vCPU a state, :meth:`start` starts
    the vCPU thread (paused or running).
    """

    def __init__(
        self,
        regions: Sequence[Region] | None = None,
        on_output: Callable[[bytes], None] | None = None,
    ) -> None:
        _kick_ready()
        self.memory = 0
        self.slots: list[Slot] = []
        self.regions: list[Region] = []
        self.devices = Devices(on_output)
        self._system = self._vm = self._vcpu = -1
        self._run_addr = 0
        self._run_size = 0
        self._run_bytes = memoryview(b"")
        #: KVM's coalesced ring of COM1 output (see _coalesce_console); None: every write exits.
        self._ring: memoryview | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Condition()
        self._pause_wanted = True
        self._parked = False
        #: When the vCPU thread last left its park (CLOCK_MONOTONIC; 0.0: not since resume()).
        self._left_park = 0.0
        self._stopping = False
        self._stopped: GuestStopped | None = None
        #: Whether kvm_run holds the parked vCPU's registers, special registers and events
        #: as they are (stored by KVM as the vCPU left KVM_RUN, nothing set since).
        self._synced = False
        self.sync_regs = False
        self.exits = 0
        self.manual_dirty_log = False
        #: The vCPU thread's SCHED_FIFO priority; 0: the normal class (see set_realtime).
        self.realtime = 0
        self._halts: _HaltWatch | None = None
        #: :meth:`await_halt` calls that waited, and those that found the guest halting.
        self.halt_waits = 0
        self.halts_caught = 0
        try:
            self._build()
            if regions is not None:
                self.attach(regions)
        except BaseException:
            self.close()
            raise

    def attach(self, regions: Sequence[Region]) -> None:
        """Make ``regions`` the guest's RAM (laid out by :func:`layout`): a machine built
        without them (a spare, made before a migration needs it) gets them here."""
        if self.regions:
            raise StateError("the machine has its RAM already", phase="attached")
        memory = sum(r.size for r in regions)
        slots = layout(memory)
        if [s.size for s in slots] != [r.size for r in regions]:
            raise SpanError(
                f"guest RAM of {memory} bytes needs regions of "
                f"{[s.size for s in slots]} bytes, got {[r.size for r in regions]}",
                length=memory,
            )
        self.regions = list(regions)
        self.slots = slots
        self.memory = memory
        for slot in slots:
            self._set_slot(slot, 0)

    # -- building -------------------------------------------------------------------------

    def _build(self) -> None:
        self._system = _open_kvm()
        self._vm = kvm.ioctl(self._system, kvm.CREATE_VM, 0)
        os.set_inheritable(self._vm, False)
        self.manual_dirty_log = self._enable_manual_dirty_log()
        kvm.ioctl(self._vm, kvm.CREATE_IRQCHIP)
        self._vcpu = kvm.ioctl(self._vm, kvm.CREATE_VCPU, 0)
        os.set_inheritable(self._vcpu, False)
        self._run_size = kvm.ioctl(self._system, kvm.GET_VCPU_MMAP_SIZE)
        self._run_addr = mm.mmap(None, self._run_size, PROT_RW, Map.SHARED, self._vcpu)
        self.run_page = kvm.Run.from_address(self._run_addr)
        self._run_bytes = kvm.run_bytes(self._run_addr, self._run_size)
        self._halts = _HaltWatch.open(self._vcpu)
        self._ring = self._coalesce_console()
        # KVM copies the registers, special registers and pending events into kvm_run at
        # every return from KVM_RUN: a save inside a pause reads them there rather than by
        # three ioctls (~15 us each here, more cold).
        synced = kvm.ioctl(self._vm, kvm.CHECK_EXTENSION, kvm.Cap.SYNC_REGS) & kvm.SYNC_ALL
        self.sync_regs = synced == kvm.SYNC_ALL
        if self.sync_regs:
            self.run_page.kvm_valid_regs = kvm.SYNC_ALL
        cpuid = _supported_cpuid(self._system)
        kvm.ioctl(self._vcpu, kvm.SET_CPUID2, cpuid)
        #: The CPUID set in the vCPU (its entries as bytes): saved with the state as it is.
        self.cpuid_entries = kvm.entries_bytes(cpuid, cpuid.head.nent)
        self.msrs = msr_indices(self._system)
        self._buffers = state.Buffers(self.msrs)

    def _coalesce_console(self) -> memoryview | None:
        """Have KVM queue the guest's writes to COM1's transmit register in its coalesced
        ring (``KVM_CAP_COALESCED_PIO``) instead of exiting to the VMM for each: this host
        makes a string write one exit per byte, about 2600 exits a second for the test
        guest's heartbeats, each needing the interpreter's lock, which a migration's
        thread holds in turns. The vCPU thread hands the queued bytes to the serial port
        whenever ``KVM_RUN`` returns, before it answers the exit or parks
        (:meth:`_drain`): in order with every other port access, and all of them before a
        save. Returns the ring (a view of its page in the vCPU's mapping), or None where
        KVM offers no such ring: then every write exits, as before."""
        page = kvm.ioctl(self._vm, kvm.CHECK_EXTENSION, kvm.Cap.COALESCED_MMIO)
        pio = kvm.ioctl(self._vm, kvm.CHECK_EXTENSION, kvm.Cap.COALESCED_PIO)
        if page <= 0 or not pio or (page + 1) * PAGE_SIZE > self._run_size:
            return None
        kvm.ioctl(self._vm, kvm.REGISTER_COALESCED_MMIO, kvm.CoalescedMmioZone(COM1, 1, 1))
        return self._run_bytes[page * PAGE_SIZE : (page + 1) * PAGE_SIZE]

    def _drain(self, ring: memoryview) -> None:
        """Hand the guest's queued COM1 writes to the serial port, oldest first, and free
        their places in the ring."""
        first, last = kvm.COALESCED_RING.unpack_from(ring, 0)
        if first == last:
            return
        data = bytearray()
        while first != last:
            at = kvm.COALESCED_RING.size + first * kvm.COALESCED_ENTRY.size
            _, size, _, value = kvm.COALESCED_ENTRY.unpack_from(ring, at)
            data += value[:size]
            first = (first + 1) % kvm.COALESCED_MAX
        struct.pack_into("<I", ring, 0, first)  # first alone: last is the kernel's
        self.devices.port_out(COM1, bytes(data), 1)

    def _enable_manual_dirty_log(self) -> bool:
        """Manual dirty-log protection with every bit set at first: turning logging on
        then costs nothing, and a round protects only what it clears (see KvmDirtyLog)."""
        if kvm.ioctl(self._vm, kvm.CHECK_EXTENSION, kvm.Cap.MANUAL_DIRTY_LOG_PROTECT2) == 0:
            return False
        cap = kvm.EnableCap()
        cap.cap = kvm.Cap.MANUAL_DIRTY_LOG_PROTECT2
        cap.args[0] = kvm.MANUAL_PROTECT_ENABLE | kvm.MANUAL_PROTECT_INITIALLY_SET
        kvm.ioctl(self._vm, kvm.ENABLE_CAP, cap)
        return True

    def _set_slot(self, slot: Slot, flags: int) -> None:
        region = self.regions[slot.index]
        mem = kvm.UserspaceMemoryRegion()
        mem.slot = slot.index
        mem.flags = flags
        mem.guest_phys_addr = slot.gpa
        mem.memory_size = slot.size
        mem.userspace_addr = region.address
        kvm.ioctl(self._vm, kvm.SET_USER_MEMORY_REGION, mem)

    @property
    def vm_fd(self) -> int:
        return self._vm

    @property
    def vcpu_fd(self) -> int:
        return self._vcpu

    # -- guest memory ---------------------------------------------------------------------

    def _at(self, gpa: int, length: int) -> tuple[Region, int]:
        for slot in self.slots:
            if slot.gpa <= gpa and gpa + length <= slot.end:
                return self.regions[slot.index], gpa - slot.gpa
        raise SpanError(
            f"guest-physical {gpa:#x}+{length:#x} is not in guest RAM", offset=gpa, length=length
        )

    def write(self, gpa: int, data: bytes) -> None:
        """Copy ``data`` into guest RAM at ``gpa`` (through the VMM's own mapping)."""
        region, offset = self._at(gpa, len(data))
        with region.view(offset, offset + len(data)) as view:
            view[:] = data

    def read(self, gpa: int, length: int) -> bytes:
        region, offset = self._at(gpa, length)
        with region.view(offset, offset + length) as view:
            return view.tobytes()

    def ram_ranges(self) -> list[tuple[int, int]]:
        """Guest RAM as (start, end) guest-physical ranges, as the memory map reports it."""
        ranges = [(0, LOW_RAM_END), (KERNEL_MIN, self.slots[0].end)]
        ranges += [(s.gpa, s.end) for s in self.slots[1:]]
        return ranges

    # -- boot -----------------------------------------------------------------------------

    def boot(self, image: PvhImage, cmdline: str) -> None:
        """Load ``image`` and set the vCPU up at its PVH entry (32-bit flat protected mode,
        ``rbx`` pointing at ``hvm_start_info``)."""
        encoded = cmdline.encode() + b"\0"
        if len(encoded) > MAX_CMDLINE:
            raise BadImage(
                f"the kernel command line is {len(encoded)} bytes, at most {MAX_CMDLINE} fit",
                kind="vm",
                path=image.path,
            )
        top = self.slots[0].end
        for seg in image.segments:
            if seg.paddr < KERNEL_MIN or seg.end > top:
                raise BadImage(
                    f"{image.path} cannot boot: it loads at {seg.paddr:#x}..{seg.end:#x}, "
                    f"outside guest RAM {KERNEL_MIN:#x}..{top:#x} (give the VM more memory?)",
                    kind="vm",
                    path=image.path,
                )
        for seg in image.segments:
            self.write(seg.paddr, seg.data)
            zeros = seg.memsz - len(seg.data)
            if zeros:
                region, offset = self._at(seg.paddr + len(seg.data), zeros)
                region.numpy(shape=zeros, offset=offset).fill(0)
        self._write_start_info(encoded)
        self._set_boot_registers(image.entry)

    def _write_start_info(self, cmdline: bytes) -> None:
        ranges = self.ram_ranges()
        memmap = b"".join(
            int(start).to_bytes(8, "little")
            + int(end - start).to_bytes(8, "little")
            + (1).to_bytes(4, "little")  # E820 RAM
            + bytes(4)
            for start, end in ranges
        )
        self.write(MEMMAP, memmap)
        self.write(CMDLINE, cmdline)
        info = b"".join(
            [
                HVM_START_MAGIC.to_bytes(4, "little"),
                (1).to_bytes(4, "little"),  # version: has a memory map
                bytes(8),  # flags, nr_modules
                bytes(8),  # modlist_paddr
                CMDLINE.to_bytes(8, "little"),
                bytes(8),  # rsdp_paddr
                MEMMAP.to_bytes(8, "little"),
                len(ranges).to_bytes(4, "little"),
                bytes(4),
            ]
        )
        self.write(START_INFO, info)

    def _set_boot_registers(self, entry: int) -> None:
        sregs = kvm.Sregs()
        kvm.ioctl(self._vcpu, kvm.GET_SREGS, sregs)
        for name, selector, seg_type in (
            ("cs", 0x8, 0xB),
            ("ds", 0x10, 0x3),
            ("es", 0x10, 0x3),
            ("fs", 0x10, 0x3),
            ("gs", 0x10, 0x3),
            ("ss", 0x10, 0x3),
        ):
            seg = getattr(sregs, name)
            seg.base, seg.limit, seg.selector, seg.type = 0, 0xFFFFFFFF, selector, seg_type
            seg.present, seg.dpl, seg.db, seg.s, seg.l, seg.g, seg.avl = 1, 0, 1, 1, 0, 1, 0
        sregs.tr.base, sregs.tr.limit, sregs.tr.selector, sregs.tr.type = 0, 0x67, 0x18, 0xB
        sregs.tr.present, sregs.tr.s = 1, 0
        sregs.cr0 = 0x11  # PE | ET
        sregs.cr3 = sregs.cr4 = sregs.efer = 0
        kvm.ioctl(self._vcpu, kvm.SET_SREGS, sregs)
        regs = kvm.Regs()
        regs.rip = entry
        regs.rbx = START_INFO
        regs.rflags = 0x2
        kvm.ioctl(self._vcpu, kvm.SET_REGS, regs)

    # -- running --------------------------------------------------------------------------

    def start(self, *, paused: bool = False) -> None:
        """Start the vCPU thread; ``paused`` keeps it parked until :meth:`resume`."""
        if self._thread is not None:
            raise StateError("the vCPU thread is already started", phase="started")
        self._check_open()
        with self._lock:
            self._pause_wanted = paused
            self.run_page.immediate_exit = 1 if paused else 0
        # The vCPU thread needs the GIL for every port I/O exit (the guest's console, its
        # timer): while another thread of this process computes (a migration's rounds), it
        # would wait up to the interpreter's switch interval (5 ms) at each one, and the
        # guest with it. A VMM process hands the GIL over sooner.
        if sys.getswitchinterval() > SWITCH_INTERVAL:
            sys.setswitchinterval(SWITCH_INTERVAL)
        self._thread = threading.Thread(target=self._loop, name="pageflip-vcpu0", daemon=True)
        self._thread.start()
        if self.realtime:
            self._schedule(self.realtime)
        if paused:
            self._wait_parked()

    def set_realtime(self, priority: int) -> None:
        """Run the vCPU thread as ``SCHED_FIFO`` at ``priority`` (1-99), or in the normal
        class (0), now if it is started, else from :meth:`start` on. A real-time thread
        needs root, CAP_SYS_NICE or an RLIMIT_RTPRIO of at least ``priority``:
        :class:`FeatureUnavailable` says which when none is there."""
        if not 0 <= priority <= 99:
            raise BadArgument(
                f"a real-time priority is 1-99 (0: none), not {priority}", argument="realtime"
            )
        if self._thread is not None:
            self._schedule(priority)
        self.realtime = priority

    def _schedule(self, priority: int) -> None:
        thread = self._thread
        if thread is None or thread.native_id is None:
            return
        with contextlib.suppress(ProcessLookupError):  # it has just ended: stopped for good
            schedule_thread(thread.native_id, priority)

    def vcpu_status(self) -> dict[str, object]:
        """The vCPU thread's id and how it is scheduled (``normal`` or ``SCHED_FIFO <n>``)."""
        thread = self._thread
        return {
            "thread": thread.native_id if thread is not None else None,
            "scheduling": f"SCHED_FIFO {self.realtime}" if self.realtime else "normal",
            "halt_waits": self.halt_waits,
            "halts_caught": self.halts_caught,
        }

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def paused(self) -> bool:
        return self._pause_wanted

    @property
    def stopped(self) -> GuestStopped | None:
        """Why the vCPU stopped for good (None while it can run)."""
        return self._stopped

    def _loop(self) -> None:
        try:
            while True:
                ran = kvm.run(self._vcpu)
                if self._ring is not None:
                    self._drain(self._ring)
                if not ran:
                    if not self._park():
                        return
                    continue
                self.exits += 1
                if not self._exit():
                    return
        except BaseException as err:  # the vCPU thread must never die silently
            log.exception("vCPU thread failed")
            self._stop_for_good(f"VMM error: {type(err).__name__}: {err}")

    def _park(self) -> bool:
        """After EINTR: park while a pause is wanted; False when the machine is closing."""
        with self._lock:
            if self._stopping:
                return False
            if not self._pause_wanted:
                return True  # a stray signal: run on
            self._parked = True
            self._synced = self.sync_regs  # stored by the return from KVM_RUN that led here
            self._lock.notify_all()
            self._lock.wait_for(self._may_run)
            self._synced = False
            self._parked = False
            self._left_park = time.monotonic()
            self._lock.notify_all()  # resume() waits for this
            return not self._stopping

    def _may_run(self) -> bool:
        return not self._pause_wanted or self._stopping

    def _exit(self) -> bool:
        """Answer one exit; False when the vCPU cannot go on."""
        run = self.run_page
        reason = run.exit_reason
        if reason == kvm.Exit.IO:
            io = run.exit.io
            start = io.data_offset
            end = start + io.size * io.count
            if io.direction:  # out
                self.devices.port_out(io.port, self._run_bytes[start:end].tobytes(), io.size)
            else:
                self._run_bytes[start:end] = self.devices.port_in(io.port, io.size, io.count)
            return True
        if reason == kvm.Exit.MMIO:
            mmio = run.exit.mmio
            if not mmio.is_write:
                mmio.data[:] = b"\xff" * 8
            log.debug(
                "MMIO %s at %#x ignored", "write" if mmio.is_write else "read", mmio.phys_addr
            )
            return True
        if reason in (kvm.Exit.INTR, kvm.Exit.IRQ_WINDOW_OPEN):
            return True
        self._stop_for_good(self._exit_text(reason))
        return False

    def _exit_text(self, reason: int) -> str:
        try:
            name = kvm.Exit(reason).name
        except ValueError:
            name = f"exit {reason}"
        run = self.run_page
        if reason == kvm.Exit.INTERNAL_ERROR:
            name += f" (suberror {run.exit.internal.suberror})"
        elif reason == kvm.Exit.FAIL_ENTRY:
            name += f" (hardware reason {run.exit.fail_entry.hardware_entry_failure_reason:#x})"
        elif reason == kvm.Exit.SYSTEM_EVENT:
            name += f" (type {run.exit.system_event.type})"
        return name

    def _stop_for_good(self, reason: str) -> None:
        registers: dict[str, int] = {}
        with contextlib.suppress(OSError):
            regs = kvm.Regs()
            kvm.ioctl(self._vcpu, kvm.GET_REGS, regs)
            registers = {name: int(getattr(regs, name)) for name in kvm.REG_NAMES}
            sregs = kvm.Sregs()
            kvm.ioctl(self._vcpu, kvm.GET_SREGS, sregs)
            registers.update({n: int(getattr(sregs, n)) for n in ("cr0", "cr2", "cr3", "cr4")})
            registers["efer"] = int(sregs.efer)
        shown = " ".join(
            f"{n}={registers[n]:#x}"
            for n in ("rip", "rsp", "rflags", "cr0", "cr2", "cr3")
            if n in registers
        )
        err = GuestStopped(
            f"the guest's vCPU stopped: {reason}" + (f"; {shown}" if shown else ""),
            kind="vm",
            reason=reason,
            registers=registers,
        )
        log.error("%s", err)
        with self._lock:
            self._stopped = err
            self._parked = True
            self._lock.notify_all()

    def await_halt(self, limit: float = HALT_WAIT) -> bool:
        """Wait up to ``limit`` seconds for the running guest to halt (``hlt``: done with
        its work until its next interrupt); True when it did, False at once where there is
        nothing to wait for (not running, or a kernel without the statistics).

        A migration calls this right before its pause (:meth:`.VirtualMachine.about_to_pause`).
        A guest paused as it halts had nothing to run until its next interrupt: it loses
        only what the pause runs past that, where a pause at any other moment also holds
        up the rest of its work (docs/benchmarks.md, "A pause at a halt"). The wait spins
        on reads of the vCPU's statistics (about 1 us each; each lets go of the GIL): a
        sleep would wake late on a host that gives its idle CPUs back (docs/kernel.md)."""
        watch = self._halts
        if watch is None or self._thread is None or self._pause_wanted or self._stopped:
            return False
        self.halt_waits += 1
        deadline = time.monotonic() + limit
        _, before = watch.read()
        while time.monotonic() < deadline:
            halted, halts = watch.read()
            if halted and halts != before:
                self.halts_caught += 1
                return True
        return False

    def pause(self) -> float:
        """Park the vCPU (it leaves KVM_RUN within a fraction of a millisecond); returns
        ``time.monotonic()`` when it was parked."""
        self._check_open()
        with self._lock:
            self._pause_wanted = True
            self.run_page.immediate_exit = 1
        thread = self._thread
        if thread is not None and thread.ident is not None and self._stopped is None:
            with contextlib.suppress(ProcessLookupError):
                signal.pthread_kill(thread.ident, KICK_SIGNAL)
            self._wait_parked()
        return time.monotonic()

    def _wait_parked(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        with self._lock:
            while not self._parked and self._stopped is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise VmError(f"the vCPU did not stop within {timeout:g} s", kind="vm")
                self._lock.wait(min(left, 0.01))
                thread = self._thread
                if not self._parked and thread is not None and thread.ident is not None:
                    with contextlib.suppress(ProcessLookupError):
                        signal.pthread_kill(thread.ident, KICK_SIGNAL)

    def resume(self) -> float:
        """Let the vCPU run again; returns ``time.monotonic()`` when the vCPU thread left
        its park for ``KVM_RUN`` (not when this thread heard it had: by then the guest may
        have run for a while, its exits holding the interpreter's lock)."""
        self._check_open()
        if not self.regions:
            raise StateError("the machine has no RAM yet", phase="spare", needed="attached")
        if self._stopped is not None:
            raise self._stopped
        with self._lock:
            self.run_page.immediate_exit = 0
            self._pause_wanted = False
            self._left_park = 0.0
            self._lock.notify_all()
            # The vCPU thread goes first: it needs the GIL to leave its park, and this
            # thread would otherwise keep it (a migration goes on to its next frame) for
            # up to a switch interval. Waiting here hands it over; the ioctl it enters
            # next releases it at once.
            if self._lock.wait_for(self._unparked, RESUME_HANDOFF) and self._left_park:
                return self._left_park
            return time.monotonic()

    def _unparked(self) -> bool:
        return not self._parked or self._stopped is not None or self._thread is None

    def _check_open(self) -> None:
        if self._vcpu < 0:
            raise StateError("the virtual machine is closed", phase="closed")

    # -- state ------------------------------------------------------------------------------

    def save(self, meta: dict[str, Any]) -> bytes:
        """The VM's state (see :mod:`.state`), the vCPU parked; ``meta`` travels with it."""
        if not self._parked and self._thread is not None:
            raise StateError("save the VM's state with the vCPU paused", phase="running")
        return state.save_machine(
            self._vm,
            self._vcpu,
            self._buffers,
            self._meta_now(meta),
            self.cpuid_entries,
            self.run_page.s if self._synced else None,
        )

    def _meta_now(self, meta: dict[str, Any]) -> dict[str, Any]:
        return {**meta, "memory": self.memory, "devices": self.devices.save()}

    def warm_save(self) -> None:
        """Run the code of :meth:`save` but for the vCPU's own ioctls, while the guest runs
        (see :func:`.state.warm_save`): a migration does this right before its pause."""
        self._check_open()
        state.warm_save(self._vm, self._buffers, self._meta_now({}), self.cpuid_entries)

    def rehearse(self) -> None:
        """Save this machine's state and load it back (the vCPU parked or not started): a
        process's first save and first load run colder than later ones, so a booted VM does
        this before its first run and a spare machine once it is built. Inside a VM flip's
        pause the save took 0.59 ms and the load 0.59 ms (medians of 12) before, 0.41 and
        0.47 ms with a rehearsal first (docs/benchmarks.md, "Real-time vCPUs")."""
        self.load(self.save({}))

    def load(
        self, saved: bytes | dict[str, bytes], meta: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Put a saved state back (the vCPU thread parked or not started); returns its
        ``meta`` record. ``saved`` may come decoded (:func:`.state.decode`), and ``meta``
        read from it already (:func:`.state.record`)."""
        if self._thread is not None and not self._parked:
            raise StateError("load a state with the vCPU thread parked", phase="running")
        blobs = state.decode(saved) if isinstance(saved, bytes) else saved
        self._synced = False  # what kvm_run holds is no longer the vCPU's
        meta = state.restore_machine(
            self._vm, self._vcpu, blobs, self._buffers, self.cpuid_entries, meta
        )
        self.cpuid_entries = blobs["cpuid"]
        if meta.get("memory") != self.memory:
            raise BadGuestState(
                f"the state is of a VM with {meta.get('memory')} bytes of RAM, this one has "
                f"{self.memory}",
                kind="vm",
                field="memory",
            )
        devices = meta.get("devices")
        if isinstance(devices, dict):
            self.devices.load(devices)
        return meta

    # -- dirty log --------------------------------------------------------------------------

    def set_dirty_logging(self, on: bool) -> None:
        """Turn KVM's dirty log on or off for every memory slot.

        Off unless a precopy tracks writes: with it on, KVM maps the guest's memory a page
        at a time and prefetches nothing, which made a freshly restored guest touch its
        memory 3.7 times slower here (256 MiB in 887 ms instead of 240 ms)."""
        flags = kvm.MEM_LOG_DIRTY_PAGES if on else 0
        for slot in self.slots:
            self._set_slot(slot, flags)

    def get_dirty_log(self, slot: int, bitmap: int) -> None:
        """KVM_GET_DIRTY_LOG of ``slot`` into the bitmap at address ``bitmap``."""
        arg = kvm.DirtyLog()
        arg.slot = slot
        arg.dirty_bitmap = bitmap
        kvm.ioctl(self._vm, kvm.GET_DIRTY_LOG, arg)

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap: int) -> None:
        arg = kvm.ClearDirtyLog()
        arg.slot = slot
        arg.first_page = first_page
        arg.num_pages = num_pages
        arg.dirty_bitmap = bitmap
        kvm.ioctl(self._vm, kvm.CLEAR_DIRTY_LOG, arg)

    # -- closing ----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the vCPU thread and free the VM (the regions stay the caller's). Idempotent."""
        thread = self._thread
        if thread is not None:
            with self._lock:
                self._stopping = True
                self._lock.notify_all()
                if self._run_addr:
                    self.run_page.immediate_exit = 1
            while thread.is_alive():
                if thread.ident is not None:
                    with contextlib.suppress(ProcessLookupError):
                        signal.pthread_kill(thread.ident, KICK_SIGNAL)
                thread.join(0.01)
            self._thread = None
        if self._run_addr:
            addr, self._run_addr = self._run_addr, 0
            del self.run_page
            self._run_bytes = memoryview(b"")
            self._ring = None
            mm.munmap(addr, self._run_size)
        if self._halts is not None:
            self._halts.close()
        for name in ("_vcpu", "_vm", "_system"):
            fd = getattr(self, name)
            if fd >= 0:
                setattr(self, name, -1)
                os.close(fd)

    def __del__(self) -> None:
        if getattr(self, "_system", -1) >= 0 and getattr(self, "_thread", None) is None:
            with contextlib.suppress(Exception):
                self.close()
