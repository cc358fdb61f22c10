"""pageflip.vm: the KVM VMM boots the shipped guest, pauses and resumes it, saves and restores
its state, tracks its writes with KVM's dirty log, rejects kernels it cannot boot with one
line, reports a guest that dies with its exit reason and registers, and moves the guest
between VMM processes by every mode (and by a live update) with the guest's own check
passing. Kills of the destination VMM in each phase before PREPARED leave the VM running on
the source."""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cli_procs import (
    NO_REALTIME,
    NO_REALTIME_MISSING,
    REALTIME_REFUSED,
    Host,
    hosts,
    one_line,
    run,
)
from pageflip._sys import kvm
from pageflip.bench.vm import guest as bench_guest
from pageflip.errors import BadGuestState, BadImage, GuestStopped, StateError
from pageflip.memory import Region
from pageflip.vm import Machine, VirtualMachine, kvm_available, layout, read_pvh
from test_huge import hugetlb_pool

_ = hosts, hugetlb_pool  # the fixtures

_why = kvm_available()
pytestmark = pytest.mark.skipif(_why is not None, reason=f"no usable KVM: {_why}")

MODES = ["flip", "precopy", "postcopy"]
#: A small guest: 64 MiB of RAM, 32 MiB of it filled and rewritten at 8 MiB/s.
APPEND = "mb=32 rate=8 hb=50"


@pytest.fixture(scope="module")
def kernel() -> str:
    from pageflip.vm.image import guest_elf

    try:
        return str(guest_elf())
    except Exception as err:  # no compiler: the one thing these tests cannot bring
        pytest.skip(f"cannot build the guest: {err}")


@pytest.fixture
def vm(kernel: str) -> Iterator[VirtualMachine]:
    guest = VirtualMachine.create(64 << 20, kernel, APPEND)
    try:
        yield guest
    finally:
        guest.close()


def _beats(guest: VirtualMachine) -> int:
    return int(guest.status()["heartbeats"])  # type: ignore[call-overload]


def _wait_beats(guest: VirtualMachine, more: int, timeout: float = 30.0) -> None:
    start = _beats(guest)
    deadline = time.monotonic() + timeout
    while _beats(guest) < start + more:
        assert time.monotonic() < deadline, f"no heartbeat; console: {guest.console_lines()}"
        time.sleep(0.01)


# -- kernels that cannot boot -------------------------------------------------------------


def _pvh_elf(code: bytes, *, note: bool = True, paddr: int = 0x100000) -> bytes:
    """A minimal PVH ELF: ``code`` loaded at ``paddr``, entry there."""
    ehdr_size, phdr_size = 64, 56
    nphdr = 2 if note else 1
    data_off = ehdr_size + nphdr * phdr_size
    note_bytes = struct.pack("<III", 4, 4, 18) + b"Xen\0" + struct.pack("<I", paddr)
    code_off = data_off + (len(note_bytes) if note else 0)
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    ehdr = ident + struct.pack(
        "<HHIQQQIHHHHHH", 2, 62, 1, paddr, ehdr_size, 0, 0, ehdr_size, phdr_size, nphdr, 0, 0, 0
    )
    load = struct.pack("<IIQQQQQQ", 1, 7, code_off, paddr, paddr, len(code), len(code), 0x1000)
    phdrs = load
    if note:
        phdrs += struct.pack("<IIQQQQQQ", 4, 4, data_off, 0, 0, len(note_bytes), len(note_bytes), 4)
    return ehdr + phdrs + (note_bytes if note else b"") + code


@pytest.mark.parametrize(
    ("blob", "says"),
    [
        (b"#!/bin/sh\necho hello\n", "it is not an ELF file"),
        (_pvh_elf(b"\x0f\x0b", note=False), "no PVH entry note"),
        (_pvh_elf(b"\x0f\x0b")[:100], "cut off"),
        (_pvh_elf(b"\x0f\x0b" * 100)[:-50], "past the end of the file"),
    ],
    ids=["not-elf", "not-pvh", "truncated-headers", "truncated-segment"],
)
def test_a_kernel_that_cannot_boot_is_one_line(tmp_path: Path, blob: bytes, says: str) -> None:
    path = tmp_path / "kernel.elf"
    path.write_bytes(blob)
    with pytest.raises(BadImage) as caught:
        read_pvh(path)
    assert says in str(caught.value) and str(path) in str(caught.value)
    assert "\n" not in str(caught.value)
    out = run(
        "vm", "run", "--memory", "64M", "--kernel", str(path), "--control", str(tmp_path / "c")
    )
    assert out.returncode == 1
    assert one_line(out.stderr).startswith("BadImage: ") and says in out.stderr


def test_a_kernel_too_large_for_the_ram_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "high.elf"
    path.write_bytes(_pvh_elf(b"\x0f\x0b", paddr=0x8000000))  # loads at 128 MiB
    with pytest.raises(BadImage, match="outside guest RAM"):
        VirtualMachine.create(64 << 20, path, "")
    out = run(
        "vm", "run", "--memory", "64M", "--kernel", str(path), "--control", str(tmp_path / "c")
    )
    assert out.returncode == 1 and "more memory" in one_line(out.stderr), out.stderr
    assert not (tmp_path / "c").exists()


