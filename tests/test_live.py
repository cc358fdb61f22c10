"""pageflip.live with real processes: tests/live_app.py serves a line protocol on 127.0.0.1
and is upgraded by `pageflip upgrade`, by SIGHUP, under load, into bad new versions."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "tests" / "live_app.py"
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
for _name in ("PAGEFLIP_LIVE_FD", "PAGEFLIP_LIVE_STDERR", "NOTIFY_SOCKET", "LISTEN_PID"):
    ENV.pop(_name, None)


class App:
    """A running live_app.py and its successors (all writing to the same files)."""

    def __init__(self, tmp: Path, env: dict[str, str] | None = None, **spawn: Any) -> None:
        self.tmp = tmp
        self.control = str(tmp / "app.sock")
        self.mode_file = tmp / "mode"
        self.out = tmp / "out.txt"
        self.err = tmp / "err.txt"
        argv = spawn.pop("argv", None) or [
            sys.executable,
            str(APP),
            "--control",
            self.control,
            "--mode-file",
            str(self.mode_file),
        ]
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.first = subprocess.Popen(
                argv, stdout=out, stderr=err, env=env or ENV, stdin=subprocess.DEVNULL, **spawn
            )
        self.seen = 0
        ready = self.wait_ready()
        self.port = ready["port"]
        self.pids = [ready["ready"]]

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.out.read_text().splitlines() if line]

    def wait_ready(self, timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self.lines()
            if len(lines) > self.seen:
                self.seen += 1
                return lines[self.seen - 1]
            if self.seen == 0 and self.first.poll() is not None:
                raise AssertionError(f"the app exited: {self.err.read_text()}")
            time.sleep(0.02)
        raise AssertionError(f"no ready line in {timeout} s: {self.err.read_text()}")

    def ask(self, line: str) -> str:
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.sendall(line.encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        return data.decode().strip()

    def info(self) -> dict[str, Any]:
        return dict(json.loads(self.ask("INFO")))

    def upgrade(self, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pageflip", "upgrade", "--control", self.control, *extra],
            env=ENV,
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def set_mode(self, mode: str) -> None:
        self.mode_file.write_text(mode)

    def ours(self) -> list[int]:
        """Every process running live_app.py with our mode file."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
                if str(self.mode_file).encode() in cmdline and b"live_app.py" in cmdline:
                    state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
                    if state != "Z":
                        found.append(int(entry))
        return found

    def only(self, pid: int, timeout: float = 10.0) -> bool:
        """Whether ``pid`` is (soon) the only process of ours: the old one exits on its own."""
        deadline = time.monotonic() + timeout
        while self.ours() != [pid] and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.ours() == [pid]

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.ask("QUIT")
        deadline = time.monotonic() + 10
        while self.ours() and time.monotonic() < deadline:
            time.sleep(0.02)
        for pid in self.ours():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.first.wait(10)


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    a = App(tmp_path)
    try:
        yield a
    finally:
        a.stop()


def test_fresh_then_takeover_moves_memory_listener_and_state(app: App) -> None:
    before = app.info()
    assert before["fresh"] and before["generation"] == 1 and not before["inherited"]
    assert before["head"] == "gen1-data"
    done = app.upgrade()
    assert done.returncode == 0, done.stderr
    assert "upgraded: pid" in done.stderr
    ready = app.wait_ready()
    assert ready["generation"] == 2 and ready["ready"] != before["pid"]
    after = app.info()
    assert after["pid"] == ready["ready"] and not after["fresh"] and after["inherited"]
    assert after["head"] == "gen1-data" and after["checksum"] == before["checksum"]
    assert after["region_inode"] == before["region_inode"]  # the same memfd: moved
    assert after["listener_inode"] == before["listener_inode"]  # the same kernel socket
    assert after["port"] == before["port"]
    assert after["state"] == {"counter": 1, "from": before["pid"]}
    assert not after["state_lost"]
    assert app.only(after["pid"])
    # The new version writes its region once ready (read-only before).
    assert app.ask("WRITE gen2-data") == "ok"
    assert app.info()["head"] == "gen2-data"


def test_upgrade_json(app: App) -> None:
    done = app.upgrade("--json", "--timeout", "20s")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    new = app.wait_ready()
    assert report["ok"] and report["generation"] == 2 and report["new_pid"] == new["ready"]
    assert report["old_pid"] == app.pids[0]
    assert report["regions"] == [{"name": "index", "bytes": 64 << 10, "moved": True}]
    assert [item["name"] for item in report["listeners"]] == ["tcp"]
    assert report["state_bytes"] > 0 and report["pause"] >= 0 and report["total"] > 0


