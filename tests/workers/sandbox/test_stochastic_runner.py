"""A stochastic TorchScript model (Ψ(y) = y + 0.05·ξ) admitted and audited by the real runner in
the real sandbox: its resource says `stochastic` with the measured spread, and the report of
its audit carries the warning on every check (issue 26, detection)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from service.domain.resource_rules import model_resource
from service.settings import Settings
from tests.fixtures import model_factory
from tests.workers.conftest import add_audit, add_model
from workers.execution import job_dirs
from workers.execution.admission_job import execute_admission
from workers.execution.steps import sandbox_for
from workers.sandbox.child import RunnerChild

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

SIGMA = 0.05


@pytest.mark.needs("bwrap")
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_sampler_is_flagged_on_its_resource_and_in_its_report(
    settings: Settings, session: Session, tmp_path: Path
) -> None:
    path = model_factory.noisy_identity_torchscript(tmp_path / "noisy.pt", sigma=SIGMA)
    model = add_model(
        session,
        settings,
        status="validating",
        blob=path.read_bytes(),
        spec=dict(model_factory.identity_spec(), input="adjoint"),
    )
    assert execute_admission(model.id, settings=settings, session=session) == "ready"
    session.refresh(model)
    resource = model_resource(model)
    # 16×16 inputs uniform in [0, 1]: ‖ξ₁ − ξ₂‖ ≈ √(2·256), ‖y‖ ≈ √(256/3), so ≈ 0.05·√6
    assert resource.stochastic is True and resource.output_spread is not None
    assert 0.5 * SIGMA * 6**0.5 < resource.output_spread < 2 * SIGMA * 6**0.5

    audit = add_audit(session, model, attempts=1)
    job_dir = job_dirs.materialise_audit_job(session, settings, audit, model)
    child = RunnerChild(
        sandbox_for(settings, "torchscript"), "workers.sandbox.runner", job_dir, time_limit=300,
        use_gpu=False,
    )  # fmt: skip
    events = [e for e in child.events(tick_seconds=1.0) if e is not None]
    outcome = child.finish()
    assert outcome.returncode == 0, outcome.stderr_tail
    assert events[-1].event == "report"
    report = json.loads((job_dir / "out" / "report.json").read_text())
    assert report["model"]["stochastic"] is True
    assert 0.5 * SIGMA * 6**0.5 < report["model"]["output_spread"] < 2 * SIGMA * 6**0.5
    # every check says what it measures of the sampler, or warns that it measures single draws
    assert report["checks"] and all(
        check.get("sampler", {}).get("measures")
        or any("counts its sampling noise as instability" in w for w in check["warnings"])
        for check in report["checks"]
    )
    # the audit's random_noise check audits the sampler: over the perturbation and the draws
    assert any(check.get("sampler") for check in report["checks"])
    # and the report carries the noise floor, with its interval
    assert report["model"]["noise_floor"]
