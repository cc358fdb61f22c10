"""One measured pageflip migration of the benchmark guest: pageflip's VMM on both sides.

:func:`run_pageflip` has :func:`~pageflip.bench.vm.qemu.run_qemu`'s signature and fills the
same record, by driving the ``pageflip`` command the way a user would:

1. ``pageflip vm run --memory <guest RAM> --kernel <elf> --append "<cmdline>"
   --control <dir>/src.sock --json``: the source VM. Its stdout is JSON lines; console lines
   are ``{"console": "<line>"}``, anything else is an event (kept with the moment it came).
2. ``pageflip incoming --listen unix:<dir>/mig.sock --control <dir>/dst.sock --json``: the
   destination; its events (``resumed`` with ``at``) and console lines likewise.
3. Once the source's console says ``READY`` and the guest ran ``guest_settle`` seconds:
   ``pageflip migrate --control <dir>/src.sock --to unix:<dir>/mig.sock --mode <mode>
   --json``; its last JSON line is the ``done`` event (``total_seconds``, ``downtime``,
   ``bytes_on_wire``, ``guest_pause``: the pause the guest observed), or ``failed``.
4. ``pageflip verify --control <dir>/dst.sock --json``: the report (``ok``, ``problems``,
   ``observed_pause``; a VM's report may add ``bad`` and ``pages`` from the guest's
   ``VERIFY`` line), then ``pageflip stop --control <dir>/dst.sock``.

The source's ``vm run`` is expected to exit by itself once its guest has left (as
``pageflip workload`` does); after a good run it gets 15 s for that. Memory is sampled as for
QEMU: both command processes and what the destination starts. Whatever happens, every process
started here is stopped by its PID and the run's directory is removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from functools import cache
from pathlib import Path
from typing import IO, Any

from ...errors import BenchmarkError, PageflipError
from ...units import format_size
from ..common import now, steal_seconds, stolen_since
from ..migrate.running import pause_steps
from ..migrate.sampling import Sampler
from .config import VmRunSpec
from .console import ConsoleLog
from .guest import GAPS_MARGIN, Gaps, Heartbeat, Ready, gaps_request, parse_line
from .records import VmRunRecord, add_memory, blank_record

__all__ = ["pageflip_vm_available", "run_pageflip"]

#: Seconds for the small steps (a child's exit, ``pageflip stop``).
_STEP = 15.0


@cache
def pageflip_vm_available(command: tuple[str, ...]) -> bool:
    """Whether ``<command> vm run --help`` works (the VMM's command exists)."""
    try:
        done = subprocess.run(
            [*command, "vm", "run", "--help"],
            capture_output=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


class _Child:
    """A ``pageflip`` command running beside the benchmark; a thread reads its JSON lines
    into a console log and an event list."""

    def __init__(self, name: str, argv: list[str], stderr: Path) -> None:
        self.name = name
        self.log = ConsoleLog(f"pageflip {name} console")
        self.events: list[dict[str, Any]] = []
        self.stderr = stderr
        with open(stderr, "wb") as err:
            try:
                self.proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err
                )
            except OSError as why:
                raise BenchmarkError(f"pageflip {name} did not start: {why}") from None
        assert self.proc.stdout is not None
        self._thread = threading.Thread(
            target=self._read, args=(self.proc.stdout,), name=f"pageflip-bench-vm-{name}"
        )
        self._thread.start()

    def _read(self, stream: IO[bytes]) -> None:
        try:
            for raw in stream:
                t = now()
                text = raw.decode(errors="replace").strip()
                try:
                    obj = json.loads(text)
                except ValueError:
                    continue
                if not isinstance(obj, dict):
                    continue
                if "console" in obj:
                    self.log.add(str(obj["console"]), t)
                else:
                    obj.setdefault("received", t)
                    self.events.append(obj)
        finally:
            self.log.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self) -> str:
        try:
            lines = [ln.strip() for ln in self.stderr.read_text(errors="replace").splitlines()]
        except OSError:
            return ""
        return " | ".join(ln for ln in lines if ln)[-300:]

    def stop(self, wait: float = _STEP) -> None:
        """Wait up to ``wait`` s for it to exit, then SIGTERM and SIGKILL by PID."""
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None and self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(wait if sig is None else 5.0)
                break
        self._thread.join(5.0)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _command(
    base: tuple[str, ...], args: list[str], timeout: float, what: str
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [*base, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise BenchmarkError(f"pageflip {what}: no answer within {timeout:g} s") from None
    except OSError as err:
        raise BenchmarkError(f"pageflip {what}: {err}") from None


def _json_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            obj = json.loads(line)
            if isinstance(obj, dict):
                out.append(obj)
    return out


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def run_pageflip(spec: VmRunSpec) -> VmRunRecord:
    """Migrate the guest once between two pageflip VMMs (see the module's docstring);
    raises :class:`~pageflip.errors.BenchmarkError`, after cleaning up, when the run fails
    or when this pageflip has no ``vm`` command yet."""
    if spec.system != "pageflip":
        raise BenchmarkError(f"run_pageflip got a {spec.system} run")
    if not pageflip_vm_available(spec.options.pageflip):
        raise BenchmarkError("pageflip vm is not available")
    workdir = Path(tempfile.mkdtemp(prefix=f"pageflip-bench-vm-{spec.index}-"))
    children: list[_Child] = []
    samplers: list[Sampler] = []
    finished = False
    try:
        record = blank_record(spec)
        _migrate(spec, workdir, children, samplers, record)
        finished = True
        return record
    finally:
        for sampler in samplers:
            with contextlib.suppress(BenchmarkError):
                sampler.stop()
        for child in reversed(children):
            # After a good run the source has exited and `pageflip stop` ends the
            # destination; after a failure nothing is waited for.
            child.stop(wait=_STEP if finished else 0.5)
        shutil.rmtree(workdir, ignore_errors=True)


def _migrate(
    spec: VmRunSpec,
    workdir: Path,
    children: list[_Child],
    samplers: list[Sampler],
    record: VmRunRecord,
) -> None:
    o = spec.options
    base = o.pageflip
    src_sock, dst_sock = str(workdir / "src.sock"), str(workdir / "dst.sock")
    to = f"unix:{workdir / 'mig.sock'}"
    started = now()
    src = _Child(
        "vm run",
        [
            *base,
            "vm",
            "run",
            "--memory",
            format_size(spec.guest_ram),
            "--kernel",
            spec.guest.kernel,
            "--append",
            spec.cmdline,
            "--control",
            src_sock,
            "--json",
            *(["--realtime"] if o.realtime else []),
            *(["--huge", huge] if (huge := o.huge_for("pageflip")) else []),
        ],
        workdir / "src.stderr",
    )
    children.append(src)
    dst = _Child(
        "incoming",
        [*base, "incoming", "--listen", to, "--control", dst_sock, "--json"],
        workdir / "dst.stderr",
    )
    children.append(dst)
    try:
        _, ready_line, ready = src.log.wait_for(Ready, o.boot_timeout, alive=src.alive)
    except BenchmarkError as err:
        raise BenchmarkError(f"{err}; stderr: {src.tail() or 'empty'}") from None
    record["boot_s"] = ready_line.t - started
    record["details"]["fill_ms"] = ready.fill_ms
    time.sleep(max(0.0, o.guest_settle - (now() - ready_line.t)))
    rates = [hb.rate for t, hb in src.log.heartbeats() if t >= now() - 1.0]
    record["write_rate"] = sum(rates) / len(rates) * (1 << 20) if rates else None

    _ask_pause(src_sock)  # from now on the guest's largest loop gap counts (QEMU's way)
    window_start = now()
    steal = steal_seconds()
    sampler = Sampler({"source": src.pid, "destination": dst.pid}, o.sample_interval, walk=False)
    samplers.append(sampler)
    baseline = sampler.baseline()
    sampler.start()
    src_mark = len(src.log)
    migrated = _command(
        base,
        ["migrate", "--control", src_sock, "--to", to, "--mode", spec.mode, "--json"],
        o.timeout + _STEP,
        "migrate",
    )
    sampler.stop()
    add_memory(record, sampler.result(baseline, spec.guest_ram))
    events = _json_lines(migrated.stdout)
    done = events[-1] if events else {}
    if done.get("event") != "done":
        why = done.get("error") if done.get("event") == "failed" else None
        raise BenchmarkError(
            f"pageflip {spec.mode}: {why or _last_line(migrated.stderr or migrated.stdout)}"
        )
    record["total_s"] = done.get("total_seconds")
    record["downtime_s"] = done.get("downtime")
    record["bytes_moved"] = done.get("bytes_on_wire")
    record["details"]["done"] = done
    record["guest_switchover_s"] = _ask_switchover_gap(dst_sock, events, dst.events, record)
    # The pause the guest saw from the P above to this one, as for QEMU (the done event's
    # guest_pause covers only the two heartbeats after the resume).
    record["guest_pause_s"] = _ask_pause(dst_sock)
    window = now() - window_start
    record["steal_s"] = stolen_since(steal)
    if record["guest_pause_s"] is None:  # a guest without P: the engine's own figure
        record["guest_pause_s"] = done.get("guest_pause")
    record["switchover_to_running_s"] = _switchover_to_running(events, dst.events)
    resumed = next((e for e in dst.events if e.get("event") == "resumed"), None)
    record["details"]["pause_steps"] = pause_steps(done, resumed)

    first = next(iter(dst.log.heartbeats()), None)
    if first is None:
        with contextlib.suppress(BenchmarkError):
            dst.log.wait_for(Heartbeat, _STEP, alive=dst.alive)
        first = next(iter(dst.log.heartbeats()), None)
    if first is not None:
        before = [t for t, _ in src.log.heartbeats(src_mark) if t < first[0]]
        record["host_gap_s"] = first[0] - before[-1] if before else None

    checked = _command(
        base, ["verify", "--control", dst_sock, "--json"], o.verify_timeout, "verify"
    )
    reports = _json_lines(checked.stdout)
    if not reports:
        raise BenchmarkError(f"pageflip verify: {_last_line(checked.stderr)}")
    report = reports[-1]
    record["details"]["verify"] = report
    bad = report.get("bad")
    if bad is None:
        bad = 0 if report.get("ok") else max(1, len(report.get("problems") or []))
    record["verify_bad"] = int(bad)
    record["verify_pages"] = report.get("pages", report.get("pages_checked"))
    if record["guest_pause_s"] is None:
        record["guest_pause_s"] = report.get("observed_pause")
    record["guest_quiet_s"] = _quiet(dst_sock, window)
    record["details"]["window_s"] = window
    _command(base, ["stop", "--control", dst_sock], _STEP, "stop")
    if record["verify_bad"]:
        problems = "; ".join(str(p) for p in (report.get("problems") or [])[:3])
        raise BenchmarkError(
            f"pageflip {spec.mode}: the guest found {record['verify_bad']} wrong page(s) on the "
            f"destination{': ' + problems if problems else ''}"
        )
    record["status"] = "completed"


def _ask_pause(control: str) -> float | None:
    """The guest's ``P`` answer through the host's console request: its largest loop gap
    since the previous ``P`` (seconds); None if it cannot tell."""
    from ...migration.host import ControlClient

    try:
        with ControlClient(control, timeout=_STEP) as client:
            answer = client.request("console", send="P", expect="PAUSE", timeout=_STEP)
    except (OSError, PageflipError):
        return None
    max_us = answer.get("fields", {}).get("max_us")
    return None if max_us is None else float(max_us) / 1e6


def _quiet(control: str, window: float) -> float | None:
    """The control (see :data:`~.records.VmRunRecord`'s ``guest_quiet_s``): the guest's
    largest loop gap over ``window`` seconds with no migration; None if it cannot tell."""
    if _ask_pause(control) is None:
        return None
    time.sleep(window)
    return _ask_pause(control)


def _ask_switchover_gap(
    control: str,
    source: list[dict[str, Any]],
    destination: list[dict[str, Any]],
    record: VmRunRecord,
) -> float | None:
    """The guest's loop gap that spans the pause: its ``G`` answer (see
    :meth:`.guest.Gaps.spanning`) against the source's switchover and the destination's
    resumed events; None when the guest cannot tell or no long gap overlaps them."""
    from ...migration.host import ControlClient

    switch = next((e for e in source if e.get("event") == "switchover"), None)
    resumed = next((e for e in destination if e.get("event") == "resumed"), None)
    if switch is None or resumed is None or "at" not in switch or "at" not in resumed:
        return None
    window = now() - float(switch["at"]) + GAPS_MARGIN
    try:
        with ControlClient(control, timeout=_STEP) as client:
            answer = client.request(
                "console", send=gaps_request(window).decode(), expect="GAPS", timeout=_STEP
            )
    except (OSError, PageflipError):
        return None
    gaps = parse_line(str(answer.get("line", "")))
    if not isinstance(gaps, Gaps) or answer.get("at") is None:
        return None
    record["details"]["gaps"] = {"line": answer["line"], "at": answer["at"]}
    return gaps.spanning(float(answer["at"]), float(switch["at"]), float(resumed["at"]))


def _switchover_to_running(
    source: list[dict[str, Any]], destination: list[dict[str, Any]]
) -> float | None:
    """The source's switchover event until the destination's resumed event, both stamped
    ``at`` with CLOCK_MONOTONIC (system-wide)."""
    switch = next((e for e in source if e.get("event") == "switchover"), None)
    resumed = next(
        (e for e in [*destination, *source] if e.get("event") == "resumed" and "at" in e), None
    )
    if switch is None or resumed is None or "at" not in switch:
        return None
    return float(resumed["at"]) - float(switch["at"])
