"""The guest interface and the reference workload (pageflip.guests).

What these prove: the workload's memory is always consistent while it runs; pause() really
stops every write (the heartbeat's too); a save_state/restore round trip onto copies of the
regions verifies and keeps running; verify() catches each way a migration can lose a write (a
stale page, an altered journal entry, a torn page, a final round that never arrived, a stale
heartbeat page); and the heartbeat tells how long the guest itself saw a pause, at least as
long as it really was, or None when its stamps cannot be compared.
"""

from __future__ import annotations

import json
import os
import pickle
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import zstandard

from pageflip import PAGE_SIZE, ClosedError, PageflipError, Region, StateError
from pageflip._sys import pagemap, procfs
from pageflip.guests import (
    MAX_STATE_BYTES,
    BadGuestState,
    Guest,
    UnknownGuest,
    VerifyReport,
    Workload,
    guest_class,
    register,
)
from pageflip.guests.workload import HB_MAGIC, HB_STAMP, HEARTBEAT_WINDOW, WORDS, Pattern
from pageflip.memory import Memfd

SIZE = 4 << 20
NPAGES = SIZE // PAGE_SIZE
FAST = 256 << 20  # rewrites a 4 MiB workload many times a second


def wait_until(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Poll ``check`` until it holds (a generous deadline only guards against hangs)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def contents(region: Region) -> bytes:
    with region.view() as view:
        return bytes(view)


def beat_words(region: Region) -> list[int]:
    """The first words of a heartbeat page: magic, boot id (2), time namespace, stamp."""
    return [int(w) for w in np.frombuffer(contents(region), np.uint64)[: HB_STAMP + 1]]


def beat_status(guest: Workload) -> dict[str, Any]:
    """The heartbeat's part of ``guest.status()``."""
    beat = guest.status()["heartbeat"]
    assert isinstance(beat, dict)
    return beat


def heartbeat_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "pageflip-workload-heartbeat"]


