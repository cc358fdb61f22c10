"""After the commit point: a guest whose every page reached the destination is kept whatever
happens to the source; every wait has a deadline; a destination that fails is reported as a
lost guest, never as a success; a postcopy whose source cannot give a page any more stops
its guest instead of letting it read zeros; a broken postcopy connection is taken up again.
Every failure is injected for real: processes stopped and killed, a pager killed, a socket
shut down, a limit hit."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import migration_peers as peers
from cli_procs import TAG, Host, hosts, json_lines, one_line, pagers, run
from pageflip import PAGE_SIZE, stream
from pageflip.errors import GuestLost
from pageflip.memory import LOST_PAGE
from pageflip.migration.destination import Destination

_ = hosts  # the fixture

MiB = 1 << 20


class Pair:
    """A workload at ``a``, a destination listening at ``listen`` with control ``b``."""

    def __init__(self, tmp: Path, started: list[Host]) -> None:
        self.tmp = tmp
        self.a, self.b, self.listen = (str(tmp / n) for n in ("a.sock", "b.sock", "in.sock"))
        self.started = started

    def start(self, host: Host) -> Host:
        self.started.append(host)
        return host

    def workload(self, *extra: str, faults: str = "", size: str = "32M", rate: str = "16M") -> Host:
        host = self.start(
            Host(
                *("workload", "--size", size, "--dirty-rate", rate, "--control", self.a, *extra),
                faults=faults,
                stderr_to=self.tmp / "workload.err",
            )
        )
        host.wait_for("ready")
        return host

    def incoming(self, *extra: str, faults: str = "") -> Host:
        host = self.start(
            Host(
                *("incoming", "--listen", self.listen, "--control", self.b, *extra),
                faults=faults,
                stderr_to=self.tmp / "incoming.err",
            )
        )
        host.wait_for("listening")
        return host

    def migrate(self, mode: str, *extra: str) -> Host:
        return self.start(
            Host("migrate", "--control", self.a, "--to", self.listen, "--mode", mode, *extra)
        )

    def verify(self, control: str) -> dict[str, Any]:
        out = run("verify", "--control", control, "--json")
        (report,) = json_lines(out.stdout)
        return report


@pytest.fixture
def pair(tmp_path: Path, hosts: list[Host]) -> Iterator[Pair]:
    yield Pair(tmp_path, hosts)


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _wait_stopped(pid: int) -> None:
    for _ in range(600):
        if _state(pid) == "T":
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} did not stop")


def _wait_gone(path: str) -> None:
    for _ in range(600):
        if not os.path.exists(path):
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} is still there")


# -- a complete guest is kept ---------------------------------------------------------------


def test_a_complete_postcopy_guest_outlives_its_source(pair: Pair) -> None:
    """The issue's case: the destination stopped right after it resumed, its pager pulls
    every page meanwhile, then the source dies: the guest stays, checked, and runs on."""
    workload = pair.workload()
    incoming = pair.incoming()
    migrate = pair.migrate("postcopy")
    incoming.wait_for("resumed")
    incoming.signal(signal.SIGSTOP)
    time.sleep(3)  # the pager (not stopped) pulls the 32 MiB meanwhile
    workload.signal(signal.SIGKILL)
    workload.finish()
    incoming.signal(signal.SIGCONT)
    done = incoming.wait_for("done")
    assert done["digest"] == "verified" or done["digest"].startswith("unchecked"), done
    incoming.wait_for("running")
    report = pair.verify(pair.b)
    assert report["ok"], report["problems"]
    assert migrate.finish() == 1  # its host was killed: it cannot know, and says so
    assert "went away" in one_line(migrate.stderr())
    assert run("stop", "--control", pair.b).returncode == 0
    assert incoming.finish() == 0


@pytest.mark.parametrize("mode", ["flip", "precopy", "postcopy"])
def test_a_source_that_hangs_after_switchover_then_dies(pair: Pair, mode: str) -> None:
    """The source sends SWITCHOVER and stops before COMMIT; then it is killed. It never
    resumed its copy (it would have said ABORT first), and the destination holds a complete
    one, prepared: it takes the guest over instead of throwing it away."""
    workload = pair.workload(faults="src-stop-before-prepared")
    incoming = pair.incoming()
    pair.migrate(mode)
    _wait_stopped(workload.pid)
    time.sleep(2)  # postcopy: the pager pulls every page out of the stopped source
    workload.signal(signal.SIGKILL)
    workload.finish()
    try:
        incoming.wait_for("running", timeout=30)
    except AssertionError:
        raise AssertionError(f"{incoming.events}") from None
    report = pair.verify(pair.b)
    assert report["ok"], report["problems"]
    assert "taking the guest over" in _after_stop(pair, incoming)


def _after_stop(pair: Pair, incoming: Host) -> str:
    assert run("stop", "--control", pair.b).returncode == 0
    assert incoming.finish() == 0
    return incoming.stderr()


# -- every wait has a deadline --------------------------------------------------------------


def test_a_stalled_source_does_not_hold_the_destination(pair: Pair) -> None:
    """The source stops right after the commit point for longer than incoming's --timeout:
    the destination, every page in, finishes on its own (saying the final check could not
    run), answers on its control socket meanwhile, and the source completes when it wakes."""
    workload = pair.workload(faults="src-stop-after-commit")
    incoming = pair.incoming("--timeout", "2s")
    migrate = pair.migrate("postcopy")
    incoming.wait_for("resumed")
    _wait_stopped(workload.pid)
    status = run("status", "--control", pair.b, "--json")
    assert status.returncode == 0, status.stderr
    done = incoming.wait_for("done")
    assert _state(workload.pid) == "T"  # it finished while the source was still stopped
    assert done["digest"].startswith("unchecked"), done
    assert pair.verify(pair.b)["ok"]
    workload.signal(signal.SIGCONT)
    last = migrate.wait_for("done")
    assert "unchecked" in last["digest"]
    assert migrate.finish() == 0 and workload.finish() == 0
    assert run("stop", "--control", pair.b).returncode == 0
    assert incoming.finish() == 0


# -- reports are true -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["flip", "precopy", "postcopy"])
def test_a_destination_killed_after_the_commit_point_is_a_lost_guest(pair: Pair, mode: str) -> None:
    workload = pair.workload()
    incoming = pair.incoming(faults="dest-kill-after-commit")
    migrate = pair.migrate(mode)
    failed = migrate.wait_for("failed")
    assert failed["guest"] == "lost" and not failed["stale_copy"], failed
    assert migrate.finish() == 3
    line = one_line(migrate.stderr())
    assert line.startswith("GuestLost: ") and "the guest is lost" in line
    assert workload.finish() == 3  # no paused copy that looks valid is left behind
    _wait_gone(pair.a)
    incoming.finish()
    assert pagers() == []


def test_keep_source_on_loss_keeps_a_stale_copy(pair: Pair) -> None:
    workload = pair.workload()
    pair.incoming(faults="dest-kill-after-commit")
    migrate = pair.migrate("precopy", "--keep-source-on-loss")
    failed = migrate.wait_for("failed")
    assert failed["guest"] == "lost" and failed["stale_copy"], failed
    assert migrate.finish() == 3
    status = json_lines(run("status", "--control", pair.a, "--json").stdout)[0]
    assert status["host"] == "stale" and "stale" in status["status"]["stale"]
    verify = run("verify", "--control", pair.a, "--json")
    assert verify.returncode == 1
    report = json_lines(verify.stdout)[0]
    assert not report["ok"] and report["problems"][0].startswith("stale copy")
    out = run("migrate", "--control", pair.a, "--to", pair.listen, "--json")
    assert out.returncode == 1 and "stale" in one_line(out.stderr)
    assert run("stop", "--control", pair.a).returncode == 0
    assert workload.finish() == 0


@pytest.mark.parametrize(
    ("fault", "said"),
    [
        ("dest-kill-pager-worker", "its worker was killed by signal 9; a new one took over"),
        ("dest-hang-pager-worker", "(hung?); a new one took over"),
    ],
)
def test_a_dead_or_hung_pager_worker_is_replaced(pair: Pair, fault: str, said: str) -> None:
    """The pager's worker is stopped before the switchover (it pulls nothing), then killed,
    or left stopped: while the guest runs and faults on missing pages (a faulting thread
    may hold the destination's GIL), the pager replaces its worker on its own, and every
    page comes."""
    pair.workload()
    incoming = pair.incoming(faults=fault)
    migrate = pair.migrate("postcopy")
    done = migrate.wait_for("done")
    assert done["digest"] == "verified", done
    assert migrate.finish() == 0
    incoming.wait_for("running")
    assert pair.verify(pair.b)["ok"]
    assert said in _after_stop(pair, incoming)
    assert pagers() == []


# -- a guest that cannot get its pages stops; nothing reads as zeros ------------------------


def _our_pager() -> int:
    """The pager this test process started (its child)."""
    for _ in range(200):
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            with contextlib.suppress(OSError), open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with contextlib.suppress(OSError), open(f"/proc/{name}/cmdline", "rb") as f:
                if int(fields[1]) == os.getpid() and b"pageflip._pager" in f.read():
                    return int(name)
        time.sleep(0.05)
    raise AssertionError("no pager")


def test_python_api_a_dead_source_never_gives_zeros(spawn: Any, tmp_path: Path) -> None:
    """Destination(listen).run() in this process; the source kills itself right after
    COMMIT while the pager is held stopped, so that pages are missing. The guest must not
    read any missing page as zeros: run() raises GuestLost, the guest is paused (no thread
    writes), and every page of its memory is the source's data or the lost-page mark."""
    listen = str(tmp_path / "in.sock")
    holder: list[subprocess.Popen[bytes]] = []

    def hold_the_pager(guest: Any) -> None:
        pager = _our_pager()
        os.kill(pager, signal.SIGSTOP)
        # Let it go a second later, from another process: a guest thread that faults on a
        # missing page may hold this process's GIL until a page comes.
        holder.append(subprocess.Popen(["sh", "-c", f"sleep 1; kill -CONT {pager}"]))

    reader, writer = spawn.Pipe(duplex=False)
    dest = Destination(listen, timeout=20, prepare=hold_the_pager)
    source = spawn.Process(
        target=peers.source,
        args=(listen, 32 * MiB, 32 * MiB, {"mode": "postcopy"}, writer, "kill-after-commit"),
    )
    source.start()
    guest = None
    try:
        with pytest.raises(GuestLost) as info:
            dest.run()
        assert info.value.guest == "lost" and "never came" in str(info.value)
        guest = dest.guest
        assert guest is not None and guest.paused
        writes = guest.total_writes
        time.sleep(0.3)
        assert guest.total_writes == writes  # no thread of the failed guest runs
        ram = guest.regions[0].numpy(np.uint64).reshape(-1, PAGE_SIZE // 8)
        lost = np.frombuffer(LOST_PAGE, np.uint64)
        marked = (ram == lost).all(axis=1)
        zero = (ram == 0).all(axis=1)
        pages = np.flatnonzero(~marked)
        real = bool((ram[pages, 0] == pages.astype(np.uint64)).all())
        del ram
        assert not zero.any(), f"{int(zero.sum())} pages read as zeros"
        assert marked.any()  # the source died with pages still to come
        # The rest are pages that came (headers name them; the guest's writers may have
        # rewritten some on top of a marked journal before it stopped: its own check
        # says so).
        assert real
        assert not guest.verify().ok
    finally:
        if guest is not None:
            guest.close()
        source.join(30)
        source.close()
        reader.close()
        writer.close()
        for proc in holder:
            proc.wait()
        dest.close()
    assert not os.path.exists(listen)


# -- limits: checked before the commit point ------------------------------------------------


class Cgroup:
    """A cgroup (v1 hierarchy ``controller``) made for one test and removed after it."""

    def __init__(self, controller: str) -> None:
        self.path = Path(f"/sys/fs/cgroup/{controller}/pageflip-test-{os.getpid()}")
        if self.path.exists():  # an earlier test of this run that could not remove it
            self.remove()
        self.path.mkdir()

    def write(self, name: str, value: int) -> None:
        (self.path / name).write_text(f"{value}\n")

    def read(self, name: str) -> str:
        return (self.path / name).read_text()

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(f"{pid}\n")

    def remove(self) -> None:
        """Move whatever still runs in the group back to the root group (a failed test
        ends its processes only after this fixture), then remove it."""
        root = self.path.parent / "cgroup.procs"
        for _ in range(100):
            for pid in self.read("cgroup.procs").split():
                with contextlib.suppress(OSError):  # it may have exited meanwhile
                    root.write_text(f"{pid}\n")
            with contextlib.suppress(OSError):
                self.path.rmdir()
                return
            time.sleep(0.1)
        self.path.rmdir()  # still busy after 10 s: said, not left behind silently


def _cgroup(controller: str) -> Iterator[Cgroup]:
    if os.geteuid() != 0 or not os.access(f"/sys/fs/cgroup/{controller}", os.W_OK):
        pytest.skip(f"needs root and a writable cgroup v1 {controller} hierarchy")
    group = Cgroup(controller)
    yield group
    group.remove()


@pytest.fixture
def pids_cgroup() -> Iterator[Cgroup]:
    yield from _cgroup("pids")


@pytest.fixture
def memory_cgroup() -> Iterator[Cgroup]:
    yield from _cgroup("memory")


@pytest.mark.parametrize("mode", ["flip", "postcopy"])
def test_threads_the_destination_cannot_have(pair: Pair, pids_cgroup: Cgroup, mode: str) -> None:
    """A pids limit: the pager's threads (postcopy) or the guest's (flip) cannot start. That
    shows before PREPARED: the guest runs on at the source, the failure named."""
    pair.workload()
    incoming = pair.incoming()
    pids_cgroup.add(incoming.pid)
    tasks = len(pids_cgroup.read("tasks").split())
    pids_cgroup.write("pids.max", tasks + (1 if mode == "postcopy" else 0))
    out = run("migrate", "--control", pair.a, "--to", pair.listen, "--mode", mode, "--json")
    assert out.returncode == 1, out.stderr
    line = one_line(out.stderr)
    assert "the guest runs on the source" in line and "thread" in line, line
    assert pair.verify(pair.a)["ok"]
    incoming.signal(signal.SIGTERM)
    incoming.finish()
    assert run("stop", "--control", pair.a).returncode == 0


def test_memory_the_destination_cannot_have(pair: Pair, memory_cgroup: Cgroup) -> None:
    """A memory limit below the guest's size: refused at SETUP, before any allocation."""
    pair.workload()
    incoming = pair.incoming()
    memory_cgroup.add(incoming.pid)
    used = int(memory_cgroup.read("memory.usage_in_bytes"))
    memory_cgroup.write("memory.limit_in_bytes", used + 16 * MiB)
    out = run("migrate", "--control", pair.a, "--to", pair.listen, "--mode", "precopy", "--json")
    assert out.returncode == 1, out.stderr
    line = one_line(out.stderr)
    assert "in phase setup" in line and "no room" in line and "memory.limit_in_bytes" in line
    assert pair.verify(pair.a)["ok"]
    incoming.wait_for("attempt-failed")
    incoming.signal(signal.SIGTERM)
    incoming.finish()
    assert run("stop", "--control", pair.a).returncode == 0


def test_a_setup_bigger_than_the_host_is_refused_before_allocating(hosts: list[Host]) -> None:
    """Over TCP (loopback), a peer announcing 47 GiB is refused at once; incoming goes on."""
    tmp = f"@pageflip-test-{os.getpid()}-b"
    incoming = Host("incoming", "--listen", "tcp:127.0.0.1:0", "--control", tmp)
    hosts.append(incoming)
    where = incoming.wait_for("listening")["listen"]
    port = int(where.rsplit(":", 1)[1])
    encoder, decoder = stream.Encoder(), stream.Decoder()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        hello = stream.Hello(
            stream.Role.SOURCE, PAGE_SIZE, stream.Feature.XXH3, os.urandom(16), "workload"
        )
        sock.sendall(encoder.encode(hello)[0])
        size = 47 << 30
        setup = stream.Setup(
            stream.Mode.PRECOPY, 1, os.getpid(), [stream.RegionInfo("ram", size, 0, False)]
        )
        sock.sendall(encoder.encode(setup)[0])
        answers: list[Any] = []
        while not any(isinstance(a, stream.Reject) for a in answers):
            data = sock.recv(65536)
            assert data, f"closed after {answers}"
            decoder.feed(data)
            while (event := decoder.next_event()) is not None:
                answers.append(event)
    reason = next(a for a in answers if isinstance(a, stream.Reject)).reason
    assert "no room" in reason and "MemAvailable" in reason, reason
    incoming.wait_for("attempt-failed")
    with open(f"/proc/{incoming.pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    assert rss < 512 * 1024  # KiB: nothing of the 47 GiB was allocated
    incoming.signal(signal.SIGTERM)
    assert incoming.finish() == 128 + signal.SIGTERM
    _ = TAG


# -- postcopy recovery ----------------------------------------------------------------------


def test_postcopy_recovers_after_its_connection_is_cut(pair: Pair) -> None:
    """The source's socket is shut down right after the commit point, both processes alive:
    both wait; the destination's pager goes on; `pageflip migrate --resume` reconnects and
    the migration ends checked."""
    workload = pair.workload(faults="src-cut-in-postcopy")
    incoming = pair.incoming()
    migrate = pair.migrate("postcopy")
    migrate.wait_for("recovering")
    incoming.wait_for("recovering")
    resume = pair.start(Host("migrate", "--control", pair.a, "--resume"))
    done = resume.wait_for("done")
    assert done["digest"] == "verified", done
    assert resume.finish() == 0
    assert migrate.wait_for("done")["digest"] == "verified"
    assert migrate.finish() == 0 and workload.finish() == 0
    incoming.wait_for("running")
    assert pair.verify(pair.b)["ok"]
    assert run("stop", "--control", pair.b).returncode == 0
    assert incoming.finish() == 0