def test_sighup_upgrades(app: App) -> None:
    os.kill(app.pids[0], signal.SIGHUP)
    ready = app.wait_ready()
    assert ready["generation"] == 2
    assert app.info()["state"]["counter"] == 1


def test_upgrade_under_load_fails_no_request(app: App) -> None:
    failures: list[str] = []
    answers: set[str] = set()
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            try:
                answer = app.ask("GET")
                if not answer.startswith("v"):
                    failures.append(f"answer {answer!r}")
                answers.add(answer)
            except OSError as err:
                failures.append(repr(err))

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for _ in range(3):
            done = app.upgrade()
            assert done.returncode == 0, done.stderr
            app.wait_ready()
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures, failures[:5]
    assert {a.split()[0] for a in answers} >= {"v1", "v4"}


def test_the_new_version_accepts_while_the_old_one_drains(app: App) -> None:
    """The old version stops accepting, the new one accepts at once; a request in flight in
    the old one finishes there meanwhile, and only then does its state come over. The
    service's pause does not hold that drain."""
    held: list[str] = []
    release = app.tmp / "release"
    asking = threading.Thread(target=lambda: held.append(app.ask(f"HOLD {release}")))
    asking.start()
    upgrading: list[subprocess.CompletedProcess[str]] = []
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(f"{release}.held"):  # the old version is inside HOLD
            assert time.monotonic() < deadline, "the old version never got the request"
            time.sleep(0.01)
        upgrader = threading.Thread(target=lambda: upgrading.append(app.upgrade("--json")))
        upgrader.start()
        try:
            answer = ""
            deadline = time.monotonic() + 30
            while not answer.startswith("v2") and time.monotonic() < deadline:
                answer = app.ask("GET")
            assert answer.startswith("v2")  # the new version answers ...
            assert not held  # ... while the old one still works on the held request
        finally:
            release.touch()
            upgrader.join()
    finally:
        release.touch()
        asking.join()
    assert held == [f"held v1 {app.pids[0]}"]  # finished by the old version
    report = json.loads(upgrading[0].stdout)
    assert report["ok"], report  # the drain outlasted the new version's first answer
    ready = app.wait_ready()
    assert ready["generation"] == 2
    assert app.info()["state"] == {"counter": 1, "from": app.pids[0]}  # after the drain


@pytest.mark.parametrize("how", ["plain-hooks", "no-accept"])
def test_hooks_without_early_accept(tmp_path: Path, how: str) -> None:
    """on_stop alone (the old version), take_over without accept (the new one): the new
    version accepts once it has the state, and the report's pause holds the drain."""
    argv = [sys.executable, str(APP), "--control", str(tmp_path / "app.sock")]
    argv += ["--mode-file", str(tmp_path / "mode")]
    if how == "plain-hooks":
        argv.append("--plain-hooks")
    a = App(tmp_path, argv=argv)
    try:
        a.set_mode("no-accept" if how == "no-accept" else "")
        slow: list[str] = []
        asking = threading.Thread(target=lambda: slow.append(a.ask("SLOW 4")))
        asking.start()
        time.sleep(0.3)
        done = a.upgrade("--json")
        asking.join()
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["ok"] and report["pause"] > 1.0, report  # the drain is in it
        assert slow == [f"slow v1 {a.pids[0]}"]
        assert a.wait_ready()["generation"] == 2
        assert a.info()["state"]["counter"] == 1
    finally:
        a.stop()


