"""pageflip bench live: the example service, the load generator, the wrk parser, the command."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

pytest.importorskip("uvicorn")

from pageflip.bench.live import Load
from pageflip.bench.live import wrk as wrk_driver
from pageflip.bench.live.service import ServiceProcess, default_app, tagged_pids
from pageflip.bench.live.upgrades import pause_of
from pageflip.errors import BenchmarkError

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "examples" / "live_service" / "app.py"
SIZE = 64 << 20
ROWS = SIZE // 256


def _app_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("live_service_app", APP)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def service() -> Iterator[tuple[ServiceProcess, int]]:
    proc = ServiceProcess(APP, ["--no-live", "--index-size", "64M", "--port", "0"])
    try:
        yield proc, proc.serving(60.0)["port"]
    finally:
        proc.stop()


def _get(port: int, path: str) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        value = json.loads(response.read())
    assert isinstance(value, dict)
    return value


def test_default_app_is_the_example() -> None:
    assert default_app() == APP


def test_search_answers_the_nearest_rows(service: tuple[ServiceProcess, int]) -> None:
    _, port = service
    app = _app_module()
    index = np.empty((ROWS, app.DIM), dtype=np.float32)
    app.fill(index, 1)
    for q in (0, 4097, ROWS - 1):
        answer = _get(port, f"/search?q={q}&k=5")
        assert answer["ids"] == app.search(index, q, 5)
        assert answer["ids"][0] == q  # unit rows: a row is its own nearest neighbour


def test_version_and_count(service: tuple[ServiceProcess, int]) -> None:
    proc, port = service
    version = _get(port, "/version")
    assert version["pid"] == proc.pid
    assert version["generation"] == 0
    assert str(version["version"]).startswith("live-service")
    before = _get(port, "/count")["count"]
    _get(port, "/search?q=3&k=2")
    assert _get(port, "/count")["count"] == before + 1  # type: ignore[operator]


def test_bad_query_is_400(service: tuple[ServiceProcess, int]) -> None:
    _, port = service
    with pytest.raises(urllib.error.HTTPError) as err:
        _get(port, "/search?q=banana")
    err.value.close()
    assert err.value.code == 400


def test_load_counts_no_failure_against_a_serving_service(
    service: tuple[ServiceProcess, int],
) -> None:
    _, port = service
    load = Load(port, connections=4, rows=ROWS)
    load.start()
    time.sleep(1.0)
    load.stop()
    assert load.error is None
    assert load.requests
    assert load.failures == []


def test_load_counts_failures_when_the_server_is_killed() -> None:
    proc = ServiceProcess(APP, ["--no-live", "--index-size", "4M", "--port", "0"])
    try:
        port = proc.serving(60.0)["port"]
        load = Load(port, connections=4, rows=(4 << 20) // 256)
        load.start()
        time.sleep(0.5)
        proc.proc.kill()
        proc.wait(10.0)
        time.sleep(0.5)
        load.stop()
    finally:
        proc.stop()
    assert load.requests
    kinds = {f.kind for f in load.failures}
    assert "refused" in kinds, kinds


def test_drain_on_sighup_exits_cleanly() -> None:
    proc = ServiceProcess(APP, ["--no-live", "--index-size", "4M", "--port", "0", "--reuseport"])
    try:
        port = proc.serving(60.0)["port"]
        load = Load(port, connections=2, rows=(4 << 20) // 256)
        load.start()
        time.sleep(0.3)
        proc.drain(timeout=20.0)
        load.stop()
    finally:
        proc.stop()
    assert proc.proc.returncode == 0
    # the drained connections were closed after a response, never in the middle of one
    assert not [f for f in load.failures if f.kind in ("eof", "eof-mid-response")]


def test_a_service_that_fails_at_start_up_is_an_error(tmp_path: Path) -> None:
    flag = tmp_path / "fail"
    flag.touch()
    proc = ServiceProcess(
        APP, ["--no-live", "--index-size", "4M", "--port", "0", "--fail-if-exists", str(flag)]
    )
    try:
        with pytest.raises(BenchmarkError, match="exited"):
            proc.serving(30.0)
    finally:
        proc.stop()


WRK_SAMPLE = """\
Running 15s test @ http://127.0.0.1:8000/
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     3.63ms    1.10ms  10.80ms   71.86%
    Req/Sec     4.40k   340.21     5.10k    70.00%
  Latency Distribution
     50%    3.51ms
     75%    4.16ms
     90%  500.00us
     99%    1.03s
  131480 requests in 15.00s, 17.05MB read
  Socket errors: connect 0, read 128, write 1, timeout 2
  Non-2xx or 3xx responses: 5
