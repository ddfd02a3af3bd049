"""Shared fixtures: the test guests, built once per session with gcc."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "guests"))

import build as guest_build  # noqa: E402

sys.path.insert(0, str(HERE.parent))  # the repo's fuzz/ package
from fuzz.parsers import elf64  # noqa: E402


@pytest.fixture(scope="session")
def guests() -> dict[str, Path]:
    return guest_build.build_all()


def make_elf64(segments: list[tuple[int, bytes]], notes: list[tuple[int, bytes]] = (), entry: int = 0) -> bytes:
    """A minimal ELF64 x86-64 file: PT_LOAD per (paddr, data) and one PT_NOTE
    with Xen notes (type, desc). For builder tests that need odd images; the
    parser fuzzer builds its seeds with the same function."""
    return elf64(segments, notes, entry)


PVH_NOTE = 18
