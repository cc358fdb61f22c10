"""A virtual machine as a :class:`~pageflip.guests.Guest`: what the migration engine moves.

:class:`VirtualMachine` wraps a :class:`~.machine.Machine` and speaks to the guest through
its serial console. The guest shipped with pageflip (``src/pageflip/vm/guest/``, see its
README) prints a line per event: ``READY`` once its memory is filled, ``HB`` heartbeats with
the largest gap between two iterations of its loop since the previous heartbeat
(``gap_us``), ``VERIFY`` after checking every page on request (input ``V``), ``PAUSE`` on
request (input ``P``). Other kernels boot too; they just have no verify or observed pause.

* :meth:`VirtualMachine.verify` asks the guest to check its memory and waits for the answer.
* :meth:`VirtualMachine.observed_pause` is the largest loop gap the guest reports in its
  first two heartbeats after the latest resume: the pause as the guest itself lived it, by
  its own TSC.
* Dirty pages for a precopy come from KVM's own dirty log (:class:`.dirtylog.KvmDirtyLog`):
  the guest writes through KVM's mappings, which the VMM's page tables do not see.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Self

from ..errors import BadGuestState, SpanError, StateError, VmError
from ..guests.base import Guest, VerifyReport, register
from ..identity import code_identity
from ..memory import HugePages, Region
from ..units import human_size, parse_size
from .dirtylog import KvmDirtyLog
from .elf import read_pvh
from .machine import Machine, layout
from .state import decode, encode, record

__all__ = ["VirtualMachine"]

#: Console lines kept for status() and for whoever attaches late.
CONSOLE_LINES = 200
#: Longest wait for READY before a verify (the fill of a large guest can take a while).
READY_WAIT = 600.0
_FIELD = re.compile(r"(\w+)=(-?\d+)")
_NO_ANSWER: tuple[int, dict[str, int], str, float] = (0, {}, "", 0.0)


def _fields(line: str) -> dict[str, int]:
    return {k: int(v) for k, v in _FIELD.findall(line)}


#: A machine built ahead of a restore (see VirtualMachine.migration_coming), at most one.
_spare: list[Machine] = []
_spare_lock = threading.Lock()


def _parked_machine() -> Machine:
    """A machine without memory whose vCPU thread is started and parked, its state's load
    (and save) rehearsed once (see Machine.rehearse)."""
    machine = Machine()
    try:
        machine.start(paused=True)
        machine.rehearse()
    except BaseException:
        machine.close()
        raise
    return machine


class _Console:
    """The guest's serial output, cut into lines; what they say, parsed."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.partial = bytearray()
        self.lines: collections.deque[str] = collections.deque(maxlen=CONSOLE_LINES)
        self.count = 0
        self.listeners: list[Callable[[str], None]] = []
        self.ready: dict[str, int] | None = None
        self.heartbeat: dict[str, int] | None = None
        self.heartbeats = 0
        #: (line number, fields) of every heartbeat since the latest resume (at most two).
        self.after_resume: list[dict[str, int]] = []
        #: The latest answer of each kind: (line number, fields, line, CLOCK_MONOTONIC
        #: moment its end arrived).
        self.answers: dict[str, tuple[int, dict[str, int], str, float]] = {}
        self.failure: str | None = None

    def feed(self, data: bytes) -> None:
        self.partial += data
        while b"\n" in self.partial:
            raw, _, rest = self.partial.partition(b"\n")
            self.partial = bytearray(rest)
            self._line(raw.decode(errors="replace").rstrip("\r"))

    def _line(self, line: str) -> None:
        head = line.split(" ", 1)[0]
        fields = _fields(line)
        with self.cond:
            self.count += 1
            self.lines.append(line)
            if head == "READY":
                self.ready = fields
            elif head == "HB":
                self.heartbeat = fields
                self.heartbeats += 1
                if len(self.after_resume) < 2:
                    self.after_resume.append(fields)
            elif head in ("VERIFY", "PAUSE", "GAPS", "RATE", "BYE"):
                self.answers[head] = (self.count, fields, line, time.monotonic())
            elif head in ("PFGUEST-ERROR", "MINIGUEST-ERROR", "GUEST-EXCEPTION"):
                self.failure = line
            self.cond.notify_all()
            listeners = list(self.listeners)
        for listener in listeners:
            with contextlib.suppress(Exception):
                listener(line)


