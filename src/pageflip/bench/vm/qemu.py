"""One measured QEMU migration of the benchmark guest, between two QEMUs on this host.

:func:`run_qemu` boots the source QEMU, waits for the guest's ``READY``, starts the
destination (``-incoming defer``), gives both the same capabilities and parameters, lets the
guest run ``guest_settle`` seconds, resets the guest's pause counter (``P``), migrates over a
unix socket and polls ``query-migrate`` until it completes, sampling both processes' memory
meanwhile. On the destination it then asks the guest for the pause it saw (``P``) and for a
full check of its memory (``V``: a wrong page makes the run an error).

Modes (:func:`migration_setup`), compared with pageflip's of the same row:

``shared`` (the ``flip`` row)
    guest RAM is a ``memory-backend-file`` on /dev/shm with ``share=on``; both QEMUs map
    the same file and the capability ``x-ignore-shared`` leaves RAM out of the stream.
``precopy``
    plain RAM, ``max-bandwidth`` 100 GB/s (unthrottled; QEMU 7.2's default is 128 MiB/s),
    ``downtime-limit`` left at its default (300 ms).
``postcopy``
    as precopy plus the capability ``postcopy-ram`` on both sides (``postcopy-blocktime`` on
    the destination); ``migrate-start-postcopy`` right after ``migrate`` (QEMU allows it
    "immediately after migration is started or any time later") or, with
    ``postcopy_after_first_pass``, once the first pass over RAM is done.

Every wait has a timeout. Whatever happens, both QEMUs are quit (QMP ``quit``, then SIGTERM
and SIGKILL by PID) and the run's sockets and shared-memory file are removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from ...errors import BenchmarkError, PageflipError
from ..common import now, steal_seconds, stolen_since
from ..migrate.sampling import Sampler
from .config import VmOptions, VmRunSpec
from .console import ConsoleLog, SerialConsole, connect_unix
from .guest import (
    GAPS_MARGIN,
    Gaps,
    Heartbeat,
    Pause,
    Ready,
    Verify,
    gaps_request,
    pause_request,
    verify_request,
)
from .qmp import Event, QmpClient
from .records import VmRunRecord, add_memory, blank_record

__all__ = [
    "BIG_BANDWIDTH",
    "RunFiles",
    "migration_setup",
    "qemu_command",
    "qemu_version",
    "run_qemu",
]

#: ``max-bandwidth`` for an unthrottled migration: 100 GB/s.
BIG_BANDWIDTH = 100_000_000_000
MiB = 1 << 20
#: Seconds to wait for a QEMU to quit by QMP, then after SIGTERM.
_QUIT_WAIT = 5.0
#: Seconds for the small steps (a QMP answer, the first heartbeat on the destination).
_STEP = 15.0


def hugetlbfs_dir(mounts: str = "/proc/mounts") -> str:
    """A hugetlbfs mount of 2 MiB pages, for the file QEMU's shared mode maps (one line of
    advice when there is none)."""
    with open(mounts) as f:
        for line in f:
            fields = line.split()
            if len(fields) < 4 or fields[2] != "hugetlbfs":
                continue
            options = fields[3].split(",")
            sizes = [o.split("=", 1)[1] for o in options if o.startswith("pagesize=")]
            if sizes in ([], ["2M"], ["2048k"]) and os.access(fields[1], os.W_OK):
                return fields[1]
    raise BenchmarkError(
        "QEMU's shared mode on huge pages needs a writable hugetlbfs mount of 2 MiB pages: "
        "mount -t hugetlbfs -o pagesize=2M none /dev/hugepages"
    )


class RunFiles:
    """The files of one run: a private directory for the sockets and QEMU's stderr, and for
    the shared mode the memory file both QEMUs map. :meth:`remove` deletes them all."""

    def __init__(self, spec: VmRunSpec) -> None:
        o = spec.options
        self.dir = Path(tempfile.mkdtemp(prefix=f"pageflip-bench-vm-{spec.index}-", dir=o.work_dir))
        self.shm: Path | None = None
        if spec.system_mode == "shared":
            name = f"pageflip-bench-vm-{os.getpid()}-{spec.index}-{os.urandom(4).hex()}"
            self.shm = Path(hugetlbfs_dir() if o.huge_for("qemu") else o.shm_dir) / name

    def qmp(self, role: str) -> str:
        return str(self.dir / f"{role}.qmp")

    def serial(self, role: str) -> str:
        return str(self.dir / f"{role}.ser")

    def stderr(self, role: str) -> Path:
        return self.dir / f"{role}.stderr"

    @property
    def migration_uri(self) -> str:
        return f"unix:{self.dir / 'mig.sock'}"

    def remove(self) -> None:
        if self.shm is not None:
            with contextlib.suppress(FileNotFoundError):
                self.shm.unlink()
        shutil.rmtree(self.dir, ignore_errors=True)


def qemu_command(spec: VmRunSpec, role: str, files: RunFiles) -> list[str]:
    """The command line of the ``src`` or ``dst`` QEMU of a run."""
    o = spec.options
    mem = spec.guest_ram // MiB
    machine = f"{o.machine},accel=kvm"
    cmd = [
        o.qemu,
        "-name",
        f"pageflip-bench-{role}",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-cpu",
        o.cpu,
        "-smp",
        "1",
        "-m",
        f"{mem}M",
    ]
    if files.shm is not None:
        cmd += [
            "-object",
            f"memory-backend-file,id=mem,size={mem}M,mem-path={files.shm},share=on",
        ]
        machine += ",memory-backend=mem"
    elif o.huge_for("qemu"):
        cmd += [
            "-object",
            f"memory-backend-memfd,id=mem,size={mem}M,hugetlb=on,hugetlbsize=2M",
        ]
        machine += ",memory-backend=mem"
    cmd += [
        "-machine",
        machine,
        "-chardev",
        f"socket,id=ser0,path={files.serial(role)},server=on,wait=off",
        "-serial",
        "chardev:ser0",
        "-qmp",
        f"unix:{files.qmp(role)},server=on,wait=off",
        "-kernel",
        spec.guest.kernel,
        "-append",
        spec.cmdline,
    ]
    if role == "dst":
        cmd += ["-incoming", "defer"]
    return cmd


def migration_setup(system_mode: str, role: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(capabilities, parameters) for one side of a QEMU migration in ``system_mode``."""
    caps: list[dict[str, Any]] = []
    params: dict[str, Any] = {"max-bandwidth": BIG_BANDWIDTH}
    if system_mode == "shared":
        caps.append({"capability": "x-ignore-shared", "state": True})
    elif system_mode == "postcopy":
        caps.append({"capability": "postcopy-ram", "state": True})
        if role == "dst":
            caps.append({"capability": "postcopy-blocktime", "state": True})
    elif system_mode != "precopy":
        raise BenchmarkError(f"QEMU has no mode {system_mode!r} here")
    return caps, params