class Guests:
    """Makes workloads and region copies for a test, and closes all of them afterwards."""

    def __init__(self) -> None:
        self.guests: list[Guest] = []
        self.regions: list[Region] = []

    def create(
        self,
        size: int = SIZE,
        dirty_rate: float = FAST,
        *,
        seed: int = 0,
        paused: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> Workload:
        guest = Workload.create(size, dirty_rate, seed=seed, progress=progress, paused=paused)
        self.guests.append(guest)
        return guest

    def restore(self, regions: list[Region], state: bytes) -> Workload:
        guest = Workload.restore(regions, state)
        self.guests.append(guest)
        return guest

    def copy(self, guest: Guest) -> list[Region]:
        """New movable regions holding a copy of the guest's memory (take it paused)."""
        copies = []
        for region in guest.regions:
            copy = Region.movable(region.size, region.name)
            self.regions.append(copy)
            with copy.view() as dst, region.view() as src:
                dst[:] = src
            copies.append(copy)
        return copies

    def close(self) -> None:
        for guest in self.guests:
            guest.close()
        for region in self.regions:
            region.close()


@pytest.fixture
def guests() -> Iterator[Guests]:
    made = Guests()
    try:
        yield made
    finally:
        made.close()


def run_writes(guest: Workload, writes: int) -> None:
    """Let a paused or running guest make at least ``writes`` more writes, then pause it."""
    target = guest.total_writes + writes
    guest.resume()
    wait_until(lambda: guest.total_writes >= target, f"{writes} writes")
    guest.pause()


def migrated(guests: Guests, guest: Workload, writes: int = 2 * NPAGES) -> Workload:
    """Run ``guest``, pause it, and restore it onto copies of its regions."""
    run_writes(guest, writes)
    copies = guests.copy(guest)
    state = guest.save_state()
    guest.close()
    return guests.restore(copies, state)


def assert_all_good(report: VerifyReport, npages: int = NPAGES) -> None:
    assert report.problems == []
    assert report.ok
    assert report.pages_checked + report.pages_skipped == npages


# -- a workload on its own --------------------------------------------------------------


def test_create_fills_every_page_at_version_zero_and_verifies(guests: Guests) -> None:
    calls: list[tuple[int, int]] = []
    guest = guests.create(dirty_rate=0, paused=True, progress=lambda d, t: calls.append((d, t)))
    assert guest.paused and guest.total_writes == 0
    assert [r.name for r in guest.regions] == ["ram", "journal", "heartbeat"]
    assert [r.size for r in guest.regions][1:] == [PAGE_SIZE, PAGE_SIZE]  # 1024 pages: 4 KiB
    assert all(r.movable for r in guest.regions)
    assert not any(contents(guest.regions[2]))  # never run: no beat yet
    assert calls[-1] == (SIZE, SIZE)
    ram = guest.regions[0].numpy(np.uint64, (NPAGES, WORDS))
    expected = Pattern(0).make(np.arange(NPAGES, dtype=np.int64), np.zeros(NPAGES, np.uint64))
    assert np.array_equal(ram, expected)
    del ram
    assert not guest.regions[1].numpy(np.uint32).any()
    report = guest.verify()
    assert_all_good(report)
    assert report.pages_checked == NPAGES


def test_running_workload_verifies_while_it_writes(guests: Guests) -> None:
    guest = guests.create()
    assert not guest.paused
    wait_until(lambda: guest.total_writes > 4 * NPAGES, "writes")
    for _ in range(3):  # concurrently with the workers: pages being written are skipped
        assert_all_good(guest.verify())
    guest.pause()
    report = guest.verify()
    assert_all_good(report)
    assert report.pages_skipped == 0
    assert guest.regions[1].numpy(np.uint32).sum() == guest.total_writes


def test_pause_stops_every_write_and_resume_continues(guests: Guests) -> None:
    guest = guests.create(8 << 20)
    wait_until(lambda: guest.total_writes > 1000, "writes")
    paused_at = guest.pause()
    assert paused_at <= time.monotonic()
    assert guest.pause() == paused_at  # pausing again changes nothing
    ram, journal, heartbeat = guest.regions
    before = contents(ram), contents(journal), contents(heartbeat), guest.total_writes
    time.sleep(0.2)  # at 256 MiB/s the workers would rewrite the whole 8 MiB several times
    assert (contents(ram), contents(journal), contents(heartbeat), guest.total_writes) == before
    assert guest.status()["paused"] is True

    resumed_at = guest.resume()
    assert resumed_at >= paused_at
    wait_until(lambda: guest.total_writes > before[3], "writes after resume")
    guest.pause()
    assert contents(ram) != before[0]
    assert contents(journal) != before[1]
    assert contents(heartbeat) != before[2]
    assert_all_good(guest.verify(), npages=guest.npages)


def test_zero_dirty_rate_leaves_memory_alone(guests: Guests) -> None:
    guest = guests.create(dirty_rate=0)
    assert not guest.paused
    ram, journal, _ = guest.regions
    before = contents(ram), contents(journal)
    time.sleep(0.1)
    guest.pause()
    assert (contents(ram), contents(journal)) == before  # only the heartbeat beat
    assert guest.total_writes == 0
    assert guest.write_rate() == 0


def test_dirty_rate_can_change_while_running(guests: Guests) -> None:
    guest = guests.create(dirty_rate=0)
    guest.dirty_rate = FAST
    wait_until(lambda: guest.total_writes > 100, "writes at the new rate")
    with pytest.raises(ValueError, match="dirty_rate"):
        guest.dirty_rate = -1


def test_status_is_json_and_says_what_the_guest_does(guests: Guests) -> None:
    guest = guests.create()
    wait_until(lambda: guest.total_writes > 100, "writes")
    status = guest.status()
    json.dumps(status)
    assert status["kind"] == "workload"
    assert status["size"] == SIZE and status["threads"] == 2
    assert status["dirty_rate"] == FAST
    assert isinstance(status["write_rate"], float) and status["write_rate"] > 0
    assert status["paused"] is False and status["migrations"] == 0
    assert status["problems"] == 0 and status["first_touched"] is None
    beat = beat_status(guest)
    assert set(beat) == {
        "interval",
        "window",
        "switchover_gap",
        "max_gap_after_resume",
        "observed_pause",
        "settled",
        "unknown_because",
        "max_gap_running",
    }
    assert 0 < beat["interval"] < 0.001 and beat["window"] == HEARTBEAT_WINDOW
    # A new guest paused nothing: every gap so far is a running one.
    assert beat["observed_pause"] is None and beat["switchover_gap"] is None
    assert beat["unknown_because"] == "no heartbeat before this run"


def test_pages_are_incompressible(guests: Guests) -> None:
    guest = guests.create(dirty_rate=0, paused=True)
    data = contents(guest.regions[0])
    compressed = zstandard.ZstdCompressor(level=3).compress(data)
    assert len(compressed) > 0.99 * len(data)


def test_close_is_idempotent_and_ends_the_guest(guests: Guests) -> None:
    with Workload.create(SIZE, FAST) as guest:
        wait_until(lambda: guest.total_writes > 0, "writes")
        regions = guest.regions
    assert all(r.closed for r in regions)
    assert guest.regions == []
    guest.close()
    with pytest.raises(ClosedError):
        guest.resume()
    with pytest.raises(ClosedError):
        guest.verify()
    with pytest.raises(ClosedError):
        guest.save_state()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="thread"):
        Workload.create(SIZE, threads=0)
    with pytest.raises(ValueError, match="dirty_rate"):
        Workload.create(SIZE, dirty_rate=-1)


