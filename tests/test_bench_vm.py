"""``pageflip bench vm``: the logic of the QEMU / pageflip comparison, without QEMU.

What runs here: the guest's console lines and requests, the QMP codec (whole, byte by byte,
with trailing data) and client (against a small fake server), the run order, the records'
cells, ratios and targets from made-up runs, the Markdown and the plot, the matrix with fake
runners, and the cleanup of a QEMU run whose QEMU fails (a fake ``qemu-system-x86_64`` on
PATH): no socket file, no shared-memory file and no process may be left. Nothing here needs
QEMU or /dev/kvm.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from cli_procs import NO_REALTIME, NO_REALTIME_MISSING, REALTIME_REFUSED, one_line, run
from pageflip.bench import vm as bench_vm
from pageflip.bench.vm import guest, qmp, runner
from pageflip.bench.vm.config import GuestImage, VmConfig, VmOptions, VmRunSpec, run_order
from pageflip.bench.vm.console import ConsoleLog
from pageflip.bench.vm.pageflip_side import _switchover_to_running, run_pageflip
from pageflip.bench.vm.qemu import RunFiles, migration_setup, qemu_command, run_qemu
from pageflip.bench.vm.records import VmRunRecord, blank_record
from pageflip.bench.vm.stats import cells, comparisons
from pageflip.cli import main
from pageflip.errors import BadArgument, BenchmarkError, RemoteProtocolError, VmBenchmarkError

MiB = 1 << 20
GiB = 1 << 30
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _config(tmp_path: Path, **kw: Any) -> VmConfig:
    kernel = tmp_path / "guest.elf"
    kernel.write_bytes(b"\x7fELF")
    options = kw.pop("options", VmOptions())
    return VmConfig(GuestImage(str(kernel)), options=options, **kw)


# -- the guest's console ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "parsed"),
    [
        ("READY mb=1024 pages=262144 fill_ms=812", guest.Ready(1024, 262144, 812)),
        ("READY mb=1024 fill_ms=812", guest.Ready(1024, None, 812)),
        (
            "HB n=7 t=140 dirtied=9000 rate=256 gap_us=10500",
            guest.Heartbeat(7, 140, 9000, 256, 10500),
        ),
        ("HB n=7 t=140 dirtied=9000 rate=256", guest.Heartbeat(7, 140, 9000, 256, None)),
        (
            "PAUSE max_us=1830 at_n=412 tick_us=1000 iters=99123",
            guest.Pause(1830, 412, 1000, 99123),
        ),
        ("VERIFY bad=0 pages=262144 ms=930", guest.Verify(0, 262144, 930)),
        (
            "GAPS n=40 k=2 g1=2100 e1=500000 g2=3400 e2=900000 now=1000000",
            guest.Gaps(40, ((2100, 500000), (3400, 900000)), 1000000),
        ),
        ("GAPS n=3 k=0 now=77", guest.Gaps(3, (), 77)),
        ("VERIFY bad=3 pages=65536 ms=120\r", guest.Verify(3, 65536, 120)),
        ("RATE 64", guest.RateSet(64)),
        ("BYE", guest.Bye()),
        ("PFGUEST start mb=64 rate=0 hb=20", guest.Started({"mb": 64, "rate": 0, "hb": 20})),
        ("MINIGUEST start mb=64 tsc_khz=2000", guest.Started({"mb": 64, "tsc_khz": 2000})),
        ("\x00\x00HB n=1 t=20 dirtied=0 rate=0", guest.Heartbeat(1, 20, 0, 0, None)),
    ],
)
def test_console_lines_parse_to_their_records(line: str, parsed: guest.ConsoleLine) -> None:
    assert guest.parse_line(line) == parsed


@pytest.mark.parametrize(
    "line",
    [
        "",
        "SeaBIOS (version 1.16)",
        "HB n=7 t=14",
        "PAUSE at_n=3",
        "VERIFY bad=",
        "READYMADE x=1",
        "GAPS n=2 k=2 g1=5 e1=9 now=10",  # torn: the second gap is missing
        "GAPS n=2 g1=5 e1=9 now=10",  # no count of those listed
    ],
)
def test_other_and_torn_lines_parse_to_nothing(line: str) -> None:
    assert guest.parse_line(line) is None


def test_the_gap_of_the_pause_is_the_one_that_overlaps_the_stop_and_the_restart() -> None:
    """Guest times are placed on the host's clock by the line's arrival: the line came at
    100.0 s host time with now=10 s guest time, so guest 9.5 s is host 99.5 s."""
    gaps = guest.Gaps(3, ((4000, 9_000_000), (2600, 9_501_000), (6000, 9_900_000)), 10_000_000)
    # The guest was stopped from 99.4990 to 99.5005 (host): the gap ending at 99.501.
    assert gaps.spanning(100.0, 99.499, 99.5005) == pytest.approx(0.0026)
    # A stall at another moment (the 6 ms one at 99.9) is not the pause.
    assert gaps.spanning(100.0, 99.7, 99.71) is None
    # Two gaps overlapping the window: the longer one.
    assert gaps.spanning(100.0, 99.0, 99.9) == pytest.approx(0.006)
    assert guest.Gaps(0, (), 5).spanning(100.0, 99.0, 99.5) is None


def test_a_guest_fault_is_recognised() -> None:
    line = "GUEST-EXCEPTION vec=14 err=0x2 rip=0x1000 cr2=0x0"
    assert guest.parse_line(line) == guest.Fault(line)


def test_command_lines_use_each_flavours_keys() -> None:
    assert guest.cmdline(guest.PFGUEST, 1 * GiB, 256 * MiB, 20, 1, 1000) == (
        "console=ttyS0 mb=1024 rate=256 hb=20 seed=1 tick_us=1000"
    )
    assert guest.cmdline(guest.PFGUEST, 64 * MiB, 0, 20, 7, None) == (
        "console=ttyS0 mb=64 rate=0 hb=20 seed=7"
    )
    assert guest.cmdline(guest.MINIGUEST, 1 * GiB, 256 * MiB, 20, 1, 1000) == (
        "console=ttyS0 ml_mb=1024 ml_rate=256 ml_hb=20 ml_seed=1"
    )
    with pytest.raises(BadArgument, match="whole MiB"):
        guest.cmdline(guest.PFGUEST, GiB + 1, 0, 20, 1, None)


def test_requests_are_the_guests_single_characters() -> None:
    assert (guest.pause_request(), guest.verify_request(), guest.quit_request()) == (
        b"P",
        b"V",
        b"Q",
    )
    assert guest.rate_request(256) == b"R256;"
    assert guest.gaps_request(2.5) == b"G2500;"
    assert guest.gaps_request(0.0001) == b"G1;"
    with pytest.raises(BadArgument):
        guest.gaps_request(0)


def test_console_log_waits_for_a_kind_from_an_index() -> None:
    log = ConsoleLog("test console")
    for text in ("READY mb=8 fill_ms=3", "HB n=1 t=20 dirtied=0 rate=0", "PAUSE max_us=9"):
        log.add(text, 1.0)
    i, line, pause = log.wait_for(guest.Pause, 0.1)
    assert (i, line.text, pause.max_us) == (2, "PAUSE max_us=9", 9)
    log.add("PAUSE max_us=4000 at_n=3 tick_us=1000 iters=5", 2.0)
    assert log.wait_for(guest.Pause, 0.1, start=3)[2].seconds == pytest.approx(0.004)
    assert [hb.n for _, hb in log.heartbeats()] == [1]
    with pytest.raises(BenchmarkError, match=r"no VERIFY line within 0\.05 s"):
        log.wait_for(guest.Verify, 0.05)


def test_console_log_stops_waiting_at_a_fault_or_a_close() -> None:
    log = ConsoleLog("src")
    log.add("GUEST-EXCEPTION vec=13")
    with pytest.raises(BenchmarkError, match="src: the guest failed: GUEST-EXCEPTION"):
        log.wait_for(guest.Ready, 5.0)
    closed = ConsoleLog("dst")
    closed.close()
    with pytest.raises(BenchmarkError, match="console closed"):
        closed.wait_for(guest.Ready, 5.0)
    gone = ConsoleLog("src")
    with pytest.raises(BenchmarkError, match="process exited"):
        gone.wait_for(guest.Ready, 5.0, alive=lambda: False)


# -- QMP ----------------------------------------------------------------------------------------

_GREETING = b'{"QMP": {"version": {"qemu": {"major": 7, "minor": 2}}, "capabilities": []}}\r\n'
_STOP = b'{"timestamp": {"seconds": 1700000000, "microseconds": 250000}, "event": "STOP"}\r\n'


def test_qmp_commands_carry_their_own_ids() -> None:
    codec = qmp.QmpCodec()
    first, data = codec.command("query-migrate")
    second, data2 = codec.command("migrate", {"uri": "unix:/x"})
    assert first != second
    assert json.loads(data) == {"execute": "query-migrate", "id": first}
    assert json.loads(data2) == {
        "execute": "migrate",
        "id": second,
        "arguments": {"uri": "unix:/x"},
    }
    assert data.endswith(b"\n") and data.count(b"\n") == 1


def _stream() -> bytes:
    return (
        _GREETING
        + _STOP
        + b'{"return": {"status": "completed", "total-time": 2537}, "id": "pf1"}\n'
        + b'{"error": {"class": "GenericError", "desc": "no"}, "id": "pf2"}\n'
    )


def _expected() -> list[qmp.QmpMessage]:
    return [
        qmp.Greeting({"qemu": {"major": 7, "minor": 2}}, []),
        qmp.Event("STOP", {}, 1700000000.25),
        qmp.Reply({"status": "completed", "total-time": 2537}, "pf1"),
        qmp.ReplyError("GenericError", "no", "pf2"),
    ]


def test_qmp_codec_parses_a_whole_stream() -> None:
    assert qmp.QmpCodec().feed(_stream()) == _expected()


def test_qmp_codec_parses_byte_by_byte() -> None:
    codec = qmp.QmpCodec()
    got: list[qmp.QmpMessage] = []
    for i in range(len(_stream())):
        got += codec.feed(_stream()[i : i + 1])
    assert got == _expected()


def test_qmp_codec_keeps_a_partial_line_for_later() -> None:
    codec = qmp.QmpCodec()
    tail = b'{"return": {}, "i'
    assert codec.feed(_stream() + tail) == _expected()
    assert codec.feed(b'd": "pf3"}\n') == [qmp.Reply({}, "pf3")]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"not json\n", "not JSON"),
        (b"[1, 2]\n", "expected a JSON object"),
        (b'{"something": 1}\n', "no known kind"),
        (b'{"error": "flat"}\n', "error without its object"),
    ],
)
def test_qmp_codec_refuses_what_qmp_does_not_send(line: bytes, message: str) -> None:
    with pytest.raises(RemoteProtocolError, match=message) as info:
        qmp.QmpCodec().feed(line)
    assert info.value.frame == "qmp"


@pytest.fixture
def fake_qmp(tmp_path: Path) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A one-connection QMP server: greets, answers every command (``fail`` with an error),
    and sends a STOP event before each answer; yields its path and the commands it got."""
    path = str(tmp_path / "qmp.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    got: list[dict[str, Any]] = []

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.sendall(_GREETING)
            buf = b""
            while True:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    cmd = json.loads(line)
                    got.append(cmd)
                    if cmd["execute"] == "fail":
                        answer = {"error": {"class": "GenericError", "desc": "nope"}}
                    else:
                        answer = {"return": {"echo": cmd["execute"]}}
                    answer["id"] = cmd["id"]
                    conn.sendall(_STOP + json.dumps(answer).encode() + b"\r\n")

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        yield path, got
    finally:
        thread.join(5)
        server.close()


def test_qmp_client_negotiates_executes_and_keeps_events(
    fake_qmp: tuple[str, list[dict[str, Any]]],
) -> None:
    path, got = fake_qmp
    client = qmp.QmpClient(path, "QEMU test", timeout=5.0)
    try:
        assert client.execute("query-status") == {"echo": "query-status"}
        with pytest.raises(BenchmarkError, match="QEMU test QMP fail: GenericError: nope"):
            client.execute("fail")
        events = client.poll_events(0.01)
    finally:
        client.close()
        client.close()  # idempotent
    assert [c["execute"] for c in got] == ["qmp_capabilities", "query-status", "fail"]
    assert [e.name for e in events] == ["STOP"] * 3
    assert all(e.timestamp == pytest.approx(1700000000.25) and e.received > 0 for e in events)


# -- QEMU's command line and modes --------------------------------------------------------------


def _spec(tmp_path: Path, mode: str = "precopy", **options: Any) -> VmRunSpec:
    config = _config(
        tmp_path,
        sizes=(64 * MiB,),
        rates=(0,),
        modes=(mode,),
        systems=("qemu",),
        options=VmOptions(**options),
    )
    return run_order(config)[0]


def test_qemu_shared_mode_maps_one_file_on_both_sides(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "flip", shm_dir=str(tmp_path), work_dir=str(tmp_path))
    files = RunFiles(spec)
    try:
        src, dst = qemu_command(spec, "src", files), qemu_command(spec, "dst", files)
        backend = f"memory-backend-file,id=mem,size=320M,mem-path={files.shm},share=on"
        assert backend in src and backend in dst
        assert "pc,accel=kvm,memory-backend=mem" in src
        assert src[src.index("-m") + 1] == "320M"
        assert dst[-2:] == ["-incoming", "defer"] and "-incoming" not in src
        assert (
            src[src.index("-append") + 1] == "console=ttyS0 mb=64 rate=0 hb=20 seed=1 tick_us=1000"
        )
        assert src[src.index("-cpu") + 1] == "host,-arch-capabilities"
    finally:
        files.remove()
    assert not files.dir.exists()


def test_qemu_on_huge_pages_maps_hugetlbfs_or_a_hugetlb_memfd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pageflip.bench.vm import qemu

    mount = tmp_path / "hugepages"
    mount.mkdir()
    monkeypatch.setattr(qemu, "hugetlbfs_dir", lambda: str(mount))
    spec = _spec(tmp_path, "flip", huge="hugetlb", work_dir=str(tmp_path))
    files = RunFiles(spec)
    try:
        assert files.shm is not None and files.shm.parent == mount
        backend = f"memory-backend-file,id=mem,size=320M,mem-path={files.shm},share=on"
        assert backend in qemu_command(spec, "src", files)
        assert backend in qemu_command(spec, "dst", files)
    finally:
        files.remove()
    spec = _spec(tmp_path, "precopy", huge="hugetlb", work_dir=str(tmp_path))
    files = RunFiles(spec)
    try:
        assert files.shm is None
        cmd = qemu_command(spec, "dst", files)
        assert "memory-backend-memfd,id=mem,size=320M,hugetlb=on,hugetlbsize=2M" in cmd
        assert "pc,accel=kvm,memory-backend=mem" in cmd
    finally:
        files.remove()


def test_hugetlbfs_mount_of_2mib_pages_is_found_or_named(tmp_path: Path) -> None:
    from pageflip.bench.vm.qemu import hugetlbfs_dir

    gib, two = tmp_path / "gib", tmp_path / "two"
    gib.mkdir()
    two.mkdir()
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "proc /proc proc rw,nosuid 0 0\n"
        f"none {gib} hugetlbfs rw,relatime,pagesize=1024M 0 0\n"
        f"none {two} hugetlbfs rw,relatime,pagesize=2M 0 0\n"
    )
    assert hugetlbfs_dir(str(mounts)) == str(two)
    mounts.write_text(f"none {gib} hugetlbfs rw,relatime,pagesize=1024M 0 0\n")
    with pytest.raises(BenchmarkError, match="mount -t hugetlbfs -o pagesize=2M none"):
        hugetlbfs_dir(str(mounts))


