"""The import graph of `ortho_train/` is layered: no cycle between its subpackages and top-level
modules, and nothing below the measurement layer imports it.

Every `import` / `from … import` is parsed with `ast` (those inside functions too: an import
moved into a function to dodge a cycle is still an arrow of the graph). A node is a first-level
name under `ortho_train` (`sieve`, `privacy`, `models`, …; the package's own `__init__` is
`ortho_train`); an arrow A → B says some file of A imports something of B.
"""
import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "ortho_train"
MEASUREMENT = "measurement"
# what may sit above the measurement layer: the LightningModules and the report read its tables'
# files, never its code; none of them imports it today
ABOVE_MEASUREMENT: frozenset[str] = frozenset()


def _node(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return "ortho_train" if parts == ("__init__",) else parts[0]


def _imported(path: Path, tree: ast.AST) -> set[str]:
    """Dotted names of the `ortho_train` modules a file imports (relative imports resolved)."""
    package = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if package[-1] == "__init__" or path.name != "__init__.py":
        package = package[:-1]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    return {n for n in names if n == "ortho_train" or n.startswith("ortho_train.")}


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for path in sorted(ROOT.rglob("*.py")):
        source = _node(path)
        for name in _imported(path, ast.parse(path.read_text(), str(path))):
            parts = name.split(".")
            target = parts[1] if len(parts) > 1 else "ortho_train"
            if (ROOT / target).is_dir() or (ROOT / f"{target}.py").is_file() or target == "ortho_train":
                if target != source:
                    graph[source].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, …, a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_no_cycle_between_subpackages():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " → ".join(cycle)


def test_nothing_below_the_measurement_layer_imports_it():
    graph = import_graph()
    assert MEASUREMENT in graph, "ortho_train/measurement/ should import the maths it measures"
    importers = sorted(src for src, targets in graph.items() if MEASUREMENT in targets and src not in ABOVE_MEASUREMENT)
    assert not importers, f"imported from below the measurement layer by: {importers}"


def test_the_checks_catch_a_cycle_and_an_upward_import():
    assert find_cycle({"sieve": {"privacy"}, "privacy": {"sieve"}}) == ["privacy", "sieve", "privacy"]
    assert find_cycle({"a": {"b"}, "b": {"c"}}) is None
    tree = ast.parse("def f():\n    from ortho_train.measurement.kill_switch import TableConfig\n")
    assert "ortho_train.measurement.kill_switch" in _imported(ROOT / "sieve" / "support.py", tree)
    relative = ast.parse("from ..measurement import kill_switch\n")
    assert "ortho_train.measurement.kill_switch" in _imported(ROOT / "sieve" / "support.py", relative)


@pytest.mark.parametrize("package", ["ortho_kernels", "ortho_callbacks"])
def test_benchmarks_live_outside_the_library(package):
    folder = {"ortho_kernels": "kernels/ortho_kernels", "ortho_callbacks": "callbacks/ortho_callbacks"}[package]
    library = [ROOT, ROOT.parent / folder]
    found = [str(p) for d in library for p in d.rglob("*.py") if "bench" in p.name]
    assert not found, f"benchmark modules inside library packages (move them to benchmarks/): {found}"