# -- save_state / restore -----------------------------------------------------------------


def test_state_is_small_json_and_needs_a_pause(guests: Guests) -> None:
    guest = guests.create()
    with pytest.raises(StateError) as info:
        guest.save_state()
    assert (info.value.phase, info.value.needed) == ("running", "paused")
    wait_until(lambda: beat_words(guest.regions[2])[HB_STAMP] > 0, "a first beat")
    guest.about_to_pause()  # a migration's warm-up: it runs on, nothing changes
    assert not guest.paused
    guest.pause()
    state = guest.save_state()
    assert len(state) < 1024 < MAX_STATE_BYTES
    data = json.loads(state)
    assert data["kind"] == "workload"
    assert data["total_writes"] == guest.total_writes
    assert data["size"] == SIZE and data["npages"] == NPAGES
    assert data["threads"] == 2 and data["dirty_rate"] == FAST and data["seed"] == 0
    assert data["migrations"] == 0
    assert data["heartbeat_ns"] == beat_words(guest.regions[2])[HB_STAMP] > 0


def test_restore_onto_copies_verifies_and_keeps_running(guests: Guests) -> None:
    source = guests.create()
    writes_made = 0

    def hop(guest: Workload) -> Workload:
        nonlocal writes_made
        run_writes(guest, 2 * NPAGES)
        writes_made = guest.total_writes
        copies = guests.copy(guest)
        state = guest.save_state()
        guest.close()
        return guests.restore(copies, state)

    dest = hop(source)
    assert dest.paused and dest.migrations == 1
    assert dest.total_writes == writes_made
    report = dest.verify()  # before it runs: every page read from memory
    assert_all_good(report)
    assert report.pages_checked == NPAGES

    dest.resume()
    # Run until the workers have rewritten (and first-touch checked) nearly every page.
    wait_until(lambda: dest.status()["first_touched"] == NPAGES, "every page rewritten")
    assert_all_good(dest.verify())
    dest.pause()
    assert_all_good(dest.verify())
    status = dest.status()
    assert status["problems"] == 0
    assert status["migrations"] == 1
    assert dest.total_writes > writes_made

    again = hop(dest)  # a second migration
    assert again.migrations == 2
    assert_all_good(again.verify())
    again.resume()
    wait_until(lambda: again.total_writes > writes_made + NPAGES, "writes after 2nd restore")
    again.pause()
    assert_all_good(again.verify())


def test_guest_class_restores_by_kind(guests: Guests) -> None:
    source = guests.create()
    run_writes(source, NPAGES)
    copies = guests.copy(source)
    state = source.save_state()
    cls = guest_class(json.loads(state)["kind"])
    dest = cls.restore(copies, state)
    guests.guests.append(dest)
    assert isinstance(dest, Workload)
    assert_all_good(dest.verify())


@pytest.mark.parametrize(
    ("change", "field", "match"),
    [
        (lambda d: b"not json", "state", "not JSON"),
        (lambda d: b"[1, 2]", "state", "not a JSON object"),
        (lambda d: {**d, "kind": "kvm"}, "kind", "kvm"),
        (lambda d: {**d, "format": 99}, "format", "format"),
        (lambda d: {**d, "total_writes": -1}, "total_writes", "total_writes"),
        (lambda d: {**d, "seed": "zero"}, "seed", "seed"),
        (lambda d: {**d, "size": SIZE + 1}, "size", "size"),
        (lambda d: {**d, "size": 2 * SIZE, "npages": 2 * NPAGES}, "ram", "ram region"),
        (lambda d: {**d, "threads": 0}, "threads", "threads"),
        (lambda d: {**d, "heartbeat_ns": -1}, "heartbeat_ns", "heartbeat_ns"),
        (lambda d: {**d, "format": 1}, "format", "format 1 is not 2"),
        (lambda d: b" " * (MAX_STATE_BYTES + 1), "state", "limit"),
    ],
)
def test_restore_rejects_a_bad_state(
    guests: Guests, change: Callable[[dict[str, object]], object], field: str, match: str
) -> None:
    source = guests.create(dirty_rate=0, paused=True)
    copies = guests.copy(source)
    changed = change(json.loads(source.save_state()))
    state = changed if isinstance(changed, bytes) else json.dumps(changed).encode()
    with pytest.raises(BadGuestState, match=match) as info:
        Workload.restore(copies, state)
    assert info.value.field == field
    assert info.value.kind == "workload"
    assert isinstance(info.value, PageflipError)
    assert not any(r.closed for r in copies)  # still the caller's


