"""Reading a PVH guest kernel: an x86-64 ELF whose ``XEN_ELFNOTE_PHYS32_ENTRY`` note names a
32-bit protected-mode entry point (the PVH boot protocol, which QEMU's ``-kernel`` and
Firecracker also speak).

:func:`read_pvh` checks the file and returns what the loader needs: the segments to copy into
guest RAM and the entry address. Anything that cannot boot is a :class:`BadImage` naming the
file and what is wrong with it, in one line.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadImage

__all__ = ["PvhImage", "Segment", "read_pvh"]

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_NHDR = struct.Struct("<III")
_PT_LOAD, _PT_NOTE = 1, 4
_EM_X86_64 = 62
_ET_EXEC = 2
#: ``XEN_ELFNOTE_PHYS32_ENTRY`` in a note named "Xen".
_PHYS32_ENTRY = 18
#: Largest kernel image pageflip reads (the guests it boots are a few hundred KiB).
MAX_IMAGE = 64 << 20


@dataclass(frozen=True, slots=True)
class Segment:
    """A PT_LOAD segment: ``data`` goes to guest-physical ``paddr``, followed by
    ``memsz - len(data)`` zero bytes."""

    paddr: int
    data: bytes
    memsz: int

    @property
    def end(self) -> int:
        return self.paddr + self.memsz


@dataclass(frozen=True, slots=True)
class PvhImage:
    path: str
    entry: int
    segments: tuple[Segment, ...]

    @property
    def end(self) -> int:
        """The first guest-physical byte above the image."""
        return max(s.end for s in self.segments)


def _bad(path: str, what: str) -> BadImage:
    return BadImage(f"{path} cannot boot: {what}", kind="vm", path=path)


def read_pvh(path: str | Path) -> PvhImage:
    """Check and read a PVH ELF; :class:`BadImage` if it is not one or is damaged."""
    name = str(path)
    try:
        with open(name, "rb") as f:
            blob = f.read(MAX_IMAGE + 1)
    except OSError as err:
        raise _bad(name, err.strerror or str(err)) from None
    if len(blob) > MAX_IMAGE:
        raise _bad(name, f"it is larger than {MAX_IMAGE >> 20} MiB: not a guest kernel")
    if len(blob) < _EHDR.size or blob[:4] != b"\x7fELF":
        raise _bad(name, "it is not an ELF file")
    ident, etype, machine, _, _, phoff, _, _, _, phentsize, phnum, *_ = _EHDR.unpack_from(blob)
    if ident[4] != 2 or ident[5] != 1 or machine != _EM_X86_64:
        raise _bad(name, "it is not a 64-bit little-endian x86-64 ELF")
    if etype != _ET_EXEC:
        raise _bad(name, "it is not an executable (ET_EXEC) ELF")
    if phentsize != _PHDR.size or phoff + phnum * phentsize > len(blob):
        raise _bad(name, "its program headers are cut off (truncated file?)")
    segments: list[Segment] = []
    pvh_entry: int | None = None
    for i in range(phnum):
        ptype, _, offset, _, paddr, filesz, memsz, _ = _PHDR.unpack_from(
            blob, phoff + i * _PHDR.size
        )
        if offset + filesz > len(blob):
            raise _bad(name, f"segment {i} runs past the end of the file (truncated?)")
        if ptype == _PT_LOAD and memsz:
            if filesz > memsz:
                raise _bad(name, f"segment {i} has more file bytes than memory bytes")
            segments.append(Segment(paddr, blob[offset : offset + filesz], memsz))
        elif ptype == _PT_NOTE:
            found = _phys32_entry(blob[offset : offset + filesz])
            pvh_entry = found if found is not None else pvh_entry
    if pvh_entry is None:
        raise _bad(
            name,
            "it has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): pageflip boots PVH kernels",
        )
    if not segments:
        raise _bad(name, "it has nothing to load (no PT_LOAD segment)")
    return PvhImage(name, pvh_entry, tuple(sorted(segments, key=lambda s: s.paddr)))


def _phys32_entry(notes: bytes) -> int | None:
    """The PVH entry from a PT_NOTE segment's notes, if one is there."""
    at = 0
    while at + _NHDR.size <= len(notes):
        namesz, descsz, ntype = _NHDR.unpack_from(notes, at)
        at += _NHDR.size
        name = notes[at : at + namesz]
        at += (namesz + 3) & ~3
        desc = notes[at : at + descsz]
        at += (descsz + 3) & ~3
        if name.rstrip(b"\0") == b"Xen" and ntype == _PHYS32_ENTRY and len(desc) in (4, 8):
            return int.from_bytes(desc, "little")
    return None
