"""A virtual machine's state besides its RAM: what is saved, how it is encoded, and the order
in which it is put back.

Saved, with the vCPU parked (out of ``KVM_RUN``, pending port I/O completed):

* VM: the in-kernel irqchip (PIC master, PIC slave, I/O APIC) and the KVM clock;
* vCPU: CPUID, general registers, special registers (segments, control registers, EFER,
  APIC base), the XSAVE area, XCRs, debug registers, every MSR KVM lists
  (``KVM_GET_MSR_INDEX_LIST``), the local APIC's registers, the multiprocessing state and
  the pending events (exceptions, interrupts, NMI, SMI). The x87 and SSE registers are in
  the XSAVE area's legacy region, so ``KVM_GET_FPU`` is not read as well (and ``KVM_SET_FPU``
  before ``KVM_SET_XSAVE`` would be overwritten by it): a state saved by an earlier version
  carries an ``fpu`` piece, which is ignored. Where KVM offers ``KVM_CAP_SYNC_REGS``, the
  registers, special registers and events come from ``kvm_run``, where KVM stored them as
  the vCPU left ``KVM_RUN`` to park: the same structures, without three ioctls in the pause;
* the devices the VMM emulates (:mod:`.devices`) and the VMM's own record (``meta``: RAM
  size, the guest kind's bookkeeping), as JSON.

Restore order, and why:

1. **irqchip** (PIC, I/O APIC): VM-wide, before any vCPU state that could raise an interrupt.
2. **clock** (``KVM_SET_CLOCK``): VM-wide; kvmclock readings of the vCPU then continue from
   the saved value.
3. **CPUID**: KVM checks XSAVE, XCR and MSR values against the features CPUID announces, so
   it comes before them. (A new VM built on the same host has the very same CPUID set
   already: an identical one is not set again.)
4. **special registers**: they set the APIC base (enabled, x2APIC mode), which decides how
   the local APIC state and the TSC-deadline MSR are taken; and EFER/CR0/CR4, which the
   XSAVE state and MSRs are checked against.
5. **general registers**, **XSAVE**, **XCRs**, **debug registers**.
6. **local APIC**: after the APIC base (step 4); this re-arms the APIC timer the guest sleeps on.
   KVM re-arms it with the count that was left when the state was read, as if the timer had
   stood still meanwhile while the guest's TSC ran on: every tick would come late by the
   whole pause, so a guest sleeping on a 1 ms tick saw the pause plus a full tick. Where
   both sides read one ``CLOCK_MONOTONIC`` (the same boot and time namespace: a flip, a live
   update, a migration on one host), the count is first advanced by the time since it was
   read (:func:`lapic_caught_up`): a tick that fell in the pause is pending at the resume,
   as on a CPU that stalled, and the ticks after it keep their phase.
7. **MSRs**: after CPUID and the local APIC (IA32_TSC_DEADLINE needs the APIC in place).
8. **multiprocessing state** (running or halted): after the registers, because setting it
   may reset pending work that the registers describe.
9. **vCPU events** last: a pending exception or interrupt is injected on top of everything
   else, with the registers it refers to already in place.

The guest's TSC: on this host KVM gives the guest the host's TSC (``KVM_SET_TSC_KHZ`` is not
offered and a write of MSR IA32_TSC is ignored), so between two VMM processes of one host the
guest's TSC runs on with no jump: a restored guest sees exactly the time it stood still.

Encoding: ``b"PFVM"``, a version byte, then named blobs (name length, name, data length,
data), every length checked on decoding; a state from a peer is never unpickled or evaluated.
"""

from __future__ import annotations

import ctypes
import json
import struct
import time
from collections.abc import Callable
from typing import Any

from .._sys import kvm
from .._sys.procfs import clock_identity
from ..errors import BadGuestState

__all__ = ["decode", "encode", "lapic_caught_up", "record", "restore_machine", "save_machine"]

