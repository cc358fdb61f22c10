"""Real ``pageflip`` processes for the tests: hosts that print JSON lines, one-shot commands,
and faults injected through tests/cli_inject.py. Every process started here is ended by its
PID when the test ends (the ``hosts`` fixture), also when the test fails."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

PAGEFLIP = [sys.executable, "-m", "pageflip"]
#: In the environment of every process started here (and of their children, such as the
#: postcopy pager), so that a test finds its own among the machine's processes. Set in this
#: process's environment too: the processes tests spawn directly inherit it.
TAG = f"pageflip-test-{os.getpid()}"
os.environ["PAGEFLIP_TEST_TAG"] = TAG
INJECT = [sys.executable, str(Path(__file__).with_name("cli_inject.py"))]


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def strict_event(line: str) -> dict[str, Any]:
    """``line`` as one JSON object; NaN and Infinity refused."""
    event = json.loads(line, parse_constant=_refuse_constant)
    assert isinstance(event, dict), line
    return event


class Host:
    """A long-running pageflip process (workload, incoming, a migrate to interrupt) whose
    stdout is JSON lines, read by a thread of its own as they come.

    ``faults`` injects failures (tests/cli_inject.py). Its stderr goes to the file
    ``stderr_to``, else to a pipe read once it has exited. ``as_json=False`` runs it without
    ``--json`` (its events go to stderr as text). ``new_session`` starts it in a session of
    its own. ``wrapper`` starts it under another command that execs it (``setpriv ...``),
    so that its PID is still the process's. ``strict`` checks every line as it is taken in:
    one JSON object, without NaN or Infinity (otherwise a line that is not JSON is passed
    over).
    """

    def __init__(
        self,
        *args: str,
        faults: str = "",
        stderr_to: Path | None = None,
        as_json: bool = True,
        new_session: bool = False,
        strict: bool = False,
        wrapper: tuple[str, ...] = (),
    ) -> None:
        env = dict(os.environ)
        env["PAGEFLIP_TEST_TAG"] = TAG
        if faults:
            env["PAGEFLIP_TEST_FAULTS"] = faults
        command = [
            *wrapper,
            *(INJECT if faults else PAGEFLIP),
            *args,
            *(["--json"] if as_json else []),
        ]
        stderr_file = open(stderr_to, "w") if stderr_to is not None else None  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=stderr_file if stderr_file is not None else subprocess.PIPE,
                text=True,
                env=env,
                start_new_session=new_session,
            )
        finally:
            if stderr_file is not None:
                stderr_file.close()  # the process has its own
        self.stderr_path = stderr_to
        self._strict = strict
        self._stderr_text: str | None = None
        self.events: list[dict[str, Any]] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _take(self, line: str) -> dict[str, Any] | None:
        """The event on ``line``, kept in ``events`` (None: not JSON, passed over)."""
        if self._strict:
            event = strict_event(line)
        else:
            try:
                event = json.loads(line)
            except ValueError:
                return None
        self.events.append(event)
        return event

    def wait_for(self, kind: str, timeout: float = 120, **match: Any) -> dict[str, Any]:
        """The next event of ``kind`` (with the fields in ``match``)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {kind} event in {timeout} s; saw {self.kinds()}")
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                self._lines.put(None)
                raise AssertionError(
                    f"exited ({self.proc.wait()}) before {kind}; saw {self.kinds()}: "
                    f"{self.stderr()}"
                )
            message = self._take(line)
            if (
                message is not None
                and message.get("event") == kind
                and all(message.get(k) == v for k, v in match.items())
            ):
                return message

    def drain(self) -> None:
        """Take in every event printed so far."""
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                return
            if line is None:
                self._lines.put(None)
                return
            self._take(line)

    def kinds(self) -> list[str]:
        return [str(e.get("event")) for e in self.events]

    def stderr(self) -> str:
        """What the process wrote on stderr: so far when it goes to a file, else once it has
        exited ("" before)."""
        if self.stderr_path is not None:
            return self.stderr_path.read_text()
        if self.proc.poll() is None:
            return ""
        if self._stderr_text is None:
            assert self.proc.stderr is not None
            self._stderr_text = self.proc.stderr.read()
        return self._stderr_text

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signum)

    def finish(self, timeout: float = 60) -> int:
        """Wait for the process to exit; kill it if it does not. Returns its exit status
        (-999: it did not exit). The events it printed and no one took join ``events``."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return -999
        finally:
            self.end()
            self.drain()

    def end(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()
        self._reader.join(10)
        self.stderr()  # kept for after the pipes are closed
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


#: Runs a command without the right to real-time scheduling: no CAP_SYS_NICE (even as root)
#: and an RLIMIT_RTPRIO of 0. Both tools exec the command, so its PID stays the same.
NO_REALTIME = (
    "prlimit", "--rtprio=0:0", "setpriv", "--bounding-set=-sys_nice", "--inh-caps=-sys_nice",
)  # fmt: skip
#: Why :data:`NO_REALTIME` cannot run here (None: it can).
NO_REALTIME_MISSING = (
    None
    if shutil.which("prlimit") and shutil.which("setpriv")
    else "needs prlimit and setpriv (util-linux)"
)


def _realtime_refused() -> str | None:
    from pageflip.errors import FeatureUnavailable
    from pageflip.vm.machine import check_realtime

    try:
        check_realtime()
    except FeatureUnavailable as err:
        return str(err)
    return None


#: Why this process may not schedule threads SCHED_FIFO (None: it may; root may).
REALTIME_REFUSED = _realtime_refused()


def run(
    *args: str, faults: str = "", timeout: float = 300, wrapper: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """A one-shot pageflip command (under ``wrapper``, a command that runs another); its exit
    status is not checked."""
    env = dict(os.environ)
    if faults:
        env["PAGEFLIP_TEST_FAULTS"] = faults
    return subprocess.run(
        [*wrapper, *(INJECT if faults else PAGEFLIP), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def one_line(stderr: str) -> str:
    """The command's error: exactly one line, no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture
def hosts() -> Iterator[list[Host]]:
    started: list[Host] = []
    yield started
    for host in started:
        host.end()


def pagers() -> list[int]:
    """Pager processes started by this test session (through a host or a spawned
    destination), alive now; other sessions' pagers on the same machine are not ours."""
    found = []
    tag = f"PAGEFLIP_TEST_TAG={TAG}".encode()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if b"pageflip._pager" not in f.read():
                        continue
                with open(f"/proc/{name}/environ", "rb") as f:
                    if tag in f.read().split(b"\0"):
                        found.append(int(name))
            except OSError:
                pass
    return found
