"""What a normal user can do: userfaultfd without privilege, and move, flip, precopy, postcopy
run by two processes of ``nobody``.

First the kernel facts pageflip builds on, checked in this process (a uffd for user-mode
faults only needs no privilege, so these run as any user): which faults such a uffd takes
and which it refuses, the order in which :func:`pageflip._sys.uffd.open_userfaultfd` tries
its ways, and dirty tracking with the last of them.

Then, as root, child processes that drop to ``nobody`` (uid and gid 65534, no supplementary
groups, no capabilities): they run a small Python script written into a directory that
``nobody`` owns, and print one JSON line each that the test checks. The venv's interpreter
may live where ``nobody`` cannot go (under /root here): the children then run a Python of
the same minor version from a public place, with the venv's packages on PYTHONPATH.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import pwd
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import pageflip as pf
from pageflip._sys import io, uffd
from pageflip._sys.flags import UffdEvent, UffdFeature, UffdRegister
from pageflip._sys.uffd import Way
from pageflip.dirty import DirtyTracker
from pageflip.errors import FeatureUnavailable
from pageflip.runs import runs_to_pages

PAGE = pf.PAGE_SIZE
NOBODY = 65534
#: Seconds a child may take; generous, since two CPUs are shared with other work.
CHILD_TIMEOUT = 120


# -- the kernel: what a user-mode-only uffd takes and what it refuses -----------------------


@pytest.fixture
def user_mode_uffd() -> Iterator[int]:
    try:
        fd = uffd.attempt(Way.USER_MODE_ONLY)
    except OSError as err:
        pytest.skip(f"no userfaultfd for user-mode faults here (Linux 5.11+): {err}")
    yield fd
    os.close(fd)


@pytest.fixture
def memfd_pages() -> Iterator[pf.Region]:
    """Eight pages of a memfd mapping, none of them there yet (postcopy's case)."""
    with pf.Region.movable(8 * PAGE, name="pageflip-test-missing") as region:
        yield region


def _wait_for_fault(fd: int) -> Any:
    for _ in range(100):
        msgs = uffd.read_messages(fd)
        if len(msgs):
            return msgs[0]
        select.select([fd], [], [], 0.1)
    raise AssertionError("no fault message arrived")


def test_a_user_mode_only_uffd_serves_faults_from_user_mode(
    user_mode_uffd: int, memfd_pages: pf.Region
) -> None:
    fd, region = user_mode_uffd, memfd_pages
    uffd.api(fd, UffdFeature.MISSING_SHMEM)
    uffd.register(fd, region.address, region.size, UffdRegister.MISSING)
    got = ctypes.create_string_buffer(8)

    def load() -> None:
        # memmove is a plain load in user mode, made without the GIL (a ctypes call).
        ctypes.memmove(got, region.address + 2 * PAGE, 8)

    thread = threading.Thread(target=load)
    thread.start()
    try:
        msg = _wait_for_fault(fd)
        assert msg["event"] == UffdEvent.PAGEFAULT
        assert int(msg["address"]) // PAGE * PAGE == region.address + 2 * PAGE
        with pf.Region.anonymous(PAGE) as page:
            page.numpy()[:] = 0x5A
            uffd.copy(fd, region.address + 2 * PAGE, page.address, PAGE)  # wakes the thread
    finally:
        thread.join(30)
    assert not thread.is_alive() and got.raw == b"\x5a" * 8
    uffd.unregister(fd, region.address, region.size)


def test_a_user_mode_only_uffd_fails_kernel_accesses_to_missing_pages_with_efault(
    user_mode_uffd: int, memfd_pages: pf.Region
) -> None:
    """A syscall into a missing page fails at once (a full uffd would make it wait)."""
    fd, region = user_mode_uffd, memfd_pages
    uffd.api(fd, UffdFeature.MISSING_SHMEM)
    uffd.register(fd, region.address, region.size, UffdRegister.MISSING)
    r, w = os.pipe()
    data = ctypes.create_string_buffer(b"pageflip", 8)
    try:
        os.write(w, b"pageflip")
        with pytest.raises(OSError) as read_into:
            io.readv(r, io.iovecs([(region.address, 8)]))
        with pytest.raises(OSError) as written_into:
            io.process_vm_writev(
                os.getpid(),
                io.iovecs([(ctypes.addressof(data), 8)]),
                io.iovecs([(region.address + PAGE, 8)]),
            )
        assert read_into.value.errno == written_into.value.errno == errno.EFAULT
        assert len(uffd.read_messages(fd)) == 0  # nobody was asked for those pages
        assert os.read(r, 8) == b"pageflip"  # the failed read consumed nothing
    finally:
        os.close(r)
        os.close(w)
        uffd.unregister(fd, region.address, region.size)


# -- the order of the ways, and what is said when none works --------------------------------

#: The errno each way fails with when it is refused (as a normal user sees them here).
_REFUSALS = {Way.SYSCALL: errno.EPERM, Way.DEVICE: errno.EACCES, Way.USER_MODE_ONLY: errno.EPERM}


@pytest.fixture
def refuse(monkeypatch: pytest.MonkeyPatch) -> Callable[..., list[Way]]:
    """Make the given ways fail as a refused user sees them; returns the ways tried."""

    def refuse_ways(*ways: Way, codes: dict[Way, int] | None = None) -> list[Way]:
        tried: list[Way] = []
        real = uffd.attempt

        def attempt(way: Way, flags: int = uffd.DEFAULT_FLAGS) -> int:
            tried.append(way)
            if way in ways:
                code = (codes or _REFUSALS)[way]
                raise OSError(code, f"{way.value}: {os.strerror(code)} (faked)")
            return real(way, flags)

        monkeypatch.setattr(uffd, "attempt", attempt)
        return tried

    return refuse_ways


def test_the_ways_are_tried_in_order_and_the_first_that_works_is_taken(
    refuse: Callable[..., list[Way]],
) -> None:
    tried = refuse(Way.SYSCALL, Way.DEVICE)
    fd, way = uffd.open_userfaultfd(user_mode_ok=True)
    os.close(fd)
    assert way is Way.USER_MODE_ONLY and not way.kernel_faults
    assert tried == [Way.SYSCALL, Way.DEVICE, Way.USER_MODE_ONLY]


def test_user_mode_only_is_not_taken_unless_the_caller_says_it_will_do(
    refuse: Callable[..., list[Way]],
) -> None:
    tried = refuse(Way.SYSCALL, Way.DEVICE)
    with pytest.raises(FeatureUnavailable) as info:
        uffd.userfaultfd()  # the default: kernel-mode faults needed
    assert tried == [Way.SYSCALL, Way.DEVICE]
    err = info.value
    assert err.feature == "userfaultfd" and err.reason is not None
    assert err.reason.startswith(
        "no permission: syscall: Operation not permitted (faked); "
        "/dev/userfaultfd: Permission denied (faked) (this use needs a uffd that takes"
    )
    assert "this use needs a uffd that takes kernel-mode faults too" in err.reason
    # Every setting that would allow one, with this host's values.
    assert f"`sysctl -w {uffd.SYSCTL}=1`" in err.reason
    assert "/dev/userfaultfd" in err.reason.split("To allow it: ")[1]
    assert "CAP_SYS_PTRACE" in err.reason
    assert str(err) == f"userfaultfd is not available here: {err.reason}"


def test_refused_even_for_user_mode_faults_points_at_a_seccomp_filter(
    refuse: Callable[..., list[Way]],
) -> None:
    refuse(*Way)
    with pytest.raises(FeatureUnavailable, match="a seccomp filter") as info:
        uffd.userfaultfd(user_mode_ok=True)
    assert "To allow it: `sysctl" in str(info.value)


def test_a_kernel_without_userfaultfd_is_named_as_such(
    refuse: Callable[..., list[Way]],
) -> None:
    refuse(
        *Way,
        codes={
            Way.SYSCALL: errno.ENOSYS,
            Way.DEVICE: errno.ENOENT,
            Way.USER_MODE_ONLY: errno.ENOSYS,
        },
    )
    with pytest.raises(FeatureUnavailable, match=r"^userfaultfd is not available here: kernel"):
        uffd.userfaultfd(user_mode_ok=True)


def test_an_error_that_is_not_a_refusal_is_raised_as_it_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def out_of_fds(way: Way, flags: int = uffd.DEFAULT_FLAGS) -> int:
        raise OSError(errno.EMFILE, "faked")

    monkeypatch.setattr(uffd, "attempt", out_of_fds)
    with pytest.raises(OSError) as info:
        uffd.userfaultfd(user_mode_ok=True)
    assert info.value.errno == errno.EMFILE and not isinstance(info.value, FeatureUnavailable)


def test_dirty_tracking_with_a_user_mode_only_uffd_sees_kernel_writes_too(
    refuse: Callable[..., list[Way]],
) -> None:
    """Async write-protect faults resolve in the kernel whoever raised them: nothing lost."""
    tried = refuse(Way.SYSCALL, Way.DEVICE)
    r, w = os.pipe()
    data = ctypes.create_string_buffer(b"pageflip", 8)
    try:
        with pf.Region.movable(16 * PAGE, name="pageflip-test-dirty") as region:
            region.numpy()[:] = 1  # populated before tracking starts
            with DirtyTracker([region]) as tracker:
                assert tried[-1] is Way.USER_MODE_ONLY
                arr = region.numpy()
                arr[3 * PAGE] = 7  # a store from user mode
                del arr
                os.write(w, b"pageflip")
                io.readv(r, io.iovecs([(region.address + 5 * PAGE, 8)]))  # the kernel writes
                io.process_vm_writev(  # and so does a peer (here: ourselves)
                    os.getpid(),
                    io.iovecs([(ctypes.addressof(data), 8)]),
                    io.iovecs([(region.address + 11 * PAGE, 8)]),
                )
                (runs,) = tracker.collect()
                assert [int(p) for p in runs_to_pages(runs)] == [3, 5, 11]
                assert bytes(region.view(5 * PAGE, 5 * PAGE + 8)) == b"pageflip"
                (again,) = tracker.collect()
                assert len(again) == 0
    finally:
        os.close(r)
        os.close(w)


# -- as nobody ------------------------------------------------------------------------------

_PEER = r'''
"""A peer run as nobody by tests/test_unprivileged.py: prints one JSON line (after "ready")."""

import json
import os
import sys

import numpy as np

import pageflip as pf

SIZE = 4 << 20


def say(**what):
    print(json.dumps({"uid": os.getuid(), "gid": os.getgid(), **what}), flush=True)


def pattern(seed):
    return np.arange(SIZE // 8, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed)


def probe():
    from pageflip._sys import uffd

    fd, way = uffd.open_userfaultfd(user_mode_ok=True)
    os.close(fd)
    report = pf.probe()
    say(
        way=way.name,
        userfaultfd=report["userfaultfd"].as_dict(),
        kernel_faults=report["uffd_kernel_faults"].as_dict(),
        missing=[f.name for f in report.missing()],
    )


def move_receive(path):
    listener = pf.Channel.listen(path)
    print("ready", flush=True)
    channel = listener.accept(timeout=60)
    moved, t_move = channel.receive()
    copied, t_copy = channel.receive()
    say(
        move=t_move.as_dict(),
        copy=t_copy.as_dict(),
        moved_ok=bool((moved.numpy(np.uint64) == pattern(1)).all()),
        copied_ok=bool((copied.numpy(np.uint64) == pattern(2)).all()),
    )
    moved.close()
    copied.close()
    channel.close()
    listener.close()


def move_send(path):
    channel = pf.Channel.connect(path, timeout=60)
    movable = pf.Region.movable(SIZE, name="nobody-moves")
    movable.numpy(np.uint64)[:] = pattern(1)
    t_move = channel.gift(movable)
    with pf.Region.anonymous(SIZE) as anonymous:
        anonymous.numpy(np.uint64)[:] = pattern(2)
        t_copy = channel.send(anonymous.view())
    say(move=t_move.as_dict(), copy=t_copy.as_dict(), gifted_closed=movable.closed)
    channel.close()


def destination(path):
    from pageflip.migration import Destination
    from pageflip.transport import Address

    listener = Address.parse(path).listen()
    print("ready", flush=True)
    try:
        guest = Destination(listener).run()
        try:
            report = guest.verify()
            say(ok=report.ok, pages_checked=report.pages_checked, problems=report.problems)
        finally:
            guest.close()
    finally:
        listener.close()


def source(path, mode):
    from pageflip._sys import uffd
    from pageflip.errors import MigrationError
    from pageflip.guests import Workload
    from pageflip.migration import MigrationOptions, Source

    guest = Workload.create(8 << 20, dirty_rate=8 << 20, threads=2)
    try:
        done = Source(guest, path, MigrationOptions(mode=mode)).run()
    except MigrationError as err:
        # Nothing may be lost: say where the guest is, and whether it is whole here.
        intact = guest.verify().ok if err.guest == "source" else None
        guest.close()
        say(failed=f"{type(err).__name__}: {err}", guest=err.guest, intact=intact)
        return
    # The way this process gets a uffd: the way its dirty tracker got one.
    fd, way = uffd.open_userfaultfd(user_mode_ok=True)
    os.close(fd)
    say(done=done.as_dict(), way=way.name)


roles = {
    "probe": probe,
    "move-receive": move_receive,
    "move-send": move_send,
    "destination": destination,
    "source": source,
}
roles[sys.argv[1]](*sys.argv[2:])
'''


@dataclass(frozen=True)
class Nobody:
    """How to run Python as nobody here, and the way nobody gets a uffd."""

    python: str
    env: dict[str, str]
    way: str


def _interpreters() -> list[str]:
    """The venv's Python, then the same version from places anyone may enter."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    found = [sys.executable, os.path.realpath(sys.executable)]
    found += [p for p in (shutil.which(version, path="/usr/local/bin:/usr/bin:/bin"),) if p]
    return list(dict.fromkeys(found))


def _as_nobody(argv: list[str], env: dict[str, str], cwd: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        argv,
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: the pager dies with it
    )


@pytest.fixture(scope="module")
def nobody() -> Nobody:
    if os.geteuid() != 0:
        pytest.skip("needs root, to start processes as nobody (uid 65534)")
    try:
        pwd.getpwuid(NOBODY)
    except KeyError:
        pytest.skip("no user with uid 65534 (nobody) on this system")
    src = str(Path(pf.__file__).resolve().parent.parent)
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "PYTHONPATH": os.pathsep.join([src, sysconfig.get_paths()["purelib"]]),
        "PYTHONDONTWRITEBYTECODE": "1",
        "HOME": "/nonexistent",
    }
    check = (
        "import os; from pageflip._sys import uffd; "
        "fd, way = uffd.open_userfaultfd(user_mode_ok=True); os.close(fd); print(way.name)"
    )
    tried = []
    for python in _interpreters():
        try:
            proc = _as_nobody([python, "-c", check], env, "/")
        except OSError as err:
            tried.append(f"{python}: {err.strerror}")
            continue
        out, err_text = proc.communicate(timeout=CHILD_TIMEOUT)
        if proc.returncode == 0:
            return Nobody(python, env, out.strip())
        last = (err_text.strip().splitlines() or ["no output"])[-1]
        tried.append(f"{python}: exit {proc.returncode}: {last}")
    pytest.skip(f"nobody can run no Python that imports pageflip: {'; '.join(tried)}")


@pytest.fixture
def home(nobody: Nobody) -> Iterator[Path]:
    """A directory nobody owns (sockets, the peer script), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="pageflip-nobody-", dir="/tmp"))
    try:
        (path / "peer.py").write_text(_PEER)
        os.chown(path, NOBODY, NOBODY)
        path.chmod(0o700)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Peers:
    """Peer processes run as nobody; every one is killed (with its group) and reaped."""

    def __init__(self, nobody: Nobody, home: Path) -> None:
        self.nobody = nobody
        self.home = home
        self.procs: list[subprocess.Popen[str]] = []
        self.roles: dict[int, str] = {}

    def start(self, *args: str, ready: bool = False) -> subprocess.Popen[str]:
        proc = _as_nobody(
            [self.nobody.python, str(self.home / "peer.py"), *args],
            self.nobody.env,
            str(self.home),
        )
        self.procs.append(proc)
        self.roles[proc.pid] = args[0]
        if ready:
            line = self._first_line(proc)
            if line != b"ready\n":
                _, err = self._reap(proc)
                raise AssertionError(f"{args[0]} did not get ready: {line!r}\n{err}")
        return proc

    @staticmethod
    def _first_line(proc: subprocess.Popen[str]) -> bytes:
        """The peer's first line, read byte by byte from the pipe, so that nothing after it
        is left in a buffer that communicate() would not see."""
        assert proc.stdout is not None
        fd, line = proc.stdout.fileno(), b""
        while not line.endswith(b"\n"):
            readable, _, _ = select.select([fd], [], [], CHILD_TIMEOUT)
            byte = os.read(fd, 1) if readable else b""
            if not byte:
                break
            line += byte
        return line

    def result(self, proc: subprocess.Popen[str]) -> dict[str, Any]:
        """The peer's JSON line, once it exited; its traceback if it failed."""
        code, out, err = self.finish(proc)
        assert code == 0, f"peer {self.roles[proc.pid]} failed:\n{err}"
        found: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        assert (found["uid"], found["gid"]) == (NOBODY, NOBODY)
        return found

    def finish(self, proc: subprocess.Popen[str]) -> tuple[int, str, str]:
        """Wait for the peer: its exit status, output and error output."""
        out, err = self._reap(proc)
        return proc.returncode, out, err

    def _reap(self, proc: subprocess.Popen[str]) -> tuple[str, str]:
        try:
            return proc.communicate(timeout=CHILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._kill(proc)
            _, err = proc.communicate()
            raise AssertionError(f"peer {self.roles[proc.pid]} hung:\n{err}") from None

    @staticmethod
    def _kill(proc: subprocess.Popen[str]) -> None:
        """Kill the peer's whole group; only while the peer is unreaped, so that its pid
        (the group's id) cannot belong to anyone else yet."""
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

    def close(self) -> None:
        for proc in self.procs:
            self._kill(proc)  # a no-op for a peer that finished and was reaped
            proc.communicate()


@pytest.fixture
def peers(nobody: Nobody, home: Path) -> Iterator[Peers]:
    group = Peers(nobody, home)
    try:
        yield group
    finally:
        group.close()


def _full_uffd_closed_to_nobody() -> str | None:
    """Why nobody gets no full uffd here (None when it does get one)."""
    from pageflip._sys.procfs import sysctl

    if sysctl(uffd.SYSCTL) == "1":
        return None
    try:
        st = os.stat(uffd.DEVICE)
    except OSError:
        return f"{uffd.SYSCTL}=0 and no {uffd.DEVICE}"
    if st.st_mode & 0o006 == 0o006 or (st.st_gid == NOBODY and st.st_mode & 0o060 == 0o060):
        return None
    return f"{uffd.SYSCTL}=0 and {uffd.DEVICE} is not open to nobody"


def test_probe_as_nobody_says_which_way_works_and_what_would_allow_more(
    nobody: Nobody, peers: Peers
) -> None:
    why = _full_uffd_closed_to_nobody()
    if why is None:
        pytest.skip("nobody gets a full userfaultfd here: no fallback to check")
    found = peers.result(peers.start("probe"))
    assert found["way"] == nobody.way == "USER_MODE_ONLY", why
    detail = found["userfaultfd"]["detail"]
    assert found["userfaultfd"]["available"] is True
    assert detail.startswith("by the syscall, user-mode faults only: enough for dirty tracking")
    assert f"kernel-mode faults too would need `sysctl -w {uffd.SYSCTL}=1` (now 0)" in detail
    kernel = found["kernel_faults"]
    assert kernel["available"] is False
    assert kernel["detail"].startswith("no permission: userfaultfd(flags=")
    assert (
        f"`sysctl -w {uffd.SYSCTL}=1`" in kernel["detail"] and "CAP_SYS_PTRACE" in kernel["detail"]
    )
    # All that move, flip, precopy and postcopy use is there.
    needed = {"memfd_seals", "mmap_fixed", "scm_rights", "process_vm_readv", "userfaultfd"}
    needed |= {"uffd_ops", "uffd_wp_async", "uffd_missing_shmem", "pagemap_scan"}
    assert needed.isdisjoint(found["missing"]) and "uffd_kernel_faults" in found["missing"]


def test_nobody_moves_and_copies_a_region_to_another_nobody(peers: Peers, home: Path) -> None:
    path = str(home / "move.sock")
    receiver = peers.start("move-receive", path, ready=True)
    sender = peers.start("move-send", path)
    sent, received = peers.result(sender), peers.result(receiver)
    pages = (4 << 20) // PAGE
    assert sent["gifted_closed"] is True
    assert received["move"]["method"] == "move"
    assert (received["move"]["pages_moved"], received["move"]["pages_copied"]) == (pages, 0)
    assert received["moved_ok"] is True
    assert received["copy"]["pages_moved"] == 0 and received["copy"]["pages_copied"] == pages
    assert received["copied_ok"] is True


def _migrate(peers: Peers, home: Path, mode: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Source and destination results; where the source failed, it says so (``failed``,
    ``guest``, ``intact``) and the destination's ``failed`` is its error output."""
    path = str(home / "in.sock")
    destination = peers.start("destination", path, ready=True)
    source = peers.result(peers.start("source", path, mode))
    if "failed" in source:
        return source, {"failed": peers.finish(destination)[2]}
    return source, peers.result(destination)


def test_nobody_flips_a_workload_to_another_nobody(peers: Peers, home: Path) -> None:
    source, destination = _migrate(peers, home, "flip")
    assert "failed" not in source, f"{source}\n{destination}"
    assert source["done"]["mode"] == "flip"
    assert source["done"]["pages_moved"] > 0 and source["done"]["pages_copied"] == 0
    assert destination["ok"] is True and destination["pages_checked"] == (8 << 20) // PAGE


def test_nobody_migrates_a_workload_by_precopy(nobody: Nobody, peers: Peers, home: Path) -> None:
    source, destination = _migrate(peers, home, "precopy")
    assert "failed" not in source, f"{source}\n{destination}"
    assert source["done"]["mode"] == "precopy" and source["done"]["pages_copied"] > 0
    if _full_uffd_closed_to_nobody() is not None:
        assert source["way"] == "USER_MODE_ONLY"  # its dirty tracking ran on such a uffd
    assert destination["ok"] is True and destination["pages_checked"] == (8 << 20) // PAGE


def test_nobody_migrates_a_workload_by_postcopy(nobody: Nobody, peers: Peers, home: Path) -> None:
    source, destination = _migrate(peers, home, "postcopy")
    assert "failed" not in source, f"{source}\n{destination}"
    assert source["done"]["mode"] == "postcopy"
    assert destination["ok"] is True and destination["pages_checked"] == (8 << 20) // PAGE
