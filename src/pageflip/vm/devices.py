"""The devices the VMM emulates by port I/O: a 16550 serial port (COM1) and the ACPI PM timer.

Everything else a guest needs for a timer tick (local APIC, PIC, I/O APIC) runs inside KVM
(the in-kernel irqchip). Port reads nobody answers return all ones, writes are dropped, as on
a PC with nothing at that port.

The serial port is the subset a polling console uses: the transmit register (each byte goes
to the output callback; a guest may write 16 at once, with ``rep outsb``, once it has turned
the FIFOs on), the line status register (transmitter always empty; data ready while input is
queued), the receive register (the input queue, fed by :meth:`Serial.feed`), the FIFO
control register (the interrupt identification register then reports 16-byte FIFOs), and the
scratch, line control, modem control, interrupt enable and divisor registers, which keep
what is written to them. No interrupts are raised: the guest polls.

The PM timer counts at 3.579545 MHz from the host's CLOCK_MONOTONIC, a clock shared by every
process of the host, so its value runs on without a jump when the guest moves to another VMM
process on the same host.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["COM1", "PM_TIMER", "PM_TIMER_HZ", "Devices", "PmTimer", "Serial"]

COM1 = 0x3F8
PM_TIMER = 0x608
PM_TIMER_HZ = 3_579_545

_LSR_DATA_READY = 0x01
_LSR_THR_EMPTY = 0x20
_LSR_TX_IDLE = 0x40
_LCR_DLAB = 0x80
#: Most bytes of input held for the guest; more is dropped (a console, not a pipe).
MAX_INPUT = 4096


class Serial:
    """COM1: output bytes to ``on_output``, input bytes queued by :meth:`feed`."""

    def __init__(self, on_output: Callable[[bytes], None] | None = None) -> None:
        self.on_output = on_output
        self._input: collections.deque[int] = collections.deque()
        self._lock = threading.Lock()
        self.regs = {"ier": 0, "lcr": 0x03, "mcr": 0, "scr": 0, "dll": 1, "dlm": 0, "fcr": 0}
        self.bytes_out = 0

    def feed(self, data: bytes) -> None:
        """Queue input for the guest to read."""
        with self._lock:
            room = MAX_INPUT - len(self._input)
            self._input.extend(data[:room])

    def read(self, offset: int) -> int:
        dlab = self.regs["lcr"] & _LCR_DLAB
        if offset == 0:
            if dlab:
                return self.regs["dll"]
            with self._lock:
                return self._input.popleft() if self._input else 0
        if offset == 1:
            return self.regs["dlm"] if dlab else self.regs["ier"]
        if offset == 2:  # IIR: no interrupt pending; bits 7:6 say the FIFOs are on
            return 0xC1 if self.regs["fcr"] & 1 else 0x01
        if offset == 3:
            return self.regs["lcr"]
        if offset == 4:
            return self.regs["mcr"]
        if offset == 5:
            ready = _LSR_DATA_READY if self._input else 0
            return _LSR_THR_EMPTY | _LSR_TX_IDLE | ready
        if offset == 6:
            return 0xB0  # MSR: DCD, DSR, CTS
        return self.regs["scr"]

    def transmit(self, data: bytes) -> None:
        """Bytes written to the transmit register."""
        self.bytes_out += len(data)
        if self.on_output is not None:
            self.on_output(data)

    def write(self, offset: int, value: int) -> None:
        dlab = self.regs["lcr"] & _LCR_DLAB
        if offset == 0:
            if dlab:
                self.regs["dll"] = value
            else:
                self.transmit(bytes((value,)))
        elif offset == 1:
            self.regs["dlm" if dlab else "ier"] = value
        elif offset == 2:
            self.regs["fcr"] = value & 0xC9  # FIFO enable, DMA mode, trigger level
        elif offset == 3:
            self.regs["lcr"] = value
        elif offset == 4:
            self.regs["mcr"] = value
        elif offset == 7:
            self.regs["scr"] = value

    def save(self) -> dict[str, Any]:
        with self._lock:
            return {"regs": dict(self.regs), "input": bytes(self._input).hex()}

    def load(self, saved: dict[str, Any]) -> None:
        regs = saved.get("regs", {})
        for name in self.regs:
            value = regs.get(name)
            if isinstance(value, int) and 0 <= value <= 0xFF:
                self.regs[name] = value
        data = saved.get("input", "")
        with self._lock:
            self._input.clear()
            if isinstance(data, str):
                self._input.extend(bytes.fromhex(data)[:MAX_INPUT])


class PmTimer:
    """The ACPI PM timer: 24 bits at 3.579545 MHz, from CLOCK_MONOTONIC."""

    @staticmethod
    def value() -> int:
        return (time.monotonic_ns() * PM_TIMER_HZ // 1_000_000_000) & 0xFFFFFF


class Devices:
    """Port I/O dispatch: COM1 at 0x3f8..0x3ff, the PM timer at 0x608."""

    def __init__(self, on_output: Callable[[bytes], None] | None = None) -> None:
        self.serial = Serial(on_output)
        self.pm_timer = PmTimer()
        self.unknown_ports: collections.Counter[int] = collections.Counter()

    def port_in(self, port: int, size: int, count: int) -> bytes:
        """The bytes a guest's ``in`` (``count`` times ``size`` bytes) reads from ``port``."""
        if COM1 <= port < COM1 + 8 and size == 1:
            return bytes(self.serial.read(port - COM1) for _ in range(count))
        if port == PM_TIMER and size == 4:
            return b"".join(self.pm_timer.value().to_bytes(4, "little") for _ in range(count))
        self.unknown_ports[port] += 1
        return b"\xff" * (size * count)

    def port_out(self, port: int, data: bytes, size: int) -> None:
        if port == COM1 and size == 1 and not self.serial.regs["lcr"] & _LCR_DLAB:
            self.serial.transmit(data)  # a string of output bytes in one exit
            return
        if COM1 <= port < COM1 + 8 and size == 1:
            for value in data:
                self.serial.write(port - COM1, value)
            return
        self.unknown_ports[port] += 1

    def save(self) -> dict[str, Any]:
        return {"serial": self.serial.save()}

    def load(self, saved: dict[str, Any]) -> None:
        serial = saved.get("serial")
        if isinstance(serial, dict):
            self.serial.load(serial)
