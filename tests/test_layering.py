"""Imports go one way: experiments, then the library (``mhc_jax``), then the kernel
package (``pallas_kernels``), which carries its own reference math."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# package -> top-level packages it must not import
FORBIDDEN = {"pallas_kernels": {"mhc_jax", "experiments"}, "mhc_jax": {"experiments"}}


def _imported_packages(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.smoke
@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_lower_layers(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    wrong = {
        str(f.relative_to(ROOT)): sorted(_imported_packages(f) & FORBIDDEN[package]) for f in files
    }
    assert {f: names for f, names in wrong.items() if names} == {}


def _edits_sys_path(path: pathlib.Path) -> bool:
    """Whether the file calls a method of ``sys.path`` or assigns to it."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        target = None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            target = node.func.value
        if isinstance(node, ast.Assign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            target = next((t for t in targets if isinstance(t, ast.Attribute)), None)
        if (
            isinstance(target, ast.Attribute)
            and target.attr == "path"
            and isinstance(target.value, ast.Name)
            and target.value.id == "sys"
        ):
            return True
    return False


@pytest.mark.smoke
def test_nothing_imports_through_sys_path():
    """Library, experiments, notebooks and tests import installed packages (and scripts
    under test by their path), never by editing ``sys.path``."""
    dirs = ("mhc_jax", "pallas_kernels", "experiments", "notebooks", "tests", "tools")
    files = sorted(f for d in dirs for f in (ROOT / d).rglob("*.py"))
    assert files
    assert [str(f.relative_to(ROOT)) for f in files if _edits_sys_path(f)] == []
