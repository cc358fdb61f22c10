"""Scheduling of the calling thread: letting go of memory at idle priority.

A writer that gave its pages away still has to tear down its own mapping of them (munmap),
and for a populated mapping of 4 KiB pages that costs about 30-70 ms per GiB of kernel work
here. The reader woke the writer with its answer, and a wake-up from a Unix socket is a
*sync* wake-up: the kernel puts the writer on the reader's CPU, where it runs first. Torn down
at normal priority, the mapping then holds the reader off its CPU after it has its pages.
Under ``SCHED_IDLE`` the teardown runs only when nothing else wants the CPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

#: Policies a thread may return to from SCHED_IDLE without privilege (its nice value stays).
_RESTORABLE = (os.SCHED_OTHER, os.SCHED_BATCH)


@contextlib.contextmanager
def idle_priority() -> Iterator[bool]:
    """Run the body with the calling thread under SCHED_IDLE, then restore its policy.

    Yields whether the thread's priority was lowered: it is left alone when its policy is
    one it could not get back without privilege (real-time), or the kernel refuses.
    """
    if os.environ.get("PF_EXP") == "yield":
        os.sched_yield()
        yield False
        return
    try:
        policy = os.sched_getscheduler(0)
        param = os.sched_getparam(0)
        if policy not in _RESTORABLE:
            yield False
            return
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        # Lowering our own weight does not make the kernel pick another task before the next
        # tick (several ms); yielding does, now.
        os.sched_yield()
    except OSError:
        yield False
        return
    try:
        yield True
    finally:
        os.sched_setscheduler(0, policy, param)