def test_cli_with_huge_pages_and_too_small_a_pool_names_the_sysctl(tmp_path: Path) -> None:
    kernel = tmp_path / "guest.elf"
    kernel.write_bytes(b"\x7fELF")
    result = CliRunner().invoke(
        main,
        [
            "bench", "vm", "--guest", str(kernel), "--sizes", "64G", "--rates", "0",
            "--modes", "flip", "--systems", "pageflip", "--huge", "hugetlb", "--no-progress",
        ],
    )  # fmt: skip
    assert result.exit_code == 1
    assert (
        "--huge hugetlb cannot run here: its 64.25 GiB of 2 MiB hugetlb pages need 32896 pages"
        in result.output
    )
    assert "sysctl -w vm.nr_hugepages=" in result.output


def test_qemu_modes_set_their_capabilities() -> None:
    assert migration_setup("shared", "src") == (
        [{"capability": "x-ignore-shared", "state": True}],
        {"max-bandwidth": 100_000_000_000},
    )
    assert migration_setup("precopy", "dst") == ([], {"max-bandwidth": 100_000_000_000})
    caps, _ = migration_setup("postcopy", "dst")
    assert [c["capability"] for c in caps] == ["postcopy-ram", "postcopy-blocktime"]
    assert [c["capability"] for c in migration_setup("postcopy", "src")[0]] == ["postcopy-ram"]
    with pytest.raises(BenchmarkError, match="no mode 'multifd'"):
        migration_setup("multifd", "src")


