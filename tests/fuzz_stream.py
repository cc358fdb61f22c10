"""Fuzz target for the migration stream's decoder (in the spirit of h11's ``fuzz/``).

Property: whatever bytes arrive, in whatever chunks, :class:`pageflip.stream.Decoder`
returns events, returns None, or raises :class:`RemoteProtocolError` naming a frame and an
offset inside the stream. Nothing else escapes, and a broken decoder stays broken.

Run it for longer than the test suite does::

    .venv/bin/python tests/fuzz_stream.py 200000        # hypothesis, N examples
    python tests/fuzz_stream.py -atheris_runs=1000000   # libFuzzer, if atheris is installed

(pytest does not collect this file; tests/test_stream.py runs the same property briefly.)
"""

from __future__ import annotations

import importlib
import sys

import numpy as np

from pageflip import RemoteProtocolError
from pageflip.stream import (
    Decoder,
    Done,
    Event,
    Feature,
    Flip,
    FrameType,
    Hello,
    Mode,
    Pages,
    RegionInfo,
    Request,
    Role,
    RoundEnd,
    Setup,
    Switchover,
    ZeroPages,
    encode,
)

PS = 4096
NAMES = {t.name for t in FrameType} | {"header"}


def _seeds() -> list[bytes]:
    runs = np.array([[0, 2], [9, 1]], dtype=np.uint64)
    events: list[Event] = [
        Hello(Role.SOURCE, PS, Feature.FLIP | Feature.ZSTD, bytes(16), "workload"),
        Setup(Mode.PRECOPY, 16, 1, [RegionInfo("ram", 16 * PS, 0, movable=True)]),
        Pages(0, 1, runs, bytes(3 * PS)),
        ZeroPages(0, 1, runs),
        RoundEnd(1, 3, 3 * PS, 1, 0.5),
        Flip([], []),
        Switchover(1.5, [1], b"state"),
        Request(0, 3, 2),
        Done({"ok": True}),
    ]
    seeds = [encode(ev, page_size=PS)[0] for ev in events]
    seeds.append(encode(Pages(0, 1, runs, bytes(3 * PS)), compress=3, page_size=PS)[0])
    return seeds


SEEDS = _seeds()


def one_input(data: bytes) -> None:
    """Byte 0: chunk size; byte 1: mode; then raw bytes (mode even) or edits of a seed:
    a seed index, then (position u16, byte) triples written over it."""
    if len(data) < 3:
        return
    chunk, mode, rest = data[0] + 1, data[1], data[2:]
    if mode & 1:
        stream = bytearray(b"".join(SEEDS[rest[0] % len(SEEDS) :]))
        for i in range(1, len(rest) - 2, 3):
            stream[int.from_bytes(rest[i : i + 2], "little") % len(stream)] = rest[i + 2]
        if mode & 2:
            del stream[int.from_bytes(rest[:2], "little") % len(stream) :]
    else:
        stream = bytearray(rest)
    dec = Decoder(PS)
    try:
        for i in range(0, len(stream), chunk):
            dec.feed(stream[i : i + chunk])
            while dec.next_event() is not None:
                pass
    except RemoteProtocolError as err:
        assert err.frame in NAMES, err
        assert err.offset is not None and 0 <= err.offset <= len(stream), err
        try:
            dec.next_event()
        except RemoteProtocolError as again:
            assert again is err
        else:  # pragma: no cover - a property violation
            raise AssertionError("the decoder recovered from a bad frame") from err
    finally:
        dec.close()


def main(argv: list[str]) -> None:
    if any(arg.startswith("-atheris") for arg in argv[1:]):
        atheris = importlib.import_module("atheris")

        atheris.Setup(argv, one_input)
        atheris.Fuzz()
        return
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    examples = int(argv[1]) if len(argv) > 1 else 100_000

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.binary(min_size=3, max_size=4000))
    def run(data: bytes) -> None:
        one_input(data)

    run()
    print(f"{examples} examples: only RemoteProtocolError escaped")


if __name__ == "__main__":
    main(sys.argv)
