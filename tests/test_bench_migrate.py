"""``pageflip bench migrate``: the matrix runs every (size, rate, mode) for real, between two
spawned processes per run, and its JSON, Markdown and plot say what happened.

One small matrix (8 and 16 MiB, idle and 16 MiB/s, every mode) runs once for the module;
the tests read its result. They check that every run verified and did what its mode says
(flip moved every page, precopy copied, postcopy reports its faults), that memory was
measured, and that nothing is left running; they never assert on timings.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import pageflip
from pageflip.bench import migrate as bench_migrate
from pageflip.bench.migrate import running as migrate_running
from pageflip.cli import main

MiB = 1 << 20
SIZES = (8 * MiB, 16 * MiB)
RATES = (0, 16 * MiB)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _helpers_alive() -> list[str]:
    """Command lines of pageflip helper processes (postcopy pagers) still alive."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if b"pageflip._pager" in cmdline:
            found.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return found


@pytest.fixture(scope="module")
def matrix() -> dict[str, Any]:
    """The small matrix, run once; checks itself that it left nothing behind (the autouse
    ``no_leaks`` fixture does not cover module fixtures)."""
    threads_before = set(threading.enumerate())
    progress: list[tuple[int, int, str]] = []
    config = bench_migrate.MigrateConfig(
        sizes=SIZES, rates=RATES, warmup=0.3, settle=0.0, verify_delay=0.1
    )
    result = bench_migrate.run(config, lambda *step: progress.append(step))
    assert multiprocessing.active_children() == []
    assert _helpers_alive() == []
    extra = [t for t in set(threading.enumerate()) - threads_before if t.is_alive()]
    assert extra == [], extra
    result["_progress"] = progress
    return result


