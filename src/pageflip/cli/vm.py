"""``pageflip vm``: run a virtual machine on pageflip's own VMM, and live-update that VMM.

``pageflip vm run`` boots a guest kernel (by default the test guest shipped with pageflip)
and serves it on a control socket like ``pageflip workload``: ``migrate``, ``status``,
``verify``, ``stop`` work on it. Its serial console goes to stdout (``--json``: one
``{"console": line}`` object per line). ``pageflip vm upgrade`` replaces the VMM process
under the running guest with a new one started from the code installed now (a flip: the
RAM's memfds change owner, nothing is copied).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, cast

import click

from ..errors import LocalProtocolError, SpanError
from ..memory import HUGE_NAMES, HugePages
from ..units import format_size, human_size
from ._base import DURATION, SIZE, emit, main
from .guests import control_option, echo_json, exit_with_outcome, follow, json_option, serve_host


@main.group()
def vm() -> None:
    """Run a virtual machine on pageflip's KVM VMM; live-update the VMM under it."""


def console_printer(as_json: bool) -> Any:
    """A console listener: each guest line to stdout (as ``{"console": line}`` with --json)."""

    def show(line: str) -> None:
        text = json.dumps({"console": line}) if as_json else line
        try:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
        except (OSError, ValueError):
            pass  # nobody reads our stdout any more: the guest runs on regardless

    return show


@vm.command("run")
@click.option("--memory", type=SIZE, default="256M", show_default=True, help="Guest RAM (bytes).")
@click.option(
    "--kernel",
    type=click.Path(dir_okay=False),
    help="A PVH kernel (ELF). Default: the test guest shipped with pageflip (built with gcc "
    "on first use).",
)
@click.option(
    "--append",
    default=None,
    help="The kernel command line. For the shipped guest: mb=N (MiB to fill, default "
    "memory - 64 MiB), rate=R (MiB/s to rewrite), hb=MS (heartbeat), tick_us=U, seed=S.",
)
@click.option(
    "--realtime",
    is_flag=True,
    help="Run the vCPU thread SCHED_FIFO (priority 1), so that the host's other work does "
    "not delay the guest's wake-ups by milliseconds; kept across migrations and upgrades. "
    "Needs root, CAP_SYS_NICE or ulimit -r 1.",
)
@click.option(
    "--huge",
    type=click.Choice(HUGE_NAMES),
    default=None,
    help="Put the guest's RAM on huge pages (hugetlb needs a pool: sysctl -w "
    "vm.nr_hugepages=N; auto falls back to 4 KiB pages). KVM then maps it a huge page at a "
    "time, so a VMM that takes the guest over (migrate, vm upgrade) runs it at full speed "
    "at once. The RAM below and above 3 GiB must each be whole pages.",
)
@control_option
@json_option
def vm_run(
    memory: int,
    kernel: str | None,
    append: str | None,
    realtime: bool,
    huge: str | None,
    control: str,
    as_json: bool,
) -> None:
    """Boot a VM and serve it on --control until it migrates away or is stopped.

    Its serial console is shown on stdout. `pageflip migrate --control PATH --to ADDR`
    migrates it (flip, precopy with KVM's dirty log, postcopy); `pageflip vm upgrade`
    replaces this VMM process under it; `pageflip verify` makes the shipped guest check
    every page it wrote.
    """
    from ..migration import room
    from ..migration.host import GuestHost
    from ..vm import VirtualMachine, install_kick_handler, kvm_available
    from ..vm.machine import REALTIME_PRIORITY, check_realtime

    why = kvm_available()
    if why is not None:
        raise click.ClickException(why)
    install_kick_handler()
    if realtime:
        check_realtime(REALTIME_PRIORITY)
    lack = room.shortfall(memory + (16 << 20), 0)
    if lack is not None:
        raise SpanError(f"--memory {format_size(memory)} is more than this host can hold: {lack}")
    host = GuestHost(
        None,
        control,
        outcome="booting",
        status=lambda: {"state": "booting", "memory": memory} if host.guest is None else {},
    )
    try:
        guest = VirtualMachine.create(
            memory,
            kernel,
            append,
            on_console=console_printer(as_json),
            paused=True,
            realtime=REALTIME_PRIORITY if realtime else 0,
            huge=cast("HugePages", huge) if huge else False,
        )
        host.attach(guest)
        guest.resume()
        emit(
            as_json,
            {
                "event": "ready",
                "control": control,
                "pid": os.getpid(),
                "memory": memory,
                "vcpu": guest.machine.vcpu_status(),
            },
            f"VM with {human_size(memory)} of RAM, control socket {control} (pid {os.getpid()})"
            + (f", vCPU {guest.machine.vcpu_status()['scheduling']}" if realtime else ""),
        )
    except BaseException:
        host.close()
        raise
    serve_host(host, as_json)


@vm.command("upgrade")
@control_option
@click.option(
    "--timeout",
    type=DURATION,
    default="60s",
    show_default=True,
    help="Longest wait for the new VMM to start and for each phase of the handover.",
)
@json_option
def vm_upgrade(control: str, timeout: float, as_json: bool) -> None:
    """Replace the VMM process at --control with a new one running the code installed now.

    The running process starts its successor (same console, same control socket), flips
    the guest into it (the guest's RAM changes owner, nothing is copied) and exits. If
    anything fails before the new process is ready, the guest runs on in the old one.
    """
    from ..migration.host import ControlClient

    with ControlClient(control, timeout=timeout) as client:
        before = client.request("status")
        if "status" not in before:
            raise LocalProtocolError(
                f"{control} is not a VM's control socket (a live service's? that one "
                "upgrades with pageflip upgrade --control)"
            )
        events = client.upgrade(timeout=timeout)
        last = echo_json(events) if as_json else follow(events, "live update")
    exit_with_outcome(last)
    after = last.get("successor") or {}
    old = before.get("status", {}).get("vmm", {})
    emit(
        as_json,
        {"event": "upgraded", "old": {**old, "pid": before.get("pid")}, "new": after},
        f"upgraded: VMM pid {before.get('pid')} -> {after.get('pid')}, code "
        f"{old.get('code')} -> {after.get('code')} (version {after.get('version')})",
    )