# -- a QEMU that fails leaves nothing behind ----------------------------------------------------

_FAKE_QEMU = """#!{python}
import os, sys, time
args = sys.argv[1:]
# Leave what a real QEMU would: its sockets and the shared-memory file.
for a in args:
    for part in a.split(","):
        for key in ("path=", "mem-path=", "unix:"):
            if part.startswith(key):
                open(part[len(key):], "w").close()
print("qemu-system-x86_64: -machine pc,accel=kvm: failed to initialize kvm: No such device",
      file=sys.stderr)
if os.environ.get("FAKE_QEMU_HANG"):
    time.sleep(600)
sys.exit(1)
"""


@pytest.fixture
def fake_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "qemu-system-x86_64"
    exe.write_text(_FAKE_QEMU.format(python=sys.executable))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    return exe


def _leftovers(*dirs: Path) -> list[str]:
    return sorted(str(p) for d in dirs for p in d.iterdir())


@pytest.mark.parametrize("mode", ["flip", "precopy", "postcopy"])
def test_a_qemu_that_fails_to_start_is_one_line_and_leaves_no_files(
    tmp_path: Path, fake_qemu: Path, mode: str
) -> None:
    work, shm = tmp_path / "work", tmp_path / "shm"
    work.mkdir()
    shm.mkdir()
    spec = _spec(tmp_path, mode, work_dir=str(work), shm_dir=str(shm), boot_timeout=20.0)
    with pytest.raises(BenchmarkError) as info:
        run_qemu(spec)
    message = str(info.value)
    assert message.startswith("QEMU (src) exited with status 1: ")
    assert "failed to initialize kvm: No such device" in message
    assert "\n" not in message
    assert _leftovers(work, shm) == []


