"""Fuzzing pvhvm's parsers of files a user hands it: kernels (ELF64/ELF32
and their Xen notes, bzImage headers), the initrd and command line as
plan_domain takes them, xl-style config files, and save files (with their
checksums made right again, so the mutation reaches Domain.restore).

Inputs are valid seeds mutated from a case's own seed: bytes flipped,
fields set to edge values, truncated, spliced, repeated; config text
mutated by token; a save file's JSON record and core blob changed by value.
The property: every failure is the module's one-line error class
(BuildError, ConfigError, SaveFileError: a PvhvmError); any other exception
is a finding.

    python -m fuzz.parsers --seed 1 --duration 300 --out fuzz-findings/parsers
"""

from __future__ import annotations

import base64
import gzip
import json
import random
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Optional

import pvhvm
from pvhvm import savefile
from pvhvm.builder import bzimage
from pvhvm.builder.domain import plan_domain
from pvhvm.builder.elf import parse_elf
from pvhvm.config import parse_config
from pvhvm.errors import PvhvmError

from .iocampaign import CaseResult, TracebackLog, case_runners, exception_detail, main

ENTRY = 0x100000
IDLE_CODE = b"\xfb\xf4\xeb\xfd"  # sti; hlt; jmp hlt
PHYS32_ENTRY_NOTE = 18
INPUTS_PER_CASE = 40


def elf64(segments, notes=(), entry=ENTRY) -> bytes:
    note_blob = b"".join(struct.pack("<III", 4, len(d), t) + b"Xen\0" + d + bytes(-len(d) % 4) for t, d in notes)
    phnum = len(segments) + (1 if notes else 0)
    off = 64 + 56 * phnum
    phdrs = body = b""
    for paddr, data in segments:
        phdrs += struct.pack("<IIQQQQQQ", 1, 7, off + len(body), paddr, paddr, len(data), len(data), 0x1000)
        body += data
    if notes:
        phdrs += struct.pack("<IIQQQQQQ", 4, 4, off + len(body), 0, 0, len(note_blob), len(note_blob), 4)
        body += note_blob
    ehdr = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    ehdr += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, entry, 64, 0, 0, 64, 56, phnum, 64, 0, 0)
    return ehdr + phdrs + body


def elf32(segments, notes=(), entry=ENTRY) -> bytes:
    note_blob = b"".join(struct.pack("<III", 4, len(d), t) + b"Xen\0" + d + bytes(-len(d) % 4) for t, d in notes)
    phnum = len(segments) + (1 if notes else 0)
    off = 52 + 32 * phnum
    phdrs = body = b""
    for paddr, data in segments:
        phdrs += struct.pack("<IIIIIIII", 1, off + len(body), paddr, paddr, len(data), len(data), 7, 0x1000)
        body += data
    if notes:
        phdrs += struct.pack("<IIIIIIII", 4, off + len(body), 0, 0, len(note_blob), len(note_blob), 4, 4)
        body += note_blob
    ehdr = b"\x7fELF" + bytes([1, 1, 1, 0]) + bytes(8)
    ehdr += struct.pack("<HHIIIIIHHHHHH", 2, 3, 1, entry, 52, 0, 0, 52, 32, phnum, 40, 0, 0)
    return ehdr + phdrs + body


def kernel_seeds() -> list[bytes]:
    pvh = [(PHYS32_ENTRY_NOTE, ENTRY.to_bytes(4, "little"))]
    more = pvh + [(1, b"4.19\0"), (5, b"xen-3.0\0"), (6, b"linux\0"), (10, b"!writable_page_tables\0"),
                  (3, (0xFFFFFFFF80000000).to_bytes(8, "little"))]
    return [elf64([(ENTRY, IDLE_CODE)], pvh), elf64([(ENTRY, IDLE_CODE), (ENTRY + 0x1000, bytes(64))], more),
            elf32([(ENTRY, IDLE_CODE)], pvh)]


