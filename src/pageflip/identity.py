"""Which code a process runs: shown by ``status`` so that a live update can be seen."""

from __future__ import annotations

import contextlib
import functools
import hashlib
from pathlib import Path
from typing import Any

__all__ = ["code_identity"]


@functools.cache
def code_identity() -> dict[str, Any]:
    """Which code this process runs: pageflip's version and a digest of its sources, so
    that two processes of one version but different code tell apart (a live update shows
    both)."""
    from . import __version__

    root = Path(__file__).resolve().parent
    digest = hashlib.blake2b(digest_size=6)
    for path in sorted(root.rglob("*.py")):
        with contextlib.suppress(OSError):
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    return {"version": __version__, "code": digest.hexdigest()}
