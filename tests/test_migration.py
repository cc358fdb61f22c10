"""Live migration between real processes: every mode, verified by the workload itself and by
digests, and every failure before the commit point injected for real."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import migration_peers as peers
from cli_procs import pagers
from helpers import IS_ROOT

MiB = 1 << 20


class Run:
    """A source process and a destination process, and what each reported."""

    def __init__(self, spawn: Any, address: str) -> None:
        self.spawn = spawn
        self.address = address
        self.src_reader, self.src_writer = spawn.Pipe(duplex=False)
        self.dst_reader, self.dst_writer = spawn.Pipe(duplex=False)
        self.procs: list[Any] = []

    def start(
        self,
        *,
        size: int = 16 * MiB,
        rate: int = 32 * MiB,
        options: dict[str, Any] | None = None,
        source_fault: str = "",
        destination_fault: str = "",
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        dst = self.spawn.Process(
            target=peers.destination, args=(self.address, self.dst_writer, destination_fault)
        )
        dst.start()
        self.procs.append(dst)
        _wait_for_listener(self.address)
        src = self.spawn.Process(
            target=peers.source,
            args=(self.address, size, rate, options or {}, self.src_writer, source_fault),
        )
        src.start()
        self.procs.append(src)
        source = _get(self.src_reader, src, 120)
        dst.join(60)
        destination = self.dst_reader.recv() if self.dst_reader.poll(5) else None
        src.join(60)
        return source, destination

    def close(self) -> None:
        for proc in self.procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join()
            proc.close()
        for end in (self.src_reader, self.src_writer, self.dst_reader, self.dst_writer):
            end.close()


def _get(reader: Any, proc: Any, timeout: float) -> Any:
    """The child's report; fails at once if the child died without one."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if reader.poll(0.5):
            return reader.recv()
        if not proc.is_alive():
            if reader.poll(1):
                return reader.recv()
            raise AssertionError(f"{proc.name} died (exit {proc.exitcode}) without a report")
    raise AssertionError(f"{proc.name} sent no report in {timeout} s")


def _wait_for_listener(address: str) -> None:
    import time

    if address.startswith("tcp:"):
        time.sleep(0.5)
        return
    for _ in range(600):
        if os.path.exists(address):
            return
        time.sleep(0.05)
    raise AssertionError(f"nobody listens at {address}")


@pytest.fixture
def run(spawn: Any, tmp_path: Path) -> Iterator[Run]:
    r = Run(spawn, str(tmp_path / "incoming.sock"))
    yield r
    r.close()


def _kinds(events: list[dict[str, Any]]) -> list[str]:
    """The kinds of events in order, progress left out and repeated postcopy progress
    counted once."""
    kinds: list[str] = []
    for e in events:
        kind = e["event"]
        if kind != "progress" and not (kind == "postcopy" and kinds and kinds[-1] == kind):
            kinds.append(kind)
    return kinds


# -- the modes ------------------------------------------------------------------------------


SOURCE_STEPS = {
    "flip": ["pause asked", "paused", "state saved", "frames sent"],
    "precopy": ["pause asked", "paused", "last writes found", "last round sent", "state saved"],
    "postcopy": ["pause asked", "paused", "stale pages dropped", "state saved", "frames sent"],
}