def test_listener_addresses_match() -> None:
    from pageflip.live.upgrader import _same_place, _spell

    def spell(address: Any) -> str:
        from pageflip.live.upgrader import _parse

        return _spell(*_parse(address))

    old = {"address": "127.0.0.1:41235", "asked": spell(("127.0.0.1", 0))}
    assert _same_place(spell(("127.0.0.1", 0)), old)  # what the old one asked
    assert _same_place(spell(("127.0.0.1", 41235)), old)  # where it is
    assert not _same_place(spell(("127.0.0.1", 41236)), old)
    assert not _same_place(spell(("127.0.0.2", 0)), old)
    assert not _same_place(spell("unix:/run/x.sock"), old)
    # Asked for a name, bound to an address: either matches; port 0 matches any.
    named = {"address": "127.0.0.1:8000", "asked": spell(("LocalHost", 8000))}
    assert _same_place(spell(("localhost", 8000)), named)
    assert _same_place(spell(("127.0.0.1", 0)), named)
    assert not _same_place(spell(("localhost", 8001)), named)
    v6 = {"address": "[::1]:8000", "asked": None}  # an old version that did not say
    assert _same_place(spell(("0:0::1", 8000)), v6) and _same_place(spell(("::1", 0)), v6)
    assert not _same_place(spell(("::", 8000)), v6)
    unix = {"address": "unix:run/x.sock", "asked": None}
    assert _same_place(spell(f"unix:{os.getcwd()}/run/x.sock"), unix)
    assert _same_place(spell("unix:./run/x.sock"), unix)
    assert not _same_place(spell("unix:run/y.sock"), unix)
    abstract = {"address": "unix:@svc", "asked": spell("unix:@svc")}
    assert _same_place(spell("unix:@svc"), abstract)
    assert not _same_place(spell("unix:@other"), abstract)