@register
class VirtualMachine(Guest):
    """A KVM virtual machine whose RAM lives in movable regions (see the module docstring).

    Make one with :meth:`create` (boots a kernel, running) or :meth:`restore` (from a
    migration, paused). Close it, or use it as a context manager.
    """

    kind: ClassVar[str] = "vm"
    #: Postcopy faults come from KVM (inside the kernel), not from user mode: the
    #: destination needs a userfaultfd that takes kernel faults.
    kernel_faults: ClassVar[bool] = True

    def __init__(self, machine: Machine, regions: list[Region], meta: dict[str, Any]) -> None:
        # Private: use VirtualMachine.create() or VirtualMachine.restore().
        self._machine: Machine | None = machine
        self._regions = regions
        self._meta = meta
        self._console = _Console()
        machine.devices.serial.on_output = self._console.feed
        self._paused_at: float | None = time.monotonic()
        self._closed = False
        self._released = False
        #: Restored ahead of a flip's pause (restore_ahead), its state not yet loaded.
        self._ahead = False
        self._started_at = time.time()
        #: When the end of the latest answer to :meth:`ask` arrived (CLOCK_MONOTONIC).
        self.answered_at: float | None = None

    # -- making one -----------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        memory: int | str,
        kernel: str | Path | None = None,
        append: str | None = None,
        *,
        paused: bool = False,
        on_console: Callable[[str], None] | None = None,
        realtime: int = 0,
        huge: HugePages = False,
    ) -> VirtualMachine:
        """Boot ``kernel`` (default: the guest shipped with pageflip, built on first use)
        with ``memory`` bytes of RAM and the command line ``append``. ``realtime``: the
        vCPU thread's SCHED_FIFO priority (0: the normal class; see
        :meth:`.Machine.set_realtime`), kept across migrations and live updates.

        ``huge`` puts the RAM on huge pages (see :data:`~pageflip.memory.HugePages`); each
        memory slot must then be whole huge pages. KVM then maps the guest's memory in
        pieces of a huge page: a VMM that takes the guest over (a flip, a live update)
        builds its mappings again a huge page at a time instead of 4 KiB at a time, and
        the guest runs at full speed at once (docs/benchmarks.md)."""
        size = parse_size(memory) if isinstance(memory, str) else int(memory)
        slots = layout(size)
        if kernel is None:
            from .image import guest_elf

            kernel = guest_elf()
        image = read_pvh(kernel)
        if append is None:
            append = f"mb={max(16, (size >> 20) - 64)}"
        regions: list[Region] = []
        machine: Machine | None = None
        try:
            for slot in slots:
                region = Region.movable(slot.size, f"vm-ram{slot.index}", huge=huge)
                regions.append(region)
                if region.size != slot.size:
                    part = "below the 3 GiB hole" if slot.index == 0 else "above the hole"
                    raise SpanError(
                        f"guest RAM of {human_size(size)} is not whole "
                        f"{human_size(region.page_size)} pages: its part {part} is "
                        f"{human_size(slot.size)}; choose a size whose parts below and above "
                        "3 GiB are whole pages",
                        length=size,
                    )
            machine = Machine(regions)
            machine.set_realtime(realtime)
            machine.boot(image, append)
            meta = {
                "kernel": str(kernel),
                "append": append,
                "migrations": 0,
                "booted": time.time(),
                "realtime": realtime,
            }
            vm = cls(machine, regions, meta)
        except BaseException:
            if machine is not None:
                machine.close()
            for region in regions:
                region.close()
            raise
        if on_console is not None:
            vm.add_console_listener(on_console)
        try:
            machine.start(paused=True)
            # Parked before its first run: the save a migration will make inside its pause
            # runs warm (see Machine.rehearse). No throwaway machine for this: closing a VM
            # takes 12-16 ms here.
            machine.rehearse()
        except BaseException:
            vm.close()
            raise
        if not paused:
            vm.resume()
        return vm

    @classmethod
    def migration_coming(cls) -> None:
        """Build a spare machine (KVM VM, irqchip, vCPU and its parked thread, without RAM)
        now, so that a restore only adds the memory slots and loads the state: what would
        otherwise take milliseconds inside the pause."""
        with _spare_lock:
            if _spare:
                return
        spare = _parked_machine()
        with _spare_lock:
            _spare.append(spare)

    @classmethod
    def prepare_regions(cls, regions: list[Region]) -> None:
        """A flip's memory, lent before the pause: the spare machine registers it as its
        memory slots now, so that the restore inside the pause only loads the state."""
        with _spare_lock:
            spare = _spare.pop() if _spare else None
        if spare is None or spare.regions:
            if spare is not None:
                spare.close()
            spare = _parked_machine()
        try:
            spare.attach(regions)
        except BaseException:
            spare.close()
            raise
        with _spare_lock:
            _spare.append(spare)

    @classmethod
    def restore(cls, regions: list[Region], state: bytes) -> Self:
        machine = cls._machine_for(regions)
        try:
            meta = machine.load(state)
            cls._schedule_as(machine, meta)
        except BaseException:
            machine.close()
            raise
        return cls._restored(machine, regions, meta)

    @staticmethod
    def _machine_for(regions: list[Region]) -> Machine:
        """The spare machine (:meth:`migration_coming`), with ``regions`` as its memory
        slots; a new machine if there is none, or one prepared for other memory (an attempt
        that failed). Closed again by the caller if what follows fails."""
        with _spare_lock:
            spare = _spare.pop() if _spare else None
        if (
            spare is not None
            and spare.regions
            and [r.address for r in spare.regions] != [r.address for r in regions]
        ):
            spare.close()
            spare = None
        machine = spare if spare is not None else Machine()
        try:
            if not machine.regions:
                machine.attach(regions)
        except SpanError as err:
            machine.close()
            raise BadGuestState(str(err), kind="vm", field="regions") from None
        except BaseException:
            machine.close()
            raise
        return machine

    @staticmethod
    def _schedule_as(machine: Machine, meta: dict[str, Any]) -> None:
        """The source's scheduling goes on here (a thread already started, the spare's,
        changes at once): a host that cannot give it fails here, before PREPARED."""
        realtime = meta.get("realtime", 0)
        if not isinstance(realtime, int) or isinstance(realtime, bool):
            raise BadGuestState(
                f"the VM state's real-time priority is {realtime!r}, not a number",
                kind="vm",
                field="realtime",
            )
        if realtime != machine.realtime:
            machine.set_realtime(realtime)

    @classmethod
    def _restored(cls, machine: Machine, regions: list[Region], meta: dict[str, Any]) -> Self:
        """The VM around a machine that holds the state whose record is ``meta``."""
        vm = cls(machine, list(regions), {})
        vm._take_record(meta)
        return vm

    def _take_record(self, meta: dict[str, Any]) -> None:
        """The source's record, one migration more, and what its console reader had of the
        guest's output."""
        meta = dict(meta)
        console = meta.pop("console", {})
        meta["migrations"] = int(meta.get("migrations", 0)) + 1
        self._meta = meta
        if isinstance(console, dict):
            self._console.partial = bytearray(str(console.get("partial", "")).encode())
            self._console.heartbeats = int(console.get("heartbeats", 0))
            ready = console.get("ready")
            self._console.ready = ready if isinstance(ready, dict) else None

    # -- restored ahead of a flip's pause -------------------------------------------------

    def state_preview(self) -> bytes:
        """The VM's record without its vCPU (which cannot be read while it runs): a flip's
        destination builds the VM around its spare machine from it ahead of the pause
        (:meth:`restore_ahead`), and in the pause loads only the state saved there
        (:meth:`finish_restore`)."""
        self._live("preview the state")
        meta = {**self._meta, "memory": sum(r.size for r in self._regions), "preview": True}
        return encode({"meta": json.dumps(meta, separators=(",", ":")).encode()})

    @classmethod
    def restore_ahead(cls, regions: list[Region], preview: bytes) -> Self:
        """A :meth:`state_preview` ahead of the pause: the spare machine (its slots on the
        lent memory, its vCPU thread parked) gets the source's scheduling (a host that
        cannot give it fails the migration here, in its setup) and becomes the VM, paused
        and never run. Its load is rehearsed once more on the way, so that the load inside
        the pause, a moment later, runs warm."""
        meta = record(decode(preview))
        if meta.get("preview") is not True:
            raise BadGuestState("a VM preview must be a preview record", kind="vm", field="state")
        memory = sum(r.size for r in regions)
        if meta.get("memory") != memory:
            raise BadGuestState(
                f"the preview is of a VM with {meta.get('memory')} bytes of RAM, the regions "
                f"hold {memory}",
                kind="vm",
                field="memory",
            )
        machine = cls._machine_for(regions)
        try:
            cls._schedule_as(machine, meta)
            if not machine.started:  # no spare: a new machine
                machine.start(paused=True)
            machine.rehearse()
        except BaseException:
            machine.close()
            raise
        del meta["preview"]
        vm = cls._restored(machine, regions, meta)
        vm._ahead = True
        return vm

    def finish_restore(self, state: bytes) -> None:
        """Restored ahead and never run: load the state saved in the pause. It must be of
        the VM the preview described (booted at the same moment, as many migrations):
        else :class:`BadGuestState`, before anything is loaded."""
        machine = self._live("finish a restore")
        if not self._ahead or machine.exits:
            raise StateError(
                "finish_restore() is for a VM restored ahead and never resumed",
                phase="resumed",
                needed="restored",
            )
        blobs = decode(state)
        meta = record(blobs)
        mine = (self._meta.get("booted"), self._meta.get("migrations"))
        theirs = (meta.get("booted"), int(meta.get("migrations", 0)) + 1)
        if mine != theirs:
            raise BadGuestState(
                f"the state is of another VM (booted, migrations: {theirs}) than the preview "
                f"it was restored from ({mine})",
                kind="vm",
                field="state",
            )
        machine.load(blobs, meta)
        self._schedule_as(machine, meta)
        self._ahead = False
        self._take_record(meta)

    def prepare_resume(self) -> None:
        machine = self._live("prepare a resume")
        if not machine.started:
            machine.start(paused=True)

    # -- the Guest interface ----------------------------------------------------------------

    @property
    def regions(self) -> list[Region]:
        return [] if self._released or self._closed else list(self._regions)

    @property
    def machine(self) -> Machine:
        return self._live("use the machine")

    def _live(self, doing: str) -> Machine:
        machine = self._machine
        if machine is None or self._closed or self._released:
            raise StateError(f"cannot {doing}: the VM is closed or migrated away", phase="gone")
        return machine

    def about_to_pause(self) -> None:
        """The save inside the pause runs cold after a quiet spell: run its code now, all
        but the vCPU's ioctls (:meth:`.Machine.warm_save`); then wait, a moment at most,
        for the guest to halt, the moment a pause costs it least
        (:meth:`.Machine.await_halt`)."""
        machine = self._live("warm the save")
        if machine.started and not machine.paused:
            machine.warm_save()
            machine.await_halt()

    def pause(self) -> float:
        machine = self._live("pause")
        if self._paused_at is not None and machine.paused:
            return self._paused_at
        self._paused_at = machine.pause()
        return self._paused_at

    def resume(self) -> float:
        machine = self._live("resume")
        self.prepare_resume()
        with self._console.cond:
            self._console.after_resume = []
        resumed = machine.resume()
        self._paused_at = None
        return resumed

    @property
    def paused(self) -> bool:
        return self._paused_at is not None

    def save_state(self) -> bytes:
        machine = self._live("save the state")
        console = self._console
        with console.cond:
            carried = {
                "partial": console.partial.decode(errors="replace"),
                "heartbeats": console.heartbeats,
                "ready": console.ready,
            }
        return machine.save({**self._meta, "console": carried})

    def status(self) -> dict[str, object]:
        console = self._console
        machine = self._machine
        stopped = machine.stopped if machine is not None else None
        with console.cond:
            beat = dict(console.heartbeat or {})
            answer: dict[str, object] = {
                "kind": self.kind,
                "memory": sum(r.size for r in self._regions),
                "state": self._state_name(stopped is not None),
                "paused": self.paused,
                "ready": console.ready is not None,
                "heartbeats": console.heartbeats,
                "heartbeat": beat,
                "console": list(console.lines)[-5:],
                "migrations": self._meta.get("migrations", 0),
                "append": self._meta.get("append"),
                "vmm": {**code_identity(), "pid": os.getpid(), "started": self._started_at},
                "vcpu": machine.vcpu_status() if machine is not None else {},
                "exits": machine.exits if machine is not None else 0,
                "ram": [
                    {"size": r.size, "page_size": r.page_size, "huge": r.huge}
                    for r in self._regions
                ],
            }
        if stopped is not None:
            answer["stopped"] = str(stopped)
        if console.failure is not None:
            answer["guest_error"] = console.failure
        return answer

    def _state_name(self, stopped: bool) -> str:
        if self._closed:
            return "closed"
        if self._released:
            return "migrated"
        if stopped:
            return "stopped"
        return "paused" if self.paused else "running"

    def verify(self) -> VerifyReport:
        """Ask the guest to check every page it wrote (input ``V``) and wait for its answer."""
        started = time.monotonic()
        self._wait_ready()
        fields, line = self.ask("V", "VERIFY", timeout=self._verify_timeout())
        bad = fields.get("bad", -1)
        problems = [] if bad == 0 else [f"the guest found {bad} wrong pages: {line}"]
        return VerifyReport(
            ok=bad == 0,
            pages_checked=fields.get("pages", 0),
            pages_skipped=0,
            problems=problems,
            seconds=time.monotonic() - started,
            observed_pause=self.observed_pause(),
        )

    def _verify_timeout(self) -> float:
        # A page a few tens of microseconds on a cold VM (shadow page faults), plus slack.
        pages = sum(r.size for r in self._regions) >> 12
        return 60.0 + pages * 100e-6

    def _wait_ready(self) -> None:
        console = self._console
        with console.cond:
            if not console.cond.wait_for(
                lambda: console.ready is not None or console.failure is not None or self._gone(),
                READY_WAIT,
            ):
                raise VmError("the guest did not say READY in time", kind="vm")
        if console.ready is None:
            raise VmError(
                f"the guest is not ready: {console.failure or self._state_name(True)}", kind="vm"
            )

    def _gone(self) -> bool:
        machine = self._machine
        return self._closed or self._released or machine is None or machine.stopped is not None

    def ask(self, request: str, answer: str, timeout: float = 30.0) -> tuple[dict[str, int], str]:
        """Send ``request`` to the guest's serial input and wait for the next line that
        starts with ``answer``: its fields and the line (:attr:`answered_at`: when its end
        arrived, CLOCK_MONOTONIC)."""
        machine = self._live(f"ask the guest for {answer}")
        if self.paused:
            raise StateError(f"the VM is paused: it cannot answer {request!r}", phase="paused")
        console = self._console
        with console.cond:
            seen = console.answers.get(answer, _NO_ANSWER)[0]
            machine.devices.serial.feed(request.encode())

            def answered() -> bool:
                return console.answers.get(answer, _NO_ANSWER)[0] > seen or self._gone()

            if not console.cond.wait_for(answered, timeout):
                raise VmError(
                    f"the guest did not answer {request!r} within {timeout:g} s", kind="vm"
                )
            if self._gone():
                raise VmError(f"the VM stopped before it answered {request!r}", kind="vm")
            _, fields, line, self.answered_at = console.answers[answer]
            return fields, line

    def observed_pause(self, timeout: float = 0.0) -> float | None:
        """The largest loop gap the guest reported in its first two heartbeats after the
        latest resume (seconds); None until the first of them came (waits up to
        ``timeout`` for both)."""
        console = self._console
        with console.cond:
            if timeout > 0:
                console.cond.wait_for(lambda: len(console.after_resume) >= 2, timeout)
            gaps = [beat["gap_us"] for beat in console.after_resume if "gap_us" in beat]
        return max(gaps) / 1e6 if gaps else None

    def dirty_tracker(self) -> KvmDirtyLog:
        return KvmDirtyLog(self._live("track dirty pages"))

    def add_console_listener(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(line)`` for every console line from now on."""
        with self._console.cond:
            self._console.listeners.append(listener)

    def console_lines(self) -> list[str]:
        with self._console.cond:
            return list(self._console.lines)

    def release_regions(self) -> list[Region]:
        if self._released or self._closed:
            return []
        machine = self._machine
        if machine is not None and not machine.paused:
            raise StateError("release the regions of a paused VM", phase="running")
        self._released = True
        if machine is not None:
            self._machine = None
            machine.close()
        regions, self._regions = self._regions, []
        with self._console.cond:
            self._console.cond.notify_all()
        return regions

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        machine, self._machine = self._machine, None
        if machine is not None:
            machine.close()
        regions, self._regions = self._regions, []
        for region in regions:
            with contextlib.suppress(Exception):
                region.close()
        with self._console.cond:
            self._console.cond.notify_all()

    def __repr__(self) -> str:
        size = sum(r.size for r in self._regions)
        return f"<VirtualMachine {size >> 20} MiB {self._state_name(False)}>"
