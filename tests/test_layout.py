"""The rooms and which way imports go (README, Layout): read from the source, not trusted."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = {"core", "data", "model", "kernels", "run", "launcher", "export", "research"}
# package -> our packages it may import (besides itself)
MAY_IMPORT = {
    "core": set(),
    "kernels": {"core"},
    "data": {"core"},
    "model": {"core", "kernels"},
    "run": {"core", "data", "model", "kernels"},
    "launcher": {"core", "data", "model", "kernels", "run"},
    "export": {"core", "data", "model", "kernels", "run"},
    "research": {"core", "data", "model", "kernels", "run", "export"},
}
# the documented commands that live with another concern: a thin entry each
THIN_ENTRIES = {
    "launcher/export_hf.py",
    "launcher/generate.py",
    "launcher/conditioning.py",
    "launcher/experiment.py",
    "launcher/gguf.py",
}


def imports(path: Path) -> set[str]:
    """Top-level names of every module `path` imports (at any depth in the file)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_each_package_imports_only_the_rooms_below_it(package):
    for path in sorted((ROOT / package).rglob("*.py")):
        if str(path.relative_to(ROOT)) in THIN_ENTRIES:
            continue
        wrong = (imports(path) & OURS) - MAY_IMPORT[package] - {package}
        assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}"


def test_model_and_kernels_never_import_deepspeed():
    for package in ("model", "kernels"):
        for path in (ROOT / package).rglob("*.py"):
            assert "deepspeed" not in imports(path), path


def test_thin_entries_only_hand_over():
    for name in THIN_ENTRIES:
        assert imports(ROOT / name) & OURS <= {"core", "export", "research"}, name
        assert len((ROOT / name).read_text().splitlines()) <= 12, name