# What a bad new version does (MODES) and what the old one's report must say.
MODES = {
    "crash-import": "exited with status 1",
    "raise": "simulated start-up failure",
    "never-ready": "did not become ready within 3 s",
    "bad-size": "is 65536 bytes in the old version, the new one asks for 131072",
    "bad-listener": "the old version has no listener 'admin'",
    "other-address": "in the old version, the new one asks for 127.0.0.1:1",
    "big-state": "over the limit of 4096 bytes",
    "serves-never-ready": "did not become ready within 3 s",
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_failed_upgrade_rolls_back(app: App, mode: str) -> None:
    assert app.ask("WRITE kept") == "ok"
    before = app.info()
    app.set_mode(mode)
    done = app.upgrade("--timeout", "3s")
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("UpgradeFailed: ") and MODES[mode] in last, done.stderr
    if mode == "crash-import":
        assert "new version: ImportError: simulated import failure" in done.stderr
    # The old version serves on, its memory and listener as they were.
    after = app.info()
    assert after["pid"] == before["pid"] and after["generation"] == 1
    assert after["checksum"] == before["checksum"] and after["head"] == "kept-data"
    assert after["listener_inode"] == before["listener_inode"]
    assert app.only(before["pid"])
    # ... and a good new version still takes over from it.
    app.set_mode("")
    assert app.upgrade().returncode == 0
    assert app.wait_ready()["generation"] == 2
    assert app.info()["head"] == "kept-data"


def test_a_second_upgrade_is_refused_while_one_runs(app: App) -> None:
    app.set_mode("never-ready")
    first = subprocess.Popen(
        [sys.executable, "-m", "pageflip", "upgrade", "--control", app.control, "--timeout", "5s"],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 10
        while len(app.ours()) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        second = app.upgrade("--timeout", "5s")
        assert second.returncode == 1
        assert "UpgradeRunning: an upgrade is already running (pid" in second.stderr
        sighup_answer = app.info()  # SIGHUP meanwhile is refused too: the old one serves
        assert sighup_answer["generation"] == 1
    finally:
        _, err = first.communicate(timeout=30)
    assert first.returncode == 1 and "did not become ready" in err


def test_an_upgrade_aimed_at_the_wrong_kind_of_socket_is_one_line(app: App) -> None:
    """`pageflip upgrade` on a guest's control socket, on a directory or on nothing, and
    `pageflip vm upgrade` on a live service's socket: one line each, nothing upgraded."""
    from pageflip.migration import GuestHost

    guest_sock = str(app.tmp / "guest.sock")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pageflip", *args],
            env=ENV,
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )

    (app.tmp / "adir").mkdir()
    with GuestHost(None, guest_sock, status=lambda: {"filling": True}, outcome="filling"):
        cases = {
            "guest": (run("upgrade", "--control", guest_sock), "is a guest's control socket"),
            "dir": (run("upgrade", "--control", str(app.tmp / "adir")), "is a directory"),
            "none": (
                run("upgrade", "--control", str(app.tmp / "none.sock")),
                "no live service at",
            ),
            "vm": (run("vm", "upgrade", "--control", app.control), "not a VM's control socket"),
        }
    for name, (done, text) in cases.items():
        assert done.returncode == 1, (name, done.stderr)
        assert done.stderr.count("\n") == 1 and text in done.stderr, (name, done.stderr)
        assert "Traceback" not in done.stderr
    info = app.info()
    assert info["generation"] == 1 and app.ours() == [info["pid"]]


def test_old_killed_during_handover_new_takes_over_without_state(app: App) -> None:
    before = app.info()
    app.set_mode("kill-old")
    done = app.upgrade()
    assert done.returncode == 1  # the old one died mid-request: the CLI cannot hear it
    ready = app.wait_ready()
    after = app.info()
    assert after["pid"] == ready["ready"] and after["generation"] == 2
    assert after["state_lost"] and after["state"] == {}
    assert after["checksum"] == before["checksum"]
    assert after["listener_inode"] == before["listener_inode"]
    assert "state is lost" in app.err.read_text()


def test_fifty_upgrades_leak_nothing(tmp_path: Path) -> None:
    """50 upgrades in a row of a 4 MiB region: no fd, mapping, process or socket file is
    left behind. Most are SIGHUPs (no `pageflip upgrade` interpreter to start), one in ten
    goes through the control socket."""
    argv = [sys.executable, str(APP), "--control", str(tmp_path / "app.sock")]
    argv += ["--mode-file", str(tmp_path / "mode"), "--size", str(4 << 20)]
    a = App(tmp_path, argv=argv)
    try:
        info = first = a.info()
        fds, maps = [], []
        for n in range(2, 52):
            if n % 10 == 0:
                done = a.upgrade()
                assert done.returncode == 0, done.stderr
            else:
                os.kill(info["pid"], signal.SIGHUP)
            assert a.wait_ready()["generation"] == n
            info = a.info()
            fds.append(info["fds"])
            maps.append(info["memfd_maps"])
            assert a.only(info["pid"])
            assert sorted(os.listdir(tmp_path)) == ["app.sock", "err.txt", "out.txt"]
        assert len(set(fds[1:])) == 1, fds
        assert set(maps) == {1}, maps
        assert info["state"]["counter"] == 50
        assert info["checksum"] == first["checksum"] and info["inherited"]  # the same pages
    finally:
        a.stop()
    assert not a.ours()
    assert sorted(os.listdir(tmp_path)) == ["err.txt", "out.txt"]


def test_unix_listener_is_handed_over_and_removed_at_the_end(tmp_path: Path) -> None:
    path = tmp_path / "svc.sock"
    argv = [sys.executable, str(APP), "--control", str(tmp_path / "app.sock")]
    argv += ["--mode-file", str(tmp_path / "mode"), "--unix", str(path)]
    a = App(tmp_path, argv=argv)
    try:
        inode = path.stat().st_ino
        assert a.upgrade().returncode == 0
        assert a.wait_ready()["unix"]
        assert path.stat().st_ino == inode
    finally:
        a.stop()
    assert not path.exists() and not (tmp_path / "app.sock").exists()


def test_systemd_socket_and_notify(tmp_path: Path) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        notify.bind(str(tmp_path / "notify.sock"))
        notify.settimeout(20)
        env = {**ENV, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "LISTEN_FDS": "1"}
        env["LISTEN_FDNAMES"] = "tcp"
        fd = listener.fileno()
        # The wrapper puts the socket at fd 3 and sets LISTEN_PID to its own pid, which exec
        # keeps (as systemd does for the service's main process).
        wrapper = (
            f"import os, sys; os.dup2({fd}, 3); os.close({fd}); "
            "os.environ['LISTEN_PID'] = str(os.getpid()); os.execv(sys.argv[1], sys.argv[1:])"
        )
        argv = [sys.executable, "-c", wrapper, sys.executable, str(APP)]
        argv += ["--control", str(tmp_path / "app.sock"), "--mode-file", str(tmp_path / "m")]
        a = App(tmp_path, env=env, argv=argv, pass_fds=(fd,))
        try:
            assert a.port == listener.getsockname()[1]
            info = a.info()
            assert info["listener_inode"] == os.fstat(fd).st_ino
            assert notify.recv(4096) == b"READY=1"
            assert a.upgrade().returncode == 0
            new = a.wait_ready()["ready"]
            assert notify.recv(4096).decode().split("\n") == [f"MAINPID={new}", "READY=1"]
            assert a.info()["listener_inode"] == os.fstat(fd).st_ino
        finally:
            a.stop()
    finally:
        listener.close()
        notify.close()