#: Offsets of local APIC registers in the ``KVM_GET_LAPIC`` page.
APIC_IRR = 0x200
APIC_LVTT = 0x320
APIC_TMICT = 0x380
APIC_TMCCT = 0x390
APIC_TDCR = 0x3E0
#: KVM's APIC bus cycle in ns (``KVM_CAP_X86_APIC_BUS_CYCLES_NS``, left at its default): the
#: timer counts once per cycle times its divider.
APIC_BUS_NS = 1
_LVT_MASKED = 1 << 16
_U32 = struct.Struct("<I")

MAGIC = b"PFVM"
VERSION = 1
_HEAD = struct.Struct("<B")
_LEN = struct.Struct("<I")


def encode(blobs: dict[str, bytes]) -> bytes:
    parts = [MAGIC, bytes((VERSION,))]
    for name, data in blobs.items():
        raw = name.encode()
        parts += [_HEAD.pack(len(raw)), raw, _LEN.pack(len(data)), data]
    return b"".join(parts)


def _bad(what: str) -> BadGuestState:
    return BadGuestState(f"the VM state {what}", kind="vm", field="state")


def decode(state: bytes) -> dict[str, bytes]:
    if state[:4] != MAGIC:
        raise _bad("does not start with PFVM: it is not a pageflip VM state")
    if len(state) < 5 or state[4] != VERSION:
        raise _bad(f"has version {state[4] if len(state) > 4 else None}, expected {VERSION}")
    blobs: dict[str, bytes] = {}
    at = 5
    while at < len(state):
        if at + 1 > len(state):
            raise _bad("is cut off")
        (n,) = _HEAD.unpack_from(state, at)
        at += 1
        name = state[at : at + n].decode(errors="replace")
        at += n
        if at + 4 > len(state):
            raise _bad(f"is cut off in {name!r}")
        (size,) = _LEN.unpack_from(state, at)
        at += 4
        if at + size > len(state):
            raise _bad(f"is cut off in {name!r}")
        blobs[name] = state[at : at + size]
        at += size
    return blobs


# Each piece: (name, structure, getter ioctl, setter ioctl), vCPU unless noted.
_VCPU_PIECES: tuple[tuple[str, type[Any], int, int], ...] = (
    ("regs", kvm.Regs, kvm.GET_REGS, kvm.SET_REGS),
    ("sregs", kvm.Sregs, kvm.GET_SREGS, kvm.SET_SREGS),
    ("xsave", kvm.Xsave, kvm.GET_XSAVE, kvm.SET_XSAVE),
    ("xcrs", kvm.Xcrs, kvm.GET_XCRS, kvm.SET_XCRS),
    ("debugregs", kvm.Debugregs, kvm.GET_DEBUGREGS, kvm.SET_DEBUGREGS),
    ("lapic", kvm.LapicState, kvm.GET_LAPIC, kvm.SET_LAPIC),
    ("mp_state", kvm.MpStateStruct, kvm.GET_MP_STATE, kvm.SET_MP_STATE),
    ("events", kvm.VcpuEvents, kvm.GET_VCPU_EVENTS, kvm.SET_VCPU_EVENTS),
)

#: The pieces KVM also stores in ``kvm_run`` (``KVM_CAP_SYNC_REGS``).
_SYNCED = frozenset({"regs", "sregs", "events"})

#: The restore order (see the module docstring for the reasons).
RESTORE_ORDER = (
    "irqchip",
    "clock",
    "cpuid",
    "sregs",
    "regs",
    "xsave",
    "xcrs",
    "debugregs",
    "lapic",
    "msrs",
    "mp_state",
    "events",
)


