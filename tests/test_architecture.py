"""The package is layered along the flow (docs/architecture.md): config -> models -> data ->
generation -> judges -> attacks -> prepare stages -> training -> evaluation -> recipes -> entry
points. A module imports only its own layer's modules or lower layers', and the import graph has
no cycle. Built from the source with ``ast`` (every import, also those inside functions), so a
lazy import that points upward counts like any other."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "alignkit"

# lowest first; a module belongs to the first layer with a matching prefix
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("alignkit.core", "alignkit.metrics", "alignkit.losses")),
    ("world", ("alignkit.world",)),
    ("config", ("alignkit.config",)),
    ("models", ("alignkit.models",)),
    ("data", ("alignkit.data",)),
    ("generation", ("alignkit.generation",)),
    ("judges", ("alignkit.judges",)),
    ("attacks", ("alignkit.attacks",)),
    ("stages", ("alignkit.stages",)),
    ("training", ("alignkit.training",)),
    ("evaluation", ("alignkit.evaluation",)),
    ("recipes", ("alignkit.recipes",)),
    ("entry", ("alignkit.demo", "alignkit.cli", "alignkit.__main__")),
]


def modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                # `from pkg import submodule` imports the submodule
                targets |= {f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod for a in node.names}
        edges = set()
        for t in targets:
            if not t.startswith("alignkit"):
                continue
            while t not in mods and "." in t:
                t = t.rpartition(".")[0]
            if t != name:
                edges.add(t)
        graph[name] = edges
    return graph


def layer_of(module: str) -> int:
    if module == "alignkit":  # the package's __init__: version and nothing else
        return len(LAYERS) - 1
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and to docs/architecture.md)")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    for m in modules():
        layer_of(m)


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_import_points_up_the_layers():
    graph = import_graph()
    up = sorted(f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
                for a, bs in graph.items() for b in bs if layer_of(b) > layer_of(a))
    assert not up, f"{len(up)} imports point up the layers:\n" + "\n".join(up)


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    """The graph must not miss an import inside a function or a relative one."""
    src = "def f():\n    from alignkit.recipes import get_recipe\n    from . import schemas\n"
    tree = ast.parse(src)
    kinds = {type(n).__name__ for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)}
    assert kinds == {"ImportFrom"}
    g = import_graph()
    assert all(isinstance(v, set) for v in g.values()) and "alignkit.cli" in g
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
