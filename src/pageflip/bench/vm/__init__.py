"""VM comparison: the same guest ELF migrated by QEMU 7.2 and by pageflip's VMM.

What it answers: for a guest of each size rewriting memory at each rate, how QEMU's
shared-memory handoff compares with pageflip's flip, QEMU's unthrottled precopy with
pageflip's precopy, and QEMU's postcopy with pageflip's postcopy: total time, downtime as
each system reports it, **the pause the guest itself observed**, the host-side heartbeat gap,
the time from switchover to the guest running on the destination, bytes moved, and the peak
memory of both processes together (Pss, so that memory both map counts once).

The guest (``pageflip.vm.image.guest_elf()``, or the older miniguest: :mod:`.guest`) fills
its buffer, rewrites pages at a rate, prints heartbeats on its serial console and answers
``P`` with the largest pause it saw since the previous ``P``, ``V`` with a full check of its
memory. Each run boots a fresh source and destination, waits for ``READY``, lets the guest
run ``guest_settle`` seconds, resets the guest's pause counter, migrates, and on the
destination asks for the pause and the check (a wrong page makes the run an error).

:func:`~.qemu.run_qemu` does one QEMU run; :func:`~.pageflip_side.run_pageflip` (the same
signature) drives the ``pageflip vm`` / ``incoming`` / ``migrate`` / ``verify`` commands.
:func:`run` walks the matrix (:func:`run_order`: each mode's two runs back to back, which
system goes first alternating), records a failed run with its error and goes on, and returns
a JSON-ready :class:`VmResult`; :func:`markdown_table`, :func:`target_rows` and :func:`plot`
lay it out. Nothing here prints: progress goes to a callback.
"""

from __future__ import annotations

from .config import (
    DEFAULT_RATES,
    DEFAULT_SIZES,
    MODES,
    QEMU_MODES,
    SYSTEMS,
    GuestImage,
    ProgressCallback,
    VmConfig,
    VmOptions,
    VmRunSpec,
    run_order,
)
from .guest import FLAVOURS, MINIGUEST, PFGUEST, GuestFlavour
from .pageflip_side import pageflip_vm_available, run_pageflip
from .qemu import run_qemu
from .records import CellRecord, ComparisonRecord, TargetRecord, VmResult, VmRunRecord
from .report import COLUMNS, check_plot, comparison_rows, markdown_table, plot, target_rows
from .runner import Runner, check_systems, run

__all__ = [
    "run",
    "VmConfig",
    "VmOptions",
    "GuestImage",
    "run_qemu",
    "run_pageflip",
    "markdown_table",
    "plot",
    "check_plot",
    "comparison_rows",
    "target_rows",
    "check_systems",
    "pageflip_vm_available",
    "run_order",
    "VmRunSpec",
    "Runner",
    "ProgressCallback",
    "VmResult",
    "VmRunRecord",
    "CellRecord",
    "ComparisonRecord",
    "TargetRecord",
    "GuestFlavour",
    "FLAVOURS",
    "PFGUEST",
    "MINIGUEST",
    "COLUMNS",
    "DEFAULT_RATES",
    "DEFAULT_SIZES",
    "MODES",
    "QEMU_MODES",
    "SYSTEMS",
]
