"""Live update: replace the process that hosts a guest with a new one running the code that is
installed now, by a flip migration to it.

:func:`start_successor` starts ``python -m pageflip incoming`` on a private Unix socket, with
the same standard output and error as this process (the guest's console goes on where it
was) and ``--replace PATH``: once the guest runs there, the successor takes this host's
control socket path over as soon as this host has let it go. The host then migrates the
guest to it by flip (:meth:`GuestHost._upgrade`) and exits; if anything fails before the
successor said PREPARED, the guest runs on here and the successor is ended.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import MigrationError, PageflipError

__all__ = ["Successor", "start_successor", "take_over"]

#: How often the successor's listening socket is looked for while it starts.
POLL = 0.01


@dataclass
class Successor:
    """A new host process, listening at ``listen`` (a ``unix:`` address)."""

    process: subprocess.Popen[bytes]
    listen: str
    directory: str
    control: str
    log: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid

    def identity(self) -> dict[str, Any]:
        """The successor's pid and code (from its control socket; what is known if not)."""
        from .host import ControlClient

        found: dict[str, Any] = {"pid": self.pid}
        with (
            contextlib.suppress(OSError, PageflipError),
            ControlClient(self.control, timeout=2) as client,
        ):
            found.update(client.request("status").get("code", {}))
        return found

    def end(self) -> None:
        """Stop it (the upgrade failed before its commit point) and remove its files."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.remove_files()

    def remove_files(self) -> None:
        for name in os.listdir(self.directory) if os.path.isdir(self.directory) else []:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.directory, name))
        with contextlib.suppress(OSError):
            os.rmdir(self.directory)


def start_successor(control: str, extra: list[str], timeout: float) -> Successor:
    """Start the successor host and wait (up to ``timeout``) until it listens."""
    directory = tempfile.mkdtemp(prefix="pageflip-upgrade-")
    path = os.path.join(directory, "handover.sock")
    temp_control = os.path.join(directory, "control.sock")
    argv = [
        sys.executable,
        "-m",
        "pageflip",
        "incoming",
        "--listen",
        path,
        "--control",
        temp_control,
        "--replace",
        control,
        *extra,
    ]
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, close_fds=True)
    successor = Successor(process, path, directory, temp_control)
    deadline = time.monotonic() + timeout
    try:
        while not _listening(temp_control):
            if process.poll() is not None:
                raise MigrationError(
                    f"the new host process exited with status {process.returncode} before it "
                    "listened (its error is above, on the console)",
                    phase="setup",
                    guest="source",
                )
            if time.monotonic() > deadline:
                raise MigrationError(
                    f"the new host process did not listen within {timeout:g} s",
                    phase="setup",
                    guest="source",
                )
            time.sleep(POLL)
    except BaseException:
        successor.end()
        raise
    return successor


def _listening(control: str) -> bool:
    """Whether the successor at ``control`` listens for the guest (its status says so)."""
    from .host import ControlClient

    try:
        with ControlClient(control, timeout=2) as client:
            answer = client.request("status")
    except (OSError, PageflipError):
        return False
    phase = answer.get("status", {}).get("migration", {}).get("phase")
    return bool(phase == "listening")


def take_over(host: Any, path: str, timeout: float) -> None:
    """In the successor, once the guest runs here: serve the control socket at ``path``
    as soon as the old host lets it go (it exits right after the migration), then remove
    the temporary directory our first control socket was in."""
    old = host.path
    deadline = time.monotonic() + timeout
    while True:
        try:
            host.move_to(path)
            break
        except FileExistsError:
            if time.monotonic() > deadline:
                raise MigrationError(
                    f"the old host still holds {path} after {timeout:g} s: the guest runs "
                    f"here, reachable at {old}",
                    phase="done",
                    guest="destination",
                ) from None
            time.sleep(POLL)
    directory = os.path.dirname(old)
    if os.path.basename(directory).startswith("pageflip-upgrade-"):
        with contextlib.suppress(OSError):
            os.rmdir(directory)