@pytest.mark.parametrize("mode", ["flip", "precopy", "postcopy"])
def test_every_switchover_records_its_pause_budget(run: Run, mode: str) -> None:
    """Each side marks the steps of the pause on the host's one monotonic clock: the source
    in its done event, the destination in its resumed event, both merged in the
    destination's done event; every step of one side comes after the step of the other
    side that it waits for."""
    src, dst = run.start(options={"mode": mode})
    assert src["ok"] and dst is not None and dst["ok"], (src, dst)
    ours = src["done"]["pause_steps"]
    names = [s["step"] for s in ours]
    want = [*SOURCE_STEPS[mode], "PREPARED heard", "COMMIT sent", "RESUMED heard"]
    assert [n for n in names if n in want] == want, names
    assert {s["side"] for s in ours} == {"source"}
    paused = next(s for s in ours if s["step"] == "paused")
    assert paused["at"] == 0.0
    assert [s["at"] for s in ours] == sorted(s["at"] for s in ours)

    resumed = next(e for e in dst["events"] if e["event"] == "resumed")
    theirs = resumed["pause_steps"]
    for name in ("SWITCHOVER read", "state restored", "PREPARED sent", "COMMIT read", "resumed"):
        assert name in [s["step"] for s in theirs], (name, theirs)
    at = {(s["side"], s["step"]): s["at"] for s in ours + theirs}
    assert at["destination", "resumed"] == pytest.approx(resumed["downtime"])
    # A step ends when its call returns, so what a side sent may be read before its step
    # ends: each read comes after the step before the sending one.
    assert at["source", "state saved"] <= at["destination", "SWITCHOVER read"]
    if mode == "flip":
        # Restored ahead from the PREVIEW, threads started, memfds checked at the LEND: the
        # pause carries no FLIP and starts no thread.
        assert ("destination", "FLIP checked") not in at
        assert ("destination", "guest prepared") not in at
        last = "state restored"
    else:
        last = "guest prepared"
    assert at["destination", last] <= at["source", "PREPARED heard"]
    assert at["source", "PREPARED heard"] <= at["destination", "COMMIT read"]
    assert at["destination", "resumed"] <= at["source", "RESUMED heard"]

    done = next(e for e in dst["events"] if e["event"] == "done")
    merged = done["pause_steps"]
    assert sorted(map(str, merged)) == sorted(map(str, ours + theirs))
    assert [s["at"] for s in merged] == sorted(s["at"] for s in merged)


def test_flip_moves_every_page_and_the_workload_verifies(run: Run) -> None:
    src, dst = run.start(options={"mode": "flip"})
    assert src["ok"], src
    done = src["done"]
    assert done["mode"] == "flip" and done["digest"] == "identity"
    assert done["pages_copied"] == 0 and done["pages_moved"] > 0
    assert done["bytes_on_wire"] < 4096  # no memory on the wire
    assert _kinds(src["events"]) == ["setup", "switchover", "prepared", "commit", "resumed", "done"]
    assert src["memfds_left"] == []  # the source holds no copy
    assert dst is not None and dst["ok"] and dst["verify"], dst
    assert dst["status"]["migrations"] == 1 and dst["status"]["problems"] == 0
    if IS_ROOT:
        assert dst["frames"] == src["frames"]  # the very same physical pages


def test_a_guest_whose_warm_up_before_the_pause_fails_still_migrates(run: Run) -> None:
    """Guest.about_to_pause() only warms what the pause will run: if it raises, the pause
    and the migration go on as without it."""
    src, dst = run.start(options={"mode": "flip"}, source_fault="warm-up-fails")
    assert src["ok"], src
    assert src["done"]["mode"] == "flip"
    assert dst is not None and dst["ok"] and dst["verify"], dst


def test_precopy_copies_verifies_and_frees_the_source(run: Run) -> None:
    src, dst = run.start(size=32 * MiB, rate=64 * MiB, options={"mode": "precopy"})
    assert src["ok"], src
    done = src["done"]
    assert done["mode"] == "precopy" and done["digest"] == "verified"
    assert done["pages_moved"] == 0 and done["pages_copied"] >= (32 * MiB) // 4096
    kinds = _kinds(src["events"])
    assert kinds[0] == "setup"
    assert kinds[-5:] == ["switchover", "prepared", "commit", "resumed", "done"]
    assert "round" in kinds
    assert src["memfds_left"] == []
    assert dst is not None and dst["ok"] and dst["verify"], dst
    if IS_ROOT:
        assert not set(dst["frames"]) & set(src["frames"])  # copies, not the same frames


def test_precopy_without_pull_sends_pages_and_zero_markers(run: Run) -> None:
    src, dst = run.start(options={"mode": "precopy", "pull": False}, rate=0)
    assert src["ok"], src
    assert dst is not None and dst["ok"] and dst["verify"], dst
    done = src["done"]
    assert done["bytes_on_wire"] > 16 * MiB  # the pages travelled as bytes
    assert done["pages_zero"] > 0  # the journal of a workload that never wrote is zeros