def test_restore_rejects_wrong_regions(guests: Guests) -> None:
    source = guests.create(dirty_rate=0, paused=True)
    ram, journal, heartbeat = guests.copy(source)
    state = source.save_state()
    with pytest.raises(BadGuestState, match="3 regions") as info:
        Workload.restore([ram], state)
    assert info.value.field == "regions"
    with pytest.raises(BadGuestState, match=r"3 regions \(ram, journal, heartbeat\), got 2"):
        Workload.restore([ram, journal], state)  # the layout before the heartbeat
    with pytest.raises(BadGuestState, match="journal region, it is named 'ram'") as info:
        Workload.restore([ram, ram, heartbeat], state)
    assert info.value.field == "journal"
    # The journal of a 4 MiB guest is one page too: the name tells it from a heartbeat.
    with pytest.raises(BadGuestState, match="heartbeat region, it is named 'journal'") as info:
        Workload.restore([ram, journal, journal], state)
    assert info.value.field == "heartbeat"
    big = Region.movable(2 * PAGE_SIZE, "heartbeat")
    guests.regions.append(big)
    with pytest.raises(BadGuestState, match="heartbeat region has 8192 bytes") as info:
        Workload.restore([ram, journal, big], state)
    assert info.value.field == "heartbeat"
    heartbeat.close()
    with pytest.raises(BadGuestState, match="heartbeat region is closed") as info:
        Workload.restore([ram, journal, heartbeat], state)
    assert info.value.field == "heartbeat"
    journal.close()
    with pytest.raises(BadGuestState, match="closed"):
        Workload.restore([ram, journal, heartbeat], state)


# -- lost writes are found ----------------------------------------------------------------


def snapshot_then_more(guests: Guests, guest: Workload) -> tuple[list[Region], list[Region]]:
    """Copies of a paused guest's memory before and after at least one more batch of writes."""
    run_writes(guest, NPAGES)
    older = guests.copy(guest)
    run_writes(guest, NPAGES)
    return older, guests.copy(guest)


def changed_page(older: list[Region], newer: list[Region]) -> tuple[int, int, int]:
    """A page rewritten between two copies: (page, older version, newer version)."""
    old = older[1].numpy(np.uint32, NPAGES)
    new = newer[1].numpy(np.uint32, NPAGES)
    page = int(np.flatnonzero(old != new)[0])
    return page, int(old[page]), int(new[page])


def test_a_stale_page_is_found_before_and_after_the_guest_runs(guests: Guests) -> None:
    source = guests.create()
    older, newer = snapshot_then_more(guests, source)
    state = source.save_state()
    page, old_version, new_version = changed_page(older, newer)
    lo, hi = page * PAGE_SIZE, (page + 1) * PAGE_SIZE
    with newer[0].view(lo, hi) as dst, older[0].view(lo, hi) as src:
        dst[:] = src  # the page's last write was lost, its journal entry was not

    dest = guests.restore(newer, state)
    report = dest.verify()
    assert not report.ok
    assert report.problems == [
        f"page {page}: content is version {old_version} but the journal says {new_version}: "
        "the page is stale, a write to it was lost"
    ]

    # The first worker to rewrite the page checks it first and keeps the finding.
    dest.resume()
    wait_until(lambda: dest.status()["first_touched"] == NPAGES, "every page rewritten")
    dest.pause()
    report = dest.verify()
    assert not report.ok
    assert len(report.problems) == 1
    assert report.problems[0].startswith(f"page {page}: content is version {old_version}")
    assert "first rewritten after the restore" in report.problems[0]
    assert dest.status()["problems"] == 1

    # And the finding travels with the next migration.
    copies = guests.copy(dest)
    onward = guests.restore(copies, dest.save_state())
    report = onward.verify()
    assert not report.ok
    assert report.problems[0].startswith(f"before migration 2: page {page}: content is version")


