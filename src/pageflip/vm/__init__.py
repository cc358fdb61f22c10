"""pageflip.vm: a minimal KVM virtual machine monitor whose guest RAM lives in movable regions.

A :class:`VirtualMachine` is a :class:`~pageflip.guests.Guest`: the migration engine moves it
between VMM processes like any other guest (flip: its RAM's memfds change owner; precopy with
KVM's dirty log; postcopy with a userfaultfd that KVM's own accesses fault through), and
``pageflip vm upgrade`` uses that to replace the VMM process under a running guest.

The parts: :mod:`.machine` (the VM, its vCPU thread, boot), :mod:`.devices` (serial port and
PM timer), :mod:`.state` (vCPU and VM state, and the order it is restored in),
:mod:`.dirtylog` (KVM's dirty log), :mod:`.elf` (PVH kernels), :mod:`.guest` (the Guest),
:mod:`.image` (the test guest shipped in ``guest/``, built with gcc on first use).
"""

from .elf import PvhImage, read_pvh
from .guest import VirtualMachine
from .image import guest_elf, guest_source_dir
from .machine import KICK_SIGNAL, Machine, install_kick_handler, kvm_available, layout

__all__ = [
    "VirtualMachine",
    "guest_elf",
    "guest_source_dir",
    "Machine",
    "install_kick_handler",
    "kvm_available",
    "layout",
    "read_pvh",
    "PvhImage",
    "KICK_SIGNAL",
]