def _tcp_run(spawn: Any) -> Run:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return Run(spawn, f"tcp:127.0.0.1:{port}")


def test_precopy_over_tcp_with_zstd(spawn: Any) -> None:
    r = _tcp_run(spawn)
    try:
        src, dst = r.start(options={"mode": "precopy", "compress": 3}, rate=16 * MiB)
    finally:
        r.close()
    assert src["ok"], src
    assert src["done"]["mode"] == "precopy"
    assert dst is not None and dst["ok"] and dst["verify"], dst


def test_precopy_over_tcp_that_cannot_converge_is_forced_not_postcopy(spawn: Any) -> None:
    """Postcopy's pager reads the source's memory: over TCP there is none, so the fallback
    is a forced switchover, never a postcopy the destination would refuse."""
    r = _tcp_run(spawn)
    try:
        src, dst = r.start(
            size=32 * MiB,
            rate=256 * MiB,
            options={
                "mode": "precopy",
                "downtime_limit": 1e-6,
                "max_rounds": 2,
                "max_bandwidth": 64 * MiB,
                "on_no_convergence": "postcopy",
            },
        )
    finally:
        r.close()
    assert src["ok"], src
    assert src["done"]["mode"] == "precopy"
    assert dst is not None and dst["ok"] and dst["verify"], dst


def test_auto_mode_flips_locally(run: Run) -> None:
    src, _ = run.start(options={"mode": "auto"}, rate=0)
    assert src["ok"] and src["done"]["mode"] == "flip"


def test_precopy_that_cannot_converge_is_forced_after_max_rounds(run: Run) -> None:
    src, dst = run.start(
        size=32 * MiB,
        rate=256 * MiB,
        options={"mode": "precopy", "downtime_limit": 1e-6, "max_rounds": 1},
    )
    assert src["ok"], src
    (switch,) = [e for e in src["events"] if e["event"] == "switchover"]
    assert switch["reason"] == "forced"
    assert switch["why"].startswith("precopy did not converge in 1 round; switching over")
    assert src["done"]["rounds"] == 2  # one round, then the final one while paused
    assert dst is not None and dst["verify"], dst


def test_precopy_that_cannot_converge_says_so_after_two_rounds(run: Run) -> None:
    """Writes as fast as the rounds (256 MiB/s against rounds slowed to 64 MiB/s): each
    round leaves about as much to send as it sent. Two rounds show it, not thirty; the
    forced pause is said, in the event and the report, to be over the downtime limit."""
    src, dst = run.start(
        size=32 * MiB,
        rate=256 * MiB,
        options={"mode": "precopy", "max_bandwidth": 64 * MiB},  # 300 ms, 30 rounds
    )
    assert src["ok"], src
    (switch,) = [e for e in src["events"] if e["event"] == "switchover"]
    assert switch["reason"] == "forced"
    why = switch["why"]
    assert why.startswith("precopy cannot converge: round 2 sent"), why
    assert "OVER the 300 ms downtime limit" in why, why
    assert src["done"]["rounds"] == 3  # two rounds, then the final one while paused
    assert src["done"]["details"]["no_convergence"] == why
    assert dst is not None and dst["verify"], dst


# -- failures before the commit point: the guest keeps running on the source ---------------


def _source_kept_it(src: dict[str, Any], phase: str | None = None) -> None:
    assert not src["ok"], src
    assert src["guest"] == "source"
    assert src["verify"], src["problems"]
    assert src["still_writing"] and not src["paused"]
    if phase is not None:
        assert src["phase"] == phase, src


@pytest.mark.parametrize(
    ("fault", "mode", "phase"),
    [
        ("kill-at-setup", "precopy", "setup"),
        ("kill-mid-round", "precopy", "precopy"),
        ("close-mid-round", "precopy", "precopy"),
        ("kill-at-switchover", "precopy", "switchover"),
        ("kill-at-switchover", "flip", "switchover"),
    ],
)
def test_destination_failures_leave_the_guest_on_the_source(
    run: Run, fault: str, mode: str, phase: str
) -> None:
    src, dst = run.start(options={"mode": mode}, destination_fault=fault)
    _source_kept_it(src, phase)
    assert dst is None or not dst["ok"]
    assert any(e["event"] == "failed" for e in src["events"])