def test_an_altered_journal_entry_is_found(guests: Guests) -> None:
    source = guests.create()
    run_writes(source, 2 * NPAGES)
    ram, journal, heartbeat = guests.copy(source)
    state = source.save_state()
    versions = journal.numpy(np.uint32, NPAGES)
    page = int(np.flatnonzero(versions)[0])
    version = int(versions[page])
    versions[page] -= 1
    del versions

    report = guests.restore([ram, journal, heartbeat], state).verify()
    assert not report.ok
    assert "1 write(s) lost" in report.problems[0]
    assert report.problems[1] == (
        f"page {page}: content is version {version}, newer than the journal's {version - 1}: "
        "the journal entry is stale or altered"
    )


def test_a_torn_page_is_found(guests: Guests) -> None:
    source = guests.create()
    run_writes(source, 2 * NPAGES)
    ram, journal, heartbeat = guests.copy(source)
    state = source.save_state()
    words = ram.numpy(np.uint64, (NPAGES, WORDS))
    words[7, 1] |= np.uint64(1)  # copied while its write was in progress
    del words

    report = guests.restore([ram, journal, heartbeat], state).verify()
    assert not report.ok
    assert len(report.problems) == 1
    assert report.problems[0].startswith("page 7: torn")


def test_a_lost_final_round_is_found(guests: Guests) -> None:
    source = guests.create()
    older, _ = snapshot_then_more(guests, source)
    before = int(older[1].numpy(np.uint32, NPAGES).sum())
    state = source.save_state()  # after the final writes: they were made, then not delivered
    lost = source.total_writes - before
    assert lost > 0

    dest = guests.restore(older, state)
    report = dest.verify()
    assert not report.ok
    assert report.pages_checked == NPAGES  # every page is consistent on its own...
    assert report.problems[0] == (  # ...but the versions do not add up
        f"pre-pause versions add up to {before} writes but the source made "
        f"{source.total_writes} before its pause: {lost} write(s) lost "
        "(a final round not delivered?)"
    )
    # The heartbeat page of the final round was lost with the rest.
    assert len(report.problems) == 2
    assert report.problems[1].startswith("the heartbeat page's last stamp is ")
    assert report.problems[1].endswith(
        "older than the one the source wrote before its pause: the page is stale, a write to "
        "it was lost"
    )
    # Still found once the guest runs and rewrites pages.
    run_writes(dest, 2 * NPAGES)
    assert "write(s) lost" in dest.verify().problems[0]


def test_a_paused_guest_checks_its_own_journal_against_its_writes(guests: Guests) -> None:
    guest = guests.create()
    run_writes(guest, 2 * NPAGES)
    ram, journal, _ = guest.regions
    versions = journal.numpy(np.uint32, NPAGES)
    words = ram.numpy(np.uint64, (NPAGES, WORDS))
    page = int(np.flatnonzero(versions)[0])
    version = int(versions[page])
    # Roll page and journal back together: the page is consistent, a write is gone.
    words[page] = Pattern(0).make(np.array([page]), np.array([version - 1], np.uint64))[0]
    versions[page] -= 1
    del versions, words
    report = guest.verify()
    assert report.problems == [
        f"the journal adds up to {guest.total_writes - 1} writes but {guest.total_writes} were made"
    ]


def test_memory_from_another_seed_is_found(guests: Guests) -> None:
    a = guests.create(dirty_rate=0, paused=True, seed=1)
    b = guests.create(dirty_rate=0, paused=True, seed=2)
    state = a.save_state()
    report = guests.restore(guests.copy(b), state).verify()
    assert not report.ok
    assert (
        report.problems[0] == "page 0: content does not match version 0, on which header "
        "and journal agree: the page body is corrupted or stale"
    )
    assert report.problems[-1] == f"... and {NPAGES - len(report.problems) + 1} more problem(s)"


# -- the heartbeat ------------------------------------------------------------------------


