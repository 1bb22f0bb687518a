"""The layering as a test: the launcher decides, the library executes, the kernels sit at the bottom.

import-linter's graph (grimp) walks a package's own folder, so it cannot see `launcher/` and `kernels/`, which
pyproject maps into the `longctx` namespace from beside it; this reads the same graph from the sources. Every
import counts, at module level or inside a function: a lazy import is still a dependency.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"longctx": ROOT / "longctx", "longctx.kernels": ROOT / "kernels", "longctx.launcher": ROOT / "launcher"}


def module_files() -> dict[str, Path]:
    files = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            files[".".join([package, *parts])] = path
    return files


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (`from a import b` is an import of a.b when that is a module)."""
    files = module_files()
    graph = {}
    for name, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                subs = {f"{node.module}.{alias.name}" for alias in node.names} & files.keys()
                targets |= subs or {node.module}
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


GRAPH = import_graph()


def layer(module: str) -> str:
    return next((p for p in ("longctx.launcher", "longctx.kernels") if module.startswith(p)), "longctx")


def test_the_graph_is_read():
    assert {"longctx.train", "longctx.launcher.run", "longctx.kernels.flash_attn"} <= GRAPH.keys()
    assert "longctx.train" in GRAPH["longctx.launcher.run"]


@pytest.mark.parametrize("lower, higher", [("longctx", "longctx.launcher"), ("longctx.kernels", "longctx.launcher"),
                                           ("longctx.kernels", "longctx")])
def test_no_layer_imports_a_layer_above_it(lower, higher):
    upward = sorted(f"{m} -> {t}" for m, targets in GRAPH.items() if layer(m) == lower
                    for t in targets if layer(t) == higher)
    assert not upward, f"{lower} imports {higher}: {upward}"


def test_no_import_cycles():
    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            if node == goal:
                return True
            if node not in seen:
                seen.add(node)
                todo.extend(GRAPH[node])
        return False

    cycles = sorted(f"{m} -> {t}" for m, targets in GRAPH.items() for t in targets if reaches(t, m))
    assert not cycles, f"imports that close a cycle: {cycles}"
