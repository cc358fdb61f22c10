"""Peers the process tests start: spawn targets, and a script for unrelated processes.

As a script: ``python peers.py send PATH MIB`` listens at PATH and gifts MIB MiB of a numpy
array in a movable region; ``python peers.py receive PATH`` connects and receives. Each prints
one JSON line about what it did.
"""

from __future__ import annotations

import json
import os
import sys
import time
from multiprocessing import reduction
from multiprocessing.queues import Queue
from typing import Any

import numpy as np
import xxhash

import pageflip as pf


def digest(buf: Any) -> str:
    return xxhash.xxh3_64_hexdigest(memoryview(buf).cast("B"))


def frames_or_none(obj: Any) -> list[int] | None:
    if os.geteuid() != 0:
        return None
    return [int(x) for x in pf.physical_frames(obj)]


def fill(region: pf.Region, seed: int) -> str:
    arr = region.numpy(np.uint64)
    arr[:] = np.random.default_rng(seed).integers(0, 2**63, arr.size, dtype=np.uint64)
    out = digest(arr)
    del arr
    return out


# -- spawn targets --------------------------------------------------------------------------


def receive_and_report(channel: pf.Channel, results: Queue[Any]) -> None:
    """receive() one transfer; report its digest, Transfer and PFNs."""
    region, transfer = channel.receive()
    results.put(
        {
            "digest": digest(region.view()),
            "transfer": transfer.as_dict(),
            "frames": frames_or_none(region),
            "pid": os.getpid(),
        }
    )
    region.close()
    channel.close()


def gift_and_report(channel: pf.Channel, size: int, seed: int, results: Queue[Any]) -> None:
    """Fill a movable region, report digest and PFNs, then gift it."""
    region = pf.Region.movable(size, name="child")
    results.put({"digest": fill(region, seed), "frames": frames_or_none(region)})
    transfer = channel.gift(region)
    results.put({"transfer": transfer.as_dict(), "closed": region.closed})
    channel.close()


def stall_after_connect(path: str, ready: Any) -> None:
    """Connect, say hello, then never answer (to be killed)."""
    channel = pf.Channel.connect(path)
    channel._say_hello()
    ready.set()
    time.sleep(600)


def stream_half_then_stall(channel: pf.Channel, size: int, ready: Any) -> None:
    """Offer an anonymous region, push half of it when asked to stream, then hang."""
    from pageflip._wire import Pull, PullMethod

    region = pf.Region.anonymous(size)
    region.view()[:] = b"\x07" * size
    original = channel._recv

    def recv_then_half(phase: str) -> Any:
        frame = original(phase)
        if isinstance(frame, Pull) and frame.method is PullMethod.STREAM:
            channel._conn.sock.sendall(region.view(0, size // 2))
            ready.set()
            time.sleep(600)
        return frame

    channel._recv = recv_then_half  # type: ignore[method-assign]
    channel.gift(region)


class PassFd:
    """An fd handed to a spawned child: pickling dups it into the child, as a Channel's is."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_fd, (reduction.DupFd(self.fd),))


def _rebuild_fd(dup: Any) -> PassFd:
    return PassFd(dup.detach())


def offer_fd_then_gift(
    channel: pf.Channel, passed: PassFd, offset: int, length: int, results: Queue[Any]
) -> None:
    """Gift ``length`` bytes at ``offset`` of the passed fd as if it were a memfd, twice
    (the reader refuses it in receive() and in receive_into()); report what the channel
    said each time; then gift a good region and report its digest."""
    from pageflip.channel.transfer import _Piece
    from pageflip.memory import Memfd

    memfd = Memfd(passed.fd)
    try:
        for _ in range(2):
            try:
                channel._offer([_Piece(0x10000, length, memfd, offset)], gift=True, name="evil")
            except pf.PeerRefused as err:
                results.put({"refused": err.reason, "phase": err.phase})
            else:
                results.put({"accepted": True})
        region = pf.Region.movable(2 * pf.PAGE_SIZE, name="good")
        results.put({"digest": fill(region, 3)})
        channel.gift(region)
    finally:
        memfd.close()
        channel.close()


def connect_as(path: str, uid: int, results: Queue[Any]) -> None:
    """Drop to ``uid``, connect to ``path`` and report whether the listener kept us."""
    os.setgid(uid)
    os.setuid(uid)
    try:
        channel = pf.Channel.connect(path, timeout=30)
    except OSError as err:
        results.put(f"error: {err}")
        return
    channel.timeout = 10
    try:
        channel._say_hello()
        channel._recv("probe")
        results.put("kept")
    except pf.PeerRejected as err:
        results.put(f"rejected: {err}")
    except pf.PeerClosed:
        results.put("closed")
    except pf.PeerTimeout:
        results.put("kept")
    finally:
        channel.close()


# -- unrelated processes --------------------------------------------------------------------


def script_send(path: str, mib: int) -> dict[str, Any]:
    with pf.Channel.listen(path) as listener:
        print(json.dumps({"listening": path}), flush=True)
        channel = listener.accept(timeout=60)
    region = pf.Region.movable(mib << 20, name="shared-array")
    arr = region.numpy(np.float32)
    arr[:] = np.arange(arr.size, dtype=np.float32)
    before = digest(arr)
    del arr
    frames = frames_or_none(region)
    transfer = channel.gift(region)
    channel.close()
    return {
        "digest": before,
        "transfer": transfer.as_dict(),
        "frames": frames,
        "closed": region.closed,
    }


def script_receive(path: str) -> dict[str, Any]:
    channel = pf.Channel.connect(path, timeout=60)
    region, transfer = channel.receive()
    arr = region.numpy(np.float32)
    ok = bool((arr == np.arange(arr.size, dtype=np.float32)).all())
    after = digest(arr)
    del arr
    frames = frames_or_none(region)
    region.close()
    channel.close()
    return {"digest": after, "transfer": transfer.as_dict(), "frames": frames, "ok": ok}


if __name__ == "__main__":
    role = sys.argv[1]
    result = (
        script_send(sys.argv[2], int(sys.argv[3]))
        if role == "send"
        else script_receive(sys.argv[2])
    )
    print(json.dumps(result), flush=True)


def answers_until(conn: Any, decoder: Any, kind: type) -> list[Any]:
    """The frames a raw migration link (``conn``, read through ``decoder``) brings until one
    of ``kind`` has come, in order."""
    answers: list[Any] = []
    while not any(isinstance(a, kind) for a in answers):
        data, fds = conn.recv()
        assert data, f"the destination closed after {answers}"
        decoder.feed(data, fds)
        while (event := decoder.next_event()) is not None:
            answers.append(event)
    return answers
