"""Shared fixtures: every test is checked for leaked fds, memfd mappings and children."""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """Ctrl-C reaches the processes the tests start, whatever started pytest: a shell that
    runs a command in the background (``make test &``) starts it with SIGINT ignored, every
    process it starts inherits that, and a test that interrupts a pageflip command with
    SIGINT would wait for it forever. A handled signal is reset to its default at exec."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


#: Seconds a test's threads get, after it, to finish closing what they held.
SETTLE = 2.0


def _open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def _fd_targets(fds: set[int]) -> dict[int, str]:
    out = {}
    for fd in fds:
        with contextlib.suppress(OSError):
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
    return out


def _pageflip_mappings() -> list[str]:
    with open("/proc/self/maps") as f:
        return [line.strip() for line in f if "/memfd:pageflip" in line]


@pytest.fixture(scope="session", autouse=True)
def _resource_tracker() -> None:
    """multiprocessing keeps one pipe to its resource tracker for the whole session: open it
    before the first test, so that it is not counted as a leak of whichever test spawns first."""
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail a test that leaves an fd, a pageflip memfd mapping, a thread or a child behind."""
    gc.collect()
    fds_before = _open_fds()
    maps_before = _pageflip_mappings()
    threads_before = set(threading.enumerate())
    yield

    def fds_left() -> dict[int, str]:
        gc.collect()
        leaked = _fd_targets(_open_fds() - fds_before)
        # The listdir of /proc/self/fd itself shows up as a short-lived fd.
        return {fd: target for fd, target in leaked.items() if "/proc/" not in target}

    def threads_left() -> list[threading.Thread]:
        return [t for t in set(threading.enumerate()) - threads_before if t.is_alive()]

    # A thread the test ended may still be on its way out, closing what it held: on a
    # loaded machine that can take a moment. What is still there after SETTLE is a leak.
    deadline = time.monotonic() + SETTLE
    while (fds_left() or threads_left()) and time.monotonic() < deadline:
        time.sleep(0.02)
    leaked = fds_left()
    assert not leaked, f"fds leaked: {leaked}"
    maps_after = _pageflip_mappings()
    assert len(maps_after) <= len(maps_before), f"memfd mappings leaked: {maps_after}"
    extra = threads_left()
    assert not extra, f"threads left running: {extra}"
    children = multiprocessing.active_children()
    assert not children, f"child processes left running: {children}"


@pytest.fixture
def spawn() -> Any:
    return multiprocessing.get_context("spawn")
