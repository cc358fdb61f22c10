"""Live migration: flip, precopy and postcopy of a guest from one process to another.

:class:`Source` runs in the process that owns the guest; :class:`Destination` in the one
that will run it; :class:`GuestHost` serves a guest on a control socket (what ``pageflip
workload`` and ``pageflip incoming`` are) and :class:`ControlClient` talks to one.
"""

from .destination import Destination
from .events import (
    DoneEvent,
    FailedEvent,
    MigrationEvent,
    PostcopyEvent,
    ProgressEvent,
    ResumedEvent,
    RoundEvent,
    SetupEvent,
    SwitchoverEvent,
)
from .host import ControlClient, GuestHost
from .source import MigrationOptions, Source

__all__ = [
    "Source",
    "Destination",
    "MigrationOptions",
    "GuestHost",
    "ControlClient",
    "MigrationEvent",
    "SetupEvent",
    "ProgressEvent",
    "RoundEvent",
    "SwitchoverEvent",
    "ResumedEvent",
    "PostcopyEvent",
    "DoneEvent",
    "FailedEvent",
]