def test_a_guest_that_triple_faults_is_reported_not_hung(tmp_path: Path) -> None:
    """``ud2`` with no IDT: #UD, then #GP, then a double fault, then shutdown."""
    path = tmp_path / "crash.elf"
    path.write_bytes(_pvh_elf(b"\x0f\x0b"))
    guest = VirtualMachine.create(64 << 20, path, "")
    try:
        deadline = time.monotonic() + 30
        while "stopped" not in guest.status():
            assert time.monotonic() < deadline, "the VMM did not see the guest stop"
            time.sleep(0.01)
        stopped = guest.machine.stopped
        assert isinstance(stopped, GuestStopped)
        assert stopped.reason is not None and "SHUTDOWN" in stopped.reason
        assert stopped.registers is not None and "rip" in stopped.registers
        assert "rip=0x" in str(stopped)
        assert guest.status()["state"] == "stopped"
        with pytest.raises(GuestStopped):
            guest.resume()
    finally:
        guest.close()


# -- one VMM process ------------------------------------------------------------------------


def test_boot_heartbeat_pause_resume(vm: VirtualMachine) -> None:
    _wait_beats(vm, 2)
    status = vm.status()
    assert status["ready"] is True and status["state"] == "running"
    vm.pause()
    paused_at = _beats(vm)
    time.sleep(0.3)
    assert _beats(vm) == paused_at, "the guest beat while paused"
    assert vm.status()["state"] == "paused"
    asked = time.monotonic()
    resumed = vm.resume()  # the moment the vCPU thread left its park, on the same clock
    assert asked <= resumed <= time.monotonic()
    _wait_beats(vm, 2)
    pause = vm.observed_pause(timeout=10)
    assert pause is not None and pause >= 0.25, pause  # the guest saw the 0.3 s it stood still
    report = vm.verify()
    assert report.ok, report.problems
    assert report.pages_checked == 32 << 8


def test_paced_heartbeats_arrive_whole_in_order_and_before_an_answer(kernel: str) -> None:
    """Heartbeats go out one FIFO burst per loop iteration; with a heartbeat every tick
    (10 ms) and a line longer than a burst, the queue falls behind and is flushed: every
    line still arrives whole and in order, and an answer never cuts into a queued line."""
    guest = VirtualMachine.create(64 << 20, kernel, "mb=32 rate=8 hb=10 tick_us=10000")
    try:
        _wait_beats(guest, 40)  # the queue fills up after some 30 ticks and is flushed
        _, answer = guest.ask("P", "PAUSE")
        assert bench_guest.parse_line(answer) is not None, answer
        _wait_beats(guest, 2)
        lines = guest.console_lines()
        beats = [bench_guest.parse_line(line) for line in lines if line.startswith("HB")]
        assert all(isinstance(b, bench_guest.Heartbeat) for b in beats), lines
        numbers = [b.n for b in beats if isinstance(b, bench_guest.Heartbeat)]
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), numbers
        assert all(line.startswith(("HB ", "PAUSE ", "READY ", "PFGUEST ")) for line in lines), (
            lines
        )
    finally:
        guest.close()


def test_the_console_goes_through_kvms_coalesced_ring_whole_and_in_order(
    vm: VirtualMachine,
) -> None:
    """COM1 output is queued in KVM's coalesced ring (Linux 6.18 offers it): far fewer
    exits than bytes written, over enough heartbeats for the ring to wrap many times, and
    every line arrives whole, the heartbeats numbered in order, an answer after them."""
    machine = vm.machine
    assert machine._ring is not None
    _wait_beats(vm, 1)
    exits, sent = machine.exits, machine.devices.serial.bytes_out
    _wait_beats(vm, 40)
    fields, line = vm.ask("P", "PAUSE")
    written = machine.devices.serial.bytes_out - sent
    assert written > 40 * 30 > 3 * kvm.COALESCED_MAX
    assert machine.exits - exits < written / 4, (machine.exits - exits, written)
    assert line.startswith("PAUSE max_us=") and "max_us" in fields
    beats = [bench_guest.parse_line(text) for text in vm.console_lines() if "HB n=" in text]
    numbers = [b.n for b in beats if isinstance(b, bench_guest.Heartbeat)]
    assert len(numbers) == len(beats) >= 40, vm.console_lines()[-5:]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))


def test_the_guest_tells_the_gap_of_a_pause_apart_from_other_gaps(vm: VirtualMachine) -> None:
    """G: the guest's long loop gaps with the guest time each ended; placed on the host's
    clock by the answer's arrival, the one that overlaps the pause is as long as it."""
    _wait_beats(vm, 2)
    stopped = vm.pause()
    time.sleep(0.08)
    restarted = vm.resume()
    _wait_beats(vm, 1)
    fields, line = vm.ask(bench_guest.gaps_request(10.0).decode(), "GAPS")
    answer = bench_guest.parse_line(line)
    assert isinstance(answer, bench_guest.Gaps), line
    assert answer.count == fields["n"] >= 1 and len(answer.gaps) == fields["k"] >= 1
    assert vm.answered_at is not None
    gap = answer.spanning(vm.answered_at, stopped, restarted)
    assert gap is not None and 0.08 <= gap < 0.5, (gap, line)
    # Just before the pause the guest ran on: no gap of that size there.
    earlier = answer.spanning(vm.answered_at, stopped - 0.06, stopped - 0.05)
    assert earlier is None or earlier < 0.08, (earlier, line)
    # A window that starts after the restart leaves the pause's gap out.
    window = max(0.001, time.monotonic() - restarted - 0.03)
    _, line = vm.ask(bench_guest.gaps_request(window).decode(), "GAPS")
    later = bench_guest.parse_line(line)
    assert isinstance(later, bench_guest.Gaps), line
    assert all(length < 80_000 for length, _ in later.gaps), line


