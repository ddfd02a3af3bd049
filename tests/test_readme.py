"""The README's Python example runs as written (it boots Debian's kernel
with two vCPUs, like test_linux.py)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_a_python_example():
    assert len(python_examples()) == 1


@pytest.mark.slow
def test_readme_python_example_runs():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(python_examples()[0], "README.md", "exec"), {})
    printed = out.getvalue()
    assert re.search(r"^b'6\.1\.\S+'$", printed, re.M), printed
    assert "b'2'" in printed, printed  # nproc
    assert "b'131072'" in printed, printed  # xvda's sectors
    assert "'requests':" in printed, printed
    assert "shutdown (poweroff) 0" in printed, printed
    assert "'online': True" in printed and "'rip':" in printed, printed
