"""The ``pageflip`` command: probe the kernel, host and migrate guests, benchmark, demo.

Subcommands (``pageflip --help``)::

    pageflip probe [--json]                      which kernel features work here
    pageflip workload --control PATH [...]       start the reference workload (a guest)
    pageflip incoming --listen ADDR [...]        wait for a migrating guest, then host it
    pageflip migrate --to ADDR --mode MODE       migrate the guest at --control to ADDR
    pageflip migrate --resume                    take up a postcopy whose connection broke
    pageflip status | verify | stop | cancel     ask the guest at --control
    pageflip bench handoff --size 1G [...]       time every way to hand N bytes over
    pageflip bench migrate [...]                 migration matrix: sizes x dirty rates x modes
    pageflip bench vm [...]                      the same guest ELF migrated by QEMU and pageflip
    pageflip upgrade --control PATH              live-update a service using pageflip.live
    pageflip bench live [...]                    a service replaced under load, three ways
    pageflip demo                                a 1 GiB workload migrated by flip and precopy
    pageflip demo handoff [--size 1G]            move, then copy, 1 GiB between two processes

Socket paths default from the environment: PAGEFLIP_CONTROL (a guest's control socket) and
PAGEFLIP_LISTEN (where ``incoming`` listens).

Every failure is one line, ``Type: message``, on stderr, with the exit status the group's
help documents (:mod:`._base`): 1 for a failure, 2 for a usage error, 3 for a guest lost
after a migration's commit point, 128+N for signal N. Anything else is a bug and shows a
traceback. Progress and colour go to stderr (rich), so that ``--json`` output on stdout
stays clean. The library itself never prints: everything here is the command line's.
"""

from __future__ import annotations

from . import bench, demo, guests, live, probe, vm
from ._base import main

__all__ = ["main"]

_ = (bench, demo, guests, live, probe, vm)  # imported for the commands they add to main
