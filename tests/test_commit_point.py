"""The commit point, through the real commands: whatever fails on the destination before it
says PREPARED (its control path taken, its state loading, its resuming), and whatever
cancels the migration before COMMIT, the guest keeps running on the source with all its
data, and ``pageflip migrate`` exits 1 with one line naming the phase."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli_procs import Host, hosts, one_line, pagers, run

_ = hosts  # the fixture

MODES = ["flip", "precopy", "postcopy"]


class Pair:
    """A workload at ``a`` and the paths of a destination (``listen``, control ``b``)."""

    def __init__(self, tmp: Path, started: list[Host]) -> None:
        self.tmp = tmp
        self.a, self.b, self.listen = (str(tmp / n) for n in ("a.sock", "b.sock", "in.sock"))
        self.started = started

    def workload(self, size: str = "16M", rate: str = "16M", faults: str = "") -> Host:
        host = Host(
            "workload", "--size", size, "--dirty-rate", rate, "--control", self.a, faults=faults
        )
        self.started.append(host)
        host.wait_for("ready")
        return host

    def incoming(self, faults: str = "", *extra: str) -> Host:
        host = Host(
            "incoming",
            "--listen",
            self.listen,
            "--control",
            self.b,
            *extra,
            faults=faults,
            stderr_to=self.tmp / f"incoming-{len(self.started)}.err",
        )
        self.started.append(host)
        return host

    def source_intact(self) -> None:
        """The guest runs on at the source and proves that no write was lost."""
        status = run("status", "--control", self.a, "--json")
        assert status.returncode == 0, status.stderr
        assert '"paused": false' in status.stdout
        verify = run("verify", "--control", self.a)
        assert verify.returncode == 0, verify.stdout + verify.stderr


@pytest.fixture
def pair(tmp_path: Path, hosts: list[Host]) -> Iterator[Pair]:
    yield Pair(tmp_path, hosts)


def _failed_before_commit(out: object, phase: str) -> str:
    assert out.returncode == 1, (out.stdout, out.stderr)  # type: ignore[attr-defined]
    line = one_line(out.stderr)  # type: ignore[attr-defined]
    assert line.startswith("MigrationError: ") and f"in phase {phase}" in line, line
    assert line.endswith("the guest runs on the source"), line
    return line


@pytest.mark.parametrize("mode", MODES)
def test_destination_control_path_taken(pair: Pair, mode: str) -> None:
    """The defect as a user met it: incoming on a control path a live process holds. It
    refuses to start (before it listens), and migrate finds nobody: nothing is lost."""
    pair.workload()
    holder = socket.socket(socket.AF_UNIX)
    holder.bind(pair.b)
    holder.listen()
    try:
        incoming = pair.incoming()
        assert incoming.finish() == 1
        line = one_line(incoming.stderr())
        assert line.startswith("FileExistsError: ") and pair.b in line and "in use" in line
        assert not os.path.exists(pair.listen)
        out = run("migrate", "--control", pair.a, "--to", pair.listen, "--mode", mode, "--json")
        _failed_before_commit(out, "setup")
    finally:
        holder.close()
    pair.source_intact()
    assert run("stop", "--control", pair.a).returncode == 0


@pytest.mark.parametrize(
    ("fault", "mode", "phase"),
    [
        # a flip restores the guest ahead, at setup, and only finishes it in the pause
        ("dest-restore-fails", "flip", "setup"),
        ("dest-finish-restore-fails", "flip", "switchover"),
        ("dest-restore-fails", "precopy", "switchover"),
        ("dest-restore-fails", "postcopy", "switchover"),
        *[("dest-resume-fails", mode, "commit") for mode in MODES],
    ],
)
def test_destination_fails_to_load_or_resume(pair: Pair, fault: str, mode: str, phase: str) -> None:
    pair.workload()
    incoming = pair.incoming(fault)
    incoming.wait_for("listening")
    out = run("migrate", "--control", pair.a, "--to", pair.listen, "--mode", mode, "--json")
    line = _failed_before_commit(out, phase)
    assert "injected" in line
    pair.source_intact()
    # incoming logged the failed attempt and goes on listening: a second migration works.
    incoming.wait_for("attempt-failed")
    assert os.path.exists(pair.listen)
    incoming.signal(signal.SIGTERM)
    assert incoming.finish() == 128 + signal.SIGTERM
    assert not os.path.exists(pair.listen) and not os.path.exists(pair.b)
    assert pagers() == []
    assert run("stop", "--control", pair.a).returncode == 0


def test_a_failed_attempt_is_followed_by_a_good_one(pair: Pair) -> None:
    workload = pair.workload()
    incoming = pair.incoming("dest-restore-fails")
    incoming.wait_for("listening")
    out = run("migrate", "--control", pair.a, "--to", pair.listen, "--mode", "precopy", "--json")
    _failed_before_commit(out, "switchover")
    incoming.signal(signal.SIGTERM)
    incoming.finish()
    good = pair.incoming()
    good.wait_for("listening")
    out = run("migrate", "--control", pair.a, "--to", pair.listen, "--mode", "precopy", "--json")
    assert out.returncode == 0, out.stderr
    assert workload.finish() == 0  # the guest left: the workload's host exits
    good.wait_for("running")
    assert run("verify", "--control", pair.b).returncode == 0
    assert run("stop", "--control", pair.b).returncode == 0
    assert good.finish() == 0


@pytest.mark.parametrize(
    ("fault", "mode", "phase"),
    [
        ("dest-stop-in-setup", "flip", "setup"),
        ("dest-stop-at-round-end", "precopy", "precopy"),
        ("dest-stop-before-prepared", "flip", "switchover"),
        ("dest-stop-before-prepared", "postcopy", "switchover"),
    ],
)
def test_cancel_while_the_destination_stalls(pair: Pair, fault: str, mode: str, phase: str) -> None:
    """A destination that stopped (not died): the source waits for it, and a cancel
    (pageflip cancel, or Ctrl-C of migrate) resumes the guest on the source."""
    pair.workload(rate="32M")
    incoming = pair.incoming(fault)
    incoming.wait_for("listening")
    migrate = Host("migrate", "--control", pair.a, "--to", pair.listen, "--mode", mode)
    pair.started.append(migrate)
    migrate.wait_for("setup") if phase != "setup" else None
    if phase == "switchover":
        migrate.wait_for("switchover")
    _wait_stopped(incoming.pid)
    out = run("cancel", "--control", pair.a)
    assert out.returncode == 0, out.stderr
    failed = migrate.wait_for("failed")
    assert failed["guest"] == "source" and failed["phase"] == phase, failed
    assert "cancelled" in failed["error"]
    assert migrate.finish() == 1
    pair.source_intact()
    incoming.end()
    assert run("stop", "--control", pair.a).returncode == 0


def test_ctrl_c_of_migrate_cancels(pair: Pair) -> None:
    pair.workload(size="32M", rate="32M")
    incoming = pair.incoming()
    incoming.wait_for("listening")
    migrate = Host(
        "migrate", "--control", pair.a, "--to", pair.listen, "--mode", "precopy",
        "--max-bandwidth", "4M",
    )  # fmt: skip
    pair.started.append(migrate)
    migrate.wait_for("progress")
    migrate.signal(signal.SIGINT)
    failed = migrate.wait_for("failed")
    assert failed["guest"] == "source" and "cancelled" in failed["error"], failed
    assert migrate.finish() == 128 + signal.SIGINT
    pair.source_intact()
    incoming.wait_for("attempt-failed")
    assert run("stop", "--control", pair.a).returncode == 0


def test_a_peer_that_is_not_a_destination_is_recognised(pair: Pair) -> None:
    pair.workload()
    silent = socket.socket(socket.AF_UNIX)
    silent.bind(pair.listen)
    silent.listen()
    try:
        out = run("migrate", "--control", pair.a, "--to", pair.listen, "--json")
        line = _failed_before_commit(out, "setup")
        assert "did not answer within 1 s" in line and "not a pageflip destination" in line
        out = run("migrate", "--control", pair.a, "--to", pair.a, "--json")  # a control socket
        line = _failed_before_commit(out, "setup")
        assert "not a pageflip destination" in line
    finally:
        silent.close()
    pair.source_intact()
    assert run("stop", "--control", pair.a).returncode == 0


def _wait_stopped(pid: int) -> None:
    """Until process ``pid`` is stopped (state T) by the fault it runs."""
    import time

    for _ in range(600):
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} did not stop")
