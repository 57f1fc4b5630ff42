"""Imports run one way (docs/architecture.md): every import statement of the package, lazy
ones inside functions included, read from the source, against the floor of its room."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fastmoco"

# room -> the fastmoco rooms it may import (errors.py is everyone's; its own room is allowed)
MAY_IMPORT = {
    "kernels": set(),
    "ops": {"kernels", "_C"},
    "data": set(),
    "config": set(),
    "config_io": {"config"},
    "models": {"ops"},
    "engine": {"config", "config_io", "data", "models", "ops"},
    "eval": {"config", "config_io", "data", "models", "ops", "engine"},
    "experiments": {"config", "config_io", "data", "models", "ops", "engine", "eval"},
}


def _room(path: Path) -> str:
    rel = path.relative_to(ROOT)
    if rel.parts[0] == "kernels":
        return "kernels"
    return rel.parts[1].removesuffix(".py")


def _imported_rooms(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """(line, fastmoco room) of every import of the package in the file (or in `source`,
    read as that file's)."""
    tree = ast.parse(path.read_text() if source is None else source)
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level and _room(path) == "kernels":
            continue  # kernels/ imports only itself relatively
        for name in names:
            parts = name.split(".")
            if parts[0] == "fastmoco" and len(parts) > 1:
                found.append((node.lineno, parts[1]))
            if parts[0] in ("fastmoco", "kernels") and _room(path) == "kernels":
                found.append((node.lineno, "fastmoco"))
    return found


FILES = sorted(
    [p for p in PACKAGE.rglob("*.py") if _room(p) in MAY_IMPORT]
    + list((ROOT / "kernels").glob("*.py"))
)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_one_way(path):
    room = _room(path)
    allowed = MAY_IMPORT[room] | {room, "errors", "__init__"}
    wrong = [(line, r) for line, r in _imported_rooms(path) if r not in allowed]
    assert not wrong, f"{path.relative_to(ROOT)} ({room}) imports up: {wrong}"


def test_the_check_sees_an_upward_import():
    """The rule fails a file that imports a higher room, even lazily (not a test that
    cannot fail)."""
    source = "def f():\n    from fastmoco.engine import trainer\n"
    assert (2, "engine") in _imported_rooms(PACKAGE / "ops" / "probe.py", source)