def qemu_version(qemu: str) -> str | None:
    """The first line of ``qemu --version`` (None: it does not run)."""
    try:
        out = subprocess.run(
            [qemu, "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0] if out.returncode == 0 and lines else None


def _tail(path: Path, n: int = 3) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "no output"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " | ".join(lines[-n:])[-400:] or "no output"


class _Qemu:
    """One QEMU process of a run, its QMP connection and its serial console."""

    def __init__(self, role: str, argv: list[str], files: RunFiles) -> None:
        self.role = role
        self.argv = argv
        self.files = files
        self.log = ConsoleLog(f"QEMU {role} console")
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp: QmpClient | None = None
        self.console: SerialConsole | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float) -> None:
        with open(self.files.stderr(self.role), "wb") as err:
            try:
                self.proc = subprocess.Popen(
                    self.argv, stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT
                )
            except OSError as why:
                raise BenchmarkError(f"QEMU ({self.role}) did not start: {why}") from None
        try:
            sock = connect_unix(self.files.serial(self.role), timeout, self.alive, self.role)
            self.console = SerialConsole(sock, self.log)
            self.qmp = QmpClient(self.files.qmp(self.role), f"QEMU {self.role}", _STEP, self.alive)
        except PageflipError as err:
            raise BenchmarkError(self.exit_text() or str(err)) from None

    def exit_text(self) -> str | None:
        """If QEMU has exited (or does within a moment): how, with the end of its stderr."""
        if self.proc is None:
            return None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(1.0)
        if self.proc.returncode is None:
            return None
        return (
            f"QEMU ({self.role}) exited with status {self.proc.returncode}: "
            f"{_tail(self.files.stderr(self.role))}"
        )

    def run(self, command: str, **arguments: Any) -> Any:
        assert self.qmp is not None
        try:
            return self.qmp.execute(command, **arguments)
        except BenchmarkError as err:
            raise BenchmarkError(self.exit_text() or str(err)) from None

    def realtime_vcpus(self) -> list[int]:
        """Make every vCPU thread of this QEMU SCHED_FIFO (priority 1, as pageflip's
        ``vm run --realtime``); returns their thread ids."""
        from ...vm.machine import REALTIME_PRIORITY, schedule_thread

        threads = [int(cpu["thread-id"]) for cpu in self.run("query-cpus-fast")]
        for tid in threads:
            schedule_thread(tid, REALTIME_PRIORITY)
        return threads

    def send(self, data: bytes) -> int:
        """Send ``data`` to the guest; returns the console's line count before it."""
        assert self.console is not None
        mark = len(self.log)
        self.console.send(data)
        return mark

    def stop(self) -> None:
        """Quit QEMU (QMP, then SIGTERM, then SIGKILL, by PID); close everything. Idempotent."""
        proc = self.proc
        if proc is not None and proc.poll() is None and self.qmp is not None:
            with contextlib.suppress(PageflipError):
                self.qmp.execute("quit", timeout=_QUIT_WAIT)
        if self.qmp is not None:
            self.qmp.close()
        if proc is not None:
            for sig in (None, signal.SIGTERM, signal.SIGKILL):
                if sig is not None and proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(_QUIT_WAIT)
                    break
        if self.console is not None:
            self.console.close()


def run_qemu(spec: VmRunSpec) -> VmRunRecord:
    """Migrate the guest once between two QEMUs (see the module's docstring); raises
    :class:`~pageflip.errors.BenchmarkError`, after cleaning up, when the run fails."""
    if spec.system != "qemu":
        raise BenchmarkError(f"run_qemu got a {spec.system} run")
    files = RunFiles(spec)
    qemus: dict[str, _Qemu] = {}
    samplers: list[Sampler] = []
    try:
        record = blank_record(spec)
        _migrate(spec, files, qemus, samplers, record)
        return record
    finally:
        for sampler in samplers:
            with contextlib.suppress(BenchmarkError):
                sampler.stop()
        for role in ("dst", "src"):
            if role in qemus:
                qemus[role].stop()
        files.remove()


def _migrate(
    spec: VmRunSpec,
    files: RunFiles,
    qemus: dict[str, _Qemu],
    samplers: list[Sampler],
    record: VmRunRecord,
) -> None:
    """The run itself; what it starts goes into ``qemus`` and ``samplers`` for the caller
    to stop."""
    o = spec.options
    flavour = spec.guest.flavour
    src = qemus["src"] = _Qemu("src", qemu_command(spec, "src", files), files)
    booted = now()
    src.start(o.boot_timeout)
    if o.realtime:
        src.realtime_vcpus()
    _, ready_line, ready = src.log.wait_for(Ready, o.boot_timeout, alive=src.alive)
    record["boot_s"] = ready_line.t - booted
    record["details"]["fill_ms"] = ready.fill_ms

    dst = qemus["dst"] = _Qemu("dst", qemu_command(spec, "dst", files), files)
    dst.start(_STEP)
    if o.realtime:
        dst.realtime_vcpus()
    for q in (dst, src):
        caps, params = migration_setup(spec.system_mode, q.role)
        q.run("migrate-set-capabilities", capabilities=caps)
        q.run("migrate-set-parameters", **params)
    dst.run("migrate-incoming", uri=files.migration_uri)
    record["details"]["parameters"] = src.run("query-migrate-parameters")

    time.sleep(max(0.0, o.guest_settle - (now() - ready_line.t)))
    record["write_rate"] = _write_rate(src.log, now() - 1.0)
    window_start = counted = None
    if flavour.has_pause:  # the guest's pause counter starts over here
        src.log.wait_for(Pause, _STEP, start=src.send(pause_request()), alive=src.alive)
        window_start = now()
    else:
        record["notes"].append(f"{flavour.name}: the guest cannot report its pause")

    sampler = Sampler({"source": src.pid, "destination": dst.pid}, o.sample_interval, walk=False)
    samplers.append(sampler)
    baseline = sampler.baseline()
    sampler.start()
    src_mark = len(src.log)
    steal = steal_seconds()
    final = _run_migration(spec, src, files.migration_uri, record)
    sampler.stop()
    add_memory(record, sampler.result(baseline, spec.guest_ram))

    _fill_from_query(record, final)
    _wait_running(dst)
    _, first_line, first_hb = dst.log.wait_for(Heartbeat, _STEP, alive=dst.alive)
    # The guest's largest gap within the heartbeat period that holds the switchover.
    record["details"]["switchover_hb_gap_us"] = first_hb.gap_us
    before = [t for t, _ in src.log.heartbeats(src_mark) if t < first_line.t]
    before = before or [t for t, _ in src.log.heartbeats() if t < first_line.t]
    record["host_gap_s"] = first_line.t - before[-1] if before else None
    stopped = _fill_from_events(record, src, dst)
    if flavour.has_pause:
        if stopped is not None:
            window = now() - stopped[0] + GAPS_MARGIN
            asked = dst.send(gaps_request(window))
            _, gaps_line, gaps = dst.log.wait_for(Gaps, _STEP, start=asked)
            record["details"]["gaps"] = {"line": gaps_line.text, "at": gaps_line.t}
            record["guest_switchover_s"] = gaps.spanning(gaps_line.t, *stopped)
        _, _, pause = dst.log.wait_for(Pause, _STEP, start=dst.send(pause_request()))
        record["guest_pause_s"] = pause.seconds
        counted = now() - window_start if window_start is not None else None
        record["details"]["pause"] = {
            "max_us": pause.max_us,
            "at_n": pause.at_n,
            "tick_us": pause.tick_us,
            "iters": pause.iters,
        }
    record["steal_s"] = stolen_since(steal)
    _, _, check = dst.log.wait_for(Verify, o.verify_timeout, start=dst.send(verify_request()))
    record["verify_bad"], record["verify_pages"] = check.bad, check.pages
    record["details"]["verify_ms"] = check.ms
    if flavour.has_pause and counted is not None:  # the control (records.VmRunRecord)
        dst.log.wait_for(Pause, _STEP, start=dst.send(pause_request()))
        time.sleep(counted)
        _, _, quiet = dst.log.wait_for(Pause, _STEP, start=dst.send(pause_request()))
        record["guest_quiet_s"] = quiet.seconds
        record["details"]["window_s"] = counted
    if spec.system_mode == "postcopy":
        incoming = dst.run("query-migrate")
        record["details"]["postcopy_blocktime_ms"] = incoming.get("postcopy-blocktime")
        record["details"]["postcopy_vcpu_blocktime_ms"] = incoming.get("postcopy-vcpu-blocktime")
    if check.bad:
        raise BenchmarkError(
            f"QEMU {spec.system_mode}: the guest found {check.bad} wrong page(s) of "
            f"{check.pages} on the destination"
        )
    record["status"] = "completed"


def _run_migration(spec: VmRunSpec, src: _Qemu, uri: str, record: VmRunRecord) -> dict[str, Any]:
    """Start the migration and poll it to its end; returns the last query-migrate answer.
    A migration that does not complete within the timeout is cancelled: an error."""
    o: VmOptions = spec.options
    postcopy = spec.system_mode == "postcopy"
    started = now()
    src.run("migrate", uri=uri)
    switched = False
    if postcopy and not o.postcopy_after_first_pass:
        src.run("migrate-start-postcopy")
        switched = True
    while True:
        info: dict[str, Any] = src.run("query-migrate")
        status = info.get("status", "?")
        if status in ("completed", "failed", "cancelled"):
            break
        if postcopy and not switched and info.get("ram", {}).get("dirty-sync-count", 0) >= 2:
            src.run("migrate-start-postcopy")
            switched = True
        if now() - started > o.timeout:
            with contextlib.suppress(BenchmarkError):
                src.run("migrate_cancel")
            ram = info.get("ram", {})
            raise BenchmarkError(
                f"QEMU {spec.system_mode}: not complete after {o.timeout:g} s (status {status}, "
                f"{ram.get('remaining', 0) / MiB:.0f} MiB remaining, expected downtime "
                f"{info.get('expected-downtime', '?')} ms); cancelled"
            )
        time.sleep(o.poll_interval)
    record["details"]["host_wall_s"] = now() - started
    if status != "completed":
        raise BenchmarkError(
            f"QEMU {spec.system_mode}: migration {status}: {info.get('error-desc', 'no reason')}"
        )
    return info


def _fill_from_query(record: VmRunRecord, info: dict[str, Any]) -> None:
    """The figures of QEMU's final query-migrate answer (ms -> s)."""
    ram = info.get("ram", {})

    def seconds(key: str) -> float | None:
        value = info.get(key)
        return None if value is None else value / 1e3

    record["total_s"] = seconds("total-time")
    record["downtime_s"] = seconds("downtime")
    record["setup_s"] = seconds("setup-time")
    record["bytes_moved"] = ram.get("transferred")
    keep = (
        "dirty-sync-count",
        "mbps",
        "precopy-bytes",
        "downtime-bytes",
        "postcopy-bytes",
        "postcopy-requests",
        "normal",
        "duplicate",
    )
    record["details"].update({k: ram[k] for k in keep if k in ram})
    record["details"]["query_migrate"] = info
    if info.get("total-time") == 0 and (ram.get("transferred") or 0) > MiB:
        record["notes"].append("QEMU reported total-time 0 for a completed migration")


def _wait_running(dst: _Qemu) -> None:
    deadline = now() + _STEP
    while True:
        status = dst.run("query-status").get("status")
        if status == "running":
            return
        if now() > deadline:
            raise BenchmarkError(f"QEMU dst: the guest is {status}, not running, after migration")
        time.sleep(0.02)


def _fill_from_events(record: VmRunRecord, src: _Qemu, dst: _Qemu) -> tuple[float, float] | None:
    """Switchover to running: the source's last STOP until the destination's first RESUME,
    by QEMU's own timestamps (the same host clock). Returns both moments on
    CLOCK_MONOTONIC (QEMU stamps the realtime clock), None without them."""
    assert src.qmp is not None and dst.qmp is not None
    stops = [e for e in src.qmp.poll_events(0.05) if e.name == "STOP"]
    resumes = [e for e in dst.qmp.poll_events(0.05) if e.name == "RESUME"]
    stop: Event | None = stops[-1] if stops else None
    resume: Event | None = resumes[0] if resumes else None
    if stop and resume and stop.timestamp is not None and resume.timestamp is not None:
        record["switchover_to_running_s"] = resume.timestamp - stop.timestamp
        offset = time.time() - time.monotonic()
        return stop.timestamp - offset, resume.timestamp - offset
    return None


def _write_rate(log: ConsoleLog, since: float) -> float | None:
    """The dirty rate the guest's heartbeats measured since ``since`` (bytes/s)."""
    rates = [hb.rate for t, hb in log.heartbeats() if t >= since]
    return sum(rates) / len(rates) * MiB if rates else None
