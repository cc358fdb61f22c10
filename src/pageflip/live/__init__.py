"""Live update of a service: a new version of the same command line takes over this
process's memory (the same pages: memfds change owner, nothing is copied), its listening
sockets (the same kernel sockets: the accept queue survives) and a small state blob, and
the old version serves on if the new one fails. See ``docs/live.md``.

::

    from pageflip import live

    up = live.Upgrader(control="app.sock")
    index = up.region("index", 1 << 30)      # zeros when fresh, else the old version's pages
    sock = up.listener("http", ("127.0.0.1", 8000))
    ...                                      # everything slow goes here
    state = up.take_over(accept=start)       # the old version stops accepting, start()
                                             # accepts, the old one drains, hands its state
    up.ready()                               # regions writable; the old version exits

The library never prints: it logs to the ``pageflip.live`` logger.
"""

from ..errors import LiveError, UpgradeFailed, UpgradeRunning
from .upgrader import BACKLOG, HANDOVER_ENV, ServiceClient, Upgrader, UpgradeReport

__all__ = [
    "BACKLOG",
    "HANDOVER_ENV",
    "LiveError",
    "ServiceClient",
    "UpgradeFailed",
    "UpgradeReport",
    "UpgradeRunning",
    "Upgrader",
]