def _handed_over(vm: VirtualMachine) -> tuple[int, bytes, list[Region]]:
    """Pause ``vm``, save its state and close it, keeping its RAM: the heartbeats it had
    printed, the state, the regions (what a migration hands to the next VMM)."""
    vm.pause()
    beats = _beats(vm)
    state = vm.save_state()
    regions = vm.release_regions()
    vm.close()
    return beats, state, regions


def test_save_and_restore_in_the_same_process(vm: VirtualMachine) -> None:
    _wait_beats(vm, 2)
    beats, state, regions = _handed_over(vm)
    again = VirtualMachine.restore(regions, state)
    try:
        assert again.status()["migrations"] == 1
        again.resume()
        _wait_beats(again, 2)
        last = again.status()["heartbeat"]
        assert last["n"] > beats  # type: ignore[index]  # the same counter, going on
        report = again.verify()
        assert report.ok, report.problems
    finally:
        again.close()


def test_a_vm_restored_ahead_from_its_preview_takes_the_state_saved_in_the_pause(
    vm: VirtualMachine,
) -> None:
    """A flip's destination builds the VM from a preview taken while the guest runs
    (restore_ahead), and in the pause loads only the state saved there (finish_restore):
    the guest goes on from that state, its memory intact."""
    _wait_beats(vm, 2)
    preview = vm.state_preview()  # the guest runs
    assert vm.status()["state"] == "running"
    beats, state, regions = _handed_over(vm)
    again = VirtualMachine.restore_ahead(regions, preview)
    try:
        assert again.status()["state"] == "paused" and again.status()["migrations"] == 1
        again.finish_restore(state)
        assert again.status()["migrations"] == 1
        again.resume()
        _wait_beats(again, 2)
        assert again.status()["heartbeat"]["n"] > beats  # type: ignore[index]
        report = again.verify()
        assert report.ok, report.problems
        with pytest.raises(StateError, match="restored ahead and never resumed"):
            again.finish_restore(state)
    finally:
        again.close()


def test_a_vm_restored_ahead_refuses_the_state_of_another_vm_and_loads_nothing(
    vm: VirtualMachine,
) -> None:
    """finish_restore() checks the state against the preview (the boot moment, the
    migration count) before it loads anything; a preview that is not one, or is of
    another size, is refused by restore_ahead() and the regions stay the caller's."""
    from pageflip.vm import state as vm_state

    preview = vm.state_preview()
    vm.pause()
    state = vm.save_state()
    blobs = vm_state.decode(state)
    meta = json.loads(blobs["meta"])
    other = vm_state.encode({**blobs, "meta": json.dumps({**meta, "booted": 1.0}).encode()})
    regions = vm.release_regions()
    vm.close()
    try:
        resized = json.loads(vm_state.decode(preview)["meta"])
        resized["memory"] += 1 << 20
        for bad, says in (
            (state, "must be a preview record"),
            (vm_state.encode({"meta": json.dumps(resized).encode()}), "bytes of RAM"),
            (b"nope", "PFVM"),
        ):
            with pytest.raises(BadGuestState, match=says):
                VirtualMachine.restore_ahead(regions, bad)
            assert all(not r.closed for r in regions)
    except BaseException:
        for region in regions:
            region.close()
        raise
    again = VirtualMachine.restore_ahead(regions, preview)
    try:
        with pytest.raises(BadGuestState, match="another VM"):
            again.finish_restore(other)
        again.finish_restore(state)  # nothing was loaded: the right state still goes in
        again.resume()
        _wait_beats(again, 2)
        assert again.verify().ok
    finally:
        again.close()


def test_a_warm_save_while_the_guest_runs_leaves_it_running_and_the_save_whole(
    vm: VirtualMachine,
) -> None:
    """Machine.warm_save() (before a migration's pause) runs the save's code but for the
    vCPU's ioctls, while the guest runs: the guest goes on, and the save and restore
    after it are whole."""
    _wait_beats(vm, 2)
    for _ in range(3):
        vm.about_to_pause()
    _wait_beats(vm, 2)
    vm.pause()
    vm.about_to_pause()  # paused: nothing to warm, nothing happens
    state = vm.save_state()
    regions = vm.release_regions()
    vm.close()
    again = VirtualMachine.restore(regions, state)
    try:
        again.resume()
        _wait_beats(again, 2)
        assert again.verify().ok
        again.machine.close()
        with pytest.raises(StateError, match="closed"):
            again.machine.warm_save()
    finally:
        again.close()


