"""The ``pageflip`` command: probe, bench handoff and demo, run in-process with CliRunner;
and the help of every option of every command.

These tests check what the commands say and that their JSON is complete and consistent (the
move row moved, copy rows copied); they never assert on timings. Each run uses a few MiB.
The autouse ``no_leaks`` fixture (conftest) fails a test that leaves an fd, a memfd mapping,
a thread or a child process behind; shared-memory segments are checked here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

import pageflip
from pageflip.bench import handoff as bench_handoff
from pageflip.cli import main
from pageflip.units import format_size, parse_size

IS_ROOT = os.geteuid() == 0
PAGES_4M = (4 << 20) // pageflip.PAGE_SIZE


def _shm_names() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


@pytest.fixture
def no_shm_leaks() -> Iterator[None]:
    """Fail a test that leaves a POSIX shared-memory segment behind."""
    before = _shm_names()
    yield
    leaked = _shm_names() - before
    assert not leaked, f"shared memory left in /dev/shm: {leaked}"


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


# -- sizes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "nbytes"),
    [
        ("4096", 4096),
        ("64M", 64 << 20),
        ("1G", 1 << 30),
        ("4g", 4 << 30),
        ("1.5G", 3 << 29),
        ("8KiB", 8192),
        ("2MB", 2 << 20),
    ],
)
def test_parse_size_reads_binary_suffixes(text: str, nbytes: int) -> None:
    assert parse_size(text) == nbytes


@pytest.mark.parametrize("text", ["", "0", "-1M", "1Q", "M", "0.5", "1.2.3G"])
def test_parse_size_refuses_what_is_not_a_positive_size(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_format_size_is_the_inverse_of_parse_size() -> None:
    for nbytes in (4096, 64 << 20, 1 << 30, 4 << 30, 3 << 29, 12345):
        assert parse_size(format_size(nbytes)) == nbytes
    assert format_size(1 << 30) == "1G"


def test_status_shows_sizes_rates_durations_and_moments_for_people() -> None:
    """The status table spells bytes, rates, seconds and moments out (--json keeps numbers)."""
    from pageflip.cli.guests import _plain

    assert _plain(268435456, "memory") == "256 MiB"
    assert _plain(268435456.0, "write_rate") == "256 MiB/s"
    heartbeat = {"interval": 0.0005, "observed_pause": None, "settled": True}
    assert _plain(heartbeat) == "interval: 0.50 ms, observed_pause: None, settled: True"
    assert _plain(1796038522.380091, "started").startswith("2026-")
    assert _plain(16384, "npages") == "16384"
    assert _plain(0.123456789, "anything") == "0.123457"


def test_a_bad_size_is_a_usage_error(runner: CliRunner) -> None:
    result = runner.invoke(main, ["bench", "handoff", "--size", "4Q"])
    assert result.exit_code == 2
    assert "'4Q' is not a size" in result.stderr


def test_an_unknown_method_is_a_usage_error(runner: CliRunner) -> None:
    result = runner.invoke(main, ["bench", "handoff", "--size", "4M", "--methods", "move,nope"])
    assert result.exit_code == 2
    assert "unknown nope" in result.stderr


# -- probe ------------------------------------------------------------------------------------


def test_probe_prints_every_feature(runner: CliRunner) -> None:
    result = runner.invoke(main, ["probe"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for name in pageflip.probe():
        assert name in result.stdout


def test_probe_json_lists_every_feature(runner: CliRunner) -> None:
    result = runner.invoke(main, ["probe", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report["features"]) == set(pageflip.probe())
    for name, feature in report["features"].items():
        assert feature["name"] == name
        assert isinstance(feature["available"], bool)
        assert feature["detail"] and feature["purpose"]
    assert report["kernel"] and report["machine"]


def test_probe_json_is_one_compact_line(runner: CliRunner) -> None:
    result = runner.invoke(main, ["probe", "--json"])
    assert result.exit_code == 0, result.output
    (line,) = result.stdout.splitlines()
    assert json.loads(line) == pageflip.probe().as_dict()
    assert '", "' not in line  # compact separators


def test_probe_table_names_the_seals(runner: CliRunner) -> None:
    if not pageflip.probe()["memfd_seals"].available:
        pytest.skip("no memfd seals here")
    result = runner.invoke(main, ["probe"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "seals SHRINK|GROW" in result.stdout
    assert "<Seal" not in result.stdout


# -- help -------------------------------------------------------------------------------------


def _commands(
    command: click.Command, path: str = "pageflip"
) -> Iterator[tuple[str, click.Command]]:
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _commands(sub, f"{path} {name}")


def test_every_command_and_option_has_help() -> None:
    missing = []
    for path, command in _commands(main):
        if not (command.help or "").strip():
            missing.append(f"{path}: no docstring")
        with click.Context(command, info_name=path) as ctx:
            for param in command.get_params(ctx):
                if isinstance(param, click.Option) and not (param.help or "").strip():
                    missing.append(f"{path} {'/'.join(param.opts)}: no help")
    assert missing == []


def test_every_command_shows_its_help(runner: CliRunner) -> None:
    for path, _ in _commands(main):
        args = path.split()[1:]
        result = runner.invoke(main, [*args, "--help"], terminal_width=120)
        assert result.exit_code == 0, (path, result.output)
        assert "Usage:" in result.stdout


# -- errors -----------------------------------------------------------------------------------


def test_a_pageflip_error_prints_type_and_message_and_fails(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    def missing(**_: Any) -> pageflip.ProbeReport:
        raise pageflip.FeatureUnavailable(
            "memfd_seals is not available here: no permission", feature="memfd_seals"
        )

    monkeypatch.setattr(pageflip, "probe", missing)
    result = runner.invoke(main, ["probe"])
    assert result.exit_code == 1
    assert result.stderr == "FeatureUnavailable: memfd_seals is not available here: no permission\n"
    assert result.stdout == ""


def test_other_errors_are_not_swallowed(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(**_: Any) -> pageflip.ProbeReport:
        raise RuntimeError("a bug")

    monkeypatch.setattr(pageflip, "probe", broken)
    result = runner.invoke(main, ["probe"])
    assert result.exit_code == 1
    assert isinstance(result.exception, RuntimeError)


@pytest.mark.skipif(
    shutil.which("pageflip", path=os.path.dirname(sys.executable)) is None,
    reason="the pageflip console script is not installed next to this Python",
)
def test_console_script_runs_probe_json() -> None:
    script = os.path.join(os.path.dirname(sys.executable), "pageflip")
    done = subprocess.run(
        [script, "probe", "--json"], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert set(json.loads(done.stdout)["features"]) == set(pageflip.probe())


# -- bench handoff ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def handoff_4m(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, str]:
    """One small handoff run shared by the tests below: (stdout JSON, --output file, stderr)."""
    out = tmp_path_factory.mktemp("bench") / "handoff-4M.json"
    shm_before = _shm_names()
    result = CliRunner().invoke(
        main,
        [
            "bench",
            "handoff",
            "--size",
            "4M",
            "--repeat",
            "1",
            "--json",
            "--overhead-rounds",
            "20",
            "--output",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert _shm_names() - shm_before == set(), "shared memory left behind"
    return json.loads(result.stdout), out, result.stderr


def test_bench_handoff_json_has_every_method(handoff_4m: tuple[dict[str, Any], Path, str]) -> None:
    data, _, _ = handoff_4m
    assert data["benchmark"] == "handoff"
    assert data["size"] == 4 << 20 and data["size_label"] == "4M" and data["repeat"] == 1
    assert list(data["results"]) == list(bench_handoff.DEFAULT_METHODS)
    for row in data["results"].values():
        assert len(row["access_seconds"]) == len(row["touched_seconds"]) == 1
        assert 0 < row["access_median"] <= row["touched_median"]
        assert row["target"] in ("mapped", "warm", "fresh")
    assert data["memcpy"]["gib_per_s"] > 0
    assert data["overhead"]["rounds"] == 20
    assert {t["id"] for t in data["targets"]} == set(bench_handoff.TARGETS)
    for target in data["targets"]:
        assert target["passed"] in (True, False, None)
    for key in ("kernel", "cpus", "python", "numpy", "pageflip"):
        assert data["machine"][key]


def test_bench_handoff_move_moved_and_copies_copied(
    handoff_4m: tuple[dict[str, Any], Path, str],
) -> None:
    data, _, _ = handoff_4m
    rows = data["results"]
    move = rows["move"]
    assert (move["pages_moved"], move["pages_copied"], move["reported_method"]) == (
        PAGES_4M,
        0,
        "move",
    )
    for key, row in rows.items():
        method = bench_handoff.METHODS[key]
        if method.semantics == "copy" and method.pageflip:
            assert (row["pages_moved"], row["pages_copied"]) == (0, PAGES_4M), key
            assert row["reported_method"] == method.copy_method, key
            assert row["fraction_of_memcpy"] > 0
        elif not method.pageflip:
            assert row["pages_moved"] is None and row["transfers"] == [None]


def test_bench_handoff_json_is_strict(handoff_4m: tuple[dict[str, Any], Path, str]) -> None:
    """No NaN or Infinity (which json.loads would have read back as floats)."""
    data, out, _ = handoff_4m

    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    assert json.loads(out.read_text(), parse_constant=refuse) == data
    assert json.loads(json.dumps(data, allow_nan=False)) == data


def test_bench_handoff_writes_the_same_json_to_output(
    handoff_4m: tuple[dict[str, Any], Path, str],
) -> None:
    data, out, _ = handoff_4m
    assert json.loads(out.read_text()) == data


def test_bench_handoff_progress_is_plain_lines_off_a_terminal(
    handoff_4m: tuple[dict[str, Any], Path, str],
) -> None:
    """Under CliRunner stderr is no terminal: progress comes as lines, ending with "done"."""
    _, _, stderr = handoff_4m
    lines = [line for line in stderr.splitlines() if line.startswith("handoff 4M: ")]
    assert len(lines) >= 2
    assert lines[-1].endswith("done")


def test_bench_handoff_markdown_covers_every_row(
    handoff_4m: tuple[dict[str, Any], Path, str],
) -> None:
    data, _, _ = handoff_4m
    text = bench_handoff.markdown_table(data)
    for key in data["results"]:
        assert f"| {key} |" in text
    assert "memcpy (reference)" in text
    assert text.count("\n| ") >= len(data["results"]) + len(data["targets"])


def test_bench_handoff_table_output(runner: CliRunner, no_shm_leaks: None) -> None:
    result = runner.invoke(
        main,
        [
            "bench",
            "handoff",
            "--size",
            "1M",
            "--repeat",
            "1",
            "--methods",
            "move",
            "--methods",
            "stream",
            "--overhead-rounds",
            "0",
            "--no-progress",
        ],
        terminal_width=200,
    )
    assert result.exit_code == 0, result.output
    assert "move" in result.stdout and "stream" in result.stdout
    assert "memcpy (reference)" in result.stdout
    assert "speed targets" in result.stdout


def test_a_move_that_copied_fails_the_benchmark() -> None:
    received = {
        "verified": True,
        "transfer": {"pages_moved": 0, "pages_copied": 1024, "method": "pread"},
    }
    with pytest.raises(bench_handoff.BenchmarkError, match="expected a move"):
        bench_handoff._check_run("move", 4 << 20, received)
    received["transfer"] = {"pages_moved": 1024, "pages_copied": 0, "method": "move"}
    with pytest.raises(bench_handoff.BenchmarkError, match="expected a stream copy"):
        bench_handoff._check_run("stream", 4 << 20, received)
    bench_handoff._check_run("move", 4 << 20, received)
    with pytest.raises(bench_handoff.BenchmarkError, match="wrong data"):
        bench_handoff._check_run("move", 4 << 20, {**received, "verified": False})


# -- demo -------------------------------------------------------------------------------------


def test_demo_moves_then_copies_and_verifies(runner: CliRunner) -> None:
    result = runner.invoke(main, ["demo", "handoff", "--size", "8M"], terminal_width=200)
    assert result.exit_code == 0, result.output + repr(result.exception)
    out = result.stdout
    assert "verified both times" in out
    assert "8388608 bytes by move: moved 2048 pages" in out
    assert "0 pages moved, 2048 copied" in out
    if IS_ROOT:
        assert "the move kept the very same pages (2048/2048 frames identical)" in out
        assert "(0/2048 identical)" in out
    else:
        assert "physical frames: not compared" in out


def test_run_demo_returns_both_phases() -> None:
    from rich.console import Console

    from pageflip.demo import run_demo

    with open(os.devnull, "w") as sink:
        result = run_demo(1 << 20, console=Console(file=sink))
    assert result.verified
    assert result.move.transfer.moved and result.move.transfer.method == "move"
    assert result.copy.transfer.pages_moved == 0 and result.copy.transfer.pages_copied == 256
    assert result.speed_ratio > 0
    if IS_ROOT:
        assert (result.move.same_frames, result.copy.same_frames) == (256, 0)


def test_demo_without_root_skips_the_frame_check(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from rich.console import Console

    from pageflip import demo

    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # this process only, not the child
    out = io.StringIO()
    result = demo.run_demo(1 << 20, console=Console(file=out, width=200))
    assert result.verified
    assert result.move.same_frames is None and result.copy.same_frames is None
    assert result.frames_skipped == "physical frame numbers need root (CAP_SYS_ADMIN)"
    assert "physical frames: not compared (physical frame numbers need root" in out.getvalue()
