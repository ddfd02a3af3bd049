"""symbols.py's kallsyms reader: the complete symbol table a stripped kernel
(Debian's) carries in .rodata, found by its shape. Checked on tables built
here in each layout scripts/kallsyms.c has emitted, and on Debian's amd64
and i386 kernels against their exported symbols (__ksymtab)."""

from __future__ import annotations

import collections
import random
import shutil
import struct

import pytest

from pvhvm.symbols import Symbols, _Kallsyms, load_symbols

SHF_EXECINSTR = 0x4


# --------------------------------------------------------------------------- tables built here


def kallsyms_tables(symbols: list[tuple[int, str]], bits: int, *, seqs_of_names: bool = False,
                    offsets_after_index: bool = False, base_relative: bool = True,
                    absolute_percpu: bool = False) -> bytes:
    """Bytes holding scripts/kallsyms.c's tables for `symbols` ((address,
    type letter + name), sorted by address) between unrelated bytes.

    Every character is its own token (the token numbers of the printable
    characters); the other numbers get tokens no name uses. The options pick
    the layout: seqs_of_names (6.2 on, Debian's 6.1), the offsets after the
    token index (6.4 on), absolute addresses instead of offsets, and
    per-CPU symbols (below 1 MiB) absolute among negative offsets (x86-64 SMP)."""
    align = bits // 8
    ptr = "<Q" if bits == 64 else "<I"
    # Byte tables like those of lib/ctype.c: digits as one-character strings, not a token table.
    out = bytearray(b"rodata\0" * 5 + b"".join(bytes([c]) + b"\0" for c in range(1, 256)) + b"x")

    def table(raw: bytes) -> None:
        out.extend(bytes(-len(out) % align))
        out.extend(raw)

    tokens = [bytes([i]) if 0x21 <= i <= 0x7E else b"~" + bytes([0x41 + i % 26]) for i in range(256)]
    names = bytearray()
    markers = []
    for i, (_, name) in enumerate(symbols):
        if i % 256 == 0:
            markers.append(len(names))
        encoded = name.encode()
        size = len(encoded)
        names += bytes([size]) if size < 0x80 else bytes([size & 0x7F | 0x80, size >> 7])
        names += encoded
    order = sorted(range(len(symbols)), key=lambda i: symbols[i][1][1:])
    seqs = b"".join(i.to_bytes(3, "big") for i in order)
    token_table = b"".join(t + b"\0" for t in tokens)
    offsets_of_tokens = [sum(len(t) + 1 for t in tokens[:i]) for i in range(256)]

    addresses = [a for a, _ in symbols]
    if not base_relative:
        address_tables = [b"".join(struct.pack(ptr, a) for a in addresses)]
    elif absolute_percpu:
        base = min(a for a in addresses if a >= 1 << 20)
        offsets = [a if a < 1 << 20 else base - a - 1 for a in addresses]
        address_tables = [struct.pack(f"<{len(offsets)}i", *offsets), struct.pack(ptr, base)]
    else:
        base = addresses[0]
        offsets = [a - base for a in addresses]
        address_tables = [struct.pack(f"<{len(offsets)}I", *offsets), struct.pack(ptr, base)]

    if not offsets_after_index:
        for raw in address_tables:
            table(raw)
    table(struct.pack("<I", len(symbols)))
    table(bytes(names))
    table(struct.pack(f"<{len(markers)}I", *markers))
    if seqs_of_names and not offsets_after_index:
        table(seqs)
    table(token_table)
    table(struct.pack("<256H", *offsets_of_tokens))
    if offsets_after_index:
        for raw in address_tables:
            table(raw)
        if seqs_of_names:
            table(seqs)
    out.extend(b"\0after the tables\0" * 4)
    return bytes(out)


def made_up_symbols(bits: int, percpu: bool = False) -> list[tuple[int, str]]:
    """Some 700 symbols of every kind, a name longer than 127 bytes among
    them, sorted by address."""
    rng = random.Random(7)
    address = 0xFFFFFFFF81000000 if bits == 64 else 0xC1000000
    symbols = [(0x40 * i, f"Dpercpu_thing_{i}") for i in range(1, 4)] if percpu else []
    for i in range(700):
        kind = "TtdWrtTwb"[i % 9]
        name = f"{kind}{'static_' if kind == 't' else ''}fn_{i}_" + "x" * rng.randrange(12)
        if i == 333:
            name = "t" + "a_very_long_static_function_name_" * 6  # two-byte length
        symbols.append((address, name))
        address += rng.choice((0, 0x10, 0x40, 0x123, 0x1000))
    return symbols


