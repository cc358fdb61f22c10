"""Field by field: a :class:`Writer` builds one payload, a :class:`Reader` takes one apart.

Each frame's ``write`` and ``read`` are written in these terms, so that every field is
checked the same way in both directions: a writer's complaint is a
:class:`~pageflip.errors.LocalProtocolError`, a reader's an :class:`Invalid` that the
decoder turns into a :class:`~pageflip.errors.RemoteProtocolError` at the field's offset.
"""

from __future__ import annotations

import enum
import operator
import struct
from collections.abc import Callable
from typing import Any, Final, TypeVar

import numpy as np
import zstandard

from ..errors import LocalProtocolError
from .wire import (
    F64,
    MAX_REGIONS,
    MAX_RUNS,
    MAX_STATE,
    RUN_SIZE,
    U8,
    U16,
    U32,
    U64,
    Runs,
    bad_run,
    no_runs,
    runs_limit,
    time_problem,
)

#: RAW PAGES data at least this big is handed out as a view of the decoder's buffer
#: (which the decoder then lets go of) instead of being copied.
HANDOVER_MIN: Final = 1 << 16

_E = TypeVar("_E", bound=enum.IntEnum)


class Writer:
    """Collects one payload's fields, checking each; errors are LocalProtocolError.

    ``page_size`` and ``regions`` are what the encoder knows of the stream: region indexes
    and runs are checked against them. A frame that declares the regions (SETUP) sets
    ``regions``; a frame that carries fds (FLIP) sets ``fds``.
    """

    __slots__ = ("_cctx", "fds", "frame", "page_size", "parts", "regions", "size")

    def __init__(
        self,
        frame: str,
        page_size: int,
        regions: tuple[int, ...] | None = None,
        cctx: zstandard.ZstdCompressor | None = None,
    ) -> None:
        self.frame = frame
        self.page_size = page_size
        self.regions = regions
        self._cctx = cctx
        self.parts: list[bytes | memoryview] = []
        self.size = 0
        self.fds: list[int] = []

    def fail(self, message: str) -> LocalProtocolError:
        return LocalProtocolError(f"cannot encode {self.frame}: {message}", frame=self.frame)

    def put(self, part: bytes | memoryview) -> None:
        self.parts.append(part)
        self.size += len(part) if isinstance(part, bytes) else part.nbytes

    def uint(self, st: struct.Struct, value: int, what: str) -> int:
        try:
            number = operator.index(value)
        except TypeError:
            raise self.fail(f"{what} {value!r} is not an integer") from None
        if not 0 <= number < 1 << (8 * st.size):
            raise self.fail(f"{what} {value!r} is not a u{8 * st.size}")
        self.put(st.pack(number))
        return number

    def time(self, value: float, what: str) -> None:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise self.fail(f"{what} {value!r} is not a number") from None
        problem = time_problem(number)
        if problem:
            raise self.fail(f"{what}: {problem}")
        self.put(F64.pack(number))

    def enum(self, cls: type[_E], value: int, what: str) -> None:
        try:
            member = cls(value)
        except ValueError:
            raise self.fail(f"{what} {value!r} is not a {cls.__name__}") from None
        self.uint(U8, member, what)

    def text(self, prefix: struct.Struct, text: str, limit: int, what: str) -> None:
        try:
            raw = text.encode()
        except (AttributeError, UnicodeEncodeError):
            raise self.fail(f"{what} {text!r} is not encodable text") from None
        if len(raw) > limit:
            raise self.fail(f"{what} is {len(raw)} bytes of UTF-8, at most {limit}")
        self.uint(prefix, len(raw), f"{what} length")
        self.put(raw)

    def blob(self, data: bytes | bytearray | memoryview, what: str) -> memoryview:
        """``data`` as bytes, checked but not written (its length usually goes first)."""
        try:
            view = memoryview(data).cast("B")
        except TypeError:
            raise self.fail(f"{what} is not a contiguous buffer") from None
        return view

    def region(self, region: int) -> int:
        """Write a region index (u16), which must name one of the known regions."""
        index = self.uint(U16, region, "region")
        if self.regions is not None and index >= len(self.regions):
            raise self.fail(f"region {index}, but there are {len(self.regions)}")
        return index

    def runs(self, runs: object, region: int, most: int) -> Runs:
        """``runs`` as a checked array of at most ``most`` runs within ``region``; not
        written (the count usually goes first)."""
        arr = self._as_runs(runs)
        if len(arr) > most:
            raise self.fail(f"{len(arr)} runs, at most {most}")
        bad = bad_run(arr, runs_limit(self.page_size, self.regions, region))
        if bad:
            raise self.fail(f"run {bad[0]}: {bad[2]}")
        return arr

    def _as_runs(self, runs: object) -> Runs:
        try:
            arr = np.asarray(runs)
        except (TypeError, ValueError) as err:
            raise self.fail(f"runs are not an array: {err}") from None
        if arr.size == 0:
            return no_runs()
        if arr.ndim != 2 or arr.shape[1] != 2 or arr.dtype.kind not in "ui":
            raise self.fail(f"runs must be integers of shape (k, 2), got {arr.dtype} {arr.shape}")
        if arr.dtype.kind == "i" and bool((arr < 0).any()):
            raise self.fail("runs hold a negative number")
        return arr.astype(np.uint64, copy=False)

    def digests(self, digests: list[int], allow_empty: bool) -> None:
        """Write a digest (u64) per region behind their count (u16); ``allow_empty``: or
        none at all."""
        n = len(digests)
        if n > MAX_REGIONS:
            raise self.fail(f"{n} digests, at most {MAX_REGIONS}")
        if self.regions is not None and n != len(self.regions) and not (allow_empty and not n):
            raise self.fail(f"{n} digests for {len(self.regions)} regions")
        self.uint(U16, n, "nregions")
        for i, digest in enumerate(digests):
            self.uint(U64, digest, f"digest {i}")

    def state(self, state: bytes) -> None:
        """Write a guest's state (SWITCHOVER, PREVIEW): its length (u32), then its bytes."""
        view = self.blob(state, "state")
        if view.nbytes > MAX_STATE:
            raise self.fail(f"state is {view.nbytes} bytes, at most {MAX_STATE}")
        self.uint(U32, view.nbytes, "state_len")
        self.put(view)

    def compressed(self, raw: memoryview) -> bytes | None:
        """``raw`` compressed, when the encoder compresses and that is smaller; or None."""
        if self._cctx is None or not raw.nbytes:
            return None
        packed: bytes = self._cctx.compress(raw)
        return packed if len(packed) < raw.nbytes else None


