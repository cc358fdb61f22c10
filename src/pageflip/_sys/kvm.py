"""KVM: the ioctls of /dev/kvm, a VM fd and a vCPU fd, and the structures they take (x86-64).

Layouts follow ``include/uapi/linux/kvm.h`` and ``arch/x86/include/uapi/asm/kvm.h``; each
structure's size is checked against the size encoded in its ioctl number at import (a wrong
layout would make the kernel read or write past the buffer).

Every call goes through :func:`ioctl`, whose errors name the request. ``KVM_RUN`` goes through
:func:`run`, which does **not** retry EINTR: an interrupted ``KVM_RUN`` is how a VMM thread
learns that another thread wants the vCPU stopped (``immediate_exit`` plus a signal).

The VMM handles these structures only through the helpers at the end: their raw bytes
(:func:`struct_bytes`, :func:`struct_from_bytes`, :func:`entries_bytes`, :func:`set_entries`)
and a byte view of the ``kvm_run`` mapping (:func:`run_bytes`), which a port I/O exit's data
is sliced from without a foreign call.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import os
import struct
from ctypes import c_int, c_ulong, c_void_p
from typing import Any, TypeVar

from ._gate import libc_gate, os_error

u8 = ctypes.c_uint8
u16 = ctypes.c_uint16
u32 = ctypes.c_uint32
u64 = ctypes.c_uint64

DEVICE = "/dev/kvm"
KVMIO = 0xAE
API_VERSION = 12


def _io(nr: int) -> int:
    return (KVMIO << 8) | nr


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _iow(nr: int, size: int) -> int:
    return _ioc(1, nr, size)


def _ior(nr: int, size: int) -> int:
    return _ioc(2, nr, size)


def _iowr(nr: int, size: int) -> int:
    return _ioc(3, nr, size)


class Cap(enum.IntEnum):
    """``KVM_CAP_*`` numbers pageflip asks about."""

    IRQCHIP = 0
    USER_MEMORY = 3
    SET_TSS_ADDR = 4
    EXT_CPUID = 7
    COALESCED_MMIO = 15
    ADJUST_CLOCK = 39
    VCPU_EVENTS = 41
    DEBUGREGS = 50
    XSAVE = 55
    XCRS = 56
    GET_TSC_KHZ = 61
    SYNC_REGS = 74
    IMMEDIATE_EXIT = 136
    COALESCED_PIO = 162
    MANUAL_DIRTY_LOG_PROTECT2 = 168


class Exit(enum.IntEnum):
    """``KVM_EXIT_*``: why ``KVM_RUN`` returned."""

    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    SET_TPR = 11
    TPR_ACCESS = 12
    NMI = 16
    INTERNAL_ERROR = 17
    SYSTEM_EVENT = 24


class MpState(enum.IntEnum):
    RUNNABLE = 0
    UNINITIALIZED = 1
    INIT_RECEIVED = 2
    HALTED = 3


#: ``KVM_MEM_LOG_DIRTY_PAGES``: a memory slot flag.
MEM_LOG_DIRTY_PAGES = 1
#: ``KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET``.
MANUAL_PROTECT_ENABLE = 1
MANUAL_PROTECT_INITIALLY_SET = 2
#: irqchip ids for KVM_GET/SET_IRQCHIP.
IRQCHIP_PIC_MASTER, IRQCHIP_PIC_SLAVE, IRQCHIP_IOAPIC = 0, 1, 2


# -- structures -----------------------------------------------------------------------------


class UserspaceMemoryRegion(ctypes.Structure):
    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]


REG_NAMES = "rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags".split()  # noqa: SIM905


class Regs(ctypes.Structure):
    _fields_ = [(name, u64) for name in REG_NAMES]


class Segment(ctypes.Structure):
    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class Dtable(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


class Sregs(ctypes.Structure):
    _fields_ = [
        *[(name, Segment) for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")],
        ("gdt", Dtable),
        ("idt", Dtable),
        *[(name, u64) for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")],
        ("interrupt_bitmap", u64 * 4),
    ]


class Fpu(ctypes.Structure):
    _fields_ = [
        ("fpr", u8 * 128),
        ("fcw", u16),
        ("fsw", u16),
        ("ftwx", u8),
        ("pad1", u8),
        ("last_opcode", u16),
        ("last_ip", u64),
        ("last_dp", u64),
        ("xmm", u8 * 256),
        ("mxcsr", u32),
        ("pad2", u32),
    ]


class Xsave(ctypes.Structure):
    _fields_ = [("region", u32 * 1024)]


class Xcr(ctypes.Structure):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


class Xcrs(ctypes.Structure):
    _fields_ = [("nr_xcrs", u32), ("flags", u32), ("xcrs", Xcr * 16), ("padding", u64 * 16)]


class MsrEntry(ctypes.Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class MsrsHeader(ctypes.Structure):
    _fields_ = [("nmsrs", u32), ("pad", u32)]


class MsrListHeader(ctypes.Structure):
    _fields_ = [("nmsrs", u32)]


class LapicState(ctypes.Structure):
    _fields_ = [("regs", ctypes.c_char * 1024)]


class MpStateStruct(ctypes.Structure):
    _fields_ = [("mp_state", u32)]


class VcpuEvents(ctypes.Structure):
    _fields_ = [
        ("exception", u8 * 8),  # injected, nr, has_error_code, pending, error_code (u32)
        ("interrupt", u8 * 4),
        ("nmi", u8 * 4),
        ("sipi_vector", u32),
        ("flags", u32),
        ("smi", u8 * 4),
        ("triple_fault", u8),
        ("reserved", u8 * 26),
        ("exception_has_payload", u8),
        ("exception_payload", u64),
    ]


class Debugregs(ctypes.Structure):
    _fields_ = [
        ("db", u64 * 4),
        ("dr6", u64),
        ("dr7", u64),
        ("flags", u64),
        ("reserved", u64 * 9),
    ]


class Irqchip(ctypes.Structure):
    _fields_ = [("chip_id", u32), ("pad", u32), ("chip", u8 * 512)]


class ClockData(ctypes.Structure):
    _fields_ = [
        ("clock", u64),
        ("flags", u32),
        ("pad0", u32),
        ("realtime", u64),
        ("host_tsc", u64),
        ("pad", u32 * 4),
    ]


class CpuidEntry2(ctypes.Structure):
    _fields_ = [
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    ]


class Cpuid2Header(ctypes.Structure):
    _fields_ = [("nent", u32), ("padding", u32)]


class DirtyLog(ctypes.Structure):
    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", u64)]


class ClearDirtyLog(ctypes.Structure):
    _fields_ = [("slot", u32), ("num_pages", u32), ("first_page", u64), ("dirty_bitmap", u64)]


class EnableCap(ctypes.Structure):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


class CoalescedMmioZone(ctypes.Structure):
    """``kvm_coalesced_mmio_zone``: guest writes to ``addr`` .. ``addr + size`` (ports, with
    ``pio`` 1) are queued in the ring instead of exiting to the VMM."""

    _fields_ = [("addr", u64), ("size", u32), ("pio", u32)]


#: ``kvm_coalesced_mmio_ring``'s head: ``first`` and ``last``; its entries follow.
COALESCED_RING = struct.Struct("<II")
#: ``kvm_coalesced_mmio``: ``phys_addr``, ``len``, ``pio``, ``data`` (8 bytes).
COALESCED_ENTRY = struct.Struct("<QII8s")
#: Entries in the ring page (``KVM_COALESCED_MMIO_MAX``): the kernel's ring is full at one
#: fewer, and a write then exits to the VMM as usual.
COALESCED_MAX = (4096 - COALESCED_RING.size) // COALESCED_ENTRY.size


class StatsHeader(ctypes.Structure):
    """``kvm_stats_header``: the start of a binary statistics fd (``KVM_GET_STATS_FD``)."""

    _fields_ = [
        ("flags", u32),
        ("name_size", u32),
        ("num_desc", u32),
        ("id_offset", u32),
        ("desc_offset", u32),
        ("data_offset", u32),
    ]


class StatsDesc(ctypes.Structure):
    """``kvm_stats_desc`` without its name (``name_size`` bytes, NUL-padded, follow it)."""

    _fields_ = [
        ("flags", u32),
        ("exponent", ctypes.c_int16),
        ("size", u16),
        ("offset", u32),
        ("bucket_size", u32),
    ]


class RunIo(ctypes.Structure):
    _fields_ = [
        ("direction", u8),
        ("size", u8),
        ("port", u16),
        ("count", u32),
        ("data_offset", u64),
    ]


class RunMmio(ctypes.Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class RunInternal(ctypes.Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class RunFailEntry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class RunSystemEvent(ctypes.Structure):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class RunExit(ctypes.Union):
    _fields_ = [
        ("io", RunIo),
        ("mmio", RunMmio),
        ("internal", RunInternal),
        ("fail_entry", RunFailEntry),
        ("system_event", RunSystemEvent),
        ("padding", ctypes.c_char * 256),
    ]


class SyncRegs(ctypes.Structure):
    """``struct kvm_sync_regs`` (x86): what KVM copies into ``kvm_run`` at every return from
    ``KVM_RUN`` for the classes set in ``kvm_valid_regs``: the very structures
    ``KVM_GET_REGS``, ``KVM_GET_SREGS`` and ``KVM_GET_VCPU_EVENTS`` fill."""

    _fields_ = [("regs", Regs), ("sregs", Sregs), ("events", VcpuEvents)]


#: ``KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS | KVM_SYNC_X86_EVENTS``.
SYNC_ALL = 0x7


class Run(ctypes.Structure):
    """``struct kvm_run`` up to its sync registers (the shared page the vCPU fd maps)."""

    _fields_ = [
        ("request_interrupt_window", u8),
        ("immediate_exit", u8),
        ("padding1", u8 * 6),
        ("exit_reason", u32),
        ("ready_for_interrupt_injection", u8),
        ("if_flag", u8),
        ("flags", u16),
        ("cr8", u64),
        ("apic_base", u64),
        ("exit", RunExit),
        ("kvm_valid_regs", u64),
        ("kvm_dirty_regs", u64),
        ("s", SyncRegs),
    ]


# -- ioctl numbers ----------------------------------------------------------------------------

GET_API_VERSION = _io(0x00)
CREATE_VM = _io(0x01)
GET_MSR_INDEX_LIST = _iowr(0x02, ctypes.sizeof(MsrListHeader))
CHECK_EXTENSION = _io(0x03)
GET_VCPU_MMAP_SIZE = _io(0x04)
GET_SUPPORTED_CPUID = _iowr(0x05, ctypes.sizeof(Cpuid2Header))
CREATE_VCPU = _io(0x41)
GET_DIRTY_LOG = _iow(0x42, ctypes.sizeof(DirtyLog))
SET_USER_MEMORY_REGION = _iow(0x46, ctypes.sizeof(UserspaceMemoryRegion))
CREATE_IRQCHIP = _io(0x60)
GET_IRQCHIP = _iowr(0x62, ctypes.sizeof(Irqchip))
SET_IRQCHIP = _ior(0x63, ctypes.sizeof(Irqchip))
SET_CLOCK = _iow(0x7B, ctypes.sizeof(ClockData))
GET_CLOCK = _ior(0x7C, ctypes.sizeof(ClockData))
RUN = _io(0x80)
GET_REGS = _ior(0x81, ctypes.sizeof(Regs))
SET_REGS = _iow(0x82, ctypes.sizeof(Regs))
GET_SREGS = _ior(0x83, ctypes.sizeof(Sregs))
SET_SREGS = _iow(0x84, ctypes.sizeof(Sregs))
GET_MSRS = _iowr(0x88, ctypes.sizeof(MsrsHeader))
SET_MSRS = _iow(0x89, ctypes.sizeof(MsrsHeader))
GET_FPU = _ior(0x8C, ctypes.sizeof(Fpu))
SET_FPU = _iow(0x8D, ctypes.sizeof(Fpu))
GET_LAPIC = _ior(0x8E, ctypes.sizeof(LapicState))
SET_LAPIC = _iow(0x8F, ctypes.sizeof(LapicState))
SET_CPUID2 = _iow(0x90, ctypes.sizeof(Cpuid2Header))
GET_CPUID2 = _iowr(0x91, ctypes.sizeof(Cpuid2Header))
GET_MP_STATE = _ior(0x98, ctypes.sizeof(MpStateStruct))
SET_MP_STATE = _iow(0x99, ctypes.sizeof(MpStateStruct))
GET_VCPU_EVENTS = _ior(0x9F, ctypes.sizeof(VcpuEvents))
SET_VCPU_EVENTS = _iow(0xA0, ctypes.sizeof(VcpuEvents))
GET_DEBUGREGS = _ior(0xA1, ctypes.sizeof(Debugregs))
SET_DEBUGREGS = _iow(0xA2, ctypes.sizeof(Debugregs))
ENABLE_CAP = _iow(0xA3, ctypes.sizeof(EnableCap))
GET_TSC_KHZ = _io(0xA3)
GET_XSAVE = _ior(0xA4, ctypes.sizeof(Xsave))
SET_XSAVE = _iow(0xA5, ctypes.sizeof(Xsave))
GET_XCRS = _ior(0xA6, ctypes.sizeof(Xcrs))
SET_XCRS = _iow(0xA7, ctypes.sizeof(Xcrs))
CLEAR_DIRTY_LOG = _iowr(0xC0, ctypes.sizeof(ClearDirtyLog))
REGISTER_COALESCED_MMIO = _iow(0x67, ctypes.sizeof(CoalescedMmioZone))
GET_STATS_FD = _io(0xCE)

_SIZES = {
    "UserspaceMemoryRegion": (UserspaceMemoryRegion, 32),
    "Regs": (Regs, 144),
    "Sregs": (Sregs, 312),
    "Fpu": (Fpu, 416),
    "Xcrs": (Xcrs, 392),
    "VcpuEvents": (VcpuEvents, 64),
    "Debugregs": (Debugregs, 128),
    "Irqchip": (Irqchip, 520),
    "ClockData": (ClockData, 48),
    "CpuidEntry2": (CpuidEntry2, 40),
    "DirtyLog": (DirtyLog, 16),
    "ClearDirtyLog": (ClearDirtyLog, 24),
    "EnableCap": (EnableCap, 104),
    "CoalescedMmioZone": (CoalescedMmioZone, 16),
    "StatsHeader": (StatsHeader, 24),
    "StatsDesc": (StatsDesc, 16),
    "Run.exit": (RunExit, 256),
}
for _name, (_struct, _size) in _SIZES.items():
    assert ctypes.sizeof(_struct) == _size, f"{_name}: {ctypes.sizeof(_struct)} != {_size}"
assert Run.exit.offset == 32

_REQUESTS = (  # noqa: SIM905
    "GET_API_VERSION CREATE_VM GET_MSR_INDEX_LIST CHECK_EXTENSION GET_VCPU_MMAP_SIZE "
    "GET_SUPPORTED_CPUID CREATE_VCPU GET_DIRTY_LOG SET_USER_MEMORY_REGION CREATE_IRQCHIP "
    "GET_IRQCHIP SET_IRQCHIP SET_CLOCK GET_CLOCK RUN GET_REGS SET_REGS GET_SREGS SET_SREGS "
    "GET_MSRS SET_MSRS GET_FPU SET_FPU GET_LAPIC SET_LAPIC SET_CPUID2 GET_CPUID2 GET_MP_STATE "
    "SET_MP_STATE GET_VCPU_EVENTS SET_VCPU_EVENTS GET_DEBUGREGS SET_DEBUGREGS ENABLE_CAP "
    "GET_TSC_KHZ GET_XSAVE SET_XSAVE GET_XCRS SET_XCRS CLEAR_DIRTY_LOG GET_STATS_FD "
    "REGISTER_COALESCED_MMIO"
).split()
#: ioctl number -> its name, for error messages.
_NAMES = {globals()[name]: f"KVM_{name}" for name in _REQUESTS}

_ioctl = libc_gate("ioctl", c_int, [c_int, c_ulong, c_void_p], ("fd", "request", None))


def ioctl(fd: int, request: int, arg: Any = None) -> int:
    """``ioctl(fd, request, arg)`` (a structure by reference, an int by value, or nothing);
    retries EINTR; an OSError names the request, e.g. ``ioctl(fd=5, KVM_SET_SREGS): ...``."""
    if arg is None:
        value: Any = None
    elif isinstance(arg, int):
        value = arg
    else:
        value = ctypes.addressof(arg)
    while True:
        result = int(_ioctl.raw(fd, request, value))
        if result >= 0:
            return result
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise os_error(err, f"ioctl(fd={fd}, {_NAMES.get(request, hex(request))})")


def run(fd: int) -> bool:
    """``KVM_RUN`` once. False when it was interrupted (EINTR: a pause was asked for, or the
    run had ``immediate_exit`` set); True when the vCPU exited for a reason in kvm_run."""
    if _ioctl.raw(fd, RUN, None) >= 0:
        return True
    err = ctypes.get_errno()
    if err == errno.EINTR:
        return False
    raise os_error(err, f"ioctl(fd={fd}, KVM_RUN)")


def buffer_with_entries(header: type[ctypes.Structure], entry: type[Any], count: int) -> Any:
    """A structure with a flexible array: ``header`` followed by ``count`` ``entry`` items
    (zeroed)."""
    key = (header, entry, count)
    made = _WITH_ENTRIES.get(key)
    if made is None:

        class WithEntries(ctypes.Structure):
            _fields_ = [("head", header), ("entries", entry * count)]

        made = _WITH_ENTRIES[key] = WithEntries
    return made()


#: The types :func:`buffer_with_entries` made. Making a ctypes structure type costs more
#: than the ioctl it is for (~60 us), and a VM's MSRs are saved and loaded inside a
#: migration's pause, always with the same count.
_WITH_ENTRIES: dict[tuple[type[Any], type[Any], int], type[ctypes.Structure]] = {}


_S = TypeVar("_S", bound=ctypes.Structure)


def size_of(cls: type[ctypes.Structure]) -> int:
    """The size in bytes of a KVM structure type (or of an entry type of a buffer)."""
    return ctypes.sizeof(cls)


def struct_bytes(obj: ctypes.Structure) -> bytes:
    """A copy of the raw bytes of a KVM structure (as an ioctl filled it)."""
    return ctypes.string_at(ctypes.addressof(obj), ctypes.sizeof(obj))


def struct_from_bytes(cls: type[_S], blob: bytes) -> _S:
    """A new ``cls`` from the first :func:`size_of` ``cls`` bytes of ``blob`` (the rest is
    ignored); ValueError when ``blob`` is shorter."""
    size = ctypes.sizeof(cls)
    if len(blob) < size:
        raise ValueError(f"{len(blob)} bytes for a {cls.__name__} of {size}")
    return cls.from_buffer_copy(blob[:size])


def entries_bytes(buf: Any, count: int) -> bytes:
    """A copy of the first ``count`` entries of a :func:`buffer_with_entries` buffer."""
    entries = buf.entries
    if not 0 <= count <= len(entries):
        raise ValueError(f"{count} entries of a buffer with room for {len(entries)}")
    return ctypes.string_at(ctypes.addressof(entries), count * ctypes.sizeof(entries._type_))


def set_entries(buf: Any, blob: bytes) -> None:
    """Copy ``blob`` (whole entries, as :func:`entries_bytes` gives them) to the start of the
    entries of a :func:`buffer_with_entries` buffer; ValueError when it does not fit."""
    room = ctypes.sizeof(buf.entries)
    if len(blob) > room:
        raise ValueError(f"{len(blob)} bytes of entries for a buffer with room for {room}")
    ctypes.memmove(ctypes.addressof(buf.entries), blob, len(blob))


def run_bytes(address: int, size: int) -> memoryview:
    """A writable byte view of the ``kvm_run`` mapping at ``address`` (``size`` bytes, from
    ``KVM_GET_VCPU_MMAP_SIZE``).

    A port I/O exit's data lies in it, ``size * count`` bytes from ``exit.io.data_offset``:
    slicing the view reads it (``.tobytes()``) and answers an ``in`` (slice assignment) at a
    fraction of the cost of a ctypes call, on the path every port I/O exit takes. The view
    must be dropped before the mapping is unmapped.
    """
    return memoryview((ctypes.c_char * size).from_address(address)).cast("B")


def stats_offsets(fd: int) -> dict[str, int]:
    """Each statistic of a binary statistics fd (``KVM_GET_STATS_FD``) by name: the byte
    offset in the fd of its first 64-bit value (``Documentation/virt/kvm/api.rst``, "The
    binary statistics"). Reading one is a ``pread`` of 8 bytes there: no ioctl, no lock of
    the vCPU, so it works while another thread is inside ``KVM_RUN``."""
    head_size = ctypes.sizeof(StatsHeader)
    head = struct_from_bytes(StatsHeader, os.pread(fd, head_size, 0))
    step = ctypes.sizeof(StatsDesc) + head.name_size
    table = os.pread(fd, step * head.num_desc, head.desc_offset)
    if len(table) < step * head.num_desc:
        raise ValueError(f"a KVM statistics fd with {head.num_desc} descriptors ends early")
    offsets = {}
    for at in range(0, len(table), step):
        desc = StatsDesc.from_buffer_copy(table, at)
        raw = table[at + ctypes.sizeof(StatsDesc) : at + step]
        offsets[raw.split(b"\0", 1)[0].decode()] = head.data_offset + desc.offset
    return offsets
