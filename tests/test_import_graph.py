"""The package's import graph: no import circle, and no two folders (or top-level modules) importing each other
both ways, counting every `import` of a lifecycle module, at module level or inside a function."""

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1] / "src" / "lifecycle"


def import_graph() -> nx.DiGraph:
    modules = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = nx.DiGraph()
    for name, path in modules.items():
        graph.add_node(name)
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(package[:len(package) - node.level + 1] + [node.module or ""]).strip(".") \
                    if node.level else node.module
                targets = [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph.add_edge(name, target)
    return graph


def unit(module: str) -> str:
    """A module's folder under lifecycle/ (or the top-level module itself)."""
    return module.split(".")[1] if "." in module else module


def test_the_graph_is_read():
    graph = import_graph()
    assert graph.has_edge("lifecycle.config", "lifecycle.errors")
    assert graph.has_edge("lifecycle.stages.vader", "lifecycle.stages.runner")


def test_no_import_circle():
    circles = [sorted(c) for c in nx.strongly_connected_components(import_graph()) if len(c) > 1]
    assert circles == []


def test_no_two_folders_import_each_other():
    graph = import_graph()
    pairs = {(unit(a), unit(b)) for a, b in graph.edges if "lifecycle" not in (unit(a), unit(b))}
    assert sorted({tuple(sorted(p)) for p in pairs if p[::-1] in pairs and p[0] != p[1]}) == []
