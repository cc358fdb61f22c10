"""Every failure of the command line, through the real console script: one line on stderr,
``Type: message`` naming what to fix, the documented exit status, no traceback, and nothing
left behind (socket files, processes, memfds).

Each process is started in a session of its own, so that "nothing left behind" is checked
for everything it started too (a pager, say): once it has exited, no process may remain in
its session, so none holds its memfds. Hosts (workload, incoming) are ended by PID when the
test ends, also when it fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import cli_procs
from cli_procs import INJECT, PAGEFLIP, hosts

_ = hosts  # the fixture

#: Longest any one command or event is waited for: a bound, never a measurement.
WAIT = 120.0


# -- processes ------------------------------------------------------------------------------


def _session_members(sid: int) -> list[int]:
    """Live processes (not zombies) in session ``sid``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        # After the command: state, ppid, pgrp, session.
        if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
            found.append(int(name))
    return found


def _memfd_holders(pids: list[int]) -> list[int]:
    """Which of ``pids`` map a pageflip memfd."""
    holders = []
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/maps") as f:
            if "/memfd:pageflip" in f.read():
                holders.append(pid)
    return holders


def assert_nothing_left(pid: int) -> None:
    """The process ``pid`` (a session leader) has exited and left nothing running: no
    process in its session, so no pageflip memfd mapped there either."""
    deadline = time.monotonic() + 10
    while (left := _session_members(pid)) and time.monotonic() < deadline:
        time.sleep(0.05)  # a child that is exiting
    assert not _memfd_holders(left), f"pageflip memfds still mapped by {left}"
    assert not left, f"processes left behind by {pid}: {left}"


class Result:
    """A finished one-shot command."""

    def __init__(self, args: tuple[str, ...], returncode: int, stdout: str, stderr: str) -> None:
        self.args = args
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr

    def line(self, kind: str, *names: str) -> str:
        """The one line on stderr: ``kind: ...``, naming each of ``names``."""
        assert "Traceback" not in self.stderr, self.stderr
        lines = self.stderr.splitlines()
        assert len(lines) == 1, f"pageflip {' '.join(self.args)}: {self.stderr!r}"
        line = lines[0]
        assert line.startswith(f"{kind}: "), line
        for name in names:
            assert name in line, f"{name!r} not in {line!r}"
        return line