def test_heartbeat_beats_while_running_and_parks_with_the_workers(guests: Guests) -> None:
    guest = guests.create(dirty_rate=0, paused=True)
    assert heartbeat_threads() == []  # nothing runs before the first resume
    guest.resume()
    page = guest.regions[2]
    wait_until(lambda: beat_words(page)[HB_STAMP] > 0, "a first beat")
    first = beat_words(page)
    assert first[0] == HB_MAGIC
    assert first[1:3] != [0, 0]  # this boot's id
    wait_until(lambda: beat_words(page)[HB_STAMP] > first[HB_STAMP], "a later beat")
    assert len(heartbeat_threads()) == 1

    paused_at = guest.pause()
    stopped = contents(page)
    last = beat_words(page)[HB_STAMP]
    assert last <= paused_at * 1e9 + 1  # the last beat came before pause() returned
    time.sleep(0.05)  # a hundred beats' time
    assert contents(page) == stopped
    assert json.loads(guest.save_state())["heartbeat_ns"] == last

    guest.resume()
    wait_until(lambda: beat_words(page)[HB_STAMP] > last, "a beat after resume")
    wait_until(lambda: beat_status(guest)["max_gap_running"] is not None, "two beats")


def test_observed_pause_of_a_pause_on_the_spot(guests: Guests) -> None:
    guest = guests.create(dirty_rate=0)
    assert guest.observed_pause() is None  # it has not been paused
    wait_until(lambda: beat_words(guest.regions[2])[HB_STAMP] > 0, "a first beat")
    paused_at = guest.pause()
    assert guest.observed_pause() is None  # its only run so far followed no pause
    time.sleep(0.05)
    resumed_at = guest.resume()
    observed = guest.observed_pause(timeout=60.0)
    assert observed is not None
    assert observed >= resumed_at - paused_at >= 0.05  # a lower bound, never an upper one


def test_observed_pause_after_a_migration_is_at_least_the_downtime(guests: Guests) -> None:
    source = guests.create()
    wait_until(lambda: beat_words(source.regions[2])[HB_STAMP] > 0, "a first beat")
    run_writes(source, NPAGES)
    paused_at = source.pause()  # already paused: the moment it was
    copies = guests.copy(source)
    state = source.save_state()
    source.close()
    dest = guests.restore(copies, state)
    assert dest.observed_pause(timeout=5.0) is None  # restored, not run yet: nothing to wait for
    assert beat_status(dest)["unknown_because"] == "not run here yet"
    time.sleep(0.05)
    resumed_at = dest.resume()

    observed = dest.observed_pause(timeout=60.0)  # waits for the window after the resume
    beat = beat_status(dest)
    assert beat["settled"] is True and beat["unknown_because"] is None
    gap = beat["switchover_gap"]
    assert isinstance(gap, float) and isinstance(observed, float)
    assert observed == beat["observed_pause"] == max(gap, beat["max_gap_after_resume"])
    assert observed >= gap >= resumed_at - paused_at >= 0.05  # lower bounds only

    dest.pause()
    report = dest.verify()
    assert_all_good(report)
    assert report.observed_pause == observed
    assert json.loads(json.dumps(report.as_dict(), allow_nan=False))["observed_pause"] == observed
    # The pause that counts is the latest one: a second hop has its own figure.
    copies = guests.copy(dest)
    again = guests.restore(copies, dest.save_state())
    again.resume()
    second = again.observed_pause(timeout=60.0)
    assert second is not None and second > 0
    again.pause()
    assert_all_good(again.verify())


@pytest.mark.parametrize(("word", "what"), [(1, "boot id"), (2, "boot id"), (3, "time namespace")])
def test_stamps_from_another_boot_give_no_figure(guests: Guests, word: int, what: str) -> None:
    source = guests.create(dirty_rate=0)
    wait_until(lambda: beat_words(source.regions[2])[HB_STAMP] > 0, "a first beat")
    source.pause()
    ram, journal, heartbeat = guests.copy(source)
    state = source.save_state()
    page = heartbeat.numpy(np.uint64, WORDS)
    page[word] ^= np.uint64(0x5A5A)  # written under another CLOCK_MONOTONIC: another host
    del page

    dest = guests.restore([ram, journal, heartbeat], state)
    dest.resume()
    assert dest.observed_pause(timeout=60.0) is None, what
    beat = beat_status(dest)
    assert beat["switchover_gap"] is None and beat["observed_pause"] is None
    assert beat["unknown_because"] == (
        "the last stamp is from another boot or time namespace (another host?)"
    )
    dest.pause()
    report = dest.verify()
    assert_all_good(report)  # a figure we cannot have is not a lost write
    assert report.observed_pause is None
    assert beat_words(heartbeat)[word] == beat_words(source.regions[2])[word]  # ours again