def text_of(symbols: list[tuple[int, str]]) -> list[tuple[int, str]]:
    return sorted((a, n[1:]) for a, n in symbols if n[0] in "tTwW" and a)


LAYOUTS = {
    "6.1, x86-64": dict(bits=64, absolute_percpu=True),
    "6.1, i386": dict(bits=32),
    "Debian's 6.1 (seqs_of_names), x86-64": dict(bits=64, seqs_of_names=True, absolute_percpu=True),
    "Debian's 6.1 (seqs_of_names), i386": dict(bits=32, seqs_of_names=True),
    "6.4 on (offsets last), x86-64": dict(bits=64, seqs_of_names=True, offsets_after_index=True,
                                          absolute_percpu=True),
    "6.4 on (offsets last), i386": dict(bits=32, seqs_of_names=True, offsets_after_index=True),
    "absolute addresses, 64-bit": dict(bits=64, base_relative=False),
    "absolute addresses, 32-bit, last": dict(bits=32, base_relative=False, offsets_after_index=True),
}


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_kallsyms_of_each_layout(layout):
    bits = layout["bits"]
    symbols = made_up_symbols(bits, percpu=layout.get("absolute_percpu", False))
    image = kallsyms_tables(symbols, **layout)
    found = Symbols.from_kallsyms(image, bits=bits)
    assert found is not None and found.source == "kallsyms of image" and not found.approximate
    assert list(zip(found.addrs, found.names)) == text_of(symbols)
    long_one = symbols[333 + (3 if layout.get("absolute_percpu") else 0)]
    assert found.lookup(long_one[0] + 1) == f"{long_one[1][1:]}+0x1"


def consistent(found: Symbols | None) -> bool:
    return found is None or (
        len(found.addrs) == len(found.names) > 0
        and found.addrs == sorted(found.addrs)
        and all(isinstance(n, str) for n in found.names)
    )


@pytest.mark.parametrize("layout", [LAYOUTS["Debian's 6.1 (seqs_of_names), x86-64"],
                                    LAYOUTS["6.4 on (offsets last), i386"]], ids=["x86-64", "i386"])
def test_kallsyms_of_corrupt_tables_is_none_or_consistent(layout):
    """Untrusted bytes: flipped, zeroed or cut anywhere, the tables give
    None or sorted names, never an exception."""
    symbols = made_up_symbols(layout["bits"])
    image = kallsyms_tables(symbols, **layout)
    rng = random.Random(1)
    results = collections.Counter()
    for _ in range(300):
        corrupt = bytearray(image)
        for _ in range(rng.choice((1, 2, 8))):
            at = rng.randrange(len(corrupt))
            corrupt[at] = rng.choice((0, 0xFF, corrupt[at] ^ (1 << rng.randrange(8))))
        found = Symbols.from_kallsyms(bytes(corrupt), bits=layout["bits"])
        assert consistent(found)
        results[found is None] += 1
    for cut in range(0, len(image), 97):
        assert consistent(Symbols.from_kallsyms(image[:cut], bits=layout["bits"]))
    assert results[True] and results[False]  # some flips break the tables, some land in names


def test_no_kallsyms_is_none(guests):
    """A test guest (no kallsyms) keeps its ELF symbol table."""
    assert Symbols.from_kallsyms(guests["crash"]) is None
    assert Symbols.from_kallsyms(b"") is None
    assert Symbols.from_kallsyms(bytes(4096)) is None
    symbols = load_symbols(guests["crash"])
    assert symbols.source == f"symbol table of {guests['crash']}" and "crash_here" in symbols.names


# --------------------------------------------------------------------------- Debian's kernels


@pytest.fixture(scope="module", params=["amd64", "i386"])
def debian_vmlinux(request):
    if shutil.which("apt-get") is None:
        pytest.skip("Debian's kernels need apt (Debian)")
    from pvhvm.images import prepare_default_guest

    return request.param, prepare_default_guest(arch=request.param).vmlinux