def test_a_qemu_that_hangs_is_killed_by_pid_and_leaves_no_files(
    tmp_path: Path, fake_qemu: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_QEMU_HANG", "1")
    work, shm = tmp_path / "work", tmp_path / "shm"
    work.mkdir()
    shm.mkdir()
    spec = _spec(tmp_path, "flip", work_dir=str(work), shm_dir=str(shm), boot_timeout=1.0)
    with pytest.raises(BenchmarkError, match=r"src QMP|src console|connect"):
        run_qemu(spec)
    assert _leftovers(work, shm) == []
    assert not any(
        "FAKE" in p or str(fake_qemu) in _cmdline(p) for p in os.listdir("/proc") if p.isdigit()
    )


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# -- the pageflip side --------------------------------------------------------------------------


def test_the_pageflip_side_says_when_pageflip_vm_is_missing(tmp_path: Path) -> None:
    """A ``pageflip`` command without ``vm`` (an older install named by --pageflip)."""
    old = tmp_path / "old_pageflip.py"
    old.write_text("import sys\nsys.exit('Error: No such command vm.')\n")
    options = VmOptions(pageflip=(sys.executable, str(old)))
    config = _config(
        tmp_path,
        sizes=(64 * MiB,),
        rates=(0,),
        modes=("flip",),
        systems=("pageflip",),
        options=options,
    )
    assert not bench_vm.pageflip_vm_available(config.options.pageflip)
    assert bench_vm.pageflip_vm_available(VmOptions().pageflip)
    with pytest.raises(BenchmarkError, match=r"^pageflip vm is not available$"):
        run_pageflip(run_order(config)[0])
    with pytest.raises(VmBenchmarkError, match="--systems qemu"):
        runner.check_systems(config)


_FAKE_PAGEFLIP = """
import json, os, sys, time
args = sys.argv[1:]
def out(obj):
    print(json.dumps(obj), flush=True)
def opt(name):
    return args[args.index(name) + 1]
def flag(control, name):
    return os.path.join(os.path.dirname(control), name)
def beats(n0, until):
    n = n0
    while not os.path.exists(until):
        n += 1
        out({"console": "HB n=%d t=%d dirtied=0 rate=8 gap_us=900" % (n, n * 20)})
        time.sleep(0.02)
if args[:2] == ["vm", "run"]:
    if "--help" in args:
        sys.exit(0)
    control = opt("--control")
    assert opt("--memory") == "264M", args
    assert opt("--append") == "console=ttyS0 mb=8 rate=8 hb=20 seed=1 tick_us=1000", args
    assert ("--realtime" in args) == bool(os.environ.get("FAKE_REALTIME")), args
    out({"console": "PFGUEST start mb=8 rate=8"})
    out({"console": "READY mb=8 pages=2048 fill_ms=1"})
    beats(0, flag(control, "migrated"))
elif args[0] == "incoming":
    control = opt("--control")
    assert opt("--listen").startswith("unix:"), args
    while not os.path.exists(flag(control, "migrated")):
        time.sleep(0.005)
    out({"event": "resumed", "t": 0.01, "at": time.monotonic(), "downtime": 0.001})
    beats(1000, flag(control, "stopped"))
elif args[0] == "migrate":
    control = opt("--control")
    out({"event": "setup", "t": 0.0, "at": time.monotonic(), "mode": opt("--mode")})
    out({"event": "switchover", "t": 0.005, "at": time.monotonic()})
    open(flag(control, "migrated"), "w").close()
    time.sleep(0.05)
    out({"event": "done", "t": 0.06, "at": time.monotonic(), "mode": opt("--mode"),
         "total_seconds": 0.06, "downtime": 0.001, "bytes_on_wire": 4096,
         "guest_pause": 0.0015})
elif args[0] == "verify":
    out({"ok": True, "pages_checked": 2048, "pages_skipped": 0, "problems": [],
         "seconds": 0.01, "observed_pause": 0.0015, "bad": 0, "pages": 2048})
elif args[0] == "stop":
    open(flag(opt("--control"), "stopped"), "w").close()
else:
    sys.exit("fake pageflip: no command " + " ".join(args))
"""


def test_the_pageflip_side_drives_the_pageflip_commands(tmp_path: Path) -> None:
    """Against a fake ``pageflip`` that speaks the commands' JSON: the skeleton's contract."""
    fake = tmp_path / "fake_pageflip.py"
    fake.write_text(_FAKE_PAGEFLIP)
    options = VmOptions(guest_settle=0.2, pageflip=(sys.executable, str(fake)), timeout=20.0)
    config = _config(
        tmp_path,
        sizes=(8 * MiB,),
        rates=(8 * MiB,),
        modes=("postcopy",),
        systems=("pageflip",),
        options=options,
    )
    record = run_pageflip(run_order(config)[0])
    assert record["status"] == "completed" and record["error"] is None
    assert (record["total_s"], record["downtime_s"], record["guest_pause_s"]) == (
        0.06,
        0.001,
        0.0015,
    )
    assert (record["bytes_moved"], record["verify_bad"], record["verify_pages"]) == (4096, 0, 2048)
    assert record["switchover_to_running_s"] is not None
    assert 0 <= record["switchover_to_running_s"] < 1.0
    assert record["host_gap_s"] is not None and record["host_gap_s"] < 1.0
    assert record["write_rate"] == 8 * MiB
    assert record["memory"] is not None and record["peak_memory"]


def test_realtime_runs_pageflips_vm_with_it_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "fake_pageflip.py"
    fake.write_text(_FAKE_PAGEFLIP)
    monkeypatch.setenv("FAKE_REALTIME", "1")  # the fake checks that vm run gets --realtime
    options = VmOptions(
        guest_settle=0.2, pageflip=(sys.executable, str(fake)), timeout=20.0, realtime=True
    )
    config = _config(
        tmp_path, sizes=(8 * MiB,), rates=(8 * MiB,), modes=("flip",), systems=("pageflip",),
        options=options,
    )  # fmt: skip
    result = bench_vm.run(config)
    assert [r["status"] for r in result["runs"]] == ["completed"], result["runs"][0]["error"]
    assert result["config"]["options"]["realtime"] is True
    assert result["config"]["options"]["tick_us"] == 1000
    assert "SCHED_FIFO" in result["notes"]["realtime"]


@pytest.mark.skipif(NO_REALTIME_MISSING is not None, reason=str(NO_REALTIME_MISSING))
def test_realtime_without_the_right_is_one_line_before_any_run(tmp_path: Path) -> None:
    out = run(
        "bench", "vm", "--systems", "pageflip", "--sizes", "8M", "--rates", "0", "--modes",
        "flip", "--realtime", "--out", str(tmp_path / "out"), "--no-progress",
        wrapper=NO_REALTIME,
    )  # fmt: skip
    assert out.returncode == 1, out.stdout
    assert "ulimit -r" in one_line(out.stderr)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(REALTIME_REFUSED is not None, reason=str(REALTIME_REFUSED))
def test_qemus_vcpu_threads_are_made_realtime_by_their_ids() -> None:
    """What query-cpus-fast names is made SCHED_FIFO 1: here two real threads of this
    process stand for QEMU's vCPUs."""
    from pageflip.bench.vm.qemu import _Qemu

    release = threading.Event()
    threads = [threading.Thread(target=release.wait) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        qemu = _Qemu.__new__(_Qemu)
        ids = [t.native_id for t in threads]
        qemu.run = lambda command, **_: (
            [  # type: ignore[method-assign]
                {"cpu-index": i, "thread-id": tid} for i, tid in enumerate(ids)
            ]
            if command == "query-cpus-fast"
            else pytest.fail(command)
        )
        assert qemu.realtime_vcpus() == ids
        for tid in ids:
            assert os.sched_getscheduler(tid) == os.SCHED_FIFO  # type: ignore[arg-type]
            assert os.sched_getparam(tid).sched_priority == 1  # type: ignore[arg-type]
    finally:
        release.set()
        for thread in threads:
            thread.join()


def test_switchover_to_running_uses_both_sides_monotonic_stamps() -> None:
    source = [{"event": "round", "at": 1.0}, {"event": "switchover", "at": 10.0}]
    destination = [{"event": "resumed", "at": 10.004, "downtime": 0.003}]
    assert _switchover_to_running(source, destination) == pytest.approx(0.004)
    assert _switchover_to_running(source, []) is None


# -- the order of runs --------------------------------------------------------------------------


def test_each_modes_two_runs_go_back_to_back_the_first_system_alternating(
    tmp_path: Path,
) -> None:
    config = _config(tmp_path, sizes=(1 * GiB, 4 * GiB), rates=(0, 256 * MiB), repeat=2)
    specs = run_order(config)
    assert len(specs) == 2 * 2 * 3 * 2 * 2
    assert [s.index for s in specs] == list(range(len(specs)))
    pairs = [specs[i : i + 2] for i in range(0, len(specs), 2)]
    for n, (a, b) in enumerate(pairs):
        assert (a.size, a.rate, a.mode, a.repeat) == (b.size, b.rate, b.mode, b.repeat)
        assert a.pair == b.pair == n
        assert [a.system, b.system] == (
            ["qemu", "pageflip"] if n % 2 == 0 else ["pageflip", "qemu"]
        )
    first_cell = [p[0].mode for p in pairs[:3]]
    second_cell = [p[0].mode for p in pairs[3:6]]
    assert first_cell == ["flip", "precopy", "postcopy"]
    assert second_cell == ["precopy", "postcopy", "flip"]
    assert specs[0].system_mode == "shared" and specs[1].system_mode == "flip"
    assert specs[0].guest_ram == 1 * GiB + 256 * MiB


def test_qemu_alone_runs_one_run_per_mode(tmp_path: Path) -> None:
    config = _config(tmp_path, sizes=(1 * GiB,), rates=(0, 256 * MiB), systems=("qemu",))
    specs = run_order(config)
    assert [(s.system, s.rate, s.system_mode) for s in specs] == [
        ("qemu", 0, "shared"),
        ("qemu", 0, "precopy"),
        ("qemu", 0, "postcopy"),
        ("qemu", 256 * MiB, "precopy"),
        ("qemu", 256 * MiB, "postcopy"),
        ("qemu", 256 * MiB, "shared"),
    ]


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"modes": ("teleport",)}, "unknown modes"),
        ({"systems": ("xen",)}, "unknown systems"),
        ({"systems": ("qemu", "qemu")}, "once"),
        ({"sizes": (GiB + 4096,)}, "whole MiB"),
        ({"rates": (-MiB,)}, "whole MiB/s"),
        ({"repeat": 0}, "repeat"),
        ({"settle": -1.0}, "negative"),
    ],
)
def test_config_refuses_what_it_cannot_run(
    tmp_path: Path, kw: dict[str, Any], message: str
) -> None:
    with pytest.raises(BadArgument, match=message):
        _config(tmp_path, **kw)


