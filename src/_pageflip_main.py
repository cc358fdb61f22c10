"""The ``pageflip`` command's entry point, outside the package on purpose.

Importing :mod:`pageflip` loads numpy, click and rich (about 0.4 s). A Ctrl-C meanwhile
would print a KeyboardInterrupt traceback from the middle of some import, before the
command's own handler exists; here it ends the command with the same one line and exit
status (130) as a Ctrl-C at any later point. A SIGINT that was ignored when we started
(a job started with ``&`` by a non-interactive shell) stays ignored.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType


def _interrupted_while_starting(signum: int, frame: FrameType | None) -> None:
    sys.stderr.write(f"Interrupted: {signal.Signals(signum).name}\n")
    sys.stderr.flush()
    os._exit(128 + signum)  # nothing exists yet that needs cleaning up


def main() -> None:
    """Import the command with Ctrl-C ending it quietly, then run it."""
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted_while_starting)
    from pageflip.cli import main as command

    if previous is signal.default_int_handler:
        signal.signal(signal.SIGINT, previous)
    command()
