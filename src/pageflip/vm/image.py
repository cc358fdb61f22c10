"""The test guest's ELF image: built from the sources in ``vm/guest`` with the system gcc,
and cached under a name that carries a hash of those sources.

:func:`guest_elf` returns the cached ELF, building it first when it is missing or the sources
changed. Builds are safe to race: each runs ``make`` into a directory of its own and renames
its result into place atomically, so a reader sees a whole ELF or none.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import GuestImageError

__all__ = ["BUILD_TOOLS", "GUEST_SOURCES", "cache_dir", "guest_elf", "guest_source_dir"]

log = logging.getLogger("pageflip.vm")

#: The files that make the ELF; a change to any of them means a new build.
GUEST_SOURCES = ("boot.S", "main.c", "link.ld", "Makefile")
#: The programs a build runs.
BUILD_TOOLS = ("gcc", "make")
#: How long one build may take, in seconds (it takes well under one).
BUILD_TIMEOUT = 120.0


def guest_source_dir() -> Path:
    """The directory of the guest's sources (and its Makefile)."""
    return Path(__file__).resolve().parent / "guest"


def cache_dir() -> Path:
    """Where built guests are kept: ``$XDG_CACHE_HOME/pageflip``, else ``~/.cache/pageflip``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pageflip"


def _source_hash(source: Path) -> str:
    digest = hashlib.sha256()
    for name in GUEST_SOURCES:
        data = (source / name).read_bytes()
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()[:12]


def _first_error(output: str) -> str:
    """The line of a build's output that says what went wrong: the first error, else the
    last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in lines:
        if "error" in line.lower():
            return line
    return lines[-1] if lines else "no output"


def guest_elf(rebuild: bool = False) -> Path:
    """The path of a built guest ELF whose sources are the current ones; built (into
    :func:`cache_dir`) when there is none yet, or always with ``rebuild``.

    Raises :class:`~pageflip.errors.GuestImageError` when gcc or make is missing, or the
    build fails.
    """
    source = guest_source_dir()
    target = cache_dir() / f"pfguest-{_source_hash(source)}.elf"
    if target.is_file() and not rebuild:
        return target
    missing = [tool for tool in BUILD_TOOLS if shutil.which(tool) is None]
    if missing:
        raise GuestImageError(
            f"cannot build the test guest: {' and '.join(missing)} not found "
            f"(install them: apt-get install {' '.join(BUILD_TOOLS)})",
            missing=missing,
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as work:
        built = Path(work) / target.name
        command = ["make", "-s", "-C", str(source), f"OUT={built}"]
        log.debug("building the test guest: %s", " ".join(command))
        try:
            done = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired as err:
            raise GuestImageError(
                f"building the test guest took over {BUILD_TIMEOUT:.0f} s: {' '.join(command)}"
            ) from err
        output = done.stdout + done.stderr
        if done.returncode != 0 or not built.is_file():
            raise GuestImageError(
                f"building the test guest failed (make exit {done.returncode}): "
                f"{_first_error(output)}",
                output=output,
            )
        os.replace(built, target)
    log.debug("built the test guest: %s", target)
    return target