def test_an_unknown_boot_id_gives_no_figure(
    guests: Guests, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(procfs, "clock_identity", lambda: (0, 0, 0))
    guest = guests.create(dirty_rate=0)
    wait_until(lambda: beat_words(guest.regions[2])[HB_STAMP] > 0, "a first beat")
    guest.pause()
    guest.resume()
    assert guest.observed_pause(timeout=60.0) is None
    assert beat_status(guest)["unknown_because"] == "this host's boot id is unknown"


def test_a_stale_heartbeat_page_is_a_problem_and_gives_no_figure(guests: Guests) -> None:
    source = guests.create(dirty_rate=0)
    wait_until(lambda: beat_words(source.regions[2])[HB_STAMP] > 0, "a first beat")
    source.pause()
    older = guests.copy(source)
    source.resume()
    wait_until(
        lambda: beat_words(source.regions[2])[HB_STAMP] > beat_words(older[2])[HB_STAMP],
        "a later beat",
    )
    source.pause()
    ram, journal, _ = guests.copy(source)
    state = source.save_state()

    dest = guests.restore([ram, journal, older[2]], state)  # the last heartbeat write lost
    report = dest.verify()
    assert not report.ok
    assert len(report.problems) == 1
    assert report.problems[0].startswith("the heartbeat page's last stamp is ")
    assert "the page is stale, a write to it was lost" in report.problems[0]
    dest.resume()
    assert dest.observed_pause(timeout=60.0) is None
    assert beat_status(dest)["unknown_because"] == (
        "the heartbeat page did not arrive as the source left it"
    )
    assert dest.status()["problems"] == 1


def test_a_lost_heartbeat_page_is_a_problem(guests: Guests) -> None:
    source = guests.create(dirty_rate=0)
    wait_until(lambda: beat_words(source.regions[2])[HB_STAMP] > 0, "a first beat")
    source.pause()
    ram, journal, _ = guests.copy(source)
    blank = Region.movable(PAGE_SIZE, "heartbeat")  # never delivered: still zeros
    guests.regions.append(blank)
    dest = guests.restore([ram, journal, blank], source.save_state())
    dest.resume()  # the heartbeat checks the page before its first beat
    assert dest.observed_pause(timeout=60.0) is None
    dest.pause()
    report = dest.verify()
    assert not report.ok
    assert report.problems[0].startswith("the heartbeat page holds no heartbeat, yet the source")
    assert report.problems[0].endswith("the page was lost")


def test_close_joins_the_heartbeat(guests: Guests) -> None:
    guest = guests.create(dirty_rate=0)
    wait_until(lambda: len(heartbeat_threads()) == 1, "the heartbeat thread")
    waiting: list[float | None] = []
    waiter = threading.Thread(target=lambda: waiting.append(guest.observed_pause(60.0)))
    guest.pause()
    guest.resume()  # its window is open: observed_pause(60) waits for it
    waiter.start()
    guest.close()
    waiter.join()  # answered (whatever the figure): close() ends the wait
    assert heartbeat_threads() == []
    assert len(waiting) == 1
    guest.observed_pause(timeout=60.0)  # and returns at once: nothing can change any more


# -- releasing the regions ----------------------------------------------------------------


def test_release_regions_hands_over_memory_with_no_views(guests: Guests) -> None:
    guest = guests.create()
    wait_until(lambda: guest.total_writes > 100, "writes")
    with pytest.raises(StateError):
        guest.release_regions()  # still running
    guest.verify()
    guest.pause()
    state = guest.save_state()
    regions = guest.release_regions()
    guests.regions.extend(regions)
    assert [r.name for r in regions] == ["ram", "journal", "heartbeat"]
    assert all(r.exports() == 0 and r.movable and not r.closed for r in regions)
    assert guest.regions == []
    assert guest.status()["released"] is True
    with pytest.raises(ClosedError):
        guest.resume()
    with pytest.raises(ClosedError):
        guest.verify()
    with pytest.raises(ClosedError):
        guest.release_regions()
    assert guest.save_state() == state  # the state is still there to send
    guest.close()
    assert not any(r.closed for r in regions)  # not the guest's to close any more

    dest = guests.restore(regions, state)  # the same memory, as after a flip
    assert_all_good(dest.verify())


# -- restored ahead (a flip's PREVIEW) -----------------------------------------------------


def mapped_again(guests: Guests, guest: Workload) -> list[Region]:
    """The guest's memfds mapped a second time, as a flip's destination maps them."""
    out = []
    for region in guest.regions:
        (extent,) = region.extents()
        assert extent.memfd is not None
        memfd = Memfd(os.dup(extent.memfd.fd))
        again = Region.from_memfds([(memfd, extent.fd_offset, region.size)], region.name)
        guests.regions.append(again)
        out.append(again)
    return out


def test_a_workload_restored_ahead_takes_the_final_state_in_the_pause(guests: Guests) -> None:
    source = guests.create()
    wait_until(lambda: beat_words(source.regions[2])[HB_STAMP] > 0, "a first beat")
    # Its threads start, parked, and its pattern is made, while the source writes on.
    ahead = Workload.restore_ahead(mapped_again(guests, source), source.state_preview())
    guests.guests.append(ahead)
    assert ahead._pattern_obj is not None and len(heartbeat_threads()) == 2
    run_writes(source, NPAGES)
    state = source.save_state()

    other = guests.create(seed=1, paused=True)
    with pytest.raises(BadGuestState, match="another workload") as err:
        ahead.finish_restore(other.save_state())
    assert err.value.field == "state"
    with pytest.raises(BadGuestState):
        ahead.finish_restore(b"{}")
    ahead.finish_restore(state)  # what the pause carries
    assert ahead.total_writes == source.total_writes
    assert ahead.migrations == source.migrations + 1
    source.close()
    assert_all_good(ahead.verify())

    ahead.resume()
    assert ahead.observed_pause(timeout=60.0) is not None  # the source's last beat was found
    run_writes(ahead, NPAGES)
    assert_all_good(ahead.verify())
    with pytest.raises(StateError, match="never resumed"):
        ahead.finish_restore(state)


def test_a_workload_restored_ahead_has_its_first_touch_table_mapped_before_the_resume(
    guests: Guests,
) -> None:
    """The table of pre-pause versions (8 bytes per page) is mapped whole by restore_ahead,
    before the pause: the writers' first rewrites after the resume do not fault it in (with
    transparent huge pages, a zeroed 2 MiB page at a time) while they hold the GIL. A
    restore in the pause leaves it to them: mapping it there would lengthen the pause."""

    def mapped(table: np.ndarray[Any, Any] | None) -> np.ndarray[Any, np.dtype[np.bool_]]:
        assert table is not None and table.size == source.npages
        first = table.ctypes.data // PAGE_SIZE * PAGE_SIZE
        pages = (table.ctypes.data + table.nbytes - first + PAGE_SIZE - 1) // PAGE_SIZE
        return pagemap.mapped_pages("self", first, pages)  # no read of it: that maps zeros

    source = guests.create(64 << 20, dirty_rate=0, paused=True)
    # Restored in the pause (precopy, postcopy): nothing of it is mapped.
    in_pause = guests.restore(guests.copy(source), source.save_state())  # its own pages
    assert not mapped(in_pause._pre).any()
    in_pause.close()
    ahead = Workload.restore_ahead(mapped_again(guests, source), source.state_preview())
    guests.guests.append(ahead)
    assert mapped(ahead._pre).all()
    assert ahead._pre is not None and not ahead._pre.any()
    ahead.finish_restore(source.save_state())
    source.close()
    assert_all_good(ahead.verify(), source.npages)


def test_by_default_a_guest_cannot_be_restored_ahead() -> None:
    bare = Workload.__new__(Workload)  # Guest's defaults, not the workload's own
    assert Guest.state_preview(bare) is None
    with pytest.raises(BadGuestState, match="cannot be restored ahead"):
        Guest.finish_restore(bare, b"")


# -- the registry -------------------------------------------------------------------------


def test_registry_knows_the_workload() -> None:
    assert guest_class("workload") is Workload
    assert register(Workload) is Workload  # registering again is harmless


def test_unknown_kind_is_an_error() -> None:
    with pytest.raises(UnknownGuest, match="no guest kind 'quantum'") as info:
        guest_class("quantum")
    err = info.value
    assert isinstance(err, PageflipError) and isinstance(err, LookupError)
    assert err.kind == "quantum"
    assert err.known is not None and "workload" in err.known
    again = pickle.loads(pickle.dumps(err))
    assert (type(again), again.kind, again.known) == (UnknownGuest, "quantum", err.known)