Requests/sec:   8765.33
Transfer/sec:      1.14MB
"""


def test_wrk_parser_reads_a_report() -> None:
    result = wrk_driver.parse(WRK_SAMPLE)
    assert result["requests"] == 131480
    assert result["duration"] == pytest.approx(15.0)
    assert (result["errors_connect"], result["errors_read"]) == (0, 128)
    assert (result["errors_write"], result["errors_timeout"]) == (1, 2)
    assert result["non_2xx"] == 5
    assert result["latency_mean"] == pytest.approx(3.63e-3)
    assert result["latency_max"] == pytest.approx(10.8e-3)
    assert result["percentiles"] == pytest.approx(
        {"p50": 3.51e-3, "p75": 4.16e-3, "p90": 500e-6, "p99": 1.03}
    )


def test_wrk_parser_without_errors_and_garbage() -> None:
    clean = "\n".join(
        line for line in WRK_SAMPLE.splitlines() if "errors" not in line and "Non-2xx" not in line
    )
    result = wrk_driver.parse(clean)
    assert result["errors_read"] == 0 and result["non_2xx"] == 0
    with pytest.raises(BenchmarkError):
        wrk_driver.parse("unable to connect to 127.0.0.1:1 Connection refused")


@pytest.mark.skipif(wrk_driver.available() is None, reason="wrk is not installed (make wrk)")
def test_wrk_driver_against_the_service(service: tuple[ServiceProcess, int]) -> None:
    _, port = service
    proc = wrk_driver.start(port, duration=1, connections=4)
    result = wrk_driver.finish(proc, timeout=30)
    assert result["requests"] > 0
    assert result["errors_connect"] == result["errors_read"] == result["non_2xx"] == 0


def test_pause_of_upgrade_reports() -> None:
    assert pause_of({"pause": 0.002}) == 0.002
    assert pause_of({"timings": {"pause_ms": 3.0}}) == pytest.approx(0.003)
    assert pause_of({"ok": True}) is None


def _pageflip(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, "-m", "pageflip", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def test_bench_live_runs_the_restart_and_overlap_sides(tmp_path: Path) -> None:
    out = tmp_path / "results"
    done = _pageflip(
        "bench", "live", "--index-size", "64M", "--upgrades", "0", "--rollbacks", "0",
        "--duration", "1s", "--connections", "4", "--out", str(out), "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result == json.loads((out / "live.json").read_text())
    sides = {side["side"]: side for side in result["sides"]}
    for name in ("plain restart", "overlap restart"):
        side = sides[name]
        assert side["available"] and len(side["times"]) == 1
        assert side["traffic"]["requests"] > 0
        assert side["memory"]["one_copy"] > 0
    markdown = (out / "live.md").read_text()
    assert "pageflip bench live --index-size 64M" in markdown
    assert "| plain restart |" in markdown
    assert "writing the index" in done.stderr  # progress on stderr
    run_dir = Path(re.findall(r"to (\S+)/index\.npy", done.stderr)[0])
    assert not run_dir.exists()
    assert tagged_pids(str(run_dir)) == []


def test_bench_live_bad_input_is_one_line() -> None:
    for args in (["--index-size", "banana"], ["--upgrades", "-1"], ["--duration", "soon"]):
        done = _pageflip("bench", "live", *args, timeout=30)
        assert done.returncode == 2, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "Traceback" not in done.stderr


def test_live_upgrades_without_failures(tmp_path: Path) -> None:
    pytest.importorskip("pageflip.live")
    out = tmp_path / "results"
    done = _pageflip(
        "bench", "live", "--index-size", "64M", "--upgrades", "2", "--rollbacks", "1",
        "--duration", "1s", "--connections", "4", "--out", str(out), "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    live = next(s for s in json.loads(done.stdout)["sides"] if s["side"] == "pageflip live")
    assert live["available"] and len(live["times"]) == 2
    assert live["rollbacks_ok"] == 1
    assert live["traffic"]["failures"] == 0


def test_the_live_service_removes_its_control_socket_on_sigterm(tmp_path: Path) -> None:
    """uvicorn re-raises SIGTERM after its shutdown: the example turns it into an exit that
    closes its Upgrader, so the control socket file does not stay behind."""
    control = tmp_path / "app.sock"
    args = ["--index-size", "16M", "--port", "0", "--control", str(control)]
    proc = ServiceProcess(APP, args)
    try:
        proc.serving(60)
        assert control.exists()
        proc.proc.terminate()
        assert proc.proc.wait(30) == 143
    finally:
        proc.stop()
    assert list(tmp_path.iterdir()) == []
