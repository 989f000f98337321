"""The layering of docs/architecture.md, checked on the source: the engine imports neither the
service nor Celery; nothing but the HTTP layer imports the HTTP layer; the service never imports
torch; the schemas import neither side; and no module-level import circle exists.

Static: the imports are read with `ast` from every file (function-local imports included, for
the first four rules), nothing is imported. The CLI starts the gateway by name
(importlib.import_module("service.api.server")), which is no import of a library.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("service", "schemas", "workers")
HEAVY = ("torch", "torchvision", "deepinv")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    return {
        _module_name(path): path
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
    }


SOURCES = _sources()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _statements(body: list[ast.stmt], module_level: bool) -> Iterator[ast.stmt]:
    """Every statement; with `module_level`, only those that run when the module is imported
    (not function bodies, not `if TYPE_CHECKING:` blocks)."""
    for node in body:
        yield node
        if module_level and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        if module_level and isinstance(node, ast.If) and _is_type_checking(node):
            yield from _statements(node.orelse, module_level)
            continue
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            children = getattr(node, field, None)
            if isinstance(children, list):
                nested = [c for c in children if isinstance(c, ast.stmt)]
                for child in children:
                    if isinstance(child, ast.ExceptHandler | ast.match_case):
                        nested.extend(child.body)
                yield from _statements(nested, module_level)


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    is_package = SOURCES[module].name == "__init__.py"
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imports(module: str, module_level: bool = False) -> set[str]:
    """The dotted names `module` imports; `from a import b` gives a.b when that is a module (the
    common `from package import submodule` inside a package is no circle), else a."""
    tree = ast.parse(SOURCES[module].read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in _statements(tree.body, module_level):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            submodules = {f"{target}.{alias.name}" for alias in node.names} & SOURCES.keys()
            found.update(submodules)
            if len(submodules) < len(node.names):  # some names are the package's own
                found.add(target)
    return found


def _within(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def _violations(sources: list[str], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(
        f"{module} imports {name}"
        for module in sources
        for name in imports(module)
        if _within(name, *forbidden)
    )


def test_the_sources_are_found() -> None:
    assert {"service.api.app", "workers.engine.audit", "schemas.reports"} <= SOURCES.keys()


def test_the_engine_imports_neither_the_service_nor_celery() -> None:
    engine = [m for m in SOURCES if _within(m, "workers.engine")]
    assert _violations(engine, ("service", "celery", "kombu")) == []


def test_only_the_http_layer_imports_the_http_layer() -> None:
    outside = [m for m in SOURCES if not _within(m, "service.api")]
    assert _violations(outside, ("service.api",)) == []


def test_the_service_never_imports_torch() -> None:
    service = [m for m in SOURCES if _within(m, "service")]
    assert _violations(service, HEAVY) == []


def test_the_schemas_import_neither_side() -> None:
    schemas = [m for m in SOURCES if _within(m, "schemas")]
    assert _violations(schemas, ("service", "workers", *HEAVY)) == []


def _graph() -> dict[str, set[str]]:
    """Module-level imports between the project's own modules."""
    graph: dict[str, set[str]] = {}
    for module in SOURCES:
        targets = set()
        for name in imports(module, module_level=True):
            # the most specific project module the name denotes (a.b.c, else a.b, ...)
            parts = name.split(".")
            while parts and ".".join(parts) not in SOURCES:
                parts.pop()
            if parts and ".".join(parts) != module:
                targets.add(".".join(parts))
        graph[module] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def test_no_import_circles() -> None:
    assert _cycles(_graph()) == []


def test_the_circle_finder_finds_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
