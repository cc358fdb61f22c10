"""probe(): each kernel feature checked once by using it, and why a missing one is missing."""

from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Iterator

import pytest

import pageflip as pf
from helpers import join, run_thread
from pageflip import features
from pageflip._sys import probe as sysprobe
from pageflip._sys import uffd
from pageflip._sys.uffd import Way

ALL = {
    "memfd_seals", "mmap_fixed", "scm_rights", "vmsplice", "splice", "tee",
    "process_vm_readv", "process_vm_writev", "userfaultfd", "uffd_kernel_faults", "uffd_ops",
    "uffd_wp_async",
    "uffd_missing_shmem", "uffd_move", "pagemap_scan", "pidfd_open", "pidfd_getfd",
    "pagemap_pfn", "thp", "hugetlb_2m", "hugetlb_1g", "shmem_thp", "uffd_hugetlb",
}  # fmt: skip


@pytest.fixture
def fresh_probe() -> Iterator[None]:
    """Forget cached results before and after, so fakes do not leak into other tests."""
    features._cache.clear()
    yield
    features._cache.clear()


def test_every_feature_is_checked_and_described(fresh_probe: None) -> None:
    report = pf.probe()
    assert set(report) == ALL
    for name, feature in report.items():
        assert feature.name == name and feature.detail and feature.purpose
    # This machine kind (Linux 6.18, root) has every one of them; CI runs here too. Huge
    # pages depend on the machine's settings (a pool, a THP control): a missing one names
    # the setting that enables it.
    missing = [f for f in report.missing() if f.name not in sysprobe.SETTINGS]
    assert missing == [], missing
    for feature in report.missing():
        assert "`echo " in feature.detail or "`sysctl -w " in feature.detail, feature
    data = json.loads(report.to_json())
    assert data["features"]["vmsplice"]["available"] is True and data["kernel"]


def test_probe_runs_each_check_once(fresh_probe: None, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    check, purpose = sysprobe.CHECKS["tee"]

    def counted() -> str:
        calls.append("tee")
        return check()

    monkeypatch.setitem(sysprobe.CHECKS, "tee", (counted, purpose))
    pf.probe()
    pf.probe()
    assert features.has("tee")
    assert calls == ["tee"]
    pf.probe(refresh=True)
    assert calls == ["tee", "tee"]


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (errno.ENOSYS, "kernel too old (syscall not implemented)"),
        (errno.EPERM, "no permission"),
        (errno.ENOTTY, "kernel too old or feature off"),
        (errno.ENOENT, "not present on this system"),
    ],
)
def test_a_missing_feature_says_why(
    fresh_probe: None, monkeypatch: pytest.MonkeyPatch, code: int, words: str
) -> None:
    def broken() -> str:
        raise OSError(code, "faked")

    monkeypatch.setitem(sysprobe.CHECKS, "userfaultfd", (broken, "test"))
    feature = pf.probe()["userfaultfd"]
    assert not feature.available and feature.detail == f"{words}: faked"
    with pytest.raises(pf.FeatureUnavailable, match=re.escape(words)) as info:
        features.require("userfaultfd")
    assert info.value.feature == "userfaultfd"


def test_without_process_vm_readv_copies_fall_back_to_vmsplice(
    fresh_probe: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> str:
        raise OSError(errno.EPERM, "faked")

    monkeypatch.setitem(sysprobe.CHECKS, "process_vm_readv", (broken, "test"))
    a, b = pf.channel_pair(timeout=30)
    data = bytes(range(256)) * 64
    thread, out = run_thread(b.receive)
    t = a.send(data)
    region, _ = join(thread, out)
    assert t.method == "vmsplice" and bytes(region.view(0, len(data))) == data
    region.close()
    a.close()
    b.close()


def _refuse(monkeypatch: pytest.MonkeyPatch, refused: dict[Way, int]) -> None:
    """Make the given ways of getting a uffd fail with the given errno."""
    real = uffd.attempt

    def attempt(way: Way, flags: int = uffd.DEFAULT_FLAGS) -> int:
        if way in refused:
            raise OSError(refused[way], f"{way.value}: {os.strerror(refused[way])} (faked)")
        return real(way, flags)

    monkeypatch.setattr(uffd, "attempt", attempt)


def test_userfaultfd_says_it_came_by_the_syscall_as_root(fresh_probe: None) -> None:
    if os.geteuid() != 0:
        pytest.skip("as a normal user the way depends on vm.unprivileged_userfaultfd")
    report = pf.probe()
    assert report["userfaultfd"].detail.startswith("by the syscall, kernel-mode faults too; ")
    assert "WP_ASYNC" in report["userfaultfd"].detail
    assert report["uffd_kernel_faults"].detail == "by the syscall"


def test_userfaultfd_by_the_device_when_the_syscall_is_refused(
    fresh_probe: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    try:
        os.close(uffd.attempt(Way.DEVICE))
    except OSError as err:
        pytest.skip(f"{uffd.DEVICE} does not work for us here: {err}")
    _refuse(monkeypatch, {Way.SYSCALL: errno.EPERM})
    report = pf.probe()
    assert report["userfaultfd"].detail.startswith("by /dev/userfaultfd, kernel-mode faults too")
    assert report["uffd_kernel_faults"].detail == "by /dev/userfaultfd"


def test_user_mode_only_is_enough_for_the_uffd_features_and_the_rest_is_named(
    fresh_probe: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    _refuse(monkeypatch, {Way.SYSCALL: errno.EPERM, Way.DEVICE: errno.EACCES})
    report = pf.probe()
    detail = report["userfaultfd"].detail
    assert report["userfaultfd"].available
    assert detail.startswith("by the syscall, user-mode faults only: enough for dirty tracking")
    assert f"kernel-mode faults too would need `sysctl -w {uffd.SYSCTL}=1`" in detail
    for name in ("uffd_ops", "uffd_wp_async", "uffd_missing_shmem", "uffd_move", "pagemap_scan"):
        assert report[name].available, report[name]
    kernel = report["uffd_kernel_faults"]
    assert not kernel.available
    assert kernel.detail.startswith(
        "no permission: syscall: Operation not permitted (faked); "
        "/dev/userfaultfd: Permission denied (faked)"
    )
    with pytest.raises(pf.FeatureUnavailable) as info:
        features.require("uffd_kernel_faults")
    assert info.value.feature == "uffd_kernel_faults"
    settings = str(info.value).split("To allow it: ")[1]
    assert settings.startswith(f"`sysctl -w {uffd.SYSCTL}=1`")
    assert settings.endswith("; or CAP_SYS_PTRACE for the process")
    if os.path.exists(uffd.DEVICE):
        assert "`chgrp " in settings or "membership of group" in settings


def test_no_way_at_all_names_the_settings(
    fresh_probe: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    _refuse(monkeypatch, dict.fromkeys(Way, errno.EPERM) | {Way.DEVICE: errno.EACCES})
    report = pf.probe()
    for name in ("userfaultfd", "uffd_kernel_faults", "uffd_wp_async", "pagemap_scan"):
        assert not report[name].available
    detail = report["userfaultfd"].detail
    assert detail.startswith("no permission: syscall: Operation not permitted (faked); ")
    assert "refused even for user-mode faults" in detail and "seccomp" in detail
    assert f"To allow it: `sysctl -w {uffd.SYSCTL}=1`" in detail
