"""The layering of docs/architecture.md, checked on the source: the engine imports neither the
service nor Celery; nothing but the HTTP layer imports the HTTP layer, and nothing but the app
factory a route module; the rules (service.domain) import nothing of the HTTP layer, and no part
of service/ but the HTTP layer imports FastAPI or Starlette; the service imports nothing of the
workers and never torch; the schemas import neither side; only the engine imports torch;
nothing outside the sandboxed runner and the CLI's in-process audit imports the engine; the
engine's torch-free helpers (workers.shared) import neither the engine nor torch; and no
module-level import circle exists. Also: every problem type has one definition, the table of
schemas/problem.py, which docs/http-api.md lists; and no status of an audit or a shard changes
outside the lifecycle module (service.db.lifecycle).

Static: the imports are read with `ast` from every file (function-local imports included, but
where a rule reads the module level only), nothing is imported. The CLI starts the gateway by
name (importlib.import_module("service.api.server")), which is no import of a library. Only the
table of problem types is imported (schemas.problem, torch-free).
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from schemas.problem import LEGACY_SLUGS, PROBLEM_TYPES

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("service", "schemas", "workers")
HEAVY = ("torch", "torchvision", "deepinv")
# HEAVY and the libraries built on torch the engine uses: importing one imports torch.
TORCH_STACK = (*HEAVY, "onnx2torch", "safetensors.torch", "adv_lib", "pyautoattack")
ENGINE = "workers.engine"
SHARED = "workers.shared"  # the engine's torch-free helpers, for the engine and the rest alike
# The modules outside the engine that may import it, and why. The engine (torch, deepinv, the
# audited model) runs in the sandboxed runner, or in the user's own process when the CLI audits
# a model file; everything else (the gateway, the Celery worker, the report renderer) imports
# the torch-free helpers of workers.shared instead.
ENGINE_IMPORTERS = {
    "workers.sandbox.runner": "the sandboxed runner's entry: it runs the engine in bubblewrap "
    "(and counts the model's calls with workers.engine.liveness for its beat)",
    "workers.cli.main": "the CLI's in-process `tightrope audit`: the engine on a local model "
    "file, imported inside that command only",
}
# The modules outside the engine that may import TORCH_STACK themselves, and why: none. The
# runner and the CLI's audit reach torch through the engine (the runner's warm-up also imports
# it by name, workers.sandbox.runner.WARM_IMPORTS, which is no import statement).
TORCH_IMPORTERS: dict[str, str] = {}
# The one module that may import the route modules: it includes their routers in the app.
APP_FACTORY = "service.api.app"
# The rules of the API's resources and the domain errors they raise, outside the HTTP layer.
DOMAIN = "service.domain"
HTTP_FRAMEWORK = ("fastapi", "starlette", "uvicorn")
ROUTE_DECORATORS = frozenset(
    {"get", "post", "put", "patch", "delete", "head", "options", "trace", "api_route"}
)


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


def _routers(tree: ast.Module) -> set[str]:
    """The module-level names bound to an `APIRouter(...)`."""
    found: set[str] = set()
    for node in tree.body:
        value = node.value if isinstance(node, ast.Assign | ast.AnnAssign) else None
        if not isinstance(value, ast.Call):
            continue
        func = value.func
        name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
        if name == "APIRouter":
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            found.update(t.id for t in targets if isinstance(t, ast.Name))
    return found


def is_route_module(module: str) -> bool:
    """A module of the HTTP layer that defines an APIRouter with routes (`@router.get(...)`)."""
    if not _within(module, "service.api"):
        return False
    tree = ast.parse(SOURCES[module].read_text(encoding="utf-8"))
    routers = _routers(tree)
    return any(
        isinstance(decorator, ast.Call)
        and isinstance(decorator.func, ast.Attribute)
        and decorator.func.attr in ROUTE_DECORATORS
        and isinstance(decorator.func.value, ast.Name)
        and decorator.func.value.id in routers
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        for decorator in node.decorator_list
    )


ROUTE_MODULES = tuple(sorted(m for m in SOURCES if is_route_module(m)))


def test_the_sources_are_found() -> None:
    assert {"service.api.app", "workers.engine.audit", "schemas.reports"} <= SOURCES.keys()


def test_the_engine_imports_neither_the_service_nor_celery() -> None:
    engine = [m for m in SOURCES if _within(m, "workers.engine")]
    assert _violations(engine, ("service", "celery", "kombu")) == []


def test_only_the_http_layer_imports_the_http_layer() -> None:
    outside = [m for m in SOURCES if not _within(m, "service.api")]
    assert _violations(outside, ("service.api",)) == []


def test_the_route_modules_are_found() -> None:
    assert {
        "service.api.audit_routes",
        "service.api.model_routes",
        "service.api.dataset_routes",
        "service.api.console.routes",
    } <= set(ROUTE_MODULES)
    # the modules the routes and the console share are no route modules
    assert not {"service.domain.audit_rules", "service.api.deps", APP_FACTORY} & set(ROUTE_MODULES)


def test_only_the_app_factory_imports_a_route_module() -> None:
    """A route module speaks HTTP and is included by the app factory, never used as a library:
    what the routes and the console share lives in a module of its own (the rules of
    service.domain, service.api.deps, ...), so the console calls the same home as the API, not
    its routes."""
    others = [m for m in SOURCES if m != APP_FACTORY]
    assert _violations(others, ROUTE_MODULES) == []


def test_the_rules_import_nothing_of_the_http_layer() -> None:
    """The rules (service.domain: audit_rules, resource_rules, the errors they raise, page
    tokens) take a session and a tenant and raise domain errors; the API and the console render
    those. So they import neither the HTTP layer nor the web framework."""
    domain = [m for m in SOURCES if _within(m, DOMAIN)]
    assert {f"{DOMAIN}.audit_rules", f"{DOMAIN}.resource_rules", f"{DOMAIN}.errors"} <= set(domain)
    assert _violations(domain, ("service.api", *HTTP_FRAMEWORK)) == []


def test_only_the_http_layer_imports_the_web_framework() -> None:
    """The shared parts of service/ (db, domain, storage, queue, signing, reports, settings) are
    what the workers import: no FastAPI, no Starlette, no uvicorn."""
    shared = [m for m in SOURCES if _within(m, "service") and not _within(m, "service.api")]
    assert _violations(shared, HTTP_FRAMEWORK) == []


def test_the_service_imports_nothing_of_the_workers() -> None:
    """Imports point from the workers to the shared parts of service/, never back: what both
    sides need lives in service/ (or schemas/), what only the workers need in workers/ (such as
    the report.html renderer, which draws with workers.shared)."""
    service = [m for m in SOURCES if _within(m, "service")]
    assert _violations(service, ("workers",)) == []


def test_the_service_never_imports_torch() -> None:
    service = [m for m in SOURCES if _within(m, "service")]
    assert _violations(service, HEAVY) == []


def test_the_schemas_import_neither_side() -> None:
    schemas = [m for m in SOURCES if _within(m, "schemas")]
    assert _violations(schemas, ("service", "workers", *HEAVY)) == []


def test_only_the_engine_imports_torch() -> None:
    outside = [m for m in SOURCES if not _within(m, ENGINE) and m not in TORCH_IMPORTERS]
    assert _violations(outside, TORCH_STACK) == []


def test_only_the_sandboxed_runner_and_the_cli_audit_import_the_engine() -> None:
    outside = [m for m in SOURCES if not _within(m, ENGINE) and m not in ENGINE_IMPORTERS]
    assert _violations(outside, (ENGINE,)) == []


def test_every_allowed_importer_is_needed() -> None:
    """An allowance nobody uses any more goes: the lists say who imports, not who once did."""
    assert {m for m in ENGINE_IMPORTERS if _violations([m], (ENGINE,))} == ENGINE_IMPORTERS.keys()
    assert {m for m in TORCH_IMPORTERS if _violations([m], TORCH_STACK)} == TORCH_IMPORTERS.keys()


def test_the_engine_importers_load_torch_only_when_they_run_the_engine() -> None:
    """The CLI imports the engine inside its `audit` command (`tightrope serve` never loads
    torch); the runner, at module level, only the torch-free counter of model calls (the engine
    itself inside each job's function)."""
    assert sorted(
        name
        for module in ENGINE_IMPORTERS
        for name in imports(module, module_level=True)
        if _within(name, ENGINE)
    ) == ["workers.engine.liveness"]


def test_the_shared_helpers_import_neither_the_engine_nor_torch() -> None:
    shared = [m for m in SOURCES if _within(m, SHARED)]
    assert {f"{SHARED}.errors", f"{SHARED}.arrays", f"{SHARED}.panels"} <= set(shared)
    assert _violations(shared, (ENGINE, "service", "celery", *TORCH_STACK)) == []


def test_the_engine_imports_no_other_part_of_the_workers() -> None:
    """The engine's own modules, workers.shared and schemas only: it runs without the Celery
    side, the report renderer, the sandbox or the CLI."""
    engine = [m for m in SOURCES if _within(m, ENGINE)]
    others = ("workers.execution", "workers.reporting", "workers.sandbox", "workers.cli")
    assert _violations(engine, others) == []


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


# The table of problem types, and the string literals that equal a slug without naming a problem:
# (module, literal) -> how often it may appear there.
PROBLEM_TABLE = "schemas.problem"
SLUGS_THAT_ARE_NO_PROBLEM = {
    ("service.db.lifecycle", "busy"): 1,  # LeaseOutcome.BUSY
    ("workers.execution.audit_job", "busy"): 1,  # execute_audit's answer for a missing audit
    ("workers.sandbox.runner", "internal"): 1,  # the cause of the runner's error event
}


def _problem_spellings(module: str, source: str) -> tuple[list[str], Counter[str]]:
    """What in `source` spells a problem type outside the table: uses of PROBLEM_BASE and
    "/problems/" URIs (always wrong), and string literals equal to a slug (counted: a few are
    other words, SLUGS_THAT_ARE_NO_PROBLEM)."""
    slugs = PROBLEM_TYPES.keys() | LEGACY_SLUGS.keys()
    wrong: list[str] = []
    literals: Counter[str] = Counter()
    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", 0)
        if (isinstance(node, ast.Name) and node.id == "PROBLEM_BASE") or (
            isinstance(node, ast.alias) and node.name == "PROBLEM_BASE"
        ):
            wrong.append(f"{module}:{line}: PROBLEM_BASE (make the problem from its table entry)")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if "/problems/" in node.value:
                wrong.append(f"{module}:{line}: a problem URI {node.value!r}")
            elif node.value in slugs:
                literals[node.value] += 1
    return wrong, literals


def test_no_problem_type_is_spelled_outside_its_table() -> None:
    wrong: list[str] = []
    for module, path in SOURCES.items():
        if module == PROBLEM_TABLE:
            continue
        found, literals = _problem_spellings(module, path.read_text(encoding="utf-8"))
        wrong += found
        wrong += [
            f"{module}: {slug!r} spelled {count}× (use schemas.problem's entry)"
            for slug, count in sorted(literals.items())
            if count > SLUGS_THAT_ARE_NO_PROBLEM.get((module, slug), 0)
        ]
    assert wrong == []


def test_the_problem_spelling_finder_finds_spellings() -> None:
    source = (
        "from schemas.problem import PROBLEM_BASE\n"
        "a = {'type': PROBLEM_BASE + 'time-limit', 'status': 422}\n"
        "b = problem('model-not-ready', 'Model not ready', 422, 'gone')\n"
        "c = 'https://tightrope.dev/problems/internal'\n"
        "status, type, title = 409, 'conflict', 'Conflict'\n"
    )
    wrong, literals = _problem_spellings("planted", source)
    assert sorted(w.split(":")[1] for w in wrong) == ["1", "2", "4"]
    assert literals == {"time-limit": 1, "model-not-ready": 1, "conflict": 1}


def _documented_problem_types() -> list[tuple[str, str]]:
    """(status, slug) of every row of the tables under "## Problem types" in docs/http-api.md."""
    text = (ROOT / "docs" / "http-api.md").read_text(encoding="utf-8")
    section = text.split("\n## Problem types\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| (\d{3}|any) \| `([a-z-]+)` \|", section, flags=re.MULTILINE)


def test_the_documented_problem_types_are_the_table() -> None:
    rows = _documented_problem_types()
    assert {slug for _, slug in rows} == PROBLEM_TYPES.keys()
    # a slug listed in both tables (the gateway's and a failed audit's) has the one status
    for status, slug in rows:
        defined = PROBLEM_TYPES[slug].status
        assert status == ("any" if defined is None else str(defined)), (slug, status)


# The one module that writes an audit's or a shard's status (and the lease and progress columns
# that go with it), for the gateway and the workers alike (docs/architecture.md, "The lifecycle
# of an audit"). Migrations (alembic/) and tests write rows as they need.
LIFECYCLE = "service.db.lifecycle"
STATUS_ROWS = frozenset({"Audit", "AuditShard"})


def _names_a_status_row(node: ast.expr) -> bool:
    """`Audit`, `AuditShard` or `tables.Audit`..., `Audit.__table__`."""
    while isinstance(node, ast.Attribute) and node.attr == "__table__":
        node = node.value
    name = node.id if isinstance(node, ast.Name) else getattr(node, "attr", None)
    return name in STATUS_ROWS


def _status_writes(module: str, source: str) -> list[str]:
    """What in `source` changes an audit's or a shard's row outside the lifecycle module:
    `update(Audit...)`/`insert(AuditShard...)` (any UPDATE or INSERT of those tables), a new
    `Audit(...)`/`AuditShard(...)` given a status, and an assignment to `x.status` (of any
    object but `self`: a class's own field, such as an exception's, is no row)."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            if name in ("update", "insert") and node.args and _names_a_status_row(node.args[0]):
                found.append(f"{module}:{line}: {name}({ast.unparse(node.args[0])})")
            elif name in STATUS_ROWS and any(k.arg == "status" for k in node.keywords):
                found.append(f"{module}:{line}: {name}(status=...)")
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        while targets:
            target = targets.pop()
            if isinstance(target, ast.Tuple | ast.List):
                targets.extend(target.elts)
            elif (
                isinstance(target, ast.Attribute)
                and target.attr == "status"
                and not (isinstance(target.value, ast.Name) and target.value.id == "self")
            ):
                found.append(f"{module}:{line}: {ast.unparse(target)} = ...")
    return found


def test_no_status_changes_outside_the_lifecycle_module() -> None:
    assert LIFECYCLE in SOURCES
    wrong = [
        found
        for module, path in SOURCES.items()
        if module != LIFECYCLE and not _within(module, "schemas")
        for found in _status_writes(module, path.read_text(encoding="utf-8"))
    ]
    assert wrong == []


def test_the_lifecycle_module_writes_the_statuses() -> None:
    """The finder sees the lifecycle's own writes: the rule above is not vacuous."""
    found = _status_writes(LIFECYCLE, SOURCES[LIFECYCLE].read_text(encoding="utf-8"))
    assert any("update(Audit)" in f for f in found)
    assert any("update(AuditShard)" in f for f in found)
    assert any("AuditShard(status=...)" in f for f in found)
    assert any("Audit(status=...)" in f for f in found)


def test_the_status_write_finder_finds_writes() -> None:
    source = (
        "from sqlalchemy import insert, update\n"
        "from service.db import tables\n"
        "session.execute(update(Audit).where(Audit.id == a).values(status='failed'))\n"
        "session.execute(update(tables.AuditShard).values(lease_owner=None))\n"
        "session.execute(insert(AuditShard.__table__), rows)\n"
        "session.add(AuditShard(audit_id=a, shard_id=s, status='done'))\n"
        "shard.status, shard.result = 'done', result\n"
        "audit.status = 'cancelled'\n"
        "self.status = 404\n"  # an object's own field, no row
        "session.add(AuditShard(audit_id=a, shard_id=s))\n"  # no status given
        "session.execute(update(Model).values(status='ready'))\n"  # another table
    )
    found = _status_writes("planted", source)
    assert sorted(int(f.split(":")[1]) for f in found) == [3, 4, 5, 6, 7, 8]
