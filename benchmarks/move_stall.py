"""Reproduce the 4 GiB move stalls of docs/benchmarks.md outside the handoff benchmark.

``python benchmarks/move_stall.py --size 4G --runs 8 [--sleep 0.5] [--canary] [--huge KIND]
[--hold SECONDS]``

Each run fills a fresh movable region (one write per page), waits ``--sleep`` seconds and
gifts it to a second process, which reports when ``receive()`` returned, how long receive()
itself took and the CPU time, page faults and involuntary context switches it spent meanwhile
(``getrusage``); the writer reports how long it took to let go of its mapping afterwards
(``Transfer.release``). ``--canary`` runs a third process that wakes every millisecond for
the whole time, so that the machine's CPUs never idle for long. ``--huge`` takes the region's
pages as ``Region.movable(huge=...)`` does (``hugetlb`` needs a pool: ``sysctl -w
vm.nr_hugepages=N``). The receiver closes each region at once, which frees its pages and so
unmaps them from the writer too (the writer's release then mostly waits for that); with
``--hold`` it keeps the region that many seconds first (and reports only then), and the
release is the writer's own.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time
from typing import Any

import numpy as np

import pageflip as pf
from pageflip.units import parse_size


def _receiver(channel: pf.Channel, out: Any, runs: int, hold: float) -> None:
    for _ in range(runs):
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        region, transfer = channel.receive()
        received = time.clock_gettime(time.CLOCK_MONOTONIC)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        report = (
            received,
            transfer.seconds,
            r1.ru_utime - r0.ru_utime,
            r1.ru_stime - r0.ru_stime,
            r1.ru_minflt - r0.ru_minflt,
            r1.ru_nivcsw - r0.ru_nivcsw,
        )
        if hold:
            # Reported once closed: the writer's next run then finds us waiting again.
            time.sleep(hold)
            region.close()
            out.put(report)
        else:
            out.put(report)
            region.close()
    channel.close()


def _canary(stop: Any) -> None:
    while not stop.is_set():
        time.sleep(0.001)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=4 << 30)
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--sleep", type=float, default=0.5)
    parser.add_argument("--canary", action="store_true")
    parser.add_argument("--hold", type=float, default=0.0)
    parser.add_argument(
        "--huge", choices=["no", "auto", "hugetlb", "hugetlb-1g", "thp"], default="no"
    )
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    sender, receiver = pf.channel_pair()
    results = ctx.Queue()
    stop = ctx.Event()
    procs = [ctx.Process(target=_receiver, args=(receiver, results, args.runs, args.hold))]
    if args.canary:
        procs.append(ctx.Process(target=_canary, args=(stop,)))
    for p in procs:
        p.start()
    receiver.close()
    try:
        for i in range(args.runs):
            huge = False if args.huge == "no" else args.huge
            region = pf.Region.movable(args.size, name="stall", huge=huge)
            words = region.numpy(np.uint64)
            words[:: pf.PAGE_SIZE // 8] = i  # one write per page: every page exists
            del words
            time.sleep(args.sleep)
            t0 = time.clock_gettime(time.CLOCK_MONOTONIC)
            gift = sender.gift(region)
            received, inside, user, system, faults, switches = results.get(timeout=60)
            print(
                f"run {i + 1}: access {(received - t0) * 1e3:7.2f} ms, receive() "
                f"{inside * 1e3:5.2f} ms, CPU user {user * 1e3:5.1f} ms system "
                f"{system * 1e3:4.1f} ms, {faults} faults, {switches} involuntary switches; "
                f"writer's release {gift.release * 1e3:6.2f} ms "
                f"({gift.release_cpu * 1e3:.2f} ms of CPU)",
                flush=True,
            )
    finally:
        stop.set()
        sender.close()
        for p in procs:
            p.join(10)
            if p.exitcode is None:
                p.kill()
                p.join()


if __name__ == "__main__":
    main()