def test_a_migrations_pause_waits_for_the_guest_to_halt(kernel: str) -> None:
    """about_to_pause() (right before a migration's pause) waits for the guest's next halt:
    a pause then finds the vCPU halted (KVM's MP state, read with the vCPU parked), and
    status counts the waits and the halts found. A paused VM has nothing to wait for."""
    guest = VirtualMachine.create(64 << 20, kernel, APPEND + " tick_us=1000")
    try:
        _wait_beats(guest, 2)
        machine = guest.machine
        assert machine._halts is not None, "Linux 6.18 has the vCPU's binary statistics"
        for _ in range(5):
            caught = machine.halts_caught
            guest.about_to_pause()
            found = machine.halts_caught > caught
            guest.pause()
            if found:
                mp = kvm.MpStateStruct()
                kvm.ioctl(machine._vcpu, kvm.GET_MP_STATE, mp)
                assert mp.mp_state == kvm.MpState.HALTED
            guest.resume()
            time.sleep(0.02)
        vcpu = guest.status()["vcpu"]
        assert isinstance(vcpu, dict)
        assert vcpu["halt_waits"] == 5 and 1 <= vcpu["halts_caught"] <= 5, vcpu
        guest.pause()
        assert machine.await_halt() is False and machine.halt_waits == 5
        guest.resume()
        _wait_beats(guest, 1)
        assert guest.verify().ok
    finally:
        guest.close()


def test_a_rehearsed_save_and_load_leave_the_guest_as_it_was(vm: VirtualMachine) -> None:
    """Machine.rehearse() (the warm-up before a pause) loads back exactly what it saved: the
    state read after it is the one read before it (but for what moves with time: the
    clock, the TSC among the MSRs, the APIC timer's count), and the guest runs on."""
    from pageflip.vm import state as vm_state

    _wait_beats(vm, 2)
    vm.pause()
    before = vm_state.decode(vm.save_state())
    vm.machine.rehearse()
    after = vm_state.decode(vm.save_state())
    moving = {"clock", "msrs", "lapic", "meta"}
    assert {k: v for k, v in before.items() if k not in moving} == {
        k: v for k, v in after.items() if k not in moving
    }
    metas = [json.loads(blobs["meta"]) for blobs in (before, after)]
    for meta in metas:
        del meta["lapic_read"]  # when the local APIC was read
    assert metas[0] == metas[1]
    vm.resume()
    _wait_beats(vm, 2)
    assert vm.verify().ok


