"""``pageflip bench live``: replace a running service under load three ways, side by side.

(a) plain restart: stop the old process, start the new one, which loads its index from
disk; (b) overlap restart: the new one loads its own copy beside the old (SO_REUSEPORT),
then the old drains and exits; (c) pageflip.live: ``pageflip upgrade`` hands the index
(a region), the listening socket and the state to the new version, N times, plus
rollbacks. The service is ``examples/live_service/app.py``.
"""

from __future__ import annotations

from .load import Failure, Load, Request
from .records import LiveResult, SideRecord
from .report import COLUMNS, markdown, rows
from .run import LiveConfig, run

__all__ = [
    "COLUMNS",
    "Failure",
    "LiveConfig",
    "LiveResult",
    "Load",
    "Request",
    "SideRecord",
    "markdown",
    "rows",
    "run",
]
