"""node/ is in rooms with one direction of dependency, and the client stays out of it.

Every import counts, at module level or inside a function, except those under
``if TYPE_CHECKING:`` (annotations only, never executed).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NODE = ROOT / "node"
# Lower layers never import higher ones. A room may import any room to its left.
LAYERS = ["core", "kinds", "bridge", "p2p", "files", "tasks", "api", "daemon", "cli"]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["teammesh", *parts])


def _imports(path: Path, name: str) -> set[str]:
    """Every teammesh.node module this file imports, resolved to its module name."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join([*up, *([base] if base else [])])
                found.add(base)
                found.update(f"{base}.{a.name}" for a in child.names)
            visit(child)

    visit(tree)
    return {m for m in found if m.startswith("teammesh.node")}


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in NODE.rglob("*.py")}
    return {name: {m for m in _imports(path, name) if m in files and m != name}
            for name, path in files.items()}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 else "node"


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(v: str) -> list[str] | None:
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return [*stack[stack.index(w):], w]
            if w not in state and (found := walk(w)) is not None:
                return found
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state and (found := walk(v)) is not None:
            return found
    return None


def test_the_graph_sees_imports_inside_functions_and_skips_type_checking(tmp_path: Path) -> None:
    # the checker itself: a lazy import counts, an annotation-only one does not
    src = tmp_path / "m.py"
    src.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                   "    from teammesh.node.daemon import Node\n"
                   "def f():\n    from teammesh.node.p2p.host import MeshHost\n")
    assert _imports(src, "teammesh.node.x") == {"teammesh.node.p2p.host",
                                                 "teammesh.node.p2p.host.MeshHost"}
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_module_of_node_imports_itself_round_a_circle() -> None:
    graph = _graph()
    assert len(graph) > 40  # the walk found the rooms
    assert _cycle(graph) is None


def test_rooms_depend_one_way() -> None:
    rank = {room: i for i, room in enumerate(LAYERS)}
    wrong = []
    for module, targets in _graph().items():
        src = _room(module)
        if src == "node":  # the package docstring
            continue
        assert src in rank, f"{module}: a room the layering does not know; add it to LAYERS"
        for target in targets:
            dst = _room(target)
            if dst != src and rank[dst] > rank[src]:
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_the_client_imports_nothing_of_the_daemon_and_installs_no_import_hook() -> None:
    probe = ("import json, sys, teammesh.client\n"
             "print(json.dumps({'node': sorted(m for m in sys.modules"
             " if m.startswith(('teammesh.node', 'libp2p'))),"
             " 'finders': [type(f).__name__ for f in sys.meta_path]}))")
    out = json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True,
                                    text=True, check=True).stdout)
    assert out["node"] == []
    assert not any("Lean" in f or "lean" in f for f in out["finders"])