class Buffers:
    """The structures one machine's state is read into and loaded from, made once.

    Inside a pause every microsecond counts: making a 4 KiB XSAVE area, a local APIC page
    and an MSR list with its 40-odd indices at each save made the first save after a pause
    310 us where it takes 281 us with the structures ready, and a second one 189 us where it
    takes 158 us (medians of 30, a 512 MiB guest writing 256 MiB/s). Not thread-safe: one
    machine saves or loads at a time."""

    def __init__(self, msr_list: list[int]) -> None:
        #: (name, getter, setter, structure, its address, its size) of each vCPU piece.
        self.vcpu: list[tuple[str, int, int, Any, int, int]] = []
        for name, cls, get, put in _VCPU_PIECES:
            obj = cls()
            self.vcpu.append((name, get, put, obj, ctypes.addressof(obj), ctypes.sizeof(obj)))
        self.piece = {entry[0]: entry for entry in self.vcpu}
        self.msr_count = len(msr_list)
        #: Every index in place: GET_MSRS overwrites only the data.
        self.msrs = kvm.buffer_with_entries(kvm.MsrsHeader, kvm.MsrEntry, max(self.msr_count, 1))
        self.msrs.head.nmsrs = self.msr_count
        for i, index in enumerate(msr_list):
            self.msrs.entries[i].index = index
        self.chips: list[Any] = []
        for chip_id in (kvm.IRQCHIP_PIC_MASTER, kvm.IRQCHIP_PIC_SLAVE, kvm.IRQCHIP_IOAPIC):
            chip = kvm.Irqchip()
            chip.chip_id = chip_id
            self.chips.append(chip)
        self.clock = kvm.ClockData()


def save_machine(
    vm_fd: int,
    vcpu_fd: int | None,
    buffers: Buffers,
    meta: dict[str, Any],
    cpuid: bytes,
    synced: kvm.SyncRegs | None = None,
) -> bytes:
    """The VM's and vCPU's state (the vCPU must be parked), with ``meta`` as JSON.

    ``cpuid`` is the CPUID the VMM set (its entries, as :func:`kvm.entries_bytes` gives
    them): it never changes while the VM lives, so it is not read back inside the pause
    (``KVM_GET_CPUID2`` costs more than any other piece). The bits KVM keeps current itself
    (OSXSAVE, the APIC's) follow from the special registers and the local APIC, restored
    after it. ``vcpu_fd`` None: the vCPU runs and is not read, its pieces are what the
    structures hold (:func:`warm_save`). ``synced``: the registers, special registers and
    events as KVM stored them in ``kvm_run`` when the vCPU parked (the very structures
    their ioctls fill), taken from there."""
    blobs: dict[str, bytes] = {}
    lapic_read = 0
    for name, get, _, obj, address, size in buffers.vcpu:
        if synced is not None and name in _SYNCED:
            blobs[name] = ctypes.string_at(ctypes.addressof(getattr(synced, name)), size)
            continue
        if vcpu_fd is not None:
            kvm.ioctl(vcpu_fd, get, obj)
        blobs[name] = ctypes.string_at(address, size)
        if get == kvm.GET_LAPIC:
            lapic_read = time.monotonic_ns()
    meta = {**meta, "lapic_read": {"at_ns": lapic_read, "clock": list(clock_identity())}}
    blobs["cpuid"] = cpuid
    msrs = buffers.msrs
    got = buffers.msr_count if vcpu_fd is None else kvm.ioctl(vcpu_fd, kvm.GET_MSRS, msrs)
    blobs["msrs"] = kvm.entries_bytes(msrs, got)
    for chip in buffers.chips:
        kvm.ioctl(vm_fd, kvm.GET_IRQCHIP, chip)
    blobs["irqchip"] = b"".join(kvm.struct_bytes(chip) for chip in buffers.chips)
    kvm.ioctl(vm_fd, kvm.GET_CLOCK, buffers.clock)
    blobs["clock"] = kvm.struct_bytes(buffers.clock)
    blobs["meta"] = json.dumps(meta, separators=(",", ":")).encode()
    return encode(blobs)


def warm_save(vm_fd: int, buffers: Buffers, meta: dict[str, Any], cpuid: bytes) -> None:
    """Run :func:`save_machine` while the vCPU still runs, all but its vCPU ioctls (only a
    parked vCPU may be read), and throw the result away. The save right after a pause
    that follows 0.2 s of quiet took 343 and 308 us without this, 244 and 225 us with it
    (medians of 20 in each of two runs, a 512 MiB guest writing 256 MiB/s, with
    :meth:`VirtualMachine.about_to_pause` before every other pause)."""
    save_machine(vm_fd, None, buffers, meta, cpuid)