# -- records, ratios, targets, report -----------------------------------------------------------


def _made_up(
    tmp_path: Path,
    figures: dict[tuple[str, str, int, int], dict[str, Any]],
    repeat: int = 1,
) -> list[VmRunRecord]:
    """Records for every run of a 4G-only matrix; ``figures`` per (system, mode, size, rate)."""
    config = _config(tmp_path, sizes=(4 * GiB,), rates=(0, 256 * MiB), repeat=repeat)
    out = []
    for spec in run_order(config):
        record = blank_record(spec)
        record.update(figures.get((spec.system, spec.mode, spec.size, spec.rate), {}))  # type: ignore[typeddict-item]
        if record["error"] is None:
            record["status"] = "completed"
        out.append(record)
    return out


_FAST = {
    ("qemu", "flip", 4 * GiB, 256 * MiB): {
        "total_s": 0.003,
        "downtime_s": 0.001,
        "guest_pause_s": 0.025,
        "bytes_moved": 200_000,
        "peak_memory": 4 * GiB,
        "peak_memory_ratio": 4 / 4.25,
    },
    ("pageflip", "flip", 4 * GiB, 256 * MiB): {
        "total_s": 0.004,
        "downtime_s": 0.0012,
        "guest_pause_s": 0.0015,
        "bytes_moved": 50_000,
        "peak_memory": int(4.3 * GiB),
        "peak_memory_ratio": 4.3 / 4.25,
    },
    ("qemu", "precopy", 4 * GiB, 0): {"total_s": 10.5, "downtime_s": 0.001},
    ("pageflip", "precopy", 4 * GiB, 0): {"total_s": 3.0, "downtime_s": 0.02},
    ("qemu", "precopy", 4 * GiB, 256 * MiB): {"total_s": 12.1, "downtime_s": 0.5},
    ("pageflip", "precopy", 4 * GiB, 256 * MiB): {"total_s": 13.0, "downtime_s": 0.2},
    ("pageflip", "postcopy", 4 * GiB, 0): {"switchover_to_running_s": 0.004},
    ("pageflip", "postcopy", 4 * GiB, 256 * MiB): {"switchover_to_running_s": 0.012},
    ("qemu", "postcopy", 4 * GiB, 0): {"switchover_to_running_s": 0.006, "total_s": 9.0},
}


