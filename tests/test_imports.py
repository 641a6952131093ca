"""The layers point one way, and no module imports itself back through others.

Every import in app/ and workers/ counts, at module level or inside a function (a lazy
import hides a cycle; it does not remove it), except those under `if TYPE_CHECKING:`,
which Python never runs. The layers, lowest first:

- app.core: below everything; imports nothing else of the project;
- the domain packages, on core: app.storage, then app.webhooks, then app.images (which
  tells webhooks a task ended); app.proxy stands apart from those three;
- app.dashboard, on the domain packages;
- app.http (the app factory), on all of the above;
- the entry points: app.cli, and the workers (which run the domain on their own: they may not
  import app.http or app.dashboard).

Imports made by name (a transport registered with kombu, a Celery app loaded by `-A`) are
listed in STRING_IMPORTS and count as imports too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# (layer, the packages in it); a module may import its own layer's and lower layers' modules.
LAYERS = [
    ("core", ("app.core",)),
    ("storage", ("app.storage",)),
    ("webhooks", ("app.webhooks",)),
    ("images", ("app.images",)),
    ("proxy", ("app.proxy",)),
    ("dashboard", ("app.dashboard",)),
    ("http", ("app.http",)),
    ("entry", ("app.cli", "workers", "app")),
]
# Side by side, not one on the other: neither imports the other.
APART = {("proxy", "storage"), ("proxy", "webhooks"), ("proxy", "images"), ("workers", "http"),
         ("workers", "dashboard")}
# Imports by name, not by an import statement: (the module naming it, the module it names).
STRING_IMPORTS = {("app.core.broker", "app.core.embedded_broker")}


def modules() -> dict[str, Path]:
    found = {}
    for path in [*ROOT.glob("app/**/*.py"), *ROOT.glob("workers/**/*.py")]:
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def _type_checking(test: ast.expr) -> bool:
    """`TYPE_CHECKING` or `typing.TYPE_CHECKING` alone: a block Python never runs."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node but those under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _type_checking(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def imports(known: dict[str, Path]) -> dict[str, set[str]]:
    """The project modules each module imports."""

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        targets = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = (f"{base}.{node.module}" if node.module else base) if node.level else node.module or ""
                targets.add(module)
                targets.update(f"{module}.{alias.name}" for alias in node.names)
        targets.update(target for source, target in STRING_IMPORTS if source == name)
        graph[name] = {found for t in targets if (found := resolve(t)) and found != name and not
                       (name.startswith(found + ".") and known[found].name == "__init__.py")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
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
            visit(node)
    return found


def layer_of(module: str) -> int:
    """A module's layer (`app` itself is the package's __init__: only that one, exactly)."""
    for position, (_, packages) in enumerate(LAYERS):
        if any(module == package or (package != "app" and module.startswith(package + ".")) for package in packages):
            return position
    raise AssertionError(f"{module} is in no layer: add its package to LAYERS")


def test_no_import_cycles():
    assert cycles(imports(modules())) == []


def test_layers_point_one_way():
    graph = imports(modules())
    wrong = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            here, there = layer_of(module), layer_of(target)
            pair = ("workers" if module.startswith("workers") else LAYERS[here][0], LAYERS[there][0])
            if there > here or pair in APART or pair[::-1] in APART:
                wrong.append(f"{module} ({pair[0]}) imports {target} ({pair[1]})")
    assert wrong == []


def test_the_check_finds_a_cycle_and_a_layer_turned_round():
    # The checks above would pass on an empty graph too: show they see what they look for.
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer_of("app.core.money") < layer_of("app.proxy.forward") < layer_of("app.http.app")
    graph = imports(modules())
    assert "app.core.models" in graph["app.core.ledger"]  # imports are read at all
    assert "app.proxy.services" not in graph["app.core.services"]  # TYPE_CHECKING imports are not
    assert "app.core.embedded_broker" in graph["app.core.broker"]  # nor are imports by name missed
    # Every module is in a layer (a new package must be placed, not fall into the top one).
    assert all(layer_of(module) >= 0 for module in graph)


def test_relative_imports_and_type_checking_are_read_right(tmp_path, monkeypatch):
    package = tmp_path / "app" / "pkg"
    package.mkdir(parents=True)
    (tmp_path / "app" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from . import b\nif not TYPE_CHECKING:\n    from app.pkg import c\n")
    (package / "b.py").write_text("from .a import x\n")
    (package / "c.py").write_text("")
    monkeypatch.setattr("tests.test_imports.ROOT", tmp_path)
    graph = imports(modules())
    assert graph["app.pkg.a"] >= {"app.pkg.b", "app.pkg.c"} and "app.pkg.a" in graph["app.pkg.b"]
    assert cycles(graph) == [["app.pkg.a", "app.pkg.b"]]
