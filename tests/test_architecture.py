"""The packages' layout, as ARCHITECTURE.md states it: small modules, small simulator functions, and
imports that go one way (``wafer`` may read ``minigpt``'s models and configs; ``minigpt`` never
imports ``wafer``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted((ROOT / "minigpt").rglob("*.py")) + sorted((ROOT / "wafer").rglob("*.py"))
# The wafer modules that import minigpt: the one adapter (shape), the explorers' model lists, and the
# table of published points. (The emulator runs a minigpt model through its config and weights.)
READS_MINIGPT = {"shape.py", "widgets.py", "calibration.py"}


def imported(path: Path) -> set[str]:
    """Top-level package names that ``path`` imports, anywhere in the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_module_is_at_most_500_lines(path):
    lines = len(path.read_text().splitlines())
    assert lines <= 500, f"{path.parent.name}/{path.name} has {lines} lines: split it by idea"


def test_mesh_functions_are_at_most_60_lines_and_nothing_is_nonlocal():
    tree = ast.parse((ROOT / "wafer" / "mesh.py").read_text())
    long = [(f.name, f.end_lineno - f.lineno + 1) for f in ast.walk(tree)
            if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and f.end_lineno - f.lineno + 1 > 60]
    assert long == []
    for path in sorted((ROOT / "wafer").glob("*.py")):
        assert not any(isinstance(n, ast.Nonlocal) for n in ast.walk(ast.parse(path.read_text()))), path.name


def test_imports_go_one_way():
    for path in sorted((ROOT / "minigpt").rglob("*.py")):
        assert "wafer" not in imported(path), f"minigpt/{path.relative_to(ROOT / 'minigpt')} imports wafer"
    readers = {p.name for p in sorted((ROOT / "wafer").glob("*.py")) if "minigpt" in imported(p)}
    assert readers <= READS_MINIGPT, f"wafer modules that import minigpt: {sorted(readers)}"


def test_the_checks_can_fail(tmp_path):
    """The import check sees an import inside a function, as a lazy import would be written."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from wafer.hardware import WSE2\n    import minigpt.model\n")
    assert imported(f) == {"wafer", "minigpt"}


def test_the_api_reference_lists_every_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("site_script", ROOT / "scripts" / "site.py")
    site = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(site)
    for package, listed in site.MODULES.items():
        # a subpackage's modules by dotted name (``parallel.zero``), the subpackage by its own name
        modules = {".".join(p.relative_to(ROOT / package).with_suffix("").parts).removesuffix(".__init__")
                   for p in (ROOT / package).rglob("*.py")} - {"__init__", "__main__"}
        assert sorted(listed) == sorted(modules), package