def record(blobs: dict[str, bytes]) -> dict[str, Any]:
    """The ``meta`` record of a decoded state (:class:`BadGuestState` if it has none)."""
    if "meta" not in blobs:
        raise _bad("lacks meta")
    try:
        meta = json.loads(blobs["meta"])
    except ValueError as err:
        raise _bad(f"has a meta record that is not JSON: {err}") from None
    if not isinstance(meta, dict):
        raise _bad("has a meta record that is not an object")
    return meta


def restore_machine(
    vm_fd: int,
    vcpu_fd: int,
    blobs: dict[str, bytes],
    buffers: Buffers,
    cpuid: bytes = b"",
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Put a saved state back into a freshly built VM, in :data:`RESTORE_ORDER`; returns
    the ``meta`` record (``meta``: the caller read it already, see :func:`record`).
    :class:`BadGuestState` for a state that is damaged or incomplete.

    ``cpuid`` is the CPUID the new VM has already (set when it was built): a saved CPUID
    equal to it byte for byte is not set again (a spare machine on the same host)."""
    missing = [name for name in (*RESTORE_ORDER, "meta") if name not in blobs]
    if missing:
        raise _bad(f"lacks {', '.join(missing)}")
    if meta is None:
        meta = record(blobs)
    read_at = _lapic_read_at(meta.get("lapic_read"))
    steps: dict[str, Callable[[bytes], None]] = {
        "irqchip": lambda b: _restore_irqchip(vm_fd, b, buffers),
        "clock": lambda b: _restore_clock(vm_fd, b, buffers),
        "cpuid": lambda b: None if b == cpuid else _restore_cpuid(vcpu_fd, b),
        "lapic": lambda b: _restore_lapic(vcpu_fd, b, read_at, buffers),
        "msrs": lambda b: _restore_msrs(vcpu_fd, b),
    }
    for name in RESTORE_ORDER:
        blob = blobs[name]
        step = steps.get(name)
        if step is not None:
            step(blob)
            continue
        _, _, put, obj, address, size = buffers.piece[name]
        kvm.ioctl(vcpu_fd, put, _filled(obj, address, size, blob, name))
    return meta


def _lapic_read_at(record: object) -> int | None:
    """When the saved local APIC was read, on this process's CLOCK_MONOTONIC (ns); None
    when the state does not say, or was read on another clock (another host, boot or time
    namespace): then nobody can tell how long its timer stood still."""
    if record is None:
        return None
    if not isinstance(record, dict):
        raise _bad("has a lapic_read record that is not an object")
    at, clock = record.get("at_ns"), record.get("clock")
    if not isinstance(at, int) or not isinstance(clock, list):
        raise _bad("has a lapic_read record without at_ns and clock")
    ours = clock_identity()
    if at <= 0 or ours[:2] == (0, 0) or tuple(clock) != ours:
        return None
    return at


def _filled(obj: Any, address: int, size: int, blob: bytes, name: str) -> Any:
    """``obj`` (at ``address``, ``size`` bytes) holding the first ``size`` bytes of ``blob``."""
    if len(blob) < size:
        raise _bad(f"has {len(blob)} bytes of {name}, expected {size}")
    ctypes.memmove(address, blob, size)
    return obj


def _restore_lapic(vcpu_fd: int, blob: bytes, read_at: int | None, buffers: Buffers) -> None:
    if read_at is not None:
        blob = lapic_caught_up(blob, time.monotonic_ns() - read_at)
    _, _, put, obj, address, size = buffers.piece["lapic"]
    kvm.ioctl(vcpu_fd, put, _filled(obj, address, size, blob, "lapic"))


def lapic_caught_up(regs: bytes, elapsed_ns: int) -> bytes:
    """A local APIC register page (``KVM_GET_LAPIC``) as it would stand had its timer run on
    for ``elapsed_ns`` more: the current count lower by that many bus cycles (over the
    divider); a count that ran out marks the timer's interrupt pending (in the IRR, unless
    the timer is masked), and a periodic timer starts its next period where the lost ones
    would have left it. A timer that is stopped, or in TSC-deadline mode (its deadline is
    an MSR on the TSC, which ran on), is left as it is."""
    lvtt, tmict, tmcct, tdcr = (
        _U32.unpack_from(regs, offset)[0]
        for offset in (APIC_LVTT, APIC_TMICT, APIC_TMCCT, APIC_TDCR)
    )
    mode = (lvtt >> 17) & 3  # 0 one-shot, 1 periodic, 2 TSC deadline
    # A one-shot count of 0 is a timer that is stopped (fired, or never set); a periodic
    # one reads 0 only when its period ended and KVM has not yet re-armed it: the tick is
    # due (KVM's own restore would wait a whole period for it).
    if mode > 1 or tmict == 0 or (tmcct == 0 and mode == 0) or elapsed_ns < 0:
        return regs
    code = (tdcr & 3) | ((tdcr & 8) >> 1)
    divide = 1 if code == 7 else 2 << code
    counts = elapsed_ns // (APIC_BUS_NS * divide)
    if counts < tmcct:  # (a count of 0 never is)
        return _with_u32(regs, APIC_TMCCT, tmcct - counts)
    # A periodic timer goes on in phase; a one-shot one that fired is stopped (count 0).
    left = tmict - (counts - tmcct) % tmict if mode == 1 else 0
    out = _with_u32(regs, APIC_TMCCT, left)
    if lvtt & _LVT_MASKED:
        return out
    vector = lvtt & 0xFF
    irr = APIC_IRR + 0x10 * (vector // 32)
    return _with_u32(out, irr, _U32.unpack_from(out, irr)[0] | (1 << (vector % 32)))


def _with_u32(regs: bytes, offset: int, value: int) -> bytes:
    return regs[:offset] + _U32.pack(value) + regs[offset + 4 :]


def _restore_irqchip(vm_fd: int, blob: bytes, buffers: Buffers) -> None:
    size = kvm.size_of(kvm.Irqchip)
    if len(blob) != 3 * size:
        raise _bad(f"has {len(blob)} bytes of irqchip, expected {3 * size}")
    for i, chip in enumerate(buffers.chips):
        piece = blob[i * size : (i + 1) * size]
        _filled(chip, ctypes.addressof(chip), size, piece, "irqchip")
        kvm.ioctl(vm_fd, kvm.SET_IRQCHIP, chip)


def _restore_clock(vm_fd: int, blob: bytes, buffers: Buffers) -> None:
    clock = buffers.clock
    _filled(clock, ctypes.addressof(clock), ctypes.sizeof(clock), blob, "clock")
    clock.flags = 0  # the saved flags describe the reading, they are not settings
    kvm.ioctl(vm_fd, kvm.SET_CLOCK, clock)


def _restore_cpuid(vcpu_fd: int, blob: bytes) -> None:
    size = kvm.size_of(kvm.CpuidEntry2)
    if not blob or len(blob) % size:
        raise _bad(f"has {len(blob)} bytes of CPUID, not a multiple of {size}")
    n = len(blob) // size
    buf = kvm.buffer_with_entries(kvm.Cpuid2Header, kvm.CpuidEntry2, n)
    buf.head.nent = n
    kvm.set_entries(buf, blob)
    kvm.ioctl(vcpu_fd, kvm.SET_CPUID2, buf)


def _restore_msrs(vcpu_fd: int, blob: bytes) -> None:
    size = kvm.size_of(kvm.MsrEntry)
    if len(blob) % size:
        raise _bad(f"has {len(blob)} bytes of MSRs, not a multiple of {size}")
    n = len(blob) // size
    if not n:
        return
    buf = kvm.buffer_with_entries(kvm.MsrsHeader, kvm.MsrEntry, n)
    buf.head.nmsrs = n
    kvm.set_entries(buf, blob)
    done = kvm.ioctl(vcpu_fd, kvm.SET_MSRS, buf)
    if done != n:
        index = int(buf.entries[done].index)
        raise BadGuestState(
            f"KVM refused MSR {index:#x} of the saved state ({done} of {n} taken)",
            kind="vm",
            field="msrs",
        )