def _result(tmp_path: Path, runs: list[VmRunRecord]) -> bench_vm.VmResult:
    import datetime

    config = _config(tmp_path, sizes=(4 * GiB,), rates=(0, 256 * MiB))
    return runner.results(
        config, datetime.datetime.now(datetime.UTC), run_order(config), runs, "QEMU 7.2.22"
    )


def test_cells_take_medians_and_leave_failed_runs_out(tmp_path: Path) -> None:
    runs = _made_up(tmp_path, {("qemu", "precopy", 4 * GiB, 0): {"total_s": 10.0}}, repeat=3)
    qemu_pre = [
        r for r in runs if r["system"] == "qemu" and r["mode"] == "precopy" and r["rate"] == 0
    ]
    qemu_pre[1]["total_s"] = 12.0
    qemu_pre[2].update(
        {"total_s": 1.0, "error": "QEMU precopy: migration failed", "status": "error"}
    )
    cell = next(
        c
        for c in cells(runs)
        if c["system"] == "qemu" and c["mode"] == "precopy" and c["rate"] == 0
    )
    assert (cell["n"], cell["errors"], cell["total_s"]) == (3, 1, 11.0)


def test_comparisons_give_pageflip_over_qemu(tmp_path: Path) -> None:
    comps = comparisons(cells(_made_up(tmp_path, _FAST)))
    assert [(c["rate"], c["mode"]) for c in comps] == [
        (0, "flip"),
        (0, "precopy"),
        (0, "postcopy"),
        (256 * MiB, "flip"),
        (256 * MiB, "precopy"),
        (256 * MiB, "postcopy"),
    ]
    flip = comps[3]
    assert flip["ratios"]["guest_pause_s"] == pytest.approx(0.06)
    assert flip["ratios"]["bytes_moved"] == pytest.approx(0.25)
    assert comps[1]["ratios"]["total_s"] == pytest.approx(3.0 / 10.5)
    assert comps[0]["ratios"]["total_s"] is None  # neither has a figure
    assert comps[2]["ratios"]["switchover_to_running_s"] == pytest.approx(4 / 6)