def test_corrupted_page_data_is_a_digest_mismatch(run: Run) -> None:
    # No writes: a rewrite of the corrupted page would resend it and heal the copy.
    src, dst = run.start(
        rate=0, options={"mode": "precopy", "pull": False}, source_fault="corrupt-page-data"
    )
    _source_kept_it(src, "switchover")
    assert dst is not None and dst["type"] == "DigestMismatch", dst
    assert "hash to" in dst["error"]


def test_a_flip_whose_regions_changed_after_the_lend_stays_on_the_source(run: Run) -> None:
    """With AHEAD no FLIP names the memfds in the pause: the source itself checks that its
    regions are still the files it lent, and a region moved onto another memfd since (the
    destination would resume the guest on stale pages) fails the flip before the commit."""
    src, dst = run.start(options={"mode": "flip"}, source_fault="swap-memfd-after-lend")
    _source_kept_it(src, "switchover")
    assert "no longer the memfds lent" in src["error"], src
    assert dst is not None and not dst["ok"]


def test_a_refusal_that_came_before_our_last_setup_frame_is_told(run: Run) -> None:
    """The destination fails at the LEND and closes before the source's PREVIEW goes out:
    that send fails on the closed socket with the destination's ABORT unread. The source
    reads it and says why, not only that the peer closed (a loaded host's race)."""
    src, dst = run.start(
        options={"mode": "flip"},
        source_fault="preview-after-the-destination-left",
        destination_fault="fail-at-the-lend",
    )
    _source_kept_it(src, "setup")
    assert "can't start new thread (a pids limit, on purpose)" in src["error"], src
    assert dst is not None and not dst["ok"] and dst["phase"] == "setup", dst


@pytest.mark.parametrize("told", ["by-receive", "by-send"])
def test_a_destination_that_gives_up_mid_round_is_heard(run: Run, told: str) -> None:
    """The destination fails on a pull mid-round, says ABORT and closes. The source finds
    out as it reads (the ABORT), or as its next send fails on the closed socket with the
    ABORT unread (made certain by ``by-send``): either way it names why."""
    src, dst = run.start(
        options={"mode": "precopy"},
        source_fault="next-send-after-the-destination-left" if told == "by-send" else "",
        destination_fault="fail-mid-round",
    )
    _source_kept_it(src, "precopy")
    assert "the pages could not land (on purpose)" in src["error"], src
    assert dst is not None and not dst["ok"] and dst["phase"] == "receiving", dst


def test_a_corrupted_frame_is_refused(run: Run) -> None:
    src, dst = run.start(options={"mode": "precopy"}, source_fault="corrupt-frame-header")
    _source_kept_it(src)
    assert dst is not None and not dst["ok"] and "magic" in dst["error"], dst


def test_cancel_before_the_commit_point(run: Run) -> None:
    src, dst = run.start(
        size=32 * MiB,
        rate=256 * MiB,
        options={"mode": "precopy", "downtime_limit": 1e-6},
        source_fault="cancel-after-round",
    )
    _source_kept_it(src, "precopy")
    assert "cancelled" in src["error"]
    assert dst is not None and not dst["ok"]


def test_nobody_listening_fails_at_setup(spawn: Any, tmp_path: Path) -> None:
    reader, writer = spawn.Pipe(duplex=False)
    proc = spawn.Process(
        target=peers.source,
        args=(str(tmp_path / "nobody.sock"), 4 * MiB, 8 * MiB, {"mode": "flip"}, writer),
    )
    proc.start()
    src = _get(reader, proc, 60)
    proc.join(30)
    proc.close()
    reader.close()
    writer.close()
    _source_kept_it(src, "setup")


# -- postcopy -------------------------------------------------------------------------------


