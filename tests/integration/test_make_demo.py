"""`make demo`, run as a user runs it on a fresh clone: the recipe read out of the Makefile."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.test_readme_commands import (
    VENV_BIN,
    clean_env,
    makefile_recipe,
    run_until_done,
    workdir,
)

pytestmark = pytest.mark.integration


@pytest.mark.timeout(900)
def test_make_demo_runs_the_demo_to_a_verdict(tmp_path: Path) -> None:
    recipe = makefile_recipe("demo")
    assert recipe == ["$(BIN)/tightrope demo --out demo-out"], recipe
    argv = recipe[0].replace("$(BIN)", str(VENV_BIN)).split()
    code, output = run_until_done(argv, workdir(tmp_path), clean_env(), timeout=780)
    assert code == 0, output[-6000:]
    report = json.loads((tmp_path / "work" / "demo-out" / "report.json").read_text())
    assert report["verdict"] in ("pass", "fail", "info")
    assert report["checks"], report
    assert (tmp_path / "work" / "demo-out" / "report.html").stat().st_size > 0
