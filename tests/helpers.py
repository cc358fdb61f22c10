"""Helpers shared by the tests (importable from test modules and spawned children)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import pytest

IS_ROOT = os.geteuid() == 0


def run_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``fn`` in a thread; its result or exception lands in the returned dict."""
    out: dict[str, Any] = {}

    def body() -> None:
        try:
            out["result"] = fn()
        except BaseException as err:
            out["error"] = err

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, out


def join(thread: threading.Thread, out: dict[str, Any], timeout: float = 60) -> Any:
    """Wait for a run_thread thread and return its result, re-raising its exception."""
    thread.join(timeout)
    assert not thread.is_alive(), "the thread did not finish"
    if "error" in out:
        raise out["error"]
    return out.get("result")


needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (CAP_SYS_ADMIN) for PFNs")
