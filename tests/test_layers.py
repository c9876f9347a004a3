"""kdface's import graph is one-way: no module reaches back, directly or through others, into a
module that imports it (issue 22). Function-level (lazy) imports count: a lazy import only hides
a circle from Python's import machinery, not from a reader.

The graph is read from the source with ``ast`` (nothing is imported), one node per module file;
``from kdface.pkg import name`` is an edge to ``kdface.pkg.name`` where that is a module, else to
the package's ``__init__``.
"""
import ast
import pathlib

import kdface

ROOT = pathlib.Path(kdface.__file__).parent


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                    + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                           for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:  # kdface.x.attr -> kdface.x
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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


def _is_package_edge(a: str, b: str) -> bool:
    """A package's ``__init__`` importing its own submodules (re-exports) is not a circle of
    logic; the submodule importing the package back is what the cycle test looks for."""
    return b.startswith(a + ".")


def test_the_graph_reader_sees_known_edges():
    graph = import_graph()
    assert "kdface.training._config" in graph["kdface.training._loop"]
    assert "kdface.distill._terms" in graph["kdface.distill._recipes"]
    # ... and a planted circle is found.
    planted = {k: set(v) for k, v in graph.items()}
    planted["kdface.training._config"].add("kdface.training._loop")
    assert any("kdface.training._config" in c for c in _cycles(planted))


def test_no_module_imports_back_into_an_importer():
    graph = import_graph()
    no_init = {a: {b for b in bs if not _is_package_edge(a, b)} for a, bs in graph.items()}
    assert _cycles(no_init) == []


def test_the_recipe_layer_does_not_know_the_trainer():
    graph = import_graph()
    for name, targets in graph.items():
        if name.startswith(("kdface.distill", "kdface.losses", "kdface.models")):
            up = sorted(t for t in targets if t.startswith("kdface.training"))
            assert not up, f"{name} imports {up}"
