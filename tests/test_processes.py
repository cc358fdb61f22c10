"""Transfers between real processes: spawned children, unrelated programs, and deaths."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import pageflip as pf
import peers

PAGE = pf.PAGE_SIZE
HERE = Path(__file__).parent


def test_gift_to_a_spawned_child_moves(spawn: Any) -> None:
    a, b = pf.channel_pair(timeout=60)
    results = spawn.Queue()
    child = spawn.Process(target=peers.receive_and_report, args=(b, results))
    child.start()
    b.close()
    region = pf.Region.movable(16 << 20, name="to-child")
    expect = peers.fill(region, 3)
    sent = a.gift(region)
    got = results.get(timeout=60)
    child.join(30)
    a.close()
    results.close()
    results.join_thread()
    assert child.exitcode == 0
    assert got["digest"] == expect and got["pid"] != os.getpid()
    assert sent.moved and got["transfer"]["method"] == "move"
    assert got["transfer"]["pages_moved"] == (16 << 20) // PAGE
    assert region.closed


def test_gift_from_a_spawned_child_moves(spawn: Any) -> None:
    a, b = pf.channel_pair(timeout=60)
    results = spawn.Queue()
    child = spawn.Process(target=peers.gift_and_report, args=(b, 4 << 20, 5, results))
    child.start()
    b.close()
    before = results.get(timeout=60)
    region, received = a.receive()
    after = results.get(timeout=60)
    child.join(30)
    a.close()
    results.close()
    results.join_thread()
    try:
        assert child.exitcode == 0
        assert peers.digest(region.view()) == before["digest"]
        assert received.moved and after["transfer"]["method"] == "move" and after["closed"]
    finally:
        region.close()


def test_unrelated_processes_move_a_256_mib_numpy_array(tmp_path: Path) -> None:
    path = str(tmp_path / "pf.sock")
    script = str(HERE / "peers.py")
    sender = subprocess.Popen(
        [sys.executable, script, "send", path, "256"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert sender.stdout is not None
        assert json.loads(sender.stdout.readline()) == {"listening": path}
        receiver = subprocess.run(
            [sys.executable, script, "receive", path],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        sent = json.loads(sender.stdout.readline())
        sender.wait(60)
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()
        if sender.stdout is not None:
            sender.stdout.close()
    got = json.loads(receiver.stdout.strip().splitlines()[-1])
    assert sender.returncode == 0
    assert got["ok"] and got["digest"] == sent["digest"]
    for t in (sent["transfer"], got["transfer"]):
        assert t["method"] == "move" and t["pages_copied"] == 0
        assert t["pages_moved"] == (256 << 20) // PAGE
    assert sent["closed"]
    if os.geteuid() == 0:  # proof by physical frame numbers (tests/test_root.py has more)
        assert got["frames"] == sent["frames"]
    assert not Path(path).exists()  # the listener removed its socket file


def test_reader_killed_mid_gift_leaves_the_data_with_the_writer(spawn: Any, tmp_path: Path) -> None:
    path = str(tmp_path / "pf.sock")
    with pf.Channel.listen(path) as listener:
        ready = spawn.Event()
        child = spawn.Process(target=peers.stall_after_connect, args=(path, ready))
        child.start()
        channel = listener.accept(timeout=60)
    region = pf.Region.movable(8 << 20)
    expect = peers.fill(region, 9)
    try:
        assert ready.wait(60)
        timer = _kill_later(child.pid, 0.3)
        start = time.monotonic()
        with pytest.raises(pf.PeerClosed):
            channel.gift(region)
        assert time.monotonic() - start < 30  # it noticed; it did not hang
        timer.join()
        assert not region.closed and peers.digest(region.view()) == expect
    finally:
        child.join(30)
        channel.close()
        region.close()


def test_writer_killed_mid_stream_is_peer_closed(spawn: Any) -> None:
    a, b = pf.channel_pair(timeout=60)
    ready = spawn.Event()
    child = spawn.Process(target=peers.stream_half_then_stall, args=(b, 4 << 20, ready))
    child.start()
    b.close()
    dest = bytearray(4 << 20)
    timer = None
    try:

        def kill_when_ready() -> None:
            ready.wait(60)
            time.sleep(0.2)
            assert child.pid is not None
            os.kill(child.pid, signal.SIGKILL)

        import threading

        timer = threading.Thread(target=kill_when_ready)
        timer.start()
        with pytest.raises(pf.PeerClosed, match="mid-stream"):
            a.receive_into(dest, copy_method="stream")
        assert dest[: 2 << 20] == b"\x07" * (2 << 20)  # what arrived is intact
    finally:
        if timer is not None:
            timer.join()
        child.join(30)
        a.close()


def _kill_later(pid: int | None, delay: float) -> Any:
    import threading

    def kill() -> None:
        time.sleep(delay)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)

    thread = threading.Thread(target=kill)
    thread.start()
    return thread
