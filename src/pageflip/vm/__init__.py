"""pageflip.vm: a minimal KVM virtual machine monitor whose guest RAM lives in movable regions."""

from .image import guest_elf

__all__ = ["guest_elf"]