class Invalid(Exception):
    """A field that breaks a rule; ``at`` is its stream offset. Becomes RemoteProtocolError."""

    def __init__(self, message: str, at: int, frame: str = "header") -> None:
        super().__init__(message)
        self.message = message
        self.at = at
        self.frame = frame


class Reader:
    """A cursor over one frame's payload in the decoder's buffer. Reads past the end of
    the payload, and bytes left after the last field, are errors at their stream offset.

    ``page_size`` and ``regions`` are what the decoder knows of the stream; a frame that
    declares the regions (SETUP) sets ``regions``. ``fds`` arrived with the frame. A frame
    whose event keeps a view of the buffer sets ``handover``: the decoder starts a new one.
    """

    __slots__ = (
        "_base",
        "_buf",
        "_end",
        "_inflater",
        "_pos",
        "fds",
        "handover",
        "page_size",
        "regions",
        "start",
    )

    def __init__(
        self,
        buf: bytearray,
        pos: int,
        end: int,
        *,
        base: int,
        start: int,
        fds: list[int],
        page_size: int,
        regions: tuple[int, ...] | None,
        inflater: Callable[[], zstandard.ZstdDecompressor],
    ) -> None:
        self._buf = buf
        self._pos = pos
        self._end = end
        #: Stream offset of buf[0].
        self._base = base
        #: Stream offset of the frame's first header byte.
        self.start = start
        self.fds = fds
        self.page_size = page_size
        self.regions = regions
        self._inflater = inflater
        self.handover = False

    @property
    def at(self) -> int:
        """Stream offset of the next field."""
        return self._base + self._pos

    @property
    def left(self) -> int:
        return self._end - self._pos

    def _take(self, n: int, what: str) -> int:
        """Buffer index of the next ``n`` bytes (field ``what``)."""
        if n > self._end - self._pos:
            raise Invalid(
                f"{what} needs {n} bytes, the payload has {self._end - self._pos} left", self.at
            )
        pos = self._pos
        self._pos += n
        return pos

    def unpack(self, st: struct.Struct, what: str) -> tuple[Any, ...]:
        return st.unpack_from(self._buf, self._take(st.size, what))

    def uint(self, st: struct.Struct, what: str) -> int:
        value: int = st.unpack_from(self._buf, self._take(st.size, what))[0]
        return value

    def time(self, what: str) -> float:
        at = self.at
        (value,) = self.unpack(F64, what)
        problem = time_problem(value)
        if problem:
            raise Invalid(f"{what}: {problem}", at)
        return float(value)

    def enum(self, cls: type[_E], what: str) -> _E:
        at = self.at
        value = self.uint(U8, what)
        try:
            return cls(value)
        except ValueError:
            raise Invalid(f"unknown {what} {value}", at) from None

    def blob(self, n: int, what: str) -> bytes:
        i = self._take(n, what)
        return bytes(memoryview(self._buf)[i : i + n])

    def text(self, prefix: struct.Struct, limit: int, what: str) -> str:
        at = self.at
        n = self.uint(prefix, f"{what} length")
        if n > limit:
            raise Invalid(f"{what} of {n} bytes, at most {limit}", at)
        at = self.at
        raw = self.blob(n, what)
        try:
            return raw.decode()
        except UnicodeDecodeError as err:
            raise Invalid(
                f"{what} is not UTF-8 ({err.reason} at its byte {err.start})", at
            ) from None

    def region(self) -> int:
        """A region index (u16), which must name one of the known regions."""
        at = self.at
        region = self.uint(U16, "region")
        if self.regions is not None and region >= len(self.regions):
            raise Invalid(f"region {region}, but there are {len(self.regions)}", at)
        return region

    def runs(self, n: int, n_at: int, region: int) -> Runs:
        """``n`` runs within ``region``; ``n_at`` is where their count was."""
        if self.regions is None and n > MAX_RUNS:
            raise Invalid(f"{n} runs, at most {MAX_RUNS}", n_at)
        if not n:
            return no_runs()
        at = self.at
        start = self._take(n * RUN_SIZE, f"{n} runs")
        raw = np.frombuffer(self._buf, dtype="<u8", count=2 * n, offset=start)
        runs = raw.reshape(-1, 2).astype(np.uint64)
        bad = bad_run(runs, runs_limit(self.page_size, self.regions, region))
        if bad:
            i, column, why = bad
            raise Invalid(f"run {i}: {why}", at + i * RUN_SIZE + 8 * column)
        return runs

    def digests(self, allow_empty: bool) -> list[int]:
        """A digest (u64) per region behind their count (u16); ``allow_empty``: or none."""
        at = self.at
        n = self.uint(U16, "nregions")
        if n > MAX_REGIONS:
            raise Invalid(f"{n} digests, at most {MAX_REGIONS}", at)
        known = self.regions
        if known is not None and n != len(known) and not (allow_empty and not n):
            raise Invalid(f"{n} digests for {len(known)} regions", at)
        return list(self.unpack(struct.Struct(f"<{n}Q"), f"{n} digests"))

    def state(self) -> bytes:
        """A guest's state (SWITCHOVER, PREVIEW): its length (u32), then its bytes."""
        at = self.at
        n = self.uint(U32, "state_len")
        if n > MAX_STATE:
            raise Invalid(f"state of {n} bytes, at most {MAX_STATE}", at)
        return self.blob(n, "state")

    def raw(self, n: int, what: str) -> bytes | memoryview:
        """The next ``n`` bytes: a read-only view that takes the buffer over when that
        saves copying much (``handover``), else a copy."""
        i = self._take(n, what)
        tail = len(self._buf) - (i + n)
        if n >= HANDOVER_MIN and tail <= n:
            self.handover = True
            return memoryview(self._buf)[i : i + n].toreadonly()
        return bytes(memoryview(self._buf)[i : i + n])

    def inflate(self, n: int, raw_len: int, what: str) -> bytes:
        """The next ``n`` bytes, zstd data that must decompress to ``raw_len`` bytes."""
        at = self.at
        i = self._take(n, what)
        if not raw_len:
            raise Invalid("zstd data for 0 raw bytes", at)
        with memoryview(self._buf) as whole, whole[i : i + n] as src:
            try:
                # A declared content size makes zstd allocate it, whatever the limit.
                declared = zstandard.frame_content_size(src)
                if declared not in (-1, raw_len):
                    raise Invalid(f"zstd frame of {declared} bytes, raw_len says {raw_len}", at)
                out: bytes = self._inflater().decompress(
                    src, max_output_size=raw_len, allow_extra_data=False
                )
            except zstandard.ZstdError as err:
                raise Invalid(
                    f"zstd data does not decompress to {raw_len} bytes: {err}", at
                ) from None
        if len(out) != raw_len:
            raise Invalid(f"zstd data decompresses to {len(out)} bytes, not {raw_len}", at)
        return out

    def finish(self) -> None:
        if self._pos != self._end:
            raise Invalid(f"{self._end - self._pos} bytes after the last field", self.at)