def test_postcopy_runs_early_and_faults_pages_in(run: Run) -> None:
    src, dst = run.start(size=32 * MiB, rate=64 * MiB, options={"mode": "postcopy"})
    assert src["ok"], src
    done = src["done"]
    assert done["mode"] == "postcopy" and done["digest"] == "verified"
    assert done["rounds"] == 0  # nothing before the switchover
    details = done["details"]
    assert details["digests"] == "verified"
    assert details["requested"] + details["pushed"] > 0
    assert details["faults"] >= details["requested"]
    assert details["fault_p99_us"] >= details["fault_median_us"] >= 0
    kinds = _kinds(src["events"])
    assert kinds == ["setup", "switchover", "prepared", "commit", "resumed", "postcopy", "done"]
    assert dst is not None and dst["ok"] and dst["verify"], dst
    assert dst["pager_exits"] == [0]  # the pager finished cleanly, too
    assert src["memfds_left"] == []
    assert pagers() == []


def test_postcopy_after_a_round_drops_stale_pages(run: Run) -> None:
    src, dst = run.start(
        size=32 * MiB, rate=128 * MiB, options={"mode": "postcopy", "postcopy_after_rounds": 1}
    )
    assert src["ok"], src
    assert src["done"]["rounds"] == 1 and src["done"]["mode"] == "postcopy"
    assert dst is not None and dst["ok"] and dst["verify"], dst
    assert pagers() == []


def test_precopy_that_cannot_converge_falls_back_to_postcopy(run: Run) -> None:
    src, dst = run.start(
        size=32 * MiB,
        rate=256 * MiB,
        options={
            "mode": "precopy",
            "downtime_limit": 1e-6,
            "max_rounds": 2,
            "max_bandwidth": 64 * MiB,
            "on_no_convergence": "postcopy",
        },
    )
    assert src["ok"], src
    switch = [e for e in src["events"] if e["event"] == "switchover"]
    assert switch[0]["reason"] == "postcopy" and src["done"]["mode"] == "postcopy"
    assert dst is not None and dst["verify"], dst
    assert pagers() == []


def test_postcopy_destination_killed_before_resuming_leaves_the_guest_on_the_source(
    run: Run,
) -> None:
    src, dst = run.start(options={"mode": "postcopy"}, destination_fault="kill-at-switchover")
    _source_kept_it(src, "switchover")
    assert dst is None
    import time

    time.sleep(1)  # the orphaned pager notices its destination died and exits
    assert pagers() == []


def test_responsive_lowers_the_switch_interval_while_any_migration_runs() -> None:
    from pageflip.migration._gil import SWITCH_INTERVAL, responsive

    before = sys.getswitchinterval()
    with responsive():
        assert sys.getswitchinterval() == pytest.approx(min(before, SWITCH_INTERVAL))
        with responsive():
            assert sys.getswitchinterval() == pytest.approx(min(before, SWITCH_INTERVAL))
        assert sys.getswitchinterval() == pytest.approx(min(before, SWITCH_INTERVAL))
    assert sys.getswitchinterval() == before
    with pytest.raises(RuntimeError), responsive():
        raise RuntimeError("a failed migration restores it too")
    assert sys.getswitchinterval() == before


def test_postcopy_drops_stale_pages_only_after_hashing_them(
    spawn: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow hasher (a loaded machine) must not read a page after DISCARD dropped it:
    reading a hole of a memfd allocates a zero page there, which the pager would then take
    for a page that arrived, and the guest would read zeros."""
    from pageflip.migration import destination as dest_module
    from pageflip.migration.digests import PageDigests

    slow_update = PageDigests.update

    def slowly(self: PageDigests, runs: Any) -> Any:
        import time

        time.sleep(0.02)
        return slow_update(self, runs)

    monkeypatch.setattr(PageDigests, "update", slowly)
    listen = str(tmp_path / "in.sock")
    reader, writer = spawn.Pipe(duplex=False)
    dest = dest_module.Destination(listen, timeout=30)
    options = {"mode": "postcopy", "postcopy_after_rounds": 1, "pull": True}
    source = spawn.Process(target=peers.source, args=(listen, 32 * MiB, 128 * MiB, options, writer))
    source.start()
    try:
        guest = dest.run()
        try:
            assert dest.postcopy is not None and dest.postcopy["digests"] == "verified"
            assert guest.verify().ok
        finally:
            guest.close()
        report = reader.recv() if reader.poll(30) else None
        assert report is not None and report["ok"], report
    finally:
        source.join(30)
        source.close()
        reader.close()
        writer.close()
        dest.close()