def executable_ranges(vmlinux) -> list[tuple[int, int]]:
    """[start, end) of the vmlinux's sections of code (SHF_EXECINSTR)."""
    data = vmlinux.read_bytes()
    elf32 = data[4] == 1
    shoff, = struct.unpack_from("<I" if elf32 else "<Q", data, 0x20 if elf32 else 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x2E if elf32 else 0x3A)
    shdr = "<IIIIIIIIII" if elf32 else "<IIQQQQIIQQ"
    sections = [struct.unpack_from(shdr, data, shoff + i * shentsize) for i in range(shnum)]
    return [(s[3], s[3] + s[5]) for s in sections if s[2] & SHF_EXECINSTR and s[5]]


@pytest.mark.slow
def test_debian_kernel_named_by_kallsyms(debian_vmlinux):
    arch, vmlinux = debian_vmlinux
    found = load_symbols(vmlinux)
    assert found.source == f"kallsyms of {vmlinux}" and not found.approximate
    assert 20_000 < len(found) < 500_000, len(found)
    names = set(found.names)
    start = "x86_64_start_kernel" if arch == "amd64" else "i386_start_kernel"
    assert {"start_kernel", start, "memset", "_stext", "_etext"} <= names
    assert arch == "i386" or "clear_bss" in names
    assert "hypercall_page" in names or any(n.startswith("xen_hypercall_") for n in names)
    # Every address is in the kernel's code.
    where = dict(zip(found.names, found.addrs))
    code = executable_ranges(vmlinux)
    assert any(lo <= where["start_kernel"] < hi for lo, hi in code)


@pytest.mark.slow
def test_every_exported_function_named_alike_by_kallsyms(debian_vmlinux):
    """__ksymtab (the exported symbols, read independently) and kallsyms
    agree on the name at every exported address of code."""
    _, vmlinux = debian_vmlinux
    kallsyms = Symbols.from_kallsyms(vmlinux)
    exported = Symbols.from_ksymtab(vmlinux)
    named_at = collections.defaultdict(set)
    for address, name in zip(kallsyms.addrs, kallsyms.names):
        named_at[address].add(name)
    code = executable_ranges(vmlinux)
    functions = [(a, n) for a, n in zip(exported.addrs, exported.names) if any(lo <= a < hi for lo, hi in code)]
    assert len(functions) > 5000
    assert [(hex(a), n) for a, n in functions if n not in named_at[a]] == []


@pytest.mark.slow
def test_static_function_named_by_kallsyms(debian_vmlinux):
    """What the exported symbols cannot do: an address in a static function
    (kernel_init, init/main.c) is named after it, not the exported one before."""
    _, vmlinux = debian_vmlinux
    kallsyms = load_symbols(vmlinux)
    exported = Symbols.from_ksymtab(vmlinux)
    assert "kernel_init" in kallsyms.names and "kernel_init" not in exported.names
    i = kallsyms.names.index("kernel_init")
    inside = (kallsyms.addrs[i] + kallsyms.addrs[i + 1]) // 2
    offset = inside - kallsyms.addrs[i]
    assert kallsyms.lookup(inside) == f"kernel_init+{offset:#x}"
    assert not exported.lookup(inside).startswith("kernel_init")


@pytest.mark.slow
def test_debian_kernel_with_corrupt_kallsyms(debian_vmlinux, tmp_path):
    """The real tables flipped, zeroed or cut: None or a consistent answer,
    never an exception; without a token table, the exported symbols."""
    _, vmlinux = debian_vmlinux
    data = vmlinux.read_bytes()
    reader = _Kallsyms(data, 64)
    assert reader.text_symbols()
    tables = reader.located
    rng = random.Random(2)
    for name in ("token_table", "token_index", "markers", "names", "num_syms"):
        for _ in range(3):
            corrupt = bytearray(data)
            at = tables[name] + rng.randrange(64)
            corrupt[at : at + 4] = rng.randbytes(4)
            assert consistent(Symbols.from_kallsyms(bytes(corrupt)))
        assert consistent(Symbols.from_kallsyms(data[: tables[name] + 5]))
    corrupt = bytearray(data)
    corrupt[tables["token_table"] : tables["token_index"]] = bytes(tables["token_index"] - tables["token_table"])
    assert Symbols.from_kallsyms(bytes(corrupt)) is None
    (tmp_path / "vmlinux").write_bytes(corrupt)
    fallback = load_symbols(tmp_path / "vmlinux")
    assert fallback.approximate and fallback.source.startswith("exported symbols of")
