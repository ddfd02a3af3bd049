"""Build pvhvm's freestanding test guests with the host gcc (seconds).

    python3 tests/guests/build.py [OUTDIR]

Each guest is `<name>.c` (plus `<name>_*.S` if present) linked with the
shared runtime in common/ into an ELF64 with a PVH entry note; `hello32` is
the hello guest rewrapped in an ELF32 container, as some x86-64 kernels are.

The guests in GUESTS32 are also built with -m32 on common/boot32.S, which
stays in 32-bit protected mode, once per paging mode in I386_VARIANTS:
`<name>.i386-<variant>.elf` (e.g. events.i386-pae.elf). Their sources are the
same; `unsigned long` and pointers give Xen's 32-bit (compat) layouts.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
GUESTS = ["hello", "exceptions", "hypercall_abi", "events", "grants", "memory", "triple_fault", "bench", "bench_events",
          "xsbench", "smp", "refusals", "fifo", "vmgenid", "suspend", "debugee", "crash", "flood", "far_timer",
          "hcfuzz", "profile_spin", "smc"]
GUESTS32 = ["hello", "hypercall_abi", "events", "grants", "memory", "vmgenid", "suspend", "crash", "hcfuzz"]
# variant -> the macro common/boot32.S builds it with
I386_VARIANTS = {"nopaging": "BOOT32_NOPAGING", "pse": "BOOT32_PSE", "pae": "BOOT32_PAE"}
COMMON_FLAGS = [
    "-O2", "-g", "-ffreestanding", "-fno-pic", "-fno-pie", "-no-pie", "-nostdlib", "-static",
    "-mno-red-zone", "-mgeneral-regs-only", "-fno-stack-protector", "-fno-asynchronous-unwind-tables",
    "-fcf-protection=none", "-Wall", "-Werror", "-Wl,--build-id=none", "-Wl,-z,noexecstack",
    "-Wl,--no-warn-rwx-segments",
]
CFLAGS = ["-m64", *COMMON_FLAGS]
CFLAGS32 = ["-m32", *COMMON_FLAGS]
# Guests that need more: crash and profile_spin keep every caller's frame for the
# stack walks;
# hcfuzz is linked away from the addresses hypercalls write back (RAM's start
# at 1 MiB in the memory map, small numbers), see hcfuzz.c.
GUEST_FLAGS = {"crash": ["-fno-omit-frame-pointer", "-fno-optimize-sibling-calls"],
               "profile_spin": ["-fno-omit-frame-pointer", "-fno-optimize-sibling-calls"],
               "hcfuzz": ["-Wl,--defsym=IMAGE_BASE=0x1340000"]}


def build(name: str, outdir: Path, variant: str | None = None) -> Path:
    """Build guest `name`: ELF64, or with `variant` (a key of I386_VARIANTS) the 32-bit build."""
    outdir.mkdir(parents=True, exist_ok=True)
    out = outdir / (f"{name}.elf" if variant is None else f"{name}.i386-{variant}.elf")
    boot = "boot.S" if variant is None else "boot32.S"
    sources = [HERE / "common" / boot, HERE / "common" / "lib.c", HERE / "common" / "xen.c", HERE / f"{name}.c"]
    sources += sorted(HERE.glob(f"{name}_*.S"))
    deps = sources + [HERE / "common" / "lib.h", HERE / "common" / "xen.h", HERE / "common" / "asm.h", HERE / "common" / "guest.ld", Path(__file__)]
    if out.exists() and all(out.stat().st_mtime >= d.stat().st_mtime for d in deps):
        return out
    flags = CFLAGS if variant is None else [*CFLAGS32, f"-D{I386_VARIANTS[variant]}"]
    flags = [*flags, *GUEST_FLAGS.get(name, [])]
    cmd = ["gcc", *flags, "-I", str(HERE), "-T", str(HERE / "common" / "guest.ld"), "-o", str(out), *map(str, sources)]
    subprocess.run(cmd, check=True)
    return out


def build_all(outdir: Path = HERE / "build") -> dict[str, Path]:
    built = {name: build(name, outdir) for name in GUESTS}
    elf32 = outdir / "hello32.elf"
    if not elf32.exists() or elf32.stat().st_mtime < built["hello"].stat().st_mtime:
        subprocess.run(["objcopy", "-O", "elf32-i386", str(built["hello"]), str(elf32)], check=True)
    built["hello32"] = elf32
    for name in GUESTS32:
        for variant in I386_VARIANTS:
            built[f"{name}.i386-{variant}"] = build(name, outdir, variant)
    return built


if __name__ == "__main__":
    for name, path in build_all(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "build").items():
        print(f"{name}: {path}")
