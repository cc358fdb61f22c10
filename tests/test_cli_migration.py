"""The migration commands, end to end: workload, incoming, migrate, status, verify, stop, demo."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

PAGEFLIP = [sys.executable, "-m", "pageflip"]


class Proc:
    """A pageflip host process that prints JSON lines."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [*PAGEFLIP, *args, "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def wait_for(self, event: str) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            message: dict[str, Any] = json.loads(line)
            if message.get("event") == event:
                return message
        raise AssertionError(f"exited ({self.proc.wait()}) before {event}: {self.stderr()}")

    def stderr(self) -> str:
        assert self.proc.stderr is not None
        return self.proc.stderr.read() if self.proc.poll() is not None else ""

    def finish(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            for stream in (self.proc.stdout, self.proc.stderr):
                if stream is not None:
                    stream.close()


def pageflip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PAGEFLIP, *args], capture_output=True, text=True, timeout=300, check=check
    )


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        if p.proc.poll() is None:
            p.proc.terminate()
        p.finish()


def test_workload_migrates_by_command_and_verifies(tmp_path: Path, procs: list[Proc]) -> None:
    a, b, listen = (str(tmp_path / n) for n in ("a.sock", "b.sock", "in.sock"))
    workload = Proc("workload", "--size", "16M", "--dirty-rate", "32M", "--control", a)
    procs.append(workload)
    ready = workload.wait_for("ready")
    assert ready["size"] == 16 << 20
    incoming = Proc("incoming", "--listen", listen, "--control", b)
    procs.append(incoming)
    incoming.wait_for("listening")

    status = json.loads(pageflip("status", "--control", a, "--json").stdout)
    assert status["status"]["kind"] == "workload" and status["pid"] == ready["pid"]

    out = pageflip("migrate", "--control", a, "--to", listen, "--mode", "precopy", "--json")
    events = [json.loads(line) for line in out.stdout.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "setup" and kinds[-1] == "done" and "round" in kinds
    assert events[-1]["digest"] == "verified"
    progress = [e["remaining_pages"] for e in events if e["event"] == "progress"]
    assert (
        progress == sorted(progress, reverse=True)
        or len({e["round"] for e in events if e["event"] == "progress"}) > 1
    )

    assert workload.finish() == 0  # the guest left: the workload host exits
    incoming.wait_for("running")
    report = json.loads(pageflip("verify", "--control", b, "--json").stdout)
    assert report["ok"] and report["pages_checked"] > 0
    pageflip("stop", "--control", b)
    assert incoming.finish() == 0
    assert not Path(a).exists() and not Path(b).exists() and not Path(listen).exists()


def test_migrate_to_nobody_fails_cleanly_and_the_guest_stays(
    tmp_path: Path, procs: list[Proc]
) -> None:
    a = str(tmp_path / "a.sock")
    workload = Proc("workload", "--size", "8M", "--dirty-rate", "8M", "--control", a)
    procs.append(workload)
    workload.wait_for("ready")
    out = pageflip("migrate", "--control", a, "--to", str(tmp_path / "nobody.sock"), check=False)
    assert out.returncode == 1
    # The live display says where it failed too; the command's error is its last line.
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("MigrationError: failed in phase setup: ")
    assert "nobody listens at" in last and "the guest runs on the source" in last
    assert "Traceback" not in out.stderr
    assert json.loads(pageflip("verify", "--control", a, "--json").stdout)["ok"]
    pageflip("stop", "--control", a)
    assert workload.finish() == 0


def test_a_precopy_that_cannot_converge_says_so(tmp_path: Path, procs: list[Proc]) -> None:
    """Writes faster than the rounds go: the display says, before the pause, that precopy
    cannot converge and that the forced pause is over the limit; --json says it in the
    switchover event and the report."""
    a, b, listen = (str(tmp_path / n) for n in ("a.sock", "b.sock", "in.sock"))
    workload = Proc("workload", "--size", "32M", "--dirty-rate", "256M", "--control", a)
    procs.append(workload)
    workload.wait_for("ready")
    incoming = Proc("incoming", "--listen", listen, "--control", b)
    procs.append(incoming)
    incoming.wait_for("listening")
    out = pageflip(
        *("migrate", "--control", a, "--to", listen, "--mode", "precopy"),
        *("--max-bandwidth", "64M"),
    )
    said = " ".join(out.stderr.split())  # the display wraps long lines
    assert "precopy cannot converge: round 2 sent" in said, out.stderr
    assert "switching over anyway, with an expected pause of" in said
    assert "OVER the 300 ms downtime limit" in said
    assert workload.finish() == 0
    incoming.wait_for("running")

    # Back the other way, as JSON lines.
    workload = Proc("incoming", "--listen", listen + "2", "--control", a)
    procs.append(workload)
    workload.wait_for("listening")
    out = pageflip(
        *("migrate", "--control", b, "--to", listen + "2", "--mode", "precopy"),
        *("--max-bandwidth", "64M", "--json"),
    )
    events = [json.loads(line) for line in out.stdout.splitlines()]
    (switch,) = [e for e in events if e["event"] == "switchover"]
    assert switch["reason"] == "forced" and switch["why"].startswith("precopy cannot converge")
    assert events[-1]["details"]["no_convergence"] == switch["why"]
    assert incoming.finish() == 0
    workload.wait_for("running")
    pageflip("stop", "--control", a)
    assert workload.finish() == 0


def test_bad_durations_and_modes_are_usage_errors(tmp_path: Path) -> None:
    out = pageflip("migrate", "--to", "x", "--downtime-limit", "soon", check=False)
    assert out.returncode == 2 and "not a duration" in out.stderr
    out = pageflip("migrate", "--to", "x", "--mode", "teleport", check=False)
    assert out.returncode == 2
    out = pageflip("status", "--control", str(tmp_path / "none.sock"), check=False)
    assert out.returncode != 0


def test_demo_migrates_by_flip_then_precopy() -> None:
    out = pageflip("demo", "--size", "16M", "--dirty-rate", "16M")
    text = out.stdout
    assert "flip: a -> b" in text and "precopy: b -> c" in text
    assert text.count("guest's own check: verified") == 2
    assert "both migrations, side by side" in text
    # then the live update of the example service, under load
    assert text.count("upgraded: pid") == 2, text
    assert "live update under load" in text and "2 of 2" in text