def test_a_save_in_a_pause_reads_what_kvm_stored_and_the_fpu_travels_in_the_xsave_area(
    vm: VirtualMachine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inside a pause the registers, special registers and events come from kvm_run, where
    KVM stored them as the vCPU parked: the very bytes their ioctls give. After a load
    they are read by the ioctls again. The x87/SSE registers are not saved on their own:
    a VM restored from the state reads back the same ones (KVM_GET_FPU) all the same."""
    import ctypes

    from pageflip._sys import kvm
    from pageflip.vm import state as vm_state

    machine = vm.machine
    if not machine.sync_regs:
        pytest.skip("KVM here lacks KVM_CAP_SYNC_REGS for regs, sregs and events")
    asked: list[int] = []
    ioctl = kvm.ioctl

    def counting(fd: int, request: int, arg: object = None) -> int:
        asked.append(request)
        return ioctl(fd, request, arg)

    monkeypatch.setattr(vm_state.kvm, "ioctl", counting)
    synced = (kvm.GET_REGS, kvm.GET_SREGS, kvm.GET_VCPU_EVENTS)
    _wait_beats(vm, 2)
    vm.pause()
    fpu = kvm.Fpu()  # SSE registers of our own (the shipped guest leaves them alone)
    ioctl(machine._vcpu, kvm.GET_FPU, fpu)
    fpu.xmm[:] = [(7 * i + 1) & 0xFF for i in range(len(fpu.xmm))]
    ioctl(machine._vcpu, kvm.SET_FPU, fpu)
    ioctl(machine._vcpu, kvm.GET_FPU, fpu)  # as KVM reports them (it leaves mxcsr 0)
    saved = vm_state.decode(vm.save_state())
    assert not set(asked) & {*synced, kvm.GET_FPU}
    for name, cls, request in (
        ("regs", kvm.Regs, kvm.GET_REGS),
        ("sregs", kvm.Sregs, kvm.GET_SREGS),
        ("events", kvm.VcpuEvents, kvm.GET_VCPU_EVENTS),
    ):
        obj = cls()
        ioctl(machine._vcpu, request, obj)
        assert saved[name] == ctypes.string_at(ctypes.addressof(obj), ctypes.sizeof(obj)), name
    assert "fpu" not in saved
    machine.rehearse()  # a load: kvm_run no longer holds the vCPU's registers
    asked.clear()
    again = vm_state.decode(vm.save_state())
    assert set(synced) <= set(asked)
    assert {k: again[k] for k in ("regs", "sregs", "events")} == {
        k: saved[k] for k in ("regs", "sregs", "events")
    }
    _, state, regions = _handed_over(vm)
    restored = VirtualMachine.restore(regions, state)
    try:
        theirs = kvm.Fpu()
        ioctl(restored.machine._vcpu, kvm.GET_FPU, theirs)
        assert bytes(theirs.xmm) == bytes(fpu.xmm) != bytes(len(fpu.xmm))
        assert kvm.struct_bytes(theirs) == kvm.struct_bytes(fpu)
        xsave = kvm.Xsave()
        ioctl(restored.machine._vcpu, kvm.GET_XSAVE, xsave)
        assert kvm.struct_bytes(xsave)[:512] == saved["xsave"][:512]  # the legacy region
        restored.resume()
        _wait_beats(restored, 2)
        assert restored.verify().ok
    finally:
        restored.close()


def test_a_tick_that_fell_in_the_pause_is_pending_once_the_state_is_back(
    vm: VirtualMachine,
) -> None:
    """The guest sleeps on a 5 ms periodic LAPIC tick. A pause of 50 ms between the save and
    the restore passed ticks: the restored LAPIC has the timer's interrupt pending at once,
    and the tick after it in phase (KVM alone would re-arm the count left at the save, and
    the guest would see the pause plus up to a whole tick)."""
    from pageflip._sys import kvm
    from pageflip.vm import state as vm_state

    _wait_beats(vm, 2)
    vm.pause()
    saved = vm.save_state()
    before = vm_state.decode(saved)["lapic"]
    regions = vm.release_regions()
    vm.close()
    time.sleep(0.05)
    again = VirtualMachine.restore(regions, saved)
    try:
        now = kvm.LapicState()
        kvm.ioctl(again.machine.vcpu_fd, kvm.GET_LAPIC, now)
        regs = kvm.struct_bytes(now)
        vector = struct.unpack_from("<I", before, vm_state.APIC_LVTT)[0] & 0xFF
        irr = struct.unpack_from("<I", regs, vm_state.APIC_IRR + 0x10 * (vector // 32))[0]
        counts = [struct.unpack_from("<I", r, vm_state.APIC_TMCCT)[0] for r in (before, regs)]
        meta = json.loads(vm_state.decode(saved)["meta"])["lapic_read"]
        assert irr >> (vector % 32) & 1, (
            f"the tick that fell in the pause is not pending: count {counts[0]} at the save, "
            f"{counts[1]} after the load; read {meta}"
        )
        again.resume()
        _wait_beats(again, 2)
        assert again.verify().ok
    finally:
        again.close()


def test_the_cpuid_is_saved_as_set_and_set_again_only_when_it_differs(
    vm: VirtualMachine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CPUID never changes while a VM lives: the state carries the CPUID the VMM set (not
    read back inside the pause), a new VM on this host has that very CPUID already (no
    KVM_SET_CPUID2 in the pause), and a state with another CPUID still gets it set."""
    from pageflip._sys import kvm
    from pageflip.vm import state as vm_state

    _wait_beats(vm, 2)
    vm.pause()
    saved = vm.save_state()
    blobs = vm_state.decode(saved)
    assert blobs["cpuid"] == vm.machine.cpuid_entries
    calls: list[int] = []
    real = kvm.ioctl

    def counting(fd: int, request: int, *args: object) -> int:
        calls.append(request)
        return real(fd, request, *args)

    monkeypatch.setattr(vm_state.kvm, "ioctl", counting)
    same = Machine()
    other = Machine()
    try:
        for machine in (same, other):
            machine.attach(
                [Region.movable(slot.size, name=f"ram{slot.index}") for slot in vm.machine.slots]
            )
        calls.clear()
        same.load(saved)
        assert kvm.SET_CPUID2 not in calls
        # The same state with one CPUID entry's flags changed (entry 0's padding word, which
        # KVM ignores): not the CPUID of the new VM, so it is set.
        size = kvm.size_of(kvm.CpuidEntry2)
        changed = bytearray(blobs["cpuid"])
        changed[size - 1] ^= 0x01
        calls.clear()
        other.load(vm_state.encode({**blobs, "cpuid": bytes(changed)}))
        assert calls.count(kvm.SET_CPUID2) == 1
        assert other.cpuid_entries == bytes(changed)
    finally:
        for machine in (same, other):
            regions = list(machine.regions)
            machine.close()
            for region in regions:
                region.close()
        vm.resume()


def test_a_damaged_state_is_refused_and_the_regions_stay_yours(vm: VirtualMachine) -> None:
    vm.pause()
    state = vm.save_state()
    regions = vm.release_regions()
    try:
        from pageflip.errors import BadGuestState

        for bad in (b"nope", state[:40], state[:-3]):
            with pytest.raises(BadGuestState):
                VirtualMachine.restore(regions, bad)
        assert all(not r.closed for r in regions)
    finally:
        for region in regions:
            region.close()


def test_the_dirty_log_finds_the_guests_writes(vm: VirtualMachine) -> None:
    _wait_beats(vm, 1)
    tracker = vm.dirty_tracker()
    tracker.start()
    try:
        time.sleep(0.5)
        written = tracker.collect()
        pages = sum(int(r[:, 1].sum()) for r in written if len(r))
        assert pages >= 100, pages  # 8 MiB/s for 0.5 s is about 1000 pages
        vm.pause()
        tracker.collect()  # what was written up to the pause
        assert sum(len(r) for r in tracker.collect()) == 0  # paused: nothing new
        vm.resume()
    finally:
        tracker.close()


def test_a_lazy_dirty_log_watches_only_what_was_armed(vm: VirtualMachine) -> None:
    """Started lazily, the log protects nothing: every page counts as written until arm()
    watches it (a precopy's first round arms each chunk before it reads it)."""
    _wait_beats(vm, 1)
    tracker = vm.dirty_tracker()
    tracker.start(lazily=True)
    try:
        n = vm.machine.slots[0].size // 4096
        half = n // 2 // 64 * 64  # the guest's buffer (16-48 MiB of 64) straddles it
        with pytest.raises(ValueError, match="whole words of 64"):
            tracker.arm(0, 10, 64)
        tracker.arm(0, 0, half)
        time.sleep(0.5)
        vm.pause()
        pages = np.concatenate([np.arange(a, a + c) for a, c in tracker.collect()[0].tolist()])
        assert int((pages >= half).sum()) == n - half  # not armed: every page counts
        assert 0 < int((pages < half).sum()) < half  # armed: what the guest wrote
        assert sum(len(r) for r in tracker.collect()) == 0  # all watched now; paused
        vm.resume()
    finally:
        tracker.close()


def test_layout_puts_ram_around_the_hole() -> None:
    assert [(s.gpa, s.size) for s in layout(1 << 30)] == [(0, 1 << 30)]
    four = layout(4 << 30)
    assert [(s.gpa, s.size) for s in four] == [(0, 3 << 30), (4 << 30, 1 << 30)]


def test_regions_must_fit_the_layout() -> None:
    from pageflip.errors import SpanError

    region = Region.movable(32 << 20, "odd")
    try:
        with pytest.raises(SpanError):
            Machine([region, region])
    finally:
        region.close()


# -- between VMM processes ----------------------------------------------------------------


class VmPair:
    def __init__(self, tmp: Path, started: list[Host], kernel: str) -> None:
        self.tmp = tmp
        self.kernel = kernel
        self.a, self.b, self.listen = (str(tmp / n) for n in ("vm.sock", "b.sock", "in.sock"))
        self.started = started

    def vm(self, *more: str) -> Host:
        host = Host(
            "vm", "run", "--memory", "64M", "--kernel", self.kernel, "--append", APPEND,
            "--control", self.a, *more,
        )  # fmt: skip
        self.started.append(host)
        host.wait_for("ready")
        return host

    def incoming(self, faults: str = "", wrapper: tuple[str, ...] = ()) -> Host:
        host = Host(
            "incoming", "--listen", self.listen, "--control", self.b, faults=faults,
            stderr_to=self.tmp / f"incoming-{len(self.started)}.err", wrapper=wrapper,
        )  # fmt: skip
        self.started.append(host)
        return host

    def migrate(self, source: Host, mode: str) -> tuple[Host, dict]:  # type: ignore[type-arg]
        """Migrate the VM from ``source`` into a new ``incoming`` by ``mode``, checking
        what moved or was verified; the destination and its status once it runs."""
        dest = self.incoming()
        dest.wait_for("listening")
        out = run("migrate", "--control", self.a, "--to", self.listen, "--mode", mode, "--json")
        assert out.returncode == 0, out.stderr
        done = [e for e in map(_json, out.stdout.splitlines()) if e.get("event") == "done"][-1]
        if mode == "flip":
            assert done["pages_copied"] == 0 and done["pages_moved"] == (64 << 20) >> 12
        else:
            assert done["digest"] == "verified"
        dest.wait_for("running")
        assert source.finish() == 0
        return dest, _json(run("status", "--control", self.b, "--json").stdout)["status"]

    def verify(self, control: str) -> None:
        out = run("verify", "--control", control)
        assert out.returncode == 0, out.stdout + out.stderr


@pytest.fixture
def pair(tmp_path: Path, hosts: list[Host], kernel: str) -> Iterator[VmPair]:
    yield VmPair(tmp_path, hosts, kernel)


@pytest.mark.parametrize("mode", MODES)
def test_migrate_between_vmm_processes(pair: VmPair, mode: str) -> None:
    source = pair.vm()
    dest, status = pair.migrate(source, mode)
    assert status["kind"] == "vm" and status["migrations"] == 1
    pair.verify(pair.b)
    # The guest's clock stayed sane: the longest gap it saw around the move is a real
    # pause, not a jump of its TSC by hours (another host's uptime) or backwards.
    seen = _json(run("verify", "--control", pair.b, "--json").stdout)["observed_pause"]
    assert seen is not None and 0 < seen < 60, seen
    assert run("stop", "--control", pair.b).returncode == 0
    assert dest.finish() == 0


@pytest.mark.parametrize("mode", MODES)
def test_a_vm_on_huge_pages_migrates_on_huge_pages_and_its_guest_verifies(
    pair: VmPair, mode: str, hugetlb_pool: object
) -> None:
    """RAM on 2 MiB hugetlb pages: a flip moves those very pages, precopy and postcopy make
    the same kind on the destination (the pool holds the guest twice), and the guest's own
    check passes there."""
    source = pair.vm("--huge", "hugetlb")
    ram = _json(run("status", "--control", pair.a, "--json").stdout)["status"]["ram"]
    assert [(r["page_size"], r["huge"]) for r in ram] == [(2 << 20, "hugetlb")]
    assert sum(r["size"] for r in ram) == 64 << 20
    dest, status = pair.migrate(source, mode)
    assert status["migrations"] == 1
    assert [(r["page_size"], r["huge"]) for r in status["ram"]] == [(2 << 20, "hugetlb")]
    pair.verify(pair.b)
    assert run("stop", "--control", pair.b).returncode == 0
    assert dest.finish() == 0


def test_vm_ram_that_is_not_whole_huge_pages_is_one_line(
    pair: VmPair, hugetlb_pool: object
) -> None:
    out = run(
        "vm", "run", "--memory", "65M", "--kernel", pair.kernel, "--huge", "hugetlb",
        "--control", pair.a,
    )  # fmt: skip
    assert out.returncode == 1
    line = one_line(out.stderr)
    assert "guest RAM of 65.0 MiB is not whole 2.0 MiB pages" in line, line
    assert not Path(pair.a).exists()


def _json(line: str) -> dict:  # type: ignore[type-arg]
    import json

    return json.loads(line)  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("mode", "fault", "phase"),
    [
        ("flip", "dest-kill-in-setup", "setup"),
        ("precopy", "dest-kill-in-setup", "setup"),
        ("precopy", "dest-kill-at-round-end", "precopy"),
        ("flip", "dest-kill-before-prepared", "switchover"),
        ("precopy", "dest-kill-before-prepared", "switchover"),
        ("postcopy", "dest-kill-before-prepared", "switchover"),
    ],
)
def test_a_killed_destination_vmm_leaves_the_vm_on_the_source(
    pair: VmPair, mode: str, fault: str, phase: str
) -> None:
    pair.vm()
    dest = pair.incoming(faults=fault)
    dest.wait_for("listening")
    out = run(
        "migrate", "--control", pair.a, "--to", pair.listen, "--mode", mode, "--timeout", "20s",
        "--json",
    )  # fmt: skip
    assert out.returncode == 1, (out.stdout, out.stderr)
    line = one_line(out.stderr)
    assert f"failed in phase {phase}" in line, line
    assert line.endswith("the guest runs on the source"), line
    assert dest.proc.wait(30) == -9
    status = _json(run("status", "--control", pair.a, "--json").stdout)["status"]
    assert status["state"] == "running" and status["paused"] is False
    pair.verify(pair.a)