def _targets(result: bench_vm.VmResult) -> dict[str, tuple[bool | None, float | None]]:
    return {t["id"]: (t["passed"], t["value"]) for t in result["targets"]}


def test_targets_are_judged_from_the_runs(tmp_path: Path) -> None:
    targets = _targets(_result(tmp_path, _made_up(tmp_path, _FAST)))
    assert targets["flip_guest_pause"] == (True, 0.0015)
    assert targets["flip_vs_qemu_shared"][0] is True
    assert targets["flip_vs_qemu_shared"][1] == pytest.approx(0.06)
    assert targets["flip_memory"][0] is True
    assert targets["precopy_total_4G_0"] == (True, 3.0)
    assert targets["precopy_total_4G_268435456"] == (False, 13.0)
    assert targets["postcopy_running"] == (True, 0.012)


def test_targets_fail_on_the_worst_run_and_compare_within_a_pair(tmp_path: Path) -> None:
    slow = {k: dict(v) for k, v in _FAST.items()}
    slow[("pageflip", "flip", 4 * GiB, 256 * MiB)].update(
        guest_pause_s=0.004, peak_memory_ratio=1.5, peak_memory=int(6.4 * GiB)
    )
    slow[("pageflip", "postcopy", 4 * GiB, 0)]["switchover_to_running_s"] = 0.08
    targets = _targets(_result(tmp_path, _made_up(tmp_path, slow)))
    assert targets["flip_guest_pause"] == (False, 0.004)
    assert targets["flip_vs_qemu_shared"][0] is False  # 4 ms vs 25 ms is 0.16x
    assert targets["flip_memory"] == (False, 1.5)
    assert targets["postcopy_running"] == (False, 0.08)


def test_targets_without_their_runs_are_not_judged(tmp_path: Path) -> None:
    runs = [r for r in _made_up(tmp_path, _FAST) if r["system"] == "qemu"]
    targets = _targets(_result(tmp_path, runs))
    assert {k: v[0] for k, v in targets.items()} == {
        "flip_guest_pause": None,
        "flip_vs_qemu_shared": None,
        "flip_memory": None,
        "precopy_total_4G_0": None,
        "precopy_total_4G_268435456": None,
        "postcopy_running": None,
    }


def test_result_is_strict_json_and_the_markdown_shows_both_systems(tmp_path: Path) -> None:
    runs = _made_up(tmp_path, _FAST)
    broken = next(
        r for r in runs if (r["system"], r["mode"], r["rate"]) == ("qemu", "postcopy", 256 * MiB)
    )
    broken.update({"error": "QEMU postcopy: migration failed: boom", "status": "error"})
    result = _result(tmp_path, runs)
    assert json.loads(json.dumps(result, allow_nan=False)) == result
    assert result["complete"] is False
    text = bench_vm.markdown_table(result)
    assert "| 4G | 256M/s | shared / flip | 1 / 1 | 3.00 ms / 4.00 ms (1.3x) |" in text
    assert "25.0 ms / 1.50 ms (0.06x)" in text
    assert "10.50 s / 3.00 s (0.29x)" in text
    assert "| 4G | 256M/s | postcopy / postcopy | 1 (1 failed) / 1 |" in text
    assert "**Incomplete" in text and "QEMU postcopy: migration failed: boom" in text
    assert "| target | measured | met |" in text
    rows = bench_vm.comparison_rows(result)
    assert len(rows) == 6 and all(len(r) == len(bench_vm.COLUMNS) for r in rows)
    assert "stolen" not in text  # no run counted it


def test_the_markdown_says_how_much_cpu_time_the_hypervisor_took(tmp_path: Path) -> None:
    """A pause measured while the host steals milliseconds measures the host: each run
    records the steal time of its migration, and the report gives its range per system."""
    runs = _made_up(tmp_path, _FAST)
    for i, record in enumerate(runs):
        record["steal_s"] = (0.002 if record["system"] == "qemu" else 0.0005) * (i + 1)
    last = {
        s: max(r["steal_s"] or 0 for r in runs if r["system"] == s) for s in ("qemu", "pageflip")
    }
    text = bench_vm.markdown_table(_result(tmp_path, runs))
    line = next(ln for ln in text.splitlines() if ln.startswith("- stolen: "))
    from pageflip.units import format_duration

    first = {s: min(r["steal_s"] or 1 for r in runs if r["system"] == s) for s in last}
    assert "(/proc/stat, steal): qemu " in line
    for system in ("qemu", "pageflip"):
        span = f"{system} {format_duration(first[system])} to {format_duration(last[system])}"
        assert span in line, (span, line)


