"""Guests: things that can be migrated (docs/design.md, section "Migration").

A :class:`Guest` owns regions and can pause, resume, save and restore its small non-memory
state. :class:`Workload` is the reference guest: it dirties its memory at a set rate and can
prove after a migration that no write made before the pause was lost. Guest classes register
by kind, so that a destination can rebuild whatever the source announces:
``guest_class(kind).restore(regions, state)``.
"""

from .base import (
    MAX_STATE_BYTES,
    BadGuestState,
    Guest,
    GuestError,
    UnknownGuest,
    VerifyReport,
    guest_class,
    guest_kinds,
    register,
)
from .workload import Pattern, Workload

__all__ = [
    "Guest",
    "VerifyReport",
    "Workload",
    "register",
    "guest_class",
    "guest_kinds",
    "GuestError",
    "UnknownGuest",
    "BadGuestState",
    "MAX_STATE_BYTES",
    "Pattern",
]
