"""The shipped guest's own loop gaps with no migration: a normal vCPU thread against a
real-time one, on an idle host and beside busy processes (docs/benchmarks.md).

``python benchmarks/vcpu_gaps.py [--seconds 5] [--busy 2] [--tick-us 1000] [--repeat 1]``

For each scheduling of the vCPU thread (the normal class, then ``SCHED_FIFO 1`` as
``pageflip vm run --realtime`` sets it) and each load (none, then ``--busy`` processes that
spin), the guest (64 MiB filled, 1 ms tick, no writes) runs ``--seconds`` and then lists
the gaps between two iterations of its loop that were longer than 1.5 ticks (its ``G``
request): their count and the longest. A gap is the time the guest did not run: the host
did not wake its vCPU in time.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from typing import Any

from pageflip.bench.vm import guest as bench_guest
from pageflip.vm import VirtualMachine
from pageflip.vm.machine import REALTIME_PRIORITY


def _spin(stop: Any) -> None:
    while not stop.is_set():
        pass


def _gaps(vm: VirtualMachine, seconds: float) -> list[float]:
    vm.ask(bench_guest.gaps_request(0.001).decode(), "GAPS")  # the window starts here
    time.sleep(seconds)
    _, line = vm.ask(bench_guest.gaps_request(seconds).decode(), "GAPS")
    gaps = bench_guest.parse_line(line)
    assert isinstance(gaps, bench_guest.Gaps), line
    return sorted(length / 1e3 for length, _ in gaps.gaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--busy", type=int, default=2, help="spinning processes beside it")
    parser.add_argument("--tick-us", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    print(f"guest loop gaps over 1.5 ticks in {args.seconds:g} s (tick {args.tick_us} us)")
    print(f"{'vCPU thread':<14} {'busy':>4} {'gaps':>5}  longest (ms)")
    for _ in range(args.repeat):
        for realtime in (0, REALTIME_PRIORITY):
            vm = VirtualMachine.create(
                96 << 20, None, f"mb=64 rate=0 hb=100 tick_us={args.tick_us}", realtime=realtime
            )
            try:
                vm.ask("P", "PAUSE", timeout=120)  # answered once it has filled its memory
                for busy in (0, args.busy):
                    stop = mp.Event()
                    spinners = [mp.Process(target=_spin, args=(stop,)) for _ in range(busy)]
                    for spinner in spinners:
                        spinner.start()
                    try:
                        gaps = _gaps(vm, args.seconds)
                    finally:
                        stop.set()
                        for spinner in spinners:
                            spinner.join()
                    longest = ", ".join(f"{g:.2f}" for g in gaps[-3:]) or "-"
                    name = vm.machine.vcpu_status()["scheduling"]
                    print(f"{name!s:<14} {busy:>4} {len(gaps):>5}  {longest}", flush=True)
            finally:
                vm.close()


if __name__ == "__main__":
    main()
