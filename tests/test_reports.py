"""What pageflip reports to people and to scripts: strict JSON lines, words for flags, and a
migration display that says where the guest is and what pause it saw.

The end-to-end test runs the real commands (``python -m pageflip``): an 8 MiB workload,
migrated by flip and then by precopy between two ``incoming`` hosts, with ``probe``,
``status`` and ``verify`` asked on the way; every line any of them prints on stdout with
``--json`` must be one JSON object that parses without NaN or Infinity. The display tests
feed events to :class:`~pageflip.display.MigrationDisplay` and :func:`summary_table` and
read the text they print; no test asserts on timings.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console

import cli_procs
import pageflip
from cli_procs import hosts, strict_event
from pageflip._sys import uffd
from pageflip._sys.flags import Seal, UffdFeature, UffdRegister
from pageflip.bench.common import finite
from pageflip.display import MigrationDisplay, fmt_seconds, region_line, summary_table

_ = hosts  # the fixture

PAGEFLIP = [sys.executable, "-m", "pageflip"]


def strict_lines(text: str) -> list[dict[str, Any]]:
    """Each line of ``text`` as one JSON object; NaN and Infinity refused."""
    lines = text.splitlines()
    assert lines, "no output"
    return [strict_event(line) for line in lines]


def pageflip_json(*args: str) -> list[dict[str, Any]]:
    """Run ``pageflip ARGS`` to the end; its stdout as strict JSON lines."""
    done = subprocess.run(
        [*PAGEFLIP, *args], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    return strict_lines(done.stdout)


class Host(cli_procs.Host):
    """A pageflip host process (tests/cli_procs.py) whose every line is checked as it is
    read: one JSON object, without NaN or Infinity."""

    def __init__(self, *args: str) -> None:
        super().__init__(*args, strict=True)


# -- strict JSON, end to end ------------------------------------------------------------------


def test_probe_json_is_one_strict_line() -> None:
    (report,) = pageflip_json("probe", "--json")
    assert set(report["features"]) == set(pageflip.probe())


def test_every_json_line_of_a_flip_then_a_precopy_is_strict(
    tmp_path: Path, hosts: list[Host]
) -> None:
    a, b, c = (str(tmp_path / f"{n}.sock") for n in "abc")
    in_b, in_c = str(tmp_path / "in-b.sock"), str(tmp_path / "in-c.sock")
    workload = Host("workload", "--size", "8M", "--dirty-rate", "8M", "--control", a)
    hosts.append(workload)
    incoming = {
        "b": Host("incoming", "--listen", in_b, "--control", b),
        "c": Host("incoming", "--listen", in_c, "--control", c),
    }
    hosts.extend(incoming.values())
    workload.wait_for("ready")
    for host in incoming.values():
        host.wait_for("listening")

    (status,) = pageflip_json("status", "--control", a, "--json")
    assert status["status"]["kind"] == "workload"
    (waiting,) = pageflip_json("status", "--control", c, "--json")
    assert waiting["host"] == "incoming"
    (report,) = pageflip_json("verify", "--control", a, "--json")
    assert report["ok"]

    flip = pageflip_json("migrate", "--control", a, "--to", in_b, "--mode", "flip", "--json")
    assert workload.finish() == 0
    incoming["b"].wait_for("running")
    (report,) = pageflip_json("verify", "--control", b, "--json")
    assert report["ok"]
    precopy = pageflip_json("migrate", "--control", b, "--to", in_c, "--mode", "precopy", "--json")
    assert incoming["b"].finish() == 0
    incoming["c"].wait_for("running")
    (report,) = pageflip_json("verify", "--control", c, "--json")
    assert report["ok"]
    (status,) = pageflip_json("status", "--control", c, "--json")
    assert status["status"]["migrations"] == 2
    stopped = subprocess.run(
        [*PAGEFLIP, "stop", "--control", c], capture_output=True, text=True, timeout=60, check=False
    )
    assert stopped.returncode == 0, stopped.stderr
    assert incoming["c"].finish() == 0

    for events, mode, digest in ((flip, "flip", "identity"), (precopy, "precopy", "verified")):
        kinds = [e["event"] for e in events if e["event"] not in ("progress", "round")]
        assert kinds == ["setup", "switchover", "prepared", "commit", "resumed", "done"]
        setup, done = events[0], events[-1]
        # The stream's Feature flags travel as names, never as a number.
        assert "XXH3" in setup["features"]
        assert all(isinstance(f, str) and f.isupper() for f in setup["features"])
        assert done["mode"] == mode and done["digest"] == digest
        assert "guest_pause" in done and "guest_pause" in events[-2]
        assert [r["name"] for r in done["regions"]] == ["ram", "journal", "heartbeat"]
        ram = done["regions"][0]
        assert ram["pages"] == (8 << 20) // pageflip.PAGE_SIZE
        moved = sum(r["moved"] for r in done["regions"])
        assert moved == done["pages_moved"]
        # The people's table of the same done event: one line per region, no NaN.
        text = _render(summary_table([(mode, done)], "migration"))
        assert f"ram {ram['pages']} pages: " in text
        assert "heartbeat 1 page: " in text
        assert digest in text
    assert flip[-1]["regions"][0]["moved"] == flip[-1]["regions"][0]["pages"]
    # Each destination said on its own lines how the guest arrived.
    for host in incoming.values():
        resumed = [e for e in host.events if e.get("event") == "resumed"]
        assert len(resumed) == 1 and "guest_pause" in resumed[0]


# -- flags print as names ---------------------------------------------------------------------


def test_probe_names_the_seals() -> None:
    feature = pageflip.probe()["memfd_seals"]
    if not feature.available:
        pytest.skip(f"memfd seals: {feature.detail}")
    assert feature.detail == "seals SHRINK|GROW"
    assert "Seal" not in feature.detail and "6" not in feature.detail


def test_flags_in_syscall_errors_are_names() -> None:
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        with pytest.raises(OSError, match=r"mode=MISSING\|WP\)") as err:
            uffd.register(fd, 1 << 20, pageflip.PAGE_SIZE, UffdRegister.MISSING | UffdRegister.WP)
        assert "UffdRegister" not in str(err.value)
        with pytest.raises(OSError, match=r"features=MISSING_SHMEM\|WP_ASYNC\)"):
            uffd.api(fd, UffdFeature.MISSING_SHMEM | UffdFeature.WP_ASYNC)
    finally:
        os.close(fd)
    assert (Seal.SHRINK | Seal.GROW).name == "SHRINK|GROW"


def test_the_display_names_the_shared_stream_features() -> None:
    from pageflip import stream

    shared = stream.Feature.FLIP | stream.Feature.PULL | stream.Feature.XXH3
    names = [f.name for f in stream.Feature if f in shared and f.name]
    text = _show(
        {
            "event": "setup",
            "mode": "flip",
            "transport": "/run/in.sock",
            "regions": [{"name": "ram", "size": 1 << 20, "movable": True}],
            "total_bytes": 1 << 20,
            "features": names,
        }
    )
    assert "shared features: flip, pull, xxh3" in text
    assert "ram 1.0 MiB" in text


def test_the_display_names_the_pages_a_region_sits_on() -> None:
    regions = [
        {"name": "ram", "size": 16 << 20, "movable": True, "pages": "2 MiB hugetlb"},
        {"name": "journal", "size": 1 << 20, "movable": True, "pages": "4 KiB"},
    ]
    text = _show(
        {
            "event": "setup",
            "mode": "precopy",
            "transport": "/run/in.sock",
            "regions": regions,
            "total_bytes": 17 << 20,
            "features": ["HUGE"],
        }
    )
    assert "(ram 16.0 MiB on 2 MiB hugetlb pages, journal 1.0 MiB) to" in text


# -- the display ------------------------------------------------------------------------------


def _render(renderable: Any) -> str:
    out = io.StringIO()
    Console(file=out, width=200, color_system=None).print(renderable)
    return out.getvalue()


def _show(*events: dict[str, Any]) -> str:
    out = io.StringIO()
    console = Console(file=out, width=200, color_system=None)
    with MigrationDisplay(console, "a -> b") as view:
        for event in events:
            view.event(event)
    return out.getvalue()


def _done(**changes: Any) -> dict[str, Any]:
    done: dict[str, Any] = {
        "event": "done",
        "t": 0.2,
        "mode": "flip",
        "total_seconds": 0.0042,
        "downtime": 0.0021,
        "bytes_on_wire": 710,
        "pages_moved": 8201,
        "pages_copied": 0,
        "pages_zero": 0,
        "pages_requested": 0,
        "rounds": 0,
        "digest": "identity",
        "details": {},
        "guest_pause": 0.0031,
        "regions": [
            {"name": "ram", "pages": 8192, "moved": 8192, "copied": 0, "zero": 0},
            {"name": "journal", "pages": 8, "moved": 8, "copied": 0, "zero": 0},
            {"name": "heartbeat", "pages": 1, "moved": 1, "copied": 0, "zero": 0},
        ],
    }
    done.update(changes)
    return done


def test_the_display_says_when_the_guest_changes_hands() -> None:
    text = _show(
        {"event": "switchover", "round": 0, "remaining_pages": 0, "reason": "flip"},
        {"event": "prepared", "t": 0.01},
        {"event": "commit", "t": 0.011},
        {"event": "resumed", "t": 0.02, "downtime": 0.00848, "guest_pause": 0.01209},
        _done(),
    )
    lines = text.splitlines()
    assert lines.index(next(ln for ln in lines if ln.startswith("prepared"))) < lines.index(
        "commit point: the guest is the destination's now"
    )
    assert "downtime 8.48 ms (the guest saw 12.09 ms)" in text


def test_a_pause_the_guest_could_not_measure_shows_as_a_dash() -> None:
    text = _show({"event": "resumed", "downtime": 0.0021, "guest_pause": None})
    assert "downtime 2.10 ms (the guest saw -)" in text
    table = _render(summary_table([("flip", _done(guest_pause=None))], "migration"))
    assert "pause the guest saw" in table


def test_the_display_leaves_a_failure_to_the_command_s_one_line() -> None:
    """A failed migration is said once, on the command's own last line (tested with the
    real commands in test_commit_point.py and test_after_commit.py): the display records
    it and prints nothing of it."""
    display = MigrationDisplay(Console(file=io.StringIO(), width=200), title="t")
    event = {
        "event": "failed",
        "phase": "switchover",
        "error": "digest mismatch in [ram]",
        "error_type": "DigestMismatch",
        "guest": "source",
        "stale_copy": False,
    }
    text = _show(event)
    assert "failed" not in text and "digest mismatch" not in text
    display.event(event)
    assert display.failed == event


def test_the_display_shows_a_broken_postcopy_waiting_for_its_resume() -> None:
    text = _show(
        {"event": "recovering", "reason": "connection reset", "timeout": 60.0},
        {
            "event": "postcopy",
            "pushed_pages": 100,
            "requested_pages": 7,
            "remaining_pages": 20,
            "fault_median_us": 42.0,
            "fault_p99_us": 310.0,
        },
    )
    assert "the connection broke (connection reset)" in text
    assert "waiting up to 60.00 s for `pageflip migrate --resume`" in text
    assert "faults served in 42 us (p99 310 us)" in text


def test_the_summary_counts_pages_per_region() -> None:
    text = _render(summary_table([("flip", _done())], "migration"))
    assert "ram 8192 pages: 8192 moved" in text
    assert "journal 8 pages: 8 moved" in text
    assert "heartbeat 1 page: 1 moved" in text
    assert "2.10 ms" in text and "3.10 ms" in text  # the engine's downtime, the guest's own
    assert "identity" in text
    assert "fault service" not in text  # no postcopy, no fault rows


def test_the_summary_of_a_postcopy_has_its_fault_times() -> None:
    post = _done(
        mode="postcopy",
        digest="unchecked: the source did not send its digests",
        details={
            "fault_median_us": 12.0,
            "fault_p99_us": 80.4,
            "fault_max_us": 900.0,
            "faults": 30,
            "requested": 30,
            "pushed": 8171,
        },
        regions=[{"name": "ram", "pages": 8192, "moved": 0, "copied": 8190, "zero": 2}],
    )
    text = _render(summary_table([("flip", _done()), ("postcopy", post)], "both"))
    assert "12 us / 80 us" in text
    assert "30 (30 / 8171)" in text
    assert "ram 8192 pages: 8190 copied, 2 zero" in text
    assert "unchecked: the source did not send its digests" in text


def test_missing_and_non_finite_figures_are_dashes_never_nan() -> None:
    broken = _done(
        total_seconds=float("nan"),
        downtime=float("inf"),
        guest_pause=float("-inf"),
        bytes_on_wire=None,
        details={"fault_median_us": float("nan"), "fault_p99_us": None},
        regions=[{"name": "ram", "pages": 4, "moved": float("nan"), "copied": 0, "zero": 0}],
    )
    text = _render(summary_table([("flip", broken)], "broken"))
    assert "nan" not in text.lower() and "inf" not in text.lower()
    assert "- / -" in text
    assert region_line({"name": "ram", "pages": 4}) == "ram 4 pages: none sent"
    for value in (None, float("nan"), float("inf"), "soon"):
        assert fmt_seconds(value) == "-"  # type: ignore[arg-type]


def test_bench_results_become_strict_json() -> None:
    result = finite(
        {"a": float("nan"), "b": [1.5, float("inf"), np.float64("nan")], "c": (np.float32(2),)}
    )
    assert result == {"a": None, "b": [1.5, None, None], "c": [2.0]}
    assert json.loads(json.dumps(result, allow_nan=False)) == result
    assert not any(isinstance(v, float) and not math.isfinite(v) for v in result["b"])
