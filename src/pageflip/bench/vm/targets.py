"""The targets of the issue for the VM comparison, each judged from the runs of one result.

* flip of a 4 GiB VM under 256 MiB/s: the pause the guest observed at most 2 ms, and at most
  1/10 of QEMU shared mode's observed pause in the same pair of runs; the memory of both
  processes together at most 1.1x the guest's RAM.
* precopy: total time below QEMU's unthrottled precopy at each size and rate (medians).
* postcopy: the guest running on the destination within 50 ms of the switchover at 4 GiB.

Flip and postcopy are judged on their worst run (every run must meet them); a target whose
runs are missing from the result is "n/a" (``passed`` None).
"""

from __future__ import annotations

from ...units import format_duration as _ms
from ...units import format_rate, format_size, human_size
from .records import ComparisonRecord, TargetRecord, VmRunRecord

__all__ = [
    "FLIP_MEMORY_RATIO",
    "FLIP_PAUSE_LIMIT",
    "FLIP_VS_SHARED",
    "POSTCOPY_RUNNING_LIMIT",
    "TARGET_RATE",
    "TARGET_SIZE",
    "judge",
]

MiB = 1 << 20
GiB = 1 << 30
#: Where the flip and postcopy targets are judged: a 4 GiB guest (buffer), 256 MiB/s.
TARGET_SIZE = 4 * GiB
TARGET_RATE = 256 * MiB
FLIP_PAUSE_LIMIT = 0.002
FLIP_VS_SHARED = 0.1
FLIP_MEMORY_RATIO = 1.1
POSTCOPY_RUNNING_LIMIT = 0.050


def _target(
    key: str, text: str, passed: bool | None, measured: str, value: float | None = None
) -> TargetRecord:
    return {"id": key, "text": text, "passed": passed, "measured": measured, "value": value}


def _ok(
    runs: list[VmRunRecord], system: str, mode: str, size: int, rate: int | None = None
) -> list[VmRunRecord]:
    return [
        r
        for r in runs
        if r["system"] == system
        and r["mode"] == mode
        and r["size"] == size
        and (rate is None or r["rate"] == rate)
        and r["error"] is None
    ]


_WHERE = f"{format_size(TARGET_SIZE)} at {format_rate(TARGET_RATE)}"


def judge(runs: list[VmRunRecord], comparisons: list[ComparisonRecord]) -> list[TargetRecord]:
    """Each target, judged from the runs (flip, postcopy) and the comparisons (precopy)."""
    out = [_flip_pause(runs), _flip_vs_shared(runs), _flip_memory(runs)]
    out += [_precopy(c) for c in comparisons if c["mode"] == "precopy"]
    out.append(_postcopy(runs))
    return out


def _flip_pause(runs: list[VmRunRecord]) -> TargetRecord:
    flips = _ok(runs, "pageflip", "flip", TARGET_SIZE, TARGET_RATE)
    pauses = [p for r in flips if (p := r["guest_pause_s"]) is not None]
    text = f"flip, {_WHERE}: pause the guest observed <= {_ms(FLIP_PAUSE_LIMIT)}"
    if not pauses:
        why = "no pageflip flip run" if not flips else "the guest reported no pause"
        return _target("flip_guest_pause", text, None, f"{why} at {_WHERE}")
    worst = max(pauses)
    return _target(
        "flip_guest_pause",
        text,
        worst <= FLIP_PAUSE_LIMIT,
        f"worst {_ms(worst)} of {len(pauses)} run(s)",
        worst,
    )


def _flip_vs_shared(runs: list[VmRunRecord]) -> TargetRecord:
    """Per pair (the two systems' back-to-back runs): pageflip's pause / QEMU's."""
    text = (
        f"flip, {_WHERE}: observed pause <= 1/{1 / FLIP_VS_SHARED:g} of QEMU shared mode's "
        "in the same pair of runs"
    )
    qemu = {r["pair"]: r for r in _ok(runs, "qemu", "flip", TARGET_SIZE, TARGET_RATE)}
    ratios = []
    for r in _ok(runs, "pageflip", "flip", TARGET_SIZE, TARGET_RATE):
        q = qemu.get(r["pair"])
        if q is None or r["guest_pause_s"] is None or not q["guest_pause_s"]:
            continue
        ratios.append((r["guest_pause_s"] / q["guest_pause_s"], r, q))
    if not ratios:
        return _target(
            "flip_vs_qemu_shared",
            text,
            None,
            f"no pair with both guest-observed pauses at {_WHERE}",
        )
    worst = max(ratios, key=lambda x: x[0])
    return _target(
        "flip_vs_qemu_shared",
        text,
        worst[0] <= FLIP_VS_SHARED,
        "; ".join(
            f"{_ms(r['guest_pause_s'])} vs {_ms(q['guest_pause_s'])} ({x:.3f}x)"
            for x, r, q in ratios
        ),
        worst[0],
    )


def _flip_memory(runs: list[VmRunRecord]) -> TargetRecord:
    text = f"flip, {_WHERE}: memory of both processes <= {FLIP_MEMORY_RATIO:g}x the guest's RAM"
    flips = [r for r in _ok(runs, "pageflip", "flip", TARGET_SIZE, TARGET_RATE) if r["peak_memory"]]
    if not flips:
        return _target("flip_memory", text, None, f"no pageflip flip run at {_WHERE}")
    worst = max(flips, key=lambda r: r["peak_memory_ratio"] or 0.0)
    ratio = worst["peak_memory_ratio"] or 0.0
    return _target(
        "flip_memory",
        text,
        ratio <= FLIP_MEMORY_RATIO,
        f"{ratio:.3f}x ({human_size(worst['peak_memory'] or 0)} for "
        f"{human_size(worst['guest_ram'])} of guest RAM), worst of {len(flips)}",
        ratio,
    )


def _precopy(c: ComparisonRecord) -> TargetRecord:
    where = f"{c['size_label']} at {c['rate_label']}"
    text = f"precopy, {where}: total time below QEMU's unthrottled precopy"
    key = f"precopy_total_{c['size_label']}_{c['rate']}"
    q = c["qemu"]["total_s"] if c["qemu"] else None
    p = c["pageflip"]["total_s"] if c["pageflip"] else None
    if q is None or p is None:
        missing = "QEMU" if q is None else "pageflip"
        return _target(key, text, None, f"no completed {missing} precopy run")
    return _target(key, text, p < q, f"{_ms(p)} vs QEMU {_ms(q)} ({p / q:.2f}x)", p)


def _postcopy(runs: list[VmRunRecord]) -> TargetRecord:
    where = format_size(TARGET_SIZE)
    text = (
        f"postcopy, {where}: guest running on the destination within "
        f"{_ms(POSTCOPY_RUNNING_LIMIT)} of the switchover"
    )
    posts = [
        r
        for r in _ok(runs, "pageflip", "postcopy", TARGET_SIZE)
        if r["switchover_to_running_s"] is not None
    ]
    if not posts:
        return _target("postcopy_running", text, None, f"no pageflip postcopy run at {where}")
    worst = max(posts, key=lambda r: r["switchover_to_running_s"] or 0.0)
    value = worst["switchover_to_running_s"] or 0.0
    return _target(
        "postcopy_running",
        text,
        value <= POSTCOPY_RUNNING_LIMIT,
        ", ".join(f"{_ms(r['switchover_to_running_s'])} at {r['rate_label']}" for r in posts),
        value,
    )