class Command:
    """A one-shot pageflip command started now; :meth:`result` waits for it."""

    def __init__(self, *args: str, faults: str = "") -> None:
        self.args = args
        self.proc = subprocess.Popen(
            [*(INJECT if faults else PAGEFLIP), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            env=_with_faults(faults),
        )

    def result(self) -> Result:
        try:
            out, err = self.proc.communicate(timeout=WAIT)
            assert_nothing_left(self.proc.pid)
        finally:
            _end(self.proc)
        return Result(self.args, self.proc.returncode, out, err)


def run(*args: str, faults: str = "") -> Result:
    return Command(*args, faults=faults).result()


def _with_faults(faults: str) -> dict[str, str] | None:
    """The environment that injects ``faults`` (None: this one, when there are none)."""
    return {**os.environ, "PAGEFLIP_TEST_FAULTS": faults} if faults else None


def run_all(*commands: tuple[str, ...]) -> list[Result]:
    """Run commands side by side (those that wait for a socket wait together)."""
    started = []
    try:
        for args in commands:
            started.append(Command(*args))
    except BaseException:
        for command in started:
            _end(command.proc)
        raise
    results = []
    for command in started:
        results.append(command.result())
    return results


def _kill_session(proc: subprocess.Popen[Any]) -> None:
    """Kill ``proc`` and what it started (its process group, whose id is its PID: Linux
    gives no new process that id while the group has members)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGCONT)
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _end(proc: subprocess.Popen[Any]) -> None:
    """Kill ``proc`` and what it started, and close its pipes."""
    _kill_session(proc)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


class Host(cli_procs.Host):
    """A host (tests/cli_procs.py) in a session of its own, its stderr in a file of
    ``tmp_path``: it must leave nothing behind, and its failure reads as a :class:`Result`."""

    def __init__(self, tmp_path: Path, *args: str, as_json: bool = True, faults: str = "") -> None:
        self.args = args
        stderr = tmp_path / f"host-{len(list(tmp_path.glob('host-*')))}.err"
        super().__init__(*args, faults=faults, stderr_to=stderr, as_json=as_json, new_session=True)

    def finish(self, timeout: float = WAIT) -> int:
        """Wait for it to exit; its exit status. Its remaining events join ``events``."""
        self.proc.wait(timeout)
        assert_nothing_left(self.pid)
        return super().finish(timeout)

    def result(self, status: int) -> Result:
        return Result(self.args, status, "", self.stderr())

    def end(self) -> None:
        """Kill it and whatever it started."""
        _kill_session(self.proc)
        super().end()


def workload(
    tmp_path: Path, hosts: list[Host], control: Path, *extra: str, faults: str = ""
) -> Host:
    host = Host(
        tmp_path,
        "workload",
        "--size",
        "8M",
        "--dirty-rate",
        "8M",
        "--control",
        str(control),
        *extra,
        faults=faults,
    )
    hosts.append(host)
    host.wait_for("ready")
    return host


def incoming(tmp_path: Path, hosts: list[Host], listen: str, control: Path) -> Host:
    host = Host(tmp_path, "incoming", "--listen", listen, "--control", str(control))
    hosts.append(host)
    host.wait_for("listening")
    return host


def status(control: Path) -> dict[str, Any]:
    out = run("status", "--control", str(control), "--json")
    assert out.returncode == 0, out.stderr
    answer: dict[str, Any] = json.loads(out.stdout)
    return answer


def stop(host: Host, control: Path) -> None:
    """Stop a host by command; it exits 0 and removes its socket file."""
    out = run("stop", "--control", str(control))
    assert out.returncode == 0, out.stderr
    assert host.finish() == 0, host.stderr()
    assert not control.exists()


@contextlib.contextmanager
def stale_socket(path: Path) -> Iterator[int]:
    """A socket file left by a killed process (it listened there, then got SIGKILL); yields
    its inode."""
    code = (
        "import socket, sys, time\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "s.bind(sys.argv[1]); s.listen()\n"
        "print('bound', flush=True); time.sleep(600)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "bound\n"
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    with socket.socket(socket.AF_UNIX) as probe, pytest.raises(ConnectionRefusedError):
        probe.connect(str(path))  # the file is there, nobody listens
    yield path.stat().st_ino


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _socket_fds(pid: int) -> int:
    count = 0
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return count


def _peak_rss(proc: subprocess.Popen[Any]) -> int:
    """Wait for ``proc`` to exit (reaping it here, for its resource usage): the most memory
    it ever held, in bytes."""
    deadline = time.monotonic() + WAIT
    while True:
        pid, wait_status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(wait_status)
            return usage.ru_maxrss << 10  # KiB
        assert time.monotonic() < deadline, f"pid {proc.pid} did not exit"
        time.sleep(0.05)


def _wait_until(condition: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"not within {WAIT} s: {what}"
        time.sleep(0.005)


# -- control sockets ------------------------------------------------------------------------

CONTROL_COMMANDS = {
    "status": ("status",),
    "verify": ("verify",),
    "stop": ("stop",),
    "cancel": ("cancel",),
    "migrate": ("migrate", "--to", "@pageflip-test-nowhere", "--json"),
}


@pytest.mark.parametrize("command", sorted(CONTROL_COMMANDS))
def test_a_missing_or_stale_control_socket_is_named(command: str, tmp_path: Path) -> None:
    """No guest at --control: the path named, what to start there; a stale socket file
    (its process was killed) said so, and left as it was."""
    missing, stale = tmp_path / "missing.sock", tmp_path / "stale.sock"
    args = CONTROL_COMMANDS[command]
    with stale_socket(stale) as inode:
        gone, dead = run_all((*args, "--control", str(missing)), (*args, "--control", str(stale)))
        assert stale.stat().st_ino == inode
    assert gone.returncode == 1
    gone.line(
        "FileNotFoundError",
        f"no guest at {missing}",
        "there is no such socket",
        f"pageflip workload --control {missing}",
    )
    assert dead.returncode == 1
    dead.line("ConnectionRefusedError", f"no guest at {stale}", "stale socket file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stale.sock"]


@pytest.mark.parametrize("kind", ["a regular file", "a directory"])
def test_a_control_path_that_is_not_a_socket_is_named(kind: str, tmp_path: Path) -> None:
    path = tmp_path / "thing"
    if kind == "a directory":
        path.mkdir()
    else:
        path.write_text("not a socket")
    out = run("status", "--control", str(path))
    assert out.returncode == 1
    out.line("OSError", f"{path} is {kind}, not a socket", "--control")
    assert path.exists()


def test_control_commands_aimed_at_a_listen_socket_say_so(
    tmp_path: Path, hosts: list[Host]
) -> None:
    """status, verify, stop and migrate at incoming's --listen socket: it is named as a
    migration listener; incoming logs the stray attempts and goes on listening."""
    listen, control = tmp_path / "in.sock", tmp_path / "b.sock"
    dest = incoming(tmp_path, hosts, str(listen), control)
    for args in (("status",), ("verify",), ("stop",), ("migrate", "--to", "@nowhere")):
        out = run(*args, "--control", str(listen))
        assert out.returncode == 1, out.stderr
        out.line("LocalProtocolError", f"{listen} is a migration listener", "--control")
    assert status(control)["host"] == "incoming"
    stop(dest, control)
    assert [e["event"] for e in dest.events].count("attempt-failed") >= 4
    assert not listen.exists()


# -- hosts that cannot start ----------------------------------------------------------------


def test_a_second_workload_on_a_live_control_path_is_refused_before_it_fills(
    tmp_path: Path, hosts: list[Host]
) -> None:
    control = tmp_path / "a.sock"
    first = workload(tmp_path, hosts, control)
    inode = control.stat().st_ino
    second = Host(
        tmp_path, "workload", "--size", "1G", "--dirty-rate", "0", "--control", str(control)
    )
    hosts.append(second)
    # Refused before its memory was filled: it never grew anywhere near 1 GiB.
    assert _peak_rss(second.proc) < 256 << 20
    assert second.finish() == 1
    second.result(1).line("FileExistsError", f"{control} is in use", "a live process listens")
    assert control.stat().st_ino == inode
    assert status(control)["pid"] == first.pid
    stop(first, control)


def test_a_size_beyond_the_memory_available_is_refused_up_front(tmp_path: Path) -> None:
    with open("/proc/meminfo") as f:
        total = next(int(line.split()[1]) << 10 for line in f if line.startswith("MemTotal:"))
    gib = total // (1 << 30) + 2
    control = tmp_path / "a.sock"
    out = run("workload", "--size", f"{gib}G", "--control", str(control), "--json")
    assert out.returncode == 1
    line = out.line("SpanError", f"--size {gib}G is more than this host can hold", "available")
    assert "GiB" in line.partition("available")[0]  # the figure it has
    assert out.stdout == "" and not control.exists()


@pytest.mark.parametrize("kind", ["in use", "not this host's", "unresolvable"])
def test_a_listen_address_that_cannot_be_had_is_named(kind: str, tmp_path: Path) -> None:
    control = tmp_path / "b.sock"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        address, words, extra = {
            "in use": (f"tcp:127.0.0.1:{port}", "the port is in use", []),
            "not this host's": (
                "tcp:192.0.2.1:7000",
                "192.0.2.1 is not an address",
                ["--insecure"],
            ),
            "unresolvable": (
                "tcp:nonexistent.invalid:7000",
                "cannot resolve 'nonexistent.invalid'",
                ["--insecure"],
            ),
        }[kind]
        out = run("incoming", "--listen", address, "--control", str(control), *extra)
    assert out.returncode == 1
    out.line("OSError", address if kind != "unresolvable" else "nonexistent.invalid", words)
    assert list(tmp_path.iterdir()) == []


def test_listening_beyond_loopback_without_authentication_is_refused(tmp_path: Path) -> None:
    out = run("incoming", "--listen", "tcp:0.0.0.0:0", "--control", str(tmp_path / "b.sock"))
    assert out.returncode == 1
    out.line("PeerRejected", "refusing to listen on tcp:0.0.0.0:0", "--key-file", "--insecure")
    assert list(tmp_path.iterdir()) == []


USAGE_ERRORS = {
    "port out of range (--listen)": (
        ("incoming", "--listen", "tcp:127.0.0.1:65536"),
        ["'--listen'", "port 65536 is out of range"],
    ),
    "port out of range (--to)": (
        ("migrate", "--to", "tcp:127.0.0.1:99999"),
        ["'--to'", "port 99999 is out of range"],
    ),
    "port not a number": (
        ("migrate", "--to", "tcp:localhost:http"),
        ["'--to'", "must be a number"],
    ),
    "unknown mode": (("migrate", "--to", "@x", "--mode", "teleport"), ["'--mode'", "'teleport'"]),
    "timeout 0": (("migrate", "--to", "@x", "--timeout", "0"), ["'--timeout'", "positive"]),
    "timeout soon": (
        ("incoming", "--listen", "@x", "--timeout", "soon"),
        ["'--timeout'", "'soon'"],
    ),
    "no destination": (("migrate",), ["--to", "--resume"]),
    "size not a size": (("workload", "--size", "8X"), ["'--size'", "'8X'"]),
    "negative dirty rate": (("workload", "--dirty-rate", "-1M"), ["'--dirty-rate'", "'-1M'"]),
    "listen is control": (
        ("incoming", "--listen", "SAME", "--control", "SAME"),
        ["--listen and --control"],
    ),
}


@pytest.mark.parametrize("case", sorted(USAGE_ERRORS))
def test_usage_errors_are_one_line_and_exit_2(case: str, tmp_path: Path) -> None:
    args, names = USAGE_ERRORS[case]
    args = tuple(str(tmp_path / "same.sock") if a == "SAME" else a for a in args)
    if "--control" not in args:
        args = (*args, "--control", str(tmp_path / "a.sock"))
    out = run(*args)
    assert out.returncode == 2
    out.line("UsageError", *names, "--help")
    assert list(tmp_path.iterdir()) == []


# -- the workload's rates -------------------------------------------------------------------


@pytest.mark.parametrize("as_json", [True, False], ids=["json", "text"])
def test_a_dirty_rate_beyond_the_guest_warns_with_the_rate_it_reaches(
    as_json: bool, tmp_path: Path, hosts: list[Host]
) -> None:
    control = tmp_path / "a.sock"
    host = Host(
        tmp_path,
        "workload",
        "--size",
        "8M",
        "--dirty-rate",
        "1T",
        "--control",
        str(control),
        as_json=as_json,
    )
    hosts.append(host)
    if as_json:
        host.wait_for("ready")
        warning = host.wait_for("warning")
        assert warning["dirty_rate"] == 1 << 40
        assert 0 < warning["write_rate"] < 1 << 40
    else:
        _wait_until(lambda: "reaches" in host.stderr(), "the warning")
        text = " ".join(host.stderr().split())
        assert re.search(
            r"warning: --dirty-rate \S+ \S+/s is more than this guest can write here: "
            r"it reaches [0-9.]+ [KMG]iB/s",
            text,
        ), text
    out = run("stop", "--control", str(control))
    assert out.returncode == 0, out.stderr
    assert host.finish() == 0
    assert not control.exists()


def test_dirty_rate_0_is_an_idle_guest(tmp_path: Path, hosts: list[Host]) -> None:
    control = tmp_path / "a.sock"
    host = workload(tmp_path, hosts, control, "--dirty-rate", "0")
    answer = status(control)["status"]
    assert answer["dirty_rate"] == 0 and answer["total_writes"] == 0
    out = run("verify", "--control", str(control), "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["ok"]
    assert status(control)["status"]["total_writes"] == 0
    stop(host, control)
    assert "warning" not in [e["event"] for e in host.events]


# -- signals --------------------------------------------------------------------------------


def _stopped_while_filling(tmp_path: Path, hosts: list[Host], control: Path) -> Host:
    """A 512 MiB workload stopped (SIGSTOP) a moment after it bound its control socket:
    its fill had just begun."""
    host = Host(
        tmp_path, "workload", "--size", "512M", "--dirty-rate", "0", "--control", str(control)
    )
    hosts.append(host)
    _wait_until(lambda: control.exists() or host.proc.poll() is not None, "the control socket")
    os.kill(host.pid, signal.SIGSTOP)
    assert host.proc.poll() is None, host.stderr()
    return host


def test_status_of_a_filling_workload_says_filling(tmp_path: Path, hosts: list[Host]) -> None:
    control = tmp_path / "a.sock"
    host = _stopped_while_filling(tmp_path, hosts, control)
    asking = Command("status", "--control", str(control), "--json")
    try:
        _wait_until(
            lambda: _socket_fds(asking.proc.pid) > 0 or asking.proc.poll() is not None,
            "status to connect",
        )
    finally:
        os.kill(host.pid, signal.SIGCONT)
    out = asking.result()
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["host"] == "filling" and answer["pid"] == host.pid
    assert answer["status"]["state"] == "filling"
    assert 0 <= answer["status"]["filled"] < answer["status"]["size"] == 512 << 20
    host.wait_for("ready")
    stop(host, control)


def test_sigterm_while_filling_removes_the_control_socket(
    tmp_path: Path, hosts: list[Host]
) -> None:
    control = tmp_path / "a.sock"
    host = _stopped_while_filling(tmp_path, hosts, control)
    os.kill(host.pid, signal.SIGTERM)
    os.kill(host.pid, signal.SIGCONT)
    assert host.finish() == 143
    assert host.events == []  # never ready: the fill was interrupted
    host.result(143).line("Interrupted", "SIGTERM")
    assert not control.exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_incoming_removes_its_socket_files_on_a_signal(
    signum: signal.Signals, tmp_path: Path, hosts: list[Host]
) -> None:
    listen, control = tmp_path / "in.sock", tmp_path / "b.sock"
    dest = incoming(tmp_path, hosts, str(listen), control)
    assert listen.exists() and control.exists()
    os.kill(dest.pid, signum)
    assert dest.finish() == 128 + signum
    dest.result(128 + signum).line("Interrupted", signum.name)
    assert list(tmp_path.iterdir()) == [tmp_path / "host-0.err"]


@pytest.mark.parametrize("delay", [0.05, 0.15, 0.3, 0.6])
def test_ctrl_c_while_the_command_starts_is_one_line(delay: float, tmp_path: Path) -> None:
    """A Ctrl-C while the installed `pageflip` script still imports numpy, click and rich
    (the first ~0.4 s), or just after: "Interrupted: SIGINT", exit 130, no traceback, no
    socket file left. Through the console script itself (not python -m)."""
    script = Path(sys.executable).with_name("pageflip")
    assert script.exists(), "make test installs the pageflip console script into the venv"
    control = tmp_path / "w.sock"
    proc = subprocess.Popen(
        [str(script), "workload", "--size", "16M", "--control", str(control)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=WAIT)
    finally:
        _end(proc)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.splitlines()[-1] == "Interrupted: SIGINT", err
    assert not control.exists()


# -- incoming goes on listening -------------------------------------------------------------


@pytest.mark.parametrize("which", ["listen", "control"])
def test_incoming_replaces_a_stale_socket_file(
    which: str, tmp_path: Path, hosts: list[Host]
) -> None:
    listen, control = tmp_path / "in.sock", tmp_path / "b.sock"
    stale = listen if which == "listen" else control
    with stale_socket(stale):
        dest = incoming(tmp_path, hosts, str(listen), control)
    with socket.socket(socket.AF_UNIX) as probe:
        probe.connect(str(stale))  # it listens there now
    assert status(control)["host"] == "incoming"
    stop(dest, control)
    assert not listen.exists()


def test_incoming_on_port_0_reports_the_port_it_listens_on(
    tmp_path: Path, hosts: list[Host]
) -> None:
    control = tmp_path / "b.sock"
    dest = incoming(tmp_path, hosts, "tcp:127.0.0.1:0", control)
    where = dest.events[-1]["listen"]
    host, _, port = where.removeprefix("tcp:").rpartition(":")
    assert host == "127.0.0.1" and int(port) > 0
    with socket.create_connection((host, int(port)), timeout=10):
        pass  # it listens there: a stray connection
    dest.wait_for("attempt-failed")
    assert status(control)["status"]["migration"]["listen"] == where
    stop(dest, control)


def test_stray_connections_do_not_end_incoming(tmp_path: Path, hosts: list[Host]) -> None:
    """Garbage, then a bare connect-and-close: each attempt fails, logged; incoming listens
    on and takes a real migration afterwards."""
    a, b, listen = tmp_path / "a.sock", tmp_path / "b.sock", tmp_path / "in.sock"
    dest = incoming(tmp_path, hosts, str(listen), b)
    with socket.socket(socket.AF_UNIX) as stray:
        stray.connect(str(listen))
        stray.sendall(b"GET / HTTP/1.0\r\n\r\n" * 4)
    failed = dest.wait_for("attempt-failed")
    assert (
        failed["error"].startswith("MigrationError: ") and "RemoteProtocolError" in failed["error"]
    )
    with socket.socket(socket.AF_UNIX) as stray:
        stray.connect(str(listen))
    dest.wait_for("attempt-failed")
    source = workload(tmp_path, hosts, a)
    out = run("migrate", "--control", str(a), "--to", str(listen), "--mode", "precopy", "--json")
    assert out.returncode == 0, out.stderr
    assert [json.loads(line) for line in out.stdout.splitlines()][-1]["event"] == "done"
    assert source.finish() == 0
    dest.wait_for("running")
    report = run("verify", "--control", str(b), "--json")
    assert report.returncode == 0 and json.loads(report.stdout)["ok"]
    stop(dest, b)
    assert not a.exists() and not listen.exists()


@pytest.mark.parametrize("mode", ["flip", "postcopy"])
def test_a_refused_mode_does_not_end_incoming(mode: str, tmp_path: Path, hosts: list[Host]) -> None:
    """Over TCP, flip and postcopy are refused (they need the source on this host): that
    attempt fails, one line naming why; incoming listens on and takes a precopy."""
    a, b = tmp_path / "a.sock", tmp_path / "b.sock"
    dest = incoming(tmp_path, hosts, "tcp:127.0.0.1:0", b)
    to = dest.events[-1]["listen"]
    source = workload(tmp_path, hosts, a)
    out = run("migrate", "--control", str(a), "--to", to, "--mode", mode, "--json")
    assert out.returncode == 1
    out.line(
        "MigrationError", f"{mode} is not possible", "this host", "the guest runs on the source"
    )
    assert dest.wait_for("attempt-failed")["phase"] == "setup"
    out = run("migrate", "--control", str(a), "--to", to, "--mode", "precopy", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1])["event"] == "done"
    assert source.finish() == 0
    dest.wait_for("running")
    report = run("verify", "--control", str(b), "--json")
    assert report.returncode == 0 and json.loads(report.stdout)["ok"]
    stop(dest, b)


# -- migrate --------------------------------------------------------------------------------


def test_migrating_beyond_loopback_without_authentication_is_refused_up_front(
    tmp_path: Path,
) -> None:
    # Refused before it asks any host: there is none at --control.
    out = run("migrate", "--control", str(tmp_path / "a.sock"), "--to", "tcp:10.255.255.1:9")
    assert out.returncode == 1
    out.line("PeerRejected", "tcp:10.255.255.1:9", "--key-file", "--insecure")


def test_migrating_to_nowhere_fails_and_the_guest_stays(tmp_path: Path, hosts: list[Host]) -> None:
    """A TCP port nobody listens on, a socket path with nothing, a control socket instead of
    a listener: each fails before the commit point, one line naming it, exit 1; the guest
    runs on, intact."""
    a = tmp_path / "a.sock"
    source = workload(tmp_path, hosts, a)
    port = free_port()
    for to, words in (
        (f"tcp:127.0.0.1:{port}", "nobody listens at tcp:127.0.0.1:"),
        (str(tmp_path / "nobody.sock"), "nobody listens at"),
        (str(a), "not a pageflip destination"),
    ):
        out = run("migrate", "--control", str(a), "--to", to, "--timeout", "5s", "--json")
        assert out.returncode == 1, out.stderr
        out.line(
            "MigrationError", "failed in phase setup", words, to, "the guest runs on the source"
        )
        assert json.loads(out.stdout.splitlines()[-1])["guest"] == "source"
    report = run("verify", "--control", str(a), "--json")
    assert report.returncode == 0 and json.loads(report.stdout)["ok"]
    assert status(a)["status"]["migrations"] == 0
    stop(source, a)


def test_ctrl_c_during_a_slow_precopy_cancels_it(tmp_path: Path, hosts: list[Host]) -> None:
    a, b, listen = tmp_path / "a.sock", tmp_path / "b.sock", tmp_path / "in.sock"
    source = Host(tmp_path, "workload", "--size", "64M", "--dirty-rate", "8M", "--control", str(a))
    hosts.append(source)
    source.wait_for("ready")
    dest = incoming(tmp_path, hosts, str(listen), b)
    migrating = Host(
        tmp_path,
        "migrate",
        "--control",
        str(a),
        "--to",
        str(listen),
        "--mode",
        "precopy",
        "--max-bandwidth",
        "8M",
    )
    hosts.append(migrating)
    migrating.wait_for("progress")  # the precopy runs, at 8 MiB/s: for seconds
    os.kill(migrating.pid, signal.SIGINT)
    code = migrating.finish()
    assert code in (130, 1)
    line = migrating.result(code).line("Interrupted" if code == 130 else "MigrationError")
    assert "the guest runs on the source" in line
    last = migrating.events[-1]
    assert last["event"] == "failed" and last["guest"] == "source"
    report = run("verify", "--control", str(a), "--json")
    assert report.returncode == 0 and json.loads(report.stdout)["ok"]
    assert status(b)["host"] == "incoming"  # the destination listens on
    stop(source, a)
    stop(dest, b)
    assert not listen.exists()


def test_cancel_with_no_migration_running(tmp_path: Path, hosts: list[Host]) -> None:
    a = tmp_path / "a.sock"
    source = workload(tmp_path, hosts, a)
    out = run("cancel", "--control", str(a))
    assert out.returncode == 1
    out.line("StateError", str(a), "no migration is running", "nothing to cancel")
    assert status(a)["host"] == "running"
    stop(source, a)


# -- the demo, the benchmarks, guests and the library's own argument checks -----------------


def test_a_demo_whose_receiver_dies_is_a_demo_error() -> None:
    out = run("demo", "handoff", "--size", "8M", faults="demo-receiver-dies")
    assert out.returncode == 1
    out.line("DemoError", "the receiver died", "exit code -9")


def test_a_benchmark_whose_receiver_dies_is_a_benchmark_error() -> None:
    out = run(
        "bench",
        "handoff",
        "--size",
        "1M",
        "--repeat",
        "1",
        "--methods",
        "move",
        "--overhead-rounds",
        "0",
        "--no-progress",
        faults="bench-receiver-dies",
    )
    assert out.returncode == 1
    out.line("BenchmarkError", "the receiver process died", "exit code -9")


def test_a_guest_error_at_the_host_is_that_error_at_the_command(
    tmp_path: Path, hosts: list[Host]
) -> None:
    a = tmp_path / "a.sock"
    source = workload(tmp_path, hosts, a, faults="src-verify-fails")
    out = run("verify", "--control", str(a))
    assert out.returncode == 1
    out.line("BadGuestState", str(a), "injected: the journal cannot be read")
    assert status(a)["host"] == "running"
    stop(source, a)


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (("bench", "handoff", "--size", "1K"), ["at least one page"]),
        (("bench", "migrate", "--modes", "flip,flip"), ["each mode once"]),
    ],
    ids=["handoff below a page", "migrate mode twice"],
)
def test_arguments_the_library_refuses_are_usage_errors(
    args: tuple[str, ...], names: list[str]
) -> None:
    out = run(*args, "--no-progress")
    assert out.returncode == 2
    out.line("UsageError", *names, "--help")
