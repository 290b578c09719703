"""Rules of the code's shape, read from the source with ``ast`` (nothing is imported).

The import graph spans ``izitorch/`` and ``plugins/`` (installed as ``izitorch.plugins``). Every
``import`` and ``from ... import`` counts, at module level and inside functions alike, since a
lazy import only postpones a cycle; imports under ``if TYPE_CHECKING:`` never run and do not
count. ``from package import name`` is an edge to the submodule ``package.name`` when there is
one, else to the package itself (its ``__init__``).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"izitorch": ROOT / "izitorch", "izitorch.plugins": ROOT / "plugins"}


def _modules() -> dict[str, Path]:
    """Every module of the two packages and their subpackages by its dotted name; a package
    (an ``__init__.py``) by the package's name."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that can run, at any depth, skipping ``if TYPE_CHECKING:`` bodies."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _imported(name: str, path: Path, node: ast.Import | ast.ImportFrom, modules: dict[str, Path]) -> set[str]:
    """The modules of ``modules`` that one import statement of module ``name`` loads."""
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: from the package holding this module
            package = name if path.stem == "__init__" else name.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}" if base else package
        targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
    edges = set()
    for target in targets:
        while target and target not in modules:  # `import izitorch.x.y` where only izitorch.x is ours
            target = target.rpartition(".")[0]
        if target:
            edges.add(target)
    return edges


def import_graph() -> dict[str, set[str]]:
    """``{module: the modules of izitorch it imports}`` over izitorch/ and plugins/."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        graph[name] = set().union(*(_imported(name, path, node, modules) for node in _import_nodes(tree))) - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_import_graph_helpers_find_a_cycle_and_its_edges():
    """The checker itself: a known cycle is found, a chain is not, and the real graph has edges
    it must have (so an empty graph cannot pass the rules below)."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    graph = import_graph()
    assert "izitorch.hookspecs" in graph["izitorch.pluginmanager"]
    assert "izitorch.loop" in graph["izitorch.pluginmanager"]  # a lazy import counts
    assert "izitorch.hookspecs" in graph["izitorch.plugins.console"]
    assert "izitorch.config" not in graph["izitorch.hookspecs"]  # under TYPE_CHECKING: does not run
    assert set(_modules()) >= {"izitorch", "izitorch.loop", "izitorch.plugins", "izitorch.plugins.kfold"}


def test_no_module_of_izitorch_is_part_of_an_import_cycle():
    assert cycles(import_graph()) == []


def test_hookimpl_is_defined_beside_the_hook_specs_and_reexported():
    """Third-party plugins write ``from izitorch import hookimpl`` (or the pluginmanager's, as
    older ones do): both are the one marker of izitorch.hookspecs, which built-ins import."""
    import izitorch
    from izitorch import hookspecs, pluginmanager

    assert izitorch.hookimpl is hookspecs.hookimpl
    assert pluginmanager.hookimpl is hookspecs.hookimpl
    assert hookspecs.hookimpl.project_name == hookspecs.hookspec.project_name == "izitorch"


def test_the_core_imports_no_builtin_plugin():
    """izitorch/ reaches the built-in plugins only through entry points, by name, like any
    third party's: none of its modules imports ``izitorch.plugins`` or one of its modules."""
    core = {name: edges for name, edges in import_graph().items() if not name.startswith("izitorch.plugins")}
    reaching = {name: sorted(e for e in edges if e == "izitorch.plugins" or e.startswith("izitorch.plugins.")) for name, edges in core.items()}
    assert {name: edges for name, edges in reaching.items() if edges} == {}
