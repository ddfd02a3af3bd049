"""The domain builder: ELF kernels and their Xen notes, guest-physical
placement, and the hvm_start_info a PVH guest boots with."""

from .elf import ElfImage, XenNote, load_elf
from .layout import PhysLayout
from .start_info import BootInfo, build_start_info

__all__ = ["ElfImage", "XenNote", "load_elf", "PhysLayout", "BootInfo", "build_start_info"]