def bzimage_seed(kernel: bytes) -> bytes:
    setup_sects = 4
    payload = gzip.compress(kernel, mtime=0)
    boot = bytearray((setup_sects + 1) * 512)
    boot[0x1F1] = setup_sects
    boot[0x1FE:0x200] = b"\x55\xaa"
    boot[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", boot, 0x206, 0x20F)
    struct.pack_into("<II", boot, 0x248, 0, len(payload))
    return bytes(boot) + payload


CONFIG_SEED = '''name = "vm"
type = "pvh"
kernel = "vmlinux"
ramdisk = "initrd"
memory = 512 ; maxmem = 1024
vcpus = 2
cmdline = "console=hvc0 root=/dev/xvda"
extra = 'quiet'
on_reboot = "restart"
on_crash = 'preserve'
disk = [ 'format=raw, vdev=xvda, access=rw, target=disk.img', "disk2.img,,xvdb,ro" ]
vif = [ "mac=00:16:3e:00:00:01,bridge=xenbr0", 'type=vif' ]
uuid = "00000000-0000-0000-0000-000000000001"
xenstore_socket = "xs.sock"
# a comment
'''
_CONFIG_TOKENS = ['"', "'", "[", "]", ",", ";", "=", "+=", "\n", "#", "\\", "\0", "\r", " ", "0x", "-1",
                  "99999999999999999999", "1e9", "memory", "vcpus", "disk", "vif", "kernel", "name", "maxmem",
                  "on_crash", "type", "cmdline", "uuid", "pci", "vdev=", "target=", "mac=", "ü", "\udcff", "${x}"]
_EDGE_INTS = [0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 0x100000, 2**63 - 1, 2**64 - 1]


def mutate_bytes(rng: random.Random, data: bytes, seeds: list[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice([1, 1, 2, 4, 8])):
        k = rng.random()
        if not b:
            b += bytes(rng.getrandbits(8) for _ in range(8))
        if k < 0.3:
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif k < 0.6:  # an edge value over a field
            width = rng.choice([1, 2, 4, 8])
            i = rng.randrange(max(1, len(b) - width + 1))
            v = rng.choice(_EDGE_INTS) & ((1 << (8 * width)) - 1)
            b[i : i + width] = v.to_bytes(width, "little")[: len(b) - i]
        elif k < 0.7:
            del b[rng.randrange(len(b)) :]
        elif k < 0.8:
            other = rng.choice(seeds)
            i, j = rng.randrange(len(b) + 1), rng.randrange(len(other) + 1)
            b = b[:i] + bytearray(other[j:])
        elif k < 0.9:
            i = rng.randrange(len(b))
            n = rng.randint(1, 64)
            b[i:i] = b[i : i + n] * rng.randint(1, 8)
        else:
            i = rng.randrange(len(b))
            b[i : i + 4] = bytes(rng.getrandbits(8) for _ in range(4))
    return bytes(b)


def mutate_text(rng: random.Random, text: str) -> str:
    for _ in range(rng.choice([1, 1, 2, 3, 6])):
        k = rng.random()
        i = rng.randrange(len(text) + 1)
        if k < 0.5:
            text = text[:i] + rng.choice(_CONFIG_TOKENS) + text[i:]
        elif k < 0.8 and text:
            text = text[:i] + text[i + rng.randint(1, 8) :]
        else:
            text = text[:i] + text[i : i + rng.randint(1, 40)] * rng.randint(2, 5) + text[i:]
    return text


def _random_json(rng: random.Random, depth: int = 0):
    k = rng.randrange(8 if depth < 2 else 6)
    if k == 6:
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if k == 7:
        return {rng.choice(["a", "data", "runs", "0"]): _random_json(rng, depth + 1)}
    return [None, True, rng.choice(_EDGE_INTS + [-1, -(2**63)]), rng.random() * 1e300,
            rng.choice(["", "x", "A" * 5000, "\udcff", "-1", "../../etc"]), rng.choice([0, -1, 2**70])][k]


def mutate_json(rng: random.Random, value):
    """A copy of `value` with one leaf (or key) changed, removed or retyped."""
    if isinstance(value, dict) and value and rng.random() < 0.85:
        key = rng.choice(sorted(value))
        out = dict(value)
        k = rng.random()
        if k < 0.1:
            del out[key]
        elif k < 0.2:
            out[key] = _random_json(rng)
        else:
            out[key] = mutate_json(rng, value[key])
        return out
    if isinstance(value, list) and value and rng.random() < 0.85:
        i = rng.randrange(len(value))
        out = list(value)
        k = rng.random()
        if k < 0.1:
            del out[i]
        elif k < 0.2:
            out.append(_random_json(rng))
        else:
            out[i] = mutate_json(rng, value[i])
        return out
    if isinstance(value, bool):
        return rng.choice([not value, None, 0, "true"])
    if isinstance(value, int):
        return rng.choice([value + 1, value - 1, -value, 0, -1, value * 4096, 2**64, 2**32 - 1, str(value), None,
                           value ^ (1 << rng.randrange(64))])
    if isinstance(value, str):
        try:
            raw = base64.b64decode(value, validate=True)
            if raw and len(value) > 8:
                return base64.b64encode(mutate_bytes(rng, raw, [raw])).decode()
        except ValueError:
            pass
        return rng.choice([value + "x", "", value[: len(value) // 2], "A" * 10000, "!!", 7, None])
    return _random_json(rng)


def pack_save(ram: bytes, core: bytes, meta: dict, head_mutation: Optional[tuple[int, int]] = None) -> bytes:
    """A save file with the checksums right (savefile.py's layout)."""
    blob = json.dumps(meta, separators=(",", ":")).encode()
    ram_off, ram_len = 4096, len(ram)
    core_off = ram_off + ram_len
    meta_off = core_off + len(core)
    fields = [savefile.MAGIC, savefile.FORMAT, savefile.ARCH, ram_off, ram_len, core_off, len(core),
              zlib.crc32(core), meta_off, len(blob), zlib.crc32(blob)]
    if head_mutation is not None:
        i, v = head_mutation
        fields[i] = v & (0xFFFFFFFF if i in (1, 7, 10) else 0xFFFFFFFFFFFFFFFF)
    head = struct.pack("<8sI16sQQQQIQQI", *fields)
    head += struct.pack("<I", zlib.crc32(head))
    return head.ljust(4096, b"\0") + ram + core + blob


class Inputs:
    """The valid seeds, made once per process."""

    def __init__(self, tmp: Path) -> None:
        self.kernels = kernel_seeds()
        self.bzimage = bzimage_seed(self.kernels[0])
        kpath = tmp / "idle.elf"
        kpath.write_bytes(self.kernels[0])
        dom = pvhvm.Domain(kpath, memory_mib=16, name="parsers-seed")
        try:
            save = tmp / "seed.sav"
            dom.save(save)
        finally:
            dom.close()
        image = savefile.read(save)
        try:
            with open(save, "rb") as f:
                f.seek(image.ram_offset)
                self.ram = f.read(image.ram_length)
            self.core = image.core
            self.meta = image.meta
        finally:
            image.close()


_inputs: Optional[Inputs] = None
_inputs_dir: Optional[tempfile.TemporaryDirectory] = None


def inputs() -> Inputs:
    global _inputs, _inputs_dir
    if _inputs is None:
        _inputs_dir = tempfile.TemporaryDirectory(prefix="pvhvm-parsers-seed-")
        _inputs = Inputs(Path(_inputs_dir.name))
    return _inputs


# ------------------------------------------------------------------- targets


def _try(result: CaseResult, target: str, fn) -> None:
    result.messages += 1
    try:
        fn()
    except PvhvmError as e:
        if "\n" in str(e).strip():
            result.find("exception", f"{target}: {type(e).__name__} of more than one line")
    except RecursionError as e:
        result.find("exception", f"{target}: {exception_detail(e)}")
    except Exception as e:  # noqa: BLE001 - the finding
        result.find("exception", f"{target}: {exception_detail(e)}")


def run_input(op: list, tmp: Path, result: CaseResult) -> None:
    kind = op[0]
    if kind == "elf":
        data = bytes.fromhex(op[1])
        _try(result, "parse_elf", lambda: parse_elf(data))
    elif kind == "plan":  # kernel, initrd, cmdline, memory through plan_domain
        kernel, initrd = tmp / "k.elf", tmp / "initrd"
        kernel.write_bytes(bytes.fromhex(op[1]))
        initrd.write_bytes(bytes.fromhex(op[2]))
        _try(result, "plan_domain", lambda: plan_domain(kernel, initrd if op[2] or op[5] else None, op[3],
                                                         memory_mib=op[4]))
    elif kind == "bzimage":
        data = bytes.fromhex(op[1])
        _try(result, "bzimage", lambda: (bzimage.header_payload(data), bzimage.payload_candidates(data),
                                         bzimage.decompress_kernel(data, Path("<fuzz>"))))
    elif kind == "config":
        (tmp / "vmlinux").write_bytes(b"x")
        _try(result, "parse_config", lambda: parse_config(op[1], source="fuzz.cfg", base_dir=tmp))
    elif kind == "save":
        path = tmp / "f.sav"
        path.write_bytes(base64.b64decode(op[1]))

        def restore() -> None:
            dom = pvhvm.Domain.restore(path, name="parsers-restore")
            dom.close()
        _try(result, "Domain.restore", restore)
    else:
        raise ValueError(f"unknown input kind {kind!r}")


def generate(rng: random.Random) -> list:
    seeds = inputs()
    k = rng.random()
    if k < 0.3:
        return ["elf", mutate_bytes(rng, rng.choice(seeds.kernels), seeds.kernels).hex()]
    if k < 0.4:
        kernel = rng.choice(seeds.kernels)
        if rng.random() < 0.5:
            kernel = mutate_bytes(rng, kernel, seeds.kernels)
        initrd = rng.choice([b"", b"x", bytes(4096), b"\x07" * 100000])
        cmdline = rng.choice(["", "console=hvc0", "x" * 4096, "x" * 70000, "\0", "ü" * 10, "\udcff"])
        return ["plan", kernel.hex(), initrd.hex(), cmdline, rng.choice([16, 17, 1, 0, -1, 4096, 2**40]),
                rng.random() < 0.3]
    if k < 0.5:
        return ["bzimage", mutate_bytes(rng, seeds.bzimage, [seeds.bzimage]).hex()]
    if k < 0.8:
        return ["config", mutate_text(rng, CONFIG_SEED)]
    ram, core, meta, head = seeds.ram, seeds.core, seeds.meta, None
    m = rng.random()
    if m < 0.5:
        meta = mutate_json(rng, meta)
        if rng.random() < 0.3:
            meta = mutate_json(rng, meta)
    elif m < 0.8:
        core = mutate_bytes(rng, core, [core])
    elif m < 0.9:
        head = (rng.choice([3, 4, 5, 6, 8, 9]), rng.choice(_EDGE_INTS + [4096, 8192]))
    else:
        meta = mutate_json(rng, meta)
        core = mutate_bytes(rng, core, [core])
    return ["save", base64.b64encode(pack_save(ram, core, meta, head)).decode()]


def _run(seed: int, ops: Optional[list]) -> CaseResult:
    result = CaseResult(seed)
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="pvhvm-parsers-") as d, TracebackLog() as tracebacks:
        tmp = Path(d)
        todo = list(ops) if ops is not None else [generate(rng) for _ in range(INPUTS_PER_CASE)]
        for op in todo:
            result.ops = [op]  # a reproducer is the one input
            run_input(op, tmp, result)
            for t in tracebacks.records:
                result.find("traceback", t)
            tracebacks.records.clear()
            if result.findings:
                break
    return result


run_case, replay_case = case_runners(_run)


if __name__ == "__main__":
    raise SystemExit(main("parsers", run_case, replay_case))