def test_live_update_replaces_the_vmm_process(pair: VmPair) -> None:
    source = pair.vm()
    before = _json(run("status", "--control", pair.a, "--json").stdout)
    out = run("vm", "upgrade", "--control", pair.a, "--json")
    assert out.returncode == 0, out.stderr
    upgraded = [e for e in map(_json, out.stdout.splitlines()) if e.get("event") == "upgraded"]
    new_pid = upgraded[0]["new"]["pid"]
    assert new_pid != before["pid"]
    # The old VMM exits once the guest left (its successor inherited its stdout and
    # stderr, so that the console goes on where it was: those pipes stay open till it ends).
    assert source.proc.wait(60) == 0
    try:
        deadline = time.monotonic() + 30
        while True:  # the successor takes the control path over once the old one let go
            answer = run("status", "--control", pair.a, "--json")
            if answer.returncode == 0 and _json(answer.stdout)["pid"] == new_pid:
                break
            assert time.monotonic() < deadline, answer.stderr
            time.sleep(0.05)
        status = _json(answer.stdout)["status"]
        assert status["vmm"]["pid"] == new_pid and status["migrations"] == 1
        assert status["vmm"]["version"]
        pair.verify(pair.a)
        assert run("stop", "--control", pair.a).returncode == 0
    finally:
        _end(new_pid)
        source.finish()
    assert not Path(pair.a).exists()


