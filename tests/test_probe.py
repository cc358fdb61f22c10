"""probe(): each kernel feature checked once by using it, and why a missing one is missing."""

from __future__ import annotations

import errno
import json
import re
from collections.abc import Iterator

import pytest

import pageflip as pf
from helpers import join, run_thread
from pageflip import features
from pageflip._sys import probe as sysprobe

ALL = {
    "memfd_seals", "mmap_fixed", "scm_rights", "vmsplice", "splice", "tee",
    "process_vm_readv", "process_vm_writev", "userfaultfd", "uffd_ops", "uffd_wp_async",
    "uffd_missing_shmem", "uffd_move", "pagemap_scan", "pidfd_open", "pidfd_getfd",
    "pagemap_pfn", "thp",
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
    # This machine kind (Linux 6.18, root) has every one of them; CI runs here too.
    assert report.missing() == [], report.missing()
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
