"""Shared fixtures: the test guests, built once per session with gcc."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "guests"))

import build as guest_build  # noqa: E402


@pytest.fixture(scope="session")
def guests() -> dict[str, Path]:
    return guest_build.build_all()


def make_elf64(segments: list[tuple[int, bytes]], notes: list[tuple[int, bytes]] = (), entry: int = 0) -> bytes:
    """A minimal ELF64 x86-64 file: PT_LOAD per (paddr, data) and one PT_NOTE
    with Xen notes (type, desc). For builder tests that need odd images."""
    note_blob = b""
    for ntype, desc in notes:
        note_blob += struct.pack("<III", 4, len(desc), ntype) + b"Xen\0" + desc + b"\0" * (-len(desc) % 4)
    phnum = len(segments) + (1 if notes else 0)
    off = 64 + 56 * phnum
    phdrs = b""
    body = b""
    for paddr, data in segments:
        phdrs += struct.pack("<IIQQQQQQ", 1, 7, off + len(body), paddr, paddr, len(data), len(data), 0x1000)
        body += data
    if notes:
        phdrs += struct.pack("<IIQQQQQQ", 4, 4, off + len(body), 0, 0, len(note_blob), len(note_blob), 4)
        body += note_blob
    ehdr = b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\0" * 8
    ehdr += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, entry, 64, 0, 0, 64, 56, phnum, 64, 0, 0)
    return ehdr + phdrs + body


PVH_NOTE = 18