# -- a real-time vCPU ----------------------------------------------------------------------


def _policy(vcpu: dict[str, object]) -> tuple[int, int]:
    """The scheduling policy and priority of the vCPU thread that ``status`` names, as the
    kernel has them (not as the VMM says)."""
    tid = vcpu["thread"]
    assert isinstance(tid, int)
    return os.sched_getscheduler(tid), os.sched_getparam(tid).sched_priority


@pytest.mark.skipif(REALTIME_REFUSED is not None, reason=str(REALTIME_REFUSED))
def test_a_realtime_vcpu_runs_sched_fifo_and_keeps_it_through_a_restore(kernel: str) -> None:
    guest = VirtualMachine.create(64 << 20, kernel, APPEND, realtime=1)
    again: VirtualMachine | None = None
    try:
        status = guest.status()
        assert status["vcpu"]["scheduling"] == "SCHED_FIFO 1"  # type: ignore[index]
        assert _policy(status["vcpu"]) == (os.SCHED_FIFO, 1)  # type: ignore[arg-type]
        _wait_beats(guest, 2)
        guest.pause()
        state = guest.save_state()
        regions = guest.release_regions()
        guest.close()
        again = VirtualMachine.restore(regions, state)
        again.resume()
        assert _policy(again.status()["vcpu"]) == (os.SCHED_FIFO, 1)  # type: ignore[arg-type]
        _wait_beats(again, 2)
        assert again.verify().ok
    finally:
        guest.close()
        if again is not None:
            again.close()


