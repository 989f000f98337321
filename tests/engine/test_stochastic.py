"""Stochastic models (issue 26): the audit runs the model at the admission probe's input
before its checks; a sampler's report says so at the top, every check that audits the sampler
says what it measures (`sampler`), every other one warns that it measures single draws; a
deterministic model's report only gains `model.stochastic: false`. The known answers of the
sampler's figures are in test_sampler_known_answers.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from schemas.reports import Report
from tests.engine.tiny_models import Identity, config, spec
from tests.fixtures import model_factory as mf
from workers.engine.audit import SINGLE_DRAW_MEASURES, run_audit_with_model, stochastic_warning
from workers.engine.model_loading import load_model
from workers.engine.probe import STOCHASTIC_TOLERANCE, probe_input
from workers.engine.report import canonical_json
from workers.reporting.html import render_html

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

SIGMA = 0.05
SPEC = spec((1, 16, 16))
CONFIG = config(
    seed=7,
    checks=[
        {"kind": "random_noise", "levels": [0.05], "samples": 2},
        {"kind": "worst_case", "levels": [0.05], "steps": 3, "restarts": 1},
        {"kind": "lipschitz", "iterations": 3},
    ],
)
# A check that measures single draws of a sampler: it carries the warning, and its `sampler`
# section says what a single draw means there.
SINGLE_DRAW_CHECK = {
    "kind": "kernel", "neighbours": 1, "directions": 1, "scales": [0.2], "power_iterations": 3,
    "cg_iterations": 5, "confirm": 0, "panels": 0,
}  # fmt: skip


def noisy_model(tmp_path: Path) -> torch.nn.Module:
    """Ψ(y) = y + 0.05·ξ, as TorchScript, loaded as an upload is."""
    path = mf.noisy_identity_torchscript(tmp_path / "noisy.pt", sigma=SIGMA)
    return load_model(path, "torchscript", SPEC)


def check_config(fields: dict[str, Any]) -> Any:
    return config(checks=[fields]).checks[0]


def audit(model: Any, out: Path, audit_config: Any = CONFIG) -> dict[str, Any]:
    return run_audit_with_model(model, SPEC, audit_config, out_dir=out, model_sha256="cd" * 32)


def expected_spread() -> float:
    """The finalising step's measure, from the same draws: torch seeded with the audit's seed,
    then two calls at the probe's input (uniform images, the denoising operator's A = I)."""
    x, _ = probe_input(SPEC, torch.device("cpu"))
    assert x is not None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(CONFIG.seed)
        first, second = torch.randn_like(x), torch.randn_like(x)
    y1 = (x + SIGMA * first).flatten(1).double()
    return float((SIGMA * (first - second).flatten(1).double().norm(dim=1) / y1.norm(dim=1)).max())


def test_a_sampler_report_carries_its_spread_and_says_what_each_check_measures(
    tmp_path: Path,
) -> None:
    with_kernel = CONFIG.model_copy(
        update={"checks": [*CONFIG.checks, check_config(SINGLE_DRAW_CHECK)]}
    )
    report = audit(noisy_model(tmp_path), tmp_path / "out", with_kernel)
    Report.model_validate(report)
    spread = report["model"]["output_spread"]
    assert report["model"]["stochastic"] is True
    assert spread == pytest.approx(expected_spread(), rel=1e-5)
    assert spread > 1000 * STOCHASTIC_TOLERANCE
    warning = stochastic_warning(spread, kind="kernel")
    assert "counts its sampling noise as instability" in warning and f"{spread:.3g}" in warning
    assert warning.endswith(SINGLE_DRAW_MEASURES["kernel"])
    kinds = [c["kind"] for c in report["checks"]]
    assert kinds == ["random_noise", "worst_case", "lipschitz", "kernel"]
    for check in report["checks"][:3]:  # these audit the sampler and say what they measure
        assert check["sampler"]["measures"], check["kind"]
        assert "single_draws" not in check["sampler"], check["kind"]
        assert not any("counts its sampling noise" in w for w in check["warnings"])
    # the kernel check measures single draws: it says what one means there, and warns
    kernel = report["checks"][3]
    assert kernel["sampler"] == {"single_draws": True, "measures": SINGLE_DRAW_MEASURES["kernel"]}
    assert "compare two draws" in kernel["sampler"]["measures"]
    assert kernel["warnings"].count(warning) == 1
    (top,) = [w for w in report["warnings"] if "stochastic" in w]
    assert top.endswith("measure single draws and count its sampling noise as instability: kernel")
    assert report["model"]["noise_floor"]["value"] == pytest.approx(SIGMA * 16, rel=0.1)
    # reproducible: torch's generator is seeded with the audit's seed for the measurement
    again = audit(noisy_model(tmp_path), tmp_path / "again", with_kernel)
    assert again["model"] == report["model"]
    assert canonical_json(again["checks"]) == canonical_json(report["checks"])
    assert (tmp_path / "out" / "report.json").read_text() == canonical_json(report)
    page = render_html(report, tmp_path / "out")
    assert 'id="model-stochastic"' in page and f"{spread:.3g}" in page
    # the page says what each check measures of the sampler, and the noise floor with its
    # interval (σ√n = 0.05·16 = 0.8 for this model, 16×16 outputs)
    assert page.count("Of the sampler:") == 4  # the kernel check's: single draws
    assert "counts its sampling noise as instability" in page
    assert 'id="model-noise-floor"' in page and "95 % interval" in page


def test_a_deterministic_model_report_only_gains_stochastic_false(tmp_path: Path) -> None:
    report = audit(Identity(), tmp_path / "out")
    assert report["model"]["stochastic"] is False and "output_spread" not in report["model"]
    assert not any("stochastic" in w for c in report["checks"] for w in c["warnings"])
    assert not any("stochastic" in w for w in report["warnings"])
    # the measurement is outside the counted passes and leaves torch's random state alone
    state = torch.random.get_rng_state()
    again = audit(Identity(), tmp_path / "again")
    assert torch.equal(state, torch.random.get_rng_state())
    assert canonical_json(again["checks"]) == canonical_json(report["checks"])
    assert again["cost"]["forward_passes"] == report["cost"]["forward_passes"]
    assert "model-stochastic" not in render_html(report, tmp_path / "out")


def test_a_stochastic_reference_is_warned_about_on_its_own_checks(tmp_path: Path) -> None:
    from workers.engine.audit import Reference

    identity = {"id": None, "name": "noisy", "sha256": "ef" * 32, "format": "torchscript"}
    reference = Reference(
        model=noisy_model(tmp_path), spec=SPEC, identity={**identity, "spec": SPEC.model_dump()}
    )
    report = run_audit_with_model(
        Identity(), SPEC, CONFIG, out_dir=tmp_path / "out", model_sha256="cd" * 32,
        reference=reference,
    )  # fmt: skip
    Report.model_validate(report)
    assert report["model"]["stochastic"] is False
    by_subject = {
        subject: [c for c in report["checks"] if c["subject"] == subject]
        for subject in ("model", "reference")
    }
    assert by_subject["model"] and by_subject["reference"]
    assert not any("stochastic" in w for c in by_subject["model"] for w in c["warnings"])
    assert not any("sampler" in c for c in by_subject["model"])
    # the reference's checks audit it as a sampler, and the report says it is one
    assert all(c["sampler"]["measures"] for c in by_subject["reference"])
    assert any(w.startswith("the reference is stochastic") for w in report["warnings"])
    assert "noise_floor" not in report["model"]
