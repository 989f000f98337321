"""An ONNX model admitted and audited by the real runner in the real sandbox: onnx,
onnxruntime and onnx2torch run under bubblewrap with the runner's memory limit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from service.db.tables import Model
from service.settings import Settings
from tests.fixtures import model_factory, onnx_corpus
from tests.workers.conftest import add_audit, add_model
from workers.execution import job_dirs
from workers.execution.admission_job import execute_admission
from workers.execution.steps import sandbox_for
from workers.sandbox.child import RunnerChild

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


def onnx_model(session: Session, settings: Settings, path: Path) -> Model:
    model = add_model(
        session,
        settings,
        status="validating",
        blob=path.read_bytes(),
        spec=model_factory.small_unet_spec(),
    )
    model.format = "onnx"
    session.commit()
    return model


@pytest.mark.needs("bwrap")
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_an_onnx_model_is_admitted_and_audited_in_the_sandbox(
    settings: Settings, session: Session, tmp_path: Path
) -> None:
    model = onnx_model(session, settings, model_factory.small_unet_onnx(tmp_path / "unet.onnx"))
    assert execute_admission(model.id, settings=settings, session=session) == "ready"
    session.refresh(model)
    info = model.admission_info or {}
    assert info["format"] == "onnx" and info["onnx_max_difference"] <= info["onnx_tolerance"]

    audit = add_audit(session, model, attempts=1)
    job_dir = job_dirs.materialise_audit_job(session, settings, audit, model)
    assert (job_dir / "model.onnx").is_file()
    child = RunnerChild(
        sandbox_for(settings, "onnx"), "workers.sandbox.runner", job_dir, time_limit=300,
        use_gpu=False,
    )  # fmt: skip
    events = [e for e in child.events(tick_seconds=1.0) if e is not None]
    outcome = child.finish()
    assert outcome.returncode == 0, outcome.stderr_tail
    assert events[-1].event == "report"
    report = json.loads((job_dir / "out" / "report.json").read_text())
    assert report["model"]["format"] == "onnx"


@pytest.mark.needs("bwrap")
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_an_unsupported_operator_is_named_in_the_sandboxed_rejection(
    settings: Settings, session: Session, tmp_path: Path
) -> None:
    path = model_factory.unsupported_operator_onnx(tmp_path / "ops.onnx")
    model = onnx_model(session, settings, path)
    model.spec = dict(model_factory.tiny_cnn_spec(), input="image")
    session.commit()
    assert execute_admission(model.id, settings=settings, session=session) == "rejected"
    session.refresh(model)
    assert "Hardmax (opset 17)" in (model.reason or "")


@pytest.mark.needs("bwrap")
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_reshape_export_at_the_default_opset_is_admitted_in_the_sandbox(
    settings: Settings, session: Session, tmp_path: Path
) -> None:
    """`view(batch, -1)` exported at torch's default opset (20): Shape → Gather → Concat →
    Reshape, which the screen runs rather than traces, in a graph onnx's version converter
    brings down to an opset onnx2torch knows; admitted by the real runner under bubblewrap.
    (One model: each sandboxed admission starts a runner, ~20 s on 2 cores; the default
    exporter's models are covered by tests/engine/test_onnx_corpus.py.)"""
    path = onnx_corpus.export("view", tmp_path / "view.onnx")
    model = onnx_model(session, settings, path)
    model.spec = onnx_corpus.PATTERNS["view"].spec()
    session.commit()
    assert execute_admission(model.id, settings=settings, session=session) == "ready", model.reason
    session.refresh(model)
    info = model.admission_info or {}
    assert info["onnx_opsets"]["ai.onnx"] == onnx_corpus.DEFAULT_OPSET
    assert info["onnx_converted_opset"] < onnx_corpus.DEFAULT_OPSET
    assert info["onnx_max_difference"] <= info["onnx_tolerance"]
    assert info["probe"] == "passed" and info["output_shape"] == [2, onnx_corpus.NUM_CLASSES]
