"""Fixtures shared by the test packages."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Before torch is loaded (libgomp reads it once): idle OpenMP threads sleep instead of spinning.
# The suite runs torch in its own process, in workers' runners and in CLI processes at once on
# two cores; spinning threads then starve the ones with work (docs/benchmarks.md, "Idle OpenMP
# threads"). Processes the tests start inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from tests.fixtures.databases import postgres_database  # noqa: E402
from tests.service.reports.chromium import chromium_binary  # noqa: E402


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The same test on both databases: a SQLite file, and a throw-away PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'data' / 'tightrope.db'}"
    else:
        with postgres_database("t") as url:
            yield url


# -- Unit and integration tests --------------------------------------------------------------
#
# `make unit` runs `-m "not integration"`: tests that need no service. `make integration` runs
# the rest. A test is an integration test when it is marked so, when it names a service with
# `@pytest.mark.needs("redis", ...)`, when it uses a fixture below that needs one or starts
# processes, or when one of its parameters is "postgresql" (the SQLite/PostgreSQL pairs).
# A needed service that is missing skips the test with the reason locally, and fails it when
# CI or TIGHTROPE_REQUIRE_SERVICES=1 is set (`make test` sets it): CI never skips silently.

REQUIRE_SERVICES = bool(os.environ.get("CI")) or os.environ.get("TIGHTROPE_REQUIRE_SERVICES") == "1"

# fixture → the services it needs (empty: it starts processes, which needs none but is slow)
FIXTURE_NEEDS: dict[str, tuple[str, ...]] = {
    "broker": ("redis",),
    "redis_client": ("redis",),
    "callback_broker": ("redis",),
    "schemathesis_broker": ("redis",),
    "postgres_url": ("postgresql",),
    "served": ("redis",),
    "gateway": ("redis",),
    "make_stack": ("redis", "bwrap"),
    "stack": ("redis", "bwrap"),
    "start_process": ("redis",),
    "cleanup": (),
}


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def _bwrap_works() -> bool:
    if shutil.which("bwrap") is None:
        return False
    done = subprocess.run(
        ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--unshare-net", "true"],
        capture_output=True,
        timeout=30,
    )
    return done.returncode == 0


MLSERVER_BINARY = Path(__file__).resolve().parent.parent / ".venv-mlserver" / "bin" / "mlserver"

SERVICES: dict[str, tuple[Callable[[], bool], str]] = {
    "redis": (lambda: _port_open(6379), "Redis on 127.0.0.1:6379"),
    "postgresql": (lambda: _port_open(5432), "PostgreSQL on 127.0.0.1:5432"),
    "bwrap": (_bwrap_works, "a working bubblewrap (bwrap)"),
    "chromium": (lambda: chromium_binary() is not None, "a headless Chromium"),
    # a third-party Open Inference Protocol server, in its own venv (`make mlserver`)
    "mlserver": (
        lambda: os.access(MLSERVER_BINARY, os.X_OK),
        "MLServer in .venv-mlserver (make mlserver)",
    ),
}
_available: dict[str, bool] = {}
_needs_key = pytest.StashKey[frozenset[str]]()


def _needs(item: pytest.Item) -> frozenset[str]:
    needs: set[str] = set()
    for marker in item.iter_markers("needs"):
        unknown = set(marker.args) - set(SERVICES)
        if unknown:
            raise pytest.UsageError(f"{item.nodeid}: unknown service(s) {sorted(unknown)}")
        needs.update(marker.args)
    for name in getattr(item, "fixturenames", ()):
        needs.update(FIXTURE_NEEDS.get(name, ()))
    callspec = getattr(item, "callspec", None)
    if callspec is not None and any(
        isinstance(value, str) and value == "postgresql" for value in callspec.params.values()
    ):
        needs.add("postgresql")
    return frozenset(needs)


# The files of the longest tests (a minute or more each on 2 cores), started first: `make
# integration` runs tests in two processes (pytest-xdist), and a long test started last would
# leave the other process idle while it runs.
LONGEST_FIRST = (
    "tests/integration/test_make_demo.py",
    "tests/integration/test_readme_commands.py",
    "tests/integration/test_scale_out.py",
    "tests/integration/test_object_storage.py",
    "tests/integration/test_faults.py",
    "tests/integration/test_end_to_end.py",
    "tests/integration/test_gate_compare.py",
    "tests/workers/execution/test_endpoint_steps.py",
    "tests/integration/test_endpoint_audit.py",
)


def _longest_first(item: pytest.Item) -> int:
    path = item.nodeid.split("::", 1)[0]
    return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        needs = _needs(item)
        item.stash[_needs_key] = needs
        starts_processes = bool(set(getattr(item, "fixturenames", ())) & FIXTURE_NEEDS.keys())
        if needs or starts_processes:
            item.add_marker(pytest.mark.integration)
    items.sort(key=_longest_first)  # stable: the order within and among the rest is kept


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    for service in sorted(item.stash.get(_needs_key, frozenset())):
        if service not in _available:
            _available[service] = SERVICES[service][0]()
        if _available[service]:
            continue
        what = SERVICES[service][1]
        if REQUIRE_SERVICES:
            pytest.fail(f"{what} is required (CI / TIGHTROPE_REQUIRE_SERVICES) but not available")
        pytest.skip(f"needs {what} (not available here; .ci/ensure-services starts it)")
