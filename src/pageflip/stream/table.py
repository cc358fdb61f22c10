"""The frame table: every frame type, by its type byte, with the event that it carries.

A frame is declared once, by decorating its event class with :func:`frame`: the type byte
and name, the payload bounds, whether fds travel with it. The event class says how its
payload is written and read (:meth:`Event.write`, :meth:`Event.read`). The encoder and the
decoder look frames up here and know none by name; :class:`FrameType` and the public names
of :mod:`pageflip.stream` are made from this table too.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Final, Self, TypeVar, cast

from ..errors import LocalProtocolError
from .fields import Reader, Writer
from .wire import HEADER, MAGIC, MAX_PAYLOAD, VERSION


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame type: its type byte, name, event class and payload bounds.

    The bounds are checked as soon as a frame's header is in, before its payload is.
    """

    code: int
    #: The frame's name, the ``frame`` of protocol errors about it.
    name: str
    event: type[Event]
    #: Fewest and most payload bytes.
    least: int
    most: int
    #: Whether fds travel with the frame (SCM_RIGHTS).
    takes_fds: bool = False
    #: A frame of nothing but its header (PREPARED, COMMIT) has one encoding: these bytes
    #: (None for any other frame).
    signal: bytes | None = None


class Event:
    """What a frame carries: each frame type's event class is declared with :func:`frame`.

    A subclass is a dataclass of the frame's fields that writes them in :meth:`write` and
    reads them back in :meth:`read`, field by field and in the same order.
    """

    __slots__ = ()

    #: The frame that carries this event (set by :func:`frame`).
    FRAME: ClassVar[Frame]

    def write(self, w: Writer) -> None:
        """Write this event's payload through ``w``, which checks every field."""
        raise NotImplementedError

    @classmethod
    def read(cls, r: Reader) -> Self:
        """The event whose payload ``r`` reads; a field that breaks a rule raises."""
        raise NotImplementedError


#: Every frame type, by type byte: the table itself.
FRAMES: Final[dict[int, Frame]] = {}
#: The frames without a payload, by their bytes (see :attr:`Frame.signal`): inside a
#: guest's pause the encoder and decoder take these whole, cold code being slow there.
SIGNALS: Final[dict[bytes, Frame]] = {}

_T = TypeVar("_T", bound=type[Event])


def frame(
    code: int, name: str, least: int, most: int | None = None, *, takes_fds: bool = False
) -> Callable[[_T], _T]:
    """Declare the decorated event class as the frame with type byte ``code``, named
    ``name``, whose payload is ``least`` to ``most`` bytes (exactly ``least`` by default).
    """
    top = least if most is None else most

    def declare(cls: _T) -> _T:
        if not 0 < code < 256 or code in FRAMES:
            raise LocalProtocolError(f"frame type {code} is not a free u8 above 0 for {name}")
        if any(f.name == name for f in FRAMES.values()):
            raise LocalProtocolError(f"two frames are named {name}")
        if not 0 <= least <= top <= MAX_PAYLOAD:
            raise LocalProtocolError(f"{name}: payload bounds {least}..{top} are out of order")
        signal = None if top or takes_fds else HEADER.pack(MAGIC, VERSION, code, 0, 0)
        spec = Frame(code, name, cls, least, top, takes_fds, signal)
        cls.FRAME = spec
        FRAMES[code] = spec
        if spec.signal is not None:
            SIGNALS[spec.signal] = spec
        return cls

    return declare


def frame_of(event: object) -> Frame | None:
    """The frame that carries ``event``, or None if it is no registered frame's event."""
    spec = type(event).__dict__.get("FRAME")
    if isinstance(spec, Frame) and FRAMES.get(spec.code) is spec:
        return spec
    return None


def frame_types() -> type[enum.IntEnum]:
    """The ``FrameType`` IntEnum of :mod:`pageflip.stream`: the table's names and type bytes."""
    members = [(FRAMES[code].name, code) for code in sorted(FRAMES)]
    # Typeshed reads this call of the functional API as a lookup of a member.
    kinds = cast("type[enum.IntEnum]", enum.IntEnum("FrameType", members, module=__package__))
    kinds.__doc__ = "The type byte of a frame header; its name is the ``frame`` of protocol errors."
    return kinds
