"""pageflip: move memory between Linux processes without copying it.

The 2013 vmsplice RFC's promise on stock kernels: a writer *gifts* page-aligned pages, a
reader *moves* them into its own memory, and whatever cannot move is copied, the fastest way
available, and reported as a copy.

    import pageflip as pf
    with pf.Region.movable(1 << 30, name="weights") as r:
        r.numpy(np.float32)[:] = 1.0
        a, b = pf.channel_pair()
        ...                                  # hand b to a child process
        t = a.gift(r)                        # the child's b.receive() gets the same pages
"""

import logging as _logging

from ._sys.flags import Splice
from .channel import Channel, CopyMethod, Listener, Transfer, channel_pair, vmsplice
from .errors import (
    BadArgument,
    BufferInUse,
    ClosedError,
    DigestMismatch,
    FeatureUnavailable,
    GuestLost,
    LocalProtocolError,
    MigrationError,
    PageflipError,
    PeerAborted,
    PeerClosed,
    PeerError,
    PeerRefused,
    PeerRejected,
    PeerTimeout,
    ProtocolError,
    RemoteProtocolError,
    SpanError,
    StateError,
    WrongType,
)
from .features import Feature, ProbeReport, probe
from .memory import PAGE_SIZE, Region, Span, physical_frames

__version__ = "0.1.0"

_logging.getLogger("pageflip").addHandler(_logging.NullHandler())


def __getattr__(name: str) -> object:
    """``pageflip.live`` (live update of a service) is imported on first use."""
    if name == "live":
        import importlib

        return importlib.import_module(".live", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    # memory and the channel
    "Region",
    "Span",
    "Channel",
    "Listener",
    "Transfer",
    "channel_pair",
    "vmsplice",
    "Splice",
    "CopyMethod",
    "PAGE_SIZE",
    "physical_frames",
    # what works here
    "probe",
    "ProbeReport",
    "Feature",
    # errors
    "PageflipError",
    "ClosedError",
    "BufferInUse",
    "BadArgument",
    "SpanError",
    "WrongType",
    "FeatureUnavailable",
    "PeerError",
    "PeerClosed",
    "PeerAborted",
    "PeerRefused",
    "PeerRejected",
    "PeerTimeout",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "StateError",
    "MigrationError",
    "DigestMismatch",
    "GuestLost",
    "__version__",
]