@pytest.fixture(scope="module")
def fonts_loaded(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Draw one plot before the tests that plot: matplotlib keeps the font files it opened
    for the life of the process, which ``no_leaks`` would otherwise count as leaked fds."""
    cells = [
        {"size": size, "rate": 0, "mode": mode, "downtime": 0.01, "total_seconds": 0.1}
        for size in SIZES
        for mode in bench_migrate.MODES
    ]
    fake = {
        "cells": cells,
        "config": {"downtime_limit": 0.3, "repeat": 1},
        "machine": {"kernel": "test", "cpus": 1, "cpu": "test", "memory_gib": 1},
        "date": "today",
    }
    bench_migrate.plot(fake, tmp_path_factory.mktemp("fonts") / "warm.png")


def _cell(result: dict[str, Any], size: int, rate: int, mode: str) -> dict[str, Any]:
    cells: list[dict[str, Any]] = [
        c for c in result["cells"] if (c["size"], c["rate"], c["mode"]) == (size, rate, mode)
    ]
    assert len(cells) == 1
    return cells[0]


def test_every_combination_ran_once_and_verified(matrix: dict[str, Any]) -> None:
    runs = matrix["runs"]
    combos = sorted((r["size"], r["rate"], r["mode"]) for r in runs)
    expected = sorted((s, r, m) for s in SIZES for r in RATES for m in bench_migrate.MODES)
    assert combos == expected
    assert matrix["complete"]
    for run in runs:
        assert run["verified"] and run["verify"]["ok"], run["verify"]
        assert run["verify"]["pages_checked"] > 0
        assert run["mode_run"] == run["mode"]
        assert run["total_seconds"] > 0 and run["downtime"] > 0
        assert run["bytes_on_wire"] > 0
    assert len(matrix["cells"]) == len(expected)
    assert all(c["verified"] and c["n"] == 1 for c in matrix["cells"])


def test_flip_moved_every_page_and_copied_none(matrix: dict[str, Any]) -> None:
    for run in (r for r in matrix["runs"] if r["mode"] == "flip"):
        assert run["pages_moved"] == run["guest_bytes"] // pageflip.PAGE_SIZE
        assert run["pages_copied"] == 0
        assert run["digest"] == "identity"
        assert run["bytes_on_wire"] < 4096  # no memory on the wire
        assert run["rounds"] == 0


def test_precopy_copied_in_rounds(matrix: dict[str, Any]) -> None:
    for run in (r for r in matrix["runs"] if r["mode"] == "precopy"):
        pages = run["guest_bytes"] // pageflip.PAGE_SIZE
        assert run["pages_moved"] == 0
        assert run["pages_copied"] > 0
        assert run["pages_copied"] + run["pages_zero"] >= pages
        assert run["rounds"] >= 1 and run["digest"] == "verified"
        assert run["last_round_bandwidth"] > 0
        assert run["expected_downtime"] is not None
        assert run["rate_below_bandwidth"] in (True, False)


def test_postcopy_reports_fault_statistics(matrix: dict[str, Any]) -> None:
    for run in (r for r in matrix["runs"] if r["mode"] == "postcopy"):
        stats = run["postcopy"]
        for key in ("fault_median_us", "fault_p99_us", "faults", "requested", "pushed"):
            assert stats[key] is not None and stats[key] >= 0, (key, stats)
        assert stats["fault_p99_us"] >= stats["fault_median_us"]
        assert stats["requested"] + stats["pushed"] > 0
        assert run["switchover_to_running"] is not None and run["switchover_to_running"] > 0
        assert run["pages_moved"] == 0


def test_peak_memory_is_measured_for_both_processes(matrix: dict[str, Any]) -> None:
    for run in matrix["runs"]:
        memory = run["memory"]
        assert memory["peak"] > 0
        # ram + journal + heartbeat
        assert memory["guest_bytes"] == run["guest_bytes"] > run["size"]
        assert list(run["regions"]) == ["ram", "journal", "heartbeat"]
        assert memory["ratio"] == pytest.approx(memory["peak"] / run["guest_bytes"])
        baseline = memory["baseline"]
        # By counters (no page-table walk during the migration): each process's private
        # memory, and the guest's shared memory once.
        assert memory["method"] == "counters"
        assert set(baseline["by_role"]) == {"source", "destination", "shared"}
        assert memory["peak"] >= baseline["total"] > 0  # the baseline is a sample too
        assert memory["added"] >= 0
        # Before the migration the source holds the whole guest (its memfds: shared memory,
        # as far as it is mapped in: RssShmem leaves out the odd page never touched).
        assert baseline["by_role"]["shared"] >= 0.99 * run["guest_bytes"]
        assert memory["pss_samples"] >= 2 and memory["rss_samples"] >= memory["pss_samples"]
    for run in (r for r in matrix["runs"] if r["mode"] == "postcopy"):
        assert "helpers" in run["memory"]["peak_pss"]["max_by_role"]  # the pager was counted


def test_events_carry_the_timing(matrix: dict[str, Any]) -> None:
    for run in matrix["runs"]:
        kinds = [e["event"] for e in run["events"] if e["event"] != "progress"]
        assert kinds[0] == "setup" and kinds[-1] == "done"
        assert "switchover" in kinds and "resumed" in kinds
        assert all("mono" in e for e in run["events"] + run["destination_events"])
        assert run["write_rate"] >= 0
        if run["rate"] == 0:
            assert run["write_rate"] == 0


def test_every_run_says_how_much_cpu_time_the_hypervisor_took(matrix: dict[str, Any]) -> None:
    """The steal time of each migration (``/proc/stat``): where the host takes milliseconds
    from the machine, the pauses measured are the host's."""
    from pageflip.bench.common import steal_seconds
    from pageflip.units import format_duration

    counted = steal_seconds() is not None
    for run in matrix["runs"]:
        assert "steal_seconds" in run
        if counted:
            assert run["steal_seconds"] is not None and run["steal_seconds"] >= 0
    text = bench_migrate.markdown_table(matrix)
    stolen = [ln for ln in text.splitlines() if ln.startswith("Stolen: ")]
    if counted:
        values = [run["steal_seconds"] for run in matrix["runs"]]
        least, most = format_duration(min(values)), format_duration(max(values))
        span = (least if least == most else f"{least} to {most}") + "."
        assert len(stolen) == 1 and stolen[0].endswith(f"(/proc/stat, steal): {span}")
    else:
        assert not stolen


def test_the_pause_the_guest_saw_stands_beside_the_downtime(matrix: dict[str, Any]) -> None:
    """Each run keeps the guest's own figure (source's done event, destination's resumed
    event: the same GUEST_PAUSE), and the cells, the Markdown and the JSON show it."""
    for run in matrix["runs"]:
        assert "guest_pause" in run and "guest_pause_destination" in run
        assert run["guest_pause"] == run["done"]["guest_pause"]
        resumed = [e for e in run["destination_events"] if e["event"] == "resumed"]
        assert len(resumed) == 1
        assert run["guest_pause_destination"] == resumed[0]["guest_pause"]
        for key in ("guest_pause", "guest_pause_destination"):
            assert run[key] is None or run[key] > 0, (key, run[key])
        if run["guest_pause"] is not None and run["guest_pause_destination"] is not None:
            assert run["guest_pause"] == run["guest_pause_destination"]
    assert any(run["guest_pause"] is not None for run in matrix["runs"])
    for cell in matrix["cells"]:
        assert "guest_pause" in cell and "guest_pause_max" in cell
    columns = list(bench_migrate.COLUMNS)
    assert columns.index("guest saw") == columns.index("downtime") + 1
    text = bench_migrate.markdown_table(matrix)
    assert "| downtime | guest saw |" in text
    assert "guest saw: the pause the guest measured itself" in matrix["notes"]["clock"]


def test_every_run_has_the_guests_figure_for_a_pause_in_place_beside_it(
    matrix: dict[str, Any],
) -> None:
    """The control: right before each migration the source pauses and resumes the guest where
    it runs, and its heartbeat's figures for that are kept beside what it saw of the
    migration, whose two parts (the destination's heartbeat) are kept too."""
    for run in matrix["runs"]:
        in_place = run["in_place"]
        assert set(in_place) == {"observed_pause", "switchover_gap", "max_gap_after_resume"}
        # A real pause and resume: the heartbeat saw a gap across it, and a window after.
        assert in_place["switchover_gap"] is not None and in_place["switchover_gap"] > 0
        assert in_place["max_gap_after_resume"] is not None
        assert in_place["observed_pause"] == max(
            in_place["switchover_gap"], in_place["max_gap_after_resume"]
        )
        assert run["guest_pause_in_place"] == in_place["observed_pause"]
        if run["guest_pause"] is not None:  # what the destination's heartbeat says of it
            assert run["guest_switchover_gap"] is not None
            parts = [run["guest_switchover_gap"], run["guest_gap_after"] or 0.0]
            assert run["guest_pause"] == pytest.approx(max(parts), abs=1e-6)  # events: in us
            assert run["guest_switchover_gap"] >= run["downtime"]
    for cell in matrix["cells"]:
        runs = [r for r in matrix["runs"] if r["index"] in cell["runs"]]
        assert cell["guest_pause_in_place"] == runs[0]["guest_pause_in_place"]  # one repeat
        assert cell["guest_pause_p90"] == cell["guest_pause_max"]
    columns = list(bench_migrate.COLUMNS)
    assert columns.index("guest saw, paused in place") == columns.index("guest saw") + 1
    text = bench_migrate.markdown_table(matrix)
    assert "| | guest saw, paused in place (no migration) |" in text
    assert "| | guest: gap across the switchover |" in text
    assert "guest saw, paused in place: the control" in matrix["notes"]["clock"]
    targets = {t["id"]: t for t in matrix["targets"]}
    assert "paused in place" in targets["flip_guest_pause"]["measured"]


def test_the_guest_pause_targets_judge_medians_and_the_90th_percentile() -> None:
    """Median < 1 ms and p90 < 2 ms in every flip cell; flip's median not above postcopy's
    at the same size and rate."""
    from pageflip.bench.migrate.targets import judge

    def cell(mode: str, median: float, p90: float) -> dict[str, Any]:
        return {
            "size": MiB, "size_label": "1M", "rate": 0, "rate_label": "idle", "mode": mode,
            "guest_pause": median, "guest_pause_p90": p90, "guest_pause_in_place": 0.0007,
            "downtime": 0.0004, "total_seconds": 0.01, "guest_bytes": MiB, "ratio": 1.0,
            "peak": MiB, "switchover_to_running": 0.001,
        }  # fmt: skip

    def verdicts(*cells: dict[str, Any]) -> dict[str, bool | None]:
        return {t["id"]: t["passed"] for t in judge(list(cells), [], 0.3)}  # type: ignore[arg-type]

    ok = verdicts(cell("flip", 0.0009, 0.0019), cell("postcopy", 0.002, 0.003))
    assert ok["flip_guest_pause"] is True and ok["flip_guest_vs_postcopy"] is True
    assert verdicts(cell("flip", 0.001, 0.0015))["flip_guest_pause"] is False
    assert verdicts(cell("flip", 0.0009, 0.002))["flip_guest_pause"] is False
    worse = verdicts(cell("flip", 0.0009, 0.0019), cell("postcopy", 0.0008, 0.001))
    assert worse["flip_guest_vs_postcopy"] is False
    alone = verdicts(cell("flip", 0.0009, 0.0019))
    assert alone["flip_guest_vs_postcopy"] is None


def test_every_run_has_its_pause_budget(matrix: dict[str, Any]) -> None:
    """Both sides' pause steps, merged in time order, in each run; per cell the median of
    each step and the guest's figure beyond the engine's pause; a flip table in Markdown."""
    for run in matrix["runs"]:
        steps = run["pause_steps"]
        assert [s["at"] for s in steps] == sorted(s["at"] for s in steps)
        assert {s["side"] for s in steps} == {"source", "destination"}
        by = {(s["side"], s["step"]): s["at"] for s in steps}
        assert by["source", "paused"] == 0.0
        assert by["destination", "resumed"] == pytest.approx(run["downtime"])
        # A step ends when its call returns: the peer may have read what it sent already.
        assert by["source", "state saved"] <= by["destination", "SWITCHOVER read"]
    for cell in matrix["cells"]:
        budget = cell["pause_budget"]
        assert ("source", "paused") in {(r["side"], r["step"]) for r in budget}
        assert budget[-1]["side"] == "guest"
        assert all(r["ms"] is None or r["ms"] >= 0 for r in budget[:-1])
    text = bench_migrate.markdown_table(matrix)
    assert "**Pause budget, flip**" in text
    assert "| destination | COMMIT read |" in text and "| | **guest saw** |" in text


def test_the_order_is_interleaved_and_stated(matrix: dict[str, Any]) -> None:
    sequence = matrix["order"]["sequence"]
    assert [r["index"] for r in matrix["runs"]] == list(range(len(sequence)))
    assert [[r["size"], r["rate"], r["mode"], r["repeat"]] for r in matrix["runs"]] == sequence
    firsts = {sequence[i][2] for i in range(0, len(sequence), len(bench_migrate.MODES))}
    assert len(firsts) > 1  # the first mode of a (size, rate) rotates
    assert "interleaved" in matrix["order"]["scheme"]
    steps = matrix["_progress"]
    assert steps[0][:2] == (0, len(sequence)) and steps[-1] == (
        len(sequence),
        len(sequence),
        "done",
    )


def test_run_order_rotates_modes_across_cells_and_repeats() -> None:
    config = bench_migrate.MigrateConfig(sizes=(MiB,), rates=(0, MiB, 2 * MiB), repeat=2)
    order = bench_migrate.run_order(config)
    assert len(order) == 1 * 3 * 3 * 2
    first_modes = [order[i].mode for i in range(0, len(order), 3)]
    for mode in bench_migrate.MODES:
        assert first_modes.count(mode) == 2
    assert order[0].mode != order[9].mode  # the same cell starts differently in repeat 2


def test_result_is_strict_json(matrix: dict[str, Any]) -> None:
    data = {k: v for k, v in matrix.items() if k != "_progress"}
    text = json.dumps(data, allow_nan=False)
    assert json.loads(text)["benchmark"] == "migrate"


def test_targets_are_judged_from_the_measurements(matrix: dict[str, Any]) -> None:
    targets = {t["id"]: t for t in matrix["targets"]}
    for key in (
        "flip_downtime",
        "flip_downtime_scaling",
        "flip_total",
        "flip_peak",
        "flip_guest_vs_postcopy",
        "precopy_downtime_limit",
        "postcopy_running",
    ):
        assert key in targets
        assert targets[key]["passed"] in (True, False)  # measured here, whatever the verdict
    flip = _cell(matrix, 16 * MiB, 16 * MiB, "flip")
    assert targets["flip_downtime"]["value"] == flip["downtime"]
    no_reference = [t for t in matrix["targets"] if t["id"].startswith("precopy_vs_qemu")]
    assert len(no_reference) == len(SIZES) * len(RATES)
    assert all(t["passed"] is None and "no QEMU reference" in t["measured"] for t in no_reference)


def test_markdown_has_a_row_per_cell_and_the_targets(matrix: dict[str, Any]) -> None:
    text = bench_migrate.markdown_table(matrix)
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| size | dirty rate | mode |")
    data_rows = [r for r in rows if r.split("|")[3].strip() in bench_migrate.MODES]
    assert len(data_rows) == len(SIZES) * len(RATES) * len(bench_migrate.MODES)
    assert "| target | measured | met |" in text
    assert "no QEMU reference" in text
    assert "interleaved" in text


@pytest.mark.usefixtures("fonts_loaded")
def test_plot_writes_a_png(matrix: dict[str, Any], tmp_path: Path) -> None:
    path = bench_migrate.plot(matrix, tmp_path / "sub" / "migrate.png")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_plot_without_matplotlib_says_how_to_get_it(
    matrix: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("matplotlib", "matplotlib.backends.backend_agg", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(pageflip.FeatureUnavailable, match=r"pageflip\[plot\]"):
        bench_migrate.plot(matrix, tmp_path / "migrate.png")
    assert not (tmp_path / "migrate.png").exists()


def test_no_pageflip_helpers_are_left(matrix: dict[str, Any]) -> None:
    assert _helpers_alive() == []
    assert multiprocessing.active_children() == []


def test_config_refuses_what_it_cannot_run() -> None:
    with pytest.raises(ValueError, match="unknown mode"):
        bench_migrate.MigrateConfig(modes=("teleport",))
    with pytest.raises(ValueError, match="negative"):
        bench_migrate.MigrateConfig(rates=(-1,))
    with pytest.raises(ValueError):
        bench_migrate.MigrateConfig(sizes=())


# -- the command ------------------------------------------------------------------------------


@pytest.mark.usefixtures("fonts_loaded")
def test_cli_writes_json_output_and_plot(tmp_path: Path) -> None:
    output = tmp_path / "results" / "migrate.json"
    png = tmp_path / "migrate.png"
    result = CliRunner().invoke(
        main,
        [
            "bench",
            "migrate",
            "--sizes",
            "8M",
            "--rates",
            "0,8M/s",
            "--modes",
            "flip,postcopy",
            "--downtime-limit",
            "200ms",
            "--warmup",
            "0.2",
            "--settle",
            "0",
            "--json",
            "--output",
            str(output),
            "--plot",
            str(png),
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert json.loads(output.read_text()) == data
    assert data["config"]["downtime_limit"] == pytest.approx(0.2)
    assert data["config"]["rates"] == [0, 8 * MiB]
    assert all("guest_pause" in r for r in data["runs"])
    assert all("guest_pause" in c for c in data["cells"])
    assert sorted((r["rate"], r["mode"]) for r in data["runs"]) == [
        (0, "flip"),
        (0, "postcopy"),
        (8 * MiB, "flip"),
        (8 * MiB, "postcopy"),
    ]
    assert all(r["verified"] for r in data["runs"])
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert _helpers_alive() == []


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--sizes", "8Q", "--sizes"),
        ("--rates", "fast", "--rates"),
        ("--modes", "teleport", "unknown mode"),
    ],
)
def test_cli_refuses_bad_options_before_running(option: str, value: str, message: str) -> None:
    result = CliRunner().invoke(main, ["bench", "migrate", option, value, "--no-progress"])
    assert result.exit_code == 2
    assert message in result.output


def test_a_failed_run_is_an_error_and_keeps_the_runs_before_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(ctx: Any, spec: bench_migrate.RunSpec, config: Any) -> dict[str, Any]:
        raise bench_migrate.MigrateBenchmarkError(
            f"run {spec.index + 1} ({spec.label}): the guest failed its check: page 3: torn"
        )

    monkeypatch.setattr(migrate_running, "_one_run", failing)
    output = tmp_path / "migrate.json"
    result = CliRunner().invoke(
        main,
        [
            "bench",
            "migrate",
            "--sizes",
            "8M",
            "--rates",
            "0",
            "--no-progress",
            "--output",
            str(output),
        ],
    )
    assert result.exit_code == 1
    assert "MigrateBenchmarkError: run 1 (8M at idle, flip): the guest failed" in result.output
    partial = json.loads(output.read_text())
    assert partial["complete"] is False and partial["runs"] == []
    assert "Incomplete" in bench_migrate.markdown_table(partial)


def test_the_sampler_counts_shared_memory_once_without_walking_page_tables() -> None:
    """walk=False: shared memory the processes hold at the start counts once (two roles on
    the same process: not twice), and shared memory created later adds what it holds."""
    from pageflip.bench.migrate.sampling import Sampler
    from pageflip.memory import Region

    mib = 1 << 20
    with Region.movable(32 * mib, "sampled") as held:
        held.numpy()[:] = 1  # resident
        sampler = Sampler({"source": os.getpid(), "destination": os.getpid()}, 0.01, walk=False)
        base = sampler.baseline()
        assert 32 * mib <= base["shared"] < 40 * mib, base
        with Region.movable(16 * mib, "grown") as grown:
            grown.numpy()[:] = 1
            later = sampler.sample()
            assert later is not None
            assert 40 * mib <= later["shared"] < 56 * mib, later
        result = sampler.result(base, 32 * mib)
        assert result["method"] == "counters" and result["pss_samples"] == 2


def test_a_prewarm_that_cannot_touch_its_memory_says_so_in_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A failed touch (no memory, or its mapping gone under a signal) is one error from the
    caller, not a traceback from each of the touching threads."""
    from pageflip._sys import mm

    def refuse(*args: object) -> None:
        raise OSError(12, "madvise(...): Cannot allocate memory")

    seen: list[threading.ExceptHookArgs] = []
    monkeypatch.setattr(mm, "madvise", refuse)
    monkeypatch.setattr(threading, "excepthook", seen.append)
    with pytest.raises(bench_migrate.MigrateBenchmarkError) as err:
        migrate_running._prewarm(4 << 20)
    text = str(err.value)
    assert "could not touch 4.0 MiB of memory before the run (--no-prewarm skips it)" in text
    assert "\n" not in text and seen == []
