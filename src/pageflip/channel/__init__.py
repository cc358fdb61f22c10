"""The channel: pageflip's one connection object.

Everything that talks to another process, or takes its memory, is built here:

* :mod:`.transfer`: the RFC's pipe between two processes (:class:`Channel`: gift, send,
  receive, receive_into), moving pages where the rules allow and copying where not;
* :mod:`.endpoint`: the one I/O loop (:class:`Endpoint`) that carries any sans-I/O codec's
  frames with deadlines: the channel's own, the migration stream, the postcopy pager's;
* :mod:`.peer`: the one set of rules for a peer's memfds and the one way to copy out of a
  peer process.
"""

from .._wire import WireCodec
from .endpoint import Codec, Endpoint, ProcessWatch
from .peer import (
    allow_peer_read,
    check_peer_memfd,
    check_same_memfds,
    forbid_peer_read,
    map_peer_memfds,
    pull_from,
    read_from,
)
from .transfer import Channel, CopyMethod, Listener, Transfer, channel_pair, vmsplice

__all__ = [
    "Channel",
    "Codec",
    "CopyMethod",
    "Endpoint",
    "Listener",
    "ProcessWatch",
    "Transfer",
    "WireCodec",
    "allow_peer_read",
    "channel_pair",
    "check_peer_memfd",
    "check_same_memfds",
    "forbid_peer_read",
    "map_peer_memfds",
    "pull_from",
    "read_from",
    "vmsplice",
]