@pytest.fixture(scope="module")
def fonts_loaded(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Draw one plot before the test that plots: matplotlib keeps the font files it opened
    for the life of the process, which ``no_leaks`` would otherwise count as leaked fds."""
    tmp = tmp_path_factory.mktemp("fonts")
    bench_vm.plot(_result(tmp, _made_up(tmp, _FAST)), tmp / "warm.png")


@pytest.mark.usefixtures("fonts_loaded")
def test_plot_writes_a_png(tmp_path: Path) -> None:
    out = bench_vm.plot(_result(tmp_path, _made_up(tmp_path, _FAST)), tmp_path / "vm.png")
    assert out.read_bytes()[:8] == PNG_MAGIC


# -- the matrix, with fake runners --------------------------------------------------------------


def test_the_matrix_records_a_failed_run_and_goes_on(tmp_path: Path) -> None:
    config = _config(tmp_path, sizes=(64 * MiB,), rates=(0,), settle=0.0)
    called: list[tuple[str, str]] = []
    progress: list[tuple[int, int, str]] = []

    def fake(spec: VmRunSpec) -> VmRunRecord:
        called.append((spec.system, spec.mode))
        if spec.system == "qemu" and spec.mode == "precopy":
            raise BenchmarkError("QEMU precopy: not complete after 120 s;\n cancelled")
        record = blank_record(spec)
        record.update(total_s=0.5, status="completed", verify_bad=0)
        return record

    result = bench_vm.run(
        config,
        lambda *step: progress.append(step),
        runners={"qemu": fake, "pageflip": fake},
        check=False,
    )
    assert called == [
        ("qemu", "flip"),
        ("pageflip", "flip"),
        ("pageflip", "precopy"),
        ("qemu", "precopy"),
        ("qemu", "postcopy"),
        ("pageflip", "postcopy"),
    ]
    assert [p[0] for p in progress] == [0, 1, 2, 3, 4, 5, 6]
    assert progress[0][2] == "qemu shared, 64M at idle (1/1)" and progress[-1][2] == "done"
    failed = [r for r in result["runs"] if r["error"]]
    assert [r["error"] for r in failed] == ["QEMU precopy: not complete after 120 s; cancelled"]
    assert result["complete"] is False and len(result["runs"]) == 6
    assert result["runs"][1]["since_previous"] is not None


# -- the command --------------------------------------------------------------------------------


def test_cli_without_qemu_says_make_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    kernel = tmp_path / "guest.elf"
    kernel.write_bytes(b"\x7fELF")
    result = CliRunner().invoke(
        main,
        [
            "bench",
            "vm",
            "--systems",
            "qemu",
            "--guest",
            str(kernel),
            "--sizes",
            "64M",
            "--rates",
            "0",
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
        ],
    )
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "VmBenchmarkError: qemu-system-x86_64 not found: install QEMU with `make qemu`"
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--sizes", "8Q", "--sizes"),
        ("--rates", "fast", "--rates"),
        ("--systems", "xen", "unknown systems"),
        ("--tick-us", "50", "--tick-us"),
    ],
)
def test_cli_refuses_bad_options_before_running(
    tmp_path: Path, option: str, value: str, message: str
) -> None:
    kernel = tmp_path / "guest.elf"
    kernel.write_bytes(b"\x7fELF")
    result = CliRunner().invoke(
        main, ["bench", "vm", "--guest", str(kernel), option, value, "--no-progress"]
    )
    assert result.exit_code == 2
    assert message in result.output


def test_steal_time_is_read_from_proc_stat(tmp_path: Path) -> None:
    from pageflip._sys import procfs
    from pageflip.bench.common import steal_seconds, stolen_since

    tick = os.sysconf("SC_CLK_TCK")
    stat = tmp_path / "stat"
    stat.write_text(f"cpu  10 0 5 900 1 0 2 {3 * tick} 0 0\ncpu0 5 0 2 450 0 0 1 {tick} 0 0\n")
    real = procfs.procfs_path()
    procfs.set_procfs_path(str(tmp_path))
    try:
        assert steal_seconds() == 3.0
        assert stolen_since(2.5) == 0.5 and stolen_since(None) is None
        stat.write_text("cpu  10 0 5 900\n")  # a kernel that does not count it
        assert steal_seconds() is None and stolen_since(1.0) is None
    finally:
        procfs.set_procfs_path(real)


def test_huge_pages_for_one_system_leave_the_other_on_4k_pages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--huge-systems pageflip: pageflip's VMM on huge pages, QEMU's shared mode on its
    /dev/shm file, and the notes say which ran on what; an unknown or empty choice is
    refused."""
    from pageflip.bench.vm import qemu
    from pageflip.bench.vm.runner import _notes

    monkeypatch.setattr(qemu, "hugetlbfs_dir", lambda: pytest.fail("QEMU is on 4 KiB pages"))
    spec = _spec(
        tmp_path, "flip", huge="hugetlb", huge_systems=("pageflip",), shm_dir=str(tmp_path)
    )
    assert spec.options.huge_for("pageflip") == "hugetlb"
    assert spec.options.huge_for("qemu") is None
    files = RunFiles(spec)
    try:
        assert files.shm is not None and files.shm.parent == tmp_path
        assert "hugetlb=on" not in " ".join(qemu_command(spec, "src", files))
    finally:
        files.remove()
    config = VmConfig(
        guest=spec.guest,
        options=VmOptions(huge="hugetlb", huge_systems=("pageflip",)),
    )
    notes = _notes(config)
    assert notes["huge_pages"].startswith("only pageflip's guest RAM on 2 MiB hugetlb pages")
    assert "QEMU's on 4 KiB pages" in notes["huge_pages"]
    assert "file on /dev/shm" in notes["qemu"]
    with pytest.raises(BadArgument, match="unknown huge-page systems"):
        VmConfig(guest=spec.guest, options=VmOptions(huge="hugetlb", huge_systems=("xen",)))
    with pytest.raises(BadArgument, match="name the systems"):
        VmConfig(guest=spec.guest, options=VmOptions(huge="hugetlb", huge_systems=()))