def test_a_vcpu_is_normal_unless_asked_and_a_bad_priority_is_refused(vm: VirtualMachine) -> None:
    from pageflip.errors import BadArgument

    assert _policy(vm.status()["vcpu"]) == (os.SCHED_OTHER, 0)  # type: ignore[arg-type]
    with pytest.raises(BadArgument, match="1-99"):
        vm.machine.set_realtime(100)
    assert _policy(vm.status()["vcpu"]) == (os.SCHED_OTHER, 0)  # type: ignore[arg-type]


@pytest.mark.skipif(REALTIME_REFUSED is not None, reason=str(REALTIME_REFUSED))
def test_a_realtime_vm_flips_into_a_new_vmm_whose_vcpu_is_realtime_too(pair: VmPair) -> None:
    source = pair.vm("--realtime")
    dest = pair.incoming()
    dest.wait_for("listening")
    before = _json(run("status", "--control", pair.a, "--json").stdout)["status"]
    assert _policy(before["vcpu"]) == (os.SCHED_FIFO, 1)
    out = run("migrate", "--control", pair.a, "--to", pair.listen, "--mode", "flip", "--json")
    assert out.returncode == 0, out.stderr
    dest.wait_for("running")
    assert source.finish() == 0
    after = _json(run("status", "--control", pair.b, "--json").stdout)["status"]
    assert after["vcpu"]["scheduling"] == "SCHED_FIFO 1"
    assert _policy(after["vcpu"]) == (os.SCHED_FIFO, 1)
    pair.verify(pair.b)
    assert run("stop", "--control", pair.b).returncode == 0
    assert dest.finish() == 0


@pytest.mark.skipif(NO_REALTIME_MISSING is not None, reason=str(NO_REALTIME_MISSING))
def test_a_realtime_vm_without_the_right_is_one_line_and_leaves_nothing(
    tmp_path: Path, kernel: str
) -> None:
    control = tmp_path / "vm.sock"
    out = run(
        "vm", "run", "--memory", "64M", "--kernel", kernel, "--realtime",
        "--control", str(control), wrapper=NO_REALTIME,
    )  # fmt: skip
    assert out.returncode == 1, out.stdout
    line = one_line(out.stderr)
    assert "SCHED_FIFO" in line and "ulimit -r" in line, line
    assert not control.exists()


@pytest.mark.skipif(NO_REALTIME_MISSING is not None, reason=str(NO_REALTIME_MISSING))
@pytest.mark.skipif(REALTIME_REFUSED is not None, reason=str(REALTIME_REFUSED))
def test_a_destination_that_cannot_run_the_vcpu_realtime_leaves_the_vm_on_the_source(
    pair: VmPair,
) -> None:
    pair.vm("--realtime")
    dest = pair.incoming(wrapper=NO_REALTIME)
    dest.wait_for("listening")
    out = run(
        "migrate", "--control", pair.a, "--to", pair.listen, "--mode", "flip", "--json",
    )  # fmt: skip
    assert out.returncode == 1, (out.stdout, out.stderr)
    line = one_line(out.stderr)
    assert "SCHED_FIFO" in line, line
    assert line.endswith("the guest runs on the source"), line
    status = _json(run("status", "--control", pair.a, "--json").stdout)["status"]
    assert status["state"] == "running" and status["paused"] is False
    assert _policy(status["vcpu"]) == (os.SCHED_FIFO, 1)
    pair.verify(pair.a)


def _end(pid: int) -> None:
    """The successor is not our child: wait for it to go, kill it by PID if it does not."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, 9)


def test_bench_vm_runs_a_real_flip_and_measures_the_guest_beside_its_control(
    kernel: str, tmp_path: Path
) -> None:
    """`pageflip bench vm`'s pageflip side on a real guest: the pageflip commands driven as
    a user would, the guest's own figures (its pause, its gap at the switchover
    when one overlaps it) and the control, its largest gap over as long a window with no
    migration, all measured; the guest checks every page on the destination."""
    from pageflip.bench import vm as bench_vm
    from pageflip.bench.vm import FLAVOURS, GuestImage, VmConfig, VmOptions

    config = VmConfig(
        guest=GuestImage(kernel, FLAVOURS["pfguest"]),
        sizes=(32 << 20,),
        rates=(8 << 20,),
        modes=("flip",),
        systems=("pageflip",),
        settle=0.0,
        options=VmOptions(guest_settle=0.5, work_dir=str(tmp_path)),
    )
    result = bench_vm.run(config)
    (run,) = result["runs"]
    assert run["status"] == "completed" and run["error"] is None, run["error"]
    assert run["verify_bad"] == 0 and run["verify_pages"] == 32 << 8
    assert run["guest_pause_s"] is not None and run["guest_pause_s"] > 0
    assert run["guest_quiet_s"] is not None and run["guest_quiet_s"] > 0
    assert run["downtime_s"] is not None and run["total_s"] is not None
    assert [s["step"] for s in run["details"]["pause_steps"]][:2] == ["pause asked", "paused"]
    assert "guest_quiet" in result["notes"]
    assert "control" in bench_vm.markdown_table(result)
    assert os.listdir(tmp_path) == []
