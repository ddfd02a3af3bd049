"""The README's Python example runs as written (it boots Debian's kernel
with two vCPUs, like test_linux.py)."""

from __future__ import annotations

import ast
import builtins
import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_its_python_examples():
    assert len(python_examples()) == 3


@pytest.mark.parametrize("index", [0, 1, 2])
def test_readme_example_uses_names_it_has_and_public_api_only(index):
    """Without booting anything: every name the example reads is imported,
    assigned or a builtin (an undefined `gref` once ended the first one),
    and it touches no attribute of pvhvm's that starts with an underscore."""
    tree = ast.parse(python_examples()[index])
    defined = set(dir(builtins))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            defined |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            defined.add(node.id)
    read = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    assert read <= defined, read - defined
    private = [n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr.startswith("_")]
    assert private == []


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


@pytest.mark.slow
def test_readme_save_restore_fork_example_runs():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(python_examples()[1], "README.md", "exec"), {})
    printed = out.getvalue()
    assert "256 MiB file" in printed, printed
    assert "before-save\n" in printed, printed
    assert "['before-save', 'only-in-kid-0', 'before-save']" in printed, printed
    assert "[1, 2, 3]" in printed, printed
    ids = re.search(r"\[1, 2, 3\] \['([0-9a-f]{8})', '([0-9a-f]{8})', '([0-9a-f]{8})'\]", printed)
    assert ids and len(set(ids.groups())) == 3, printed


@pytest.mark.slow
def test_readme_background_domain_example_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("PVHVM_RUNTIME_DIR", str(tmp_path / "rt"))
    monkeypatch.setenv("PVHVM_LOG_DIR", str(tmp_path / "log"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(python_examples()[2], "README.md", "exec"), {})
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[('readme', '") and len(lines[0]) > 20, lines
    assert lines[1:] == ["204800", "--p---", "{'outcome': 'shutdown (reboot)', 'action': 'restart'}", "[]"], lines
