"""ONNX models (workers.engine.onnx_models): converted to PyTorch, checked against onnxruntime,
and audited exactly like their TorchScript twins."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from schemas.audits import AuditConfig
from schemas.model_spec import ModelSpec
from tests.fixtures import model_factory as mf
from workers.engine import onnx_models
from workers.engine.entry_points import run_audit
from workers.engine.model_loading import ModelRejected, admit, load_model
from workers.engine.screening import detect_format

torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*TorchScript.*")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

# Audit figures of an ONNX model and its TorchScript twin agree this closely (a few times the
# admission tolerance: the figures are sums and ratios of model outputs).
FIGURE_RTOL, FIGURE_ATOL = 1e-3, 1e-4


def spec_of(raw: dict[str, Any]) -> ModelSpec:
    return ModelSpec.model_validate(raw)


def assert_figures_close(onnx_value: Any, twin_value: Any, where: str = "checks") -> None:
    """Same structure, same strings and flags, numbers within the figure tolerance."""
    if isinstance(twin_value, dict):
        assert isinstance(onnx_value, dict) and onnx_value.keys() == twin_value.keys(), where
        for key in twin_value:
            assert_figures_close(onnx_value[key], twin_value[key], f"{where}.{key}")
    elif isinstance(twin_value, list):
        assert isinstance(onnx_value, list) and len(onnx_value) == len(twin_value), where
        for i, (a, b) in enumerate(zip(onnx_value, twin_value, strict=True)):
            assert_figures_close(a, b, f"{where}[{i}]")
    elif isinstance(twin_value, float) and not isinstance(twin_value, bool):
        assert isinstance(onnx_value, float | int), where
        assert math.isclose(onnx_value, twin_value, rel_tol=FIGURE_RTOL, abs_tol=FIGURE_ATOL), (
            f"{where}: onnx {onnx_value} vs torchscript {twin_value}"
        )
    else:
        assert onnx_value == twin_value, where


def audit_both(tmp_path: Path, onnx_path: Path, twin_path: Path, spec: ModelSpec, config: Any):
    reports = []
    for fmt, path in (("onnx", onnx_path), ("torchscript", twin_path)):
        reports.append(
            run_audit(
                path,
                fmt,
                spec,
                AuditConfig.model_validate(config),
                out_dir=tmp_path / fmt,
                model_sha256="ab" * 32,
                base_dir=tmp_path,
            )
        )
    return reports


def test_onnx_bytes_are_recognised_whatever_the_name(tmp_path: Path) -> None:
    path = mf.small_unet_onnx(tmp_path / "model.pt")
    assert detect_format(path) == "onnx"
    assert detect_format(mf.unet_safetensors(tmp_path / "w.safetensors")) == "safetensors"


def test_the_unet_is_admitted_with_the_conversion_check(tmp_path: Path) -> None:
    path = mf.small_unet_onnx(tmp_path / "unet.onnx")
    admission = admit(path, "onnx", spec_of(mf.small_unet_spec()))
    assert admission.ok, admission.reason
    info = admission.info
    assert info["probe"] == "passed" and info["output_shape"] == [2, 1, mf.SIZE, mf.SIZE]
    assert info["onnx_max_difference"] <= info["onnx_tolerance"]
    assert info["onnx_converter"].startswith("onnx2torch ")
    assert info["graphs_screened"] == 2  # the converted graph and its aten trace
    # the converted model is the eager module it was exported from, at another size too
    model = load_model(path, "onnx", spec_of(mf.small_unet_spec()))
    x = torch.rand(3, 1, 24, 32, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(
        model(x), mf.build_registered("unet", mf.SMALL_UNET_PARAMS)(x), rtol=1e-4, atol=1e-5
    )
    assert all(not p.requires_grad for p in model.parameters())


def test_a_unet_audit_gives_the_figures_of_its_torchscript_twin(tmp_path: Path) -> None:
    onnx_path = mf.small_unet_onnx(tmp_path / "unet.onnx")
    twin = mf.small_unet_torchscript(tmp_path / "unet.pt")
    config = {
        "dataset": {"builtin": "ellipses", "count": 2, "size": mf.SIZE, "seed": 1},
        "operator": {"kind": "denoising"},
        "noise_level": 0.01,
        "seed": 7,
        "checks": [
            {"kind": "random_noise", "levels": [0.05], "samples": 2},
            {"kind": "lipschitz", "iterations": 4},
        ],
        "device": "cpu",
    }
    onnx_report, twin_report = audit_both(
        tmp_path, onnx_path, twin, spec_of(mf.small_unet_spec()), config
    )
    assert onnx_report["model"]["format"] == "onnx"
    assert [c["kind"] for c in onnx_report["checks"]] == ["random_noise", "lipschitz"]
    assert_figures_close(onnx_report["checks"], twin_report["checks"])
    assert onnx_report["verdict"] == twin_report["verdict"]


def test_a_classifier_audit_gives_the_figures_of_its_torchscript_twin(tmp_path: Path) -> None:
    onnx_path = mf.tiny_classifier_onnx(tmp_path / "clf.onnx")
    twin = mf.tiny_classifier_torchscript(tmp_path / "clf.pt")
    rng = np.random.default_rng(0)
    images = rng.uniform(0.0, 1.0, size=(4, 1, mf.SIZE, mf.SIZE)).astype(np.float32)
    np.savez(tmp_path / "data.npz", images=images, labels=np.array([0, 1, 2, 0]))
    config = {
        "dataset": {"file": "data.npz"},
        "checks": [
            {"kind": "adversarial", "epsilons": [0.01, 0.1], "steps": 3},
            {"kind": "random_noise", "levels": [0.1], "samples": 2},
        ],
        "device": "cpu",
    }
    spec = spec_of(mf.classifier_spec())
    assert admit(onnx_path, "onnx", spec).ok
    onnx_report, twin_report = audit_both(tmp_path, onnx_path, twin, spec, config)
    assert [c["kind"] for c in onnx_report["checks"]] == ["adversarial", "random_noise"]
    assert_figures_close(onnx_report["checks"], twin_report["checks"])


def test_unsupported_operators_are_all_named(tmp_path: Path) -> None:
    path = mf.unsupported_operator_onnx(tmp_path / "ops.onnx")
    spec = spec_of(dict(mf.tiny_cnn_spec(), input="image"))
    admission = admit(path, "onnx", spec)
    assert not admission.ok
    reason = admission.reason or ""
    assert "does not support" in reason
    assert "Hardmax (opset 17)" in reason and "LpNormalization (opset 17)" in reason


def test_a_conversion_that_disagrees_with_onnxruntime_is_rejected_with_the_difference(
    tmp_path: Path,
) -> None:
    path = mf.small_unet_onnx(tmp_path / "unet.onnx")
    spec = spec_of(mf.small_unet_spec())
    converted = load_model(path, "onnx", spec)
    assert onnx_models.verify_conversion(path, converted, spec, torch.device("cpu"))
    with torch.no_grad():  # what a faulty converter rule would do: weights a little off
        for parameter in converted.parameters():
            parameter.add_(0.01)
    with pytest.raises(ModelRejected) as rejected:
        onnx_models.verify_conversion(path, converted, spec, torch.device("cpu"))
    reason = rejected.value.reason
    assert "disagrees with onnxruntime" in reason and "largest difference" in reason
    difference = float(reason.split("largest difference ")[1].split(",")[0])
    assert difference > onnx_models.ABSOLUTE_TOLERANCE


def test_a_malformed_protobuf_is_rejected(tmp_path: Path) -> None:
    whole = mf.small_unet_onnx(tmp_path / "unet.onnx")
    truncated = mf.truncated_copy(whole, tmp_path / "cut.onnx", fraction=0.6)
    admission = admit(truncated, "onnx", spec_of(mf.small_unet_spec()))
    assert not admission.ok
    assert "not a valid ONNX protobuf" in (admission.reason or "")


def test_an_oversized_model_is_rejected_before_parsing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = mf.small_unet_onnx(tmp_path / "unet.onnx")
    monkeypatch.setattr(onnx_models, "MAX_ONNX_BYTES", path.stat().st_size - 1)
    admission = admit(path, "onnx", spec_of(mf.small_unet_spec()))
    assert not admission.ok
    assert f"has {path.stat().st_size} bytes, more than" in (admission.reason or "")


def test_external_data_custom_domains_and_functions_are_refused(tmp_path: Path) -> None:
    import onnx
    from onnx import helper

    spec = spec_of(mf.small_unet_spec())
    external = admit(mf.external_data_onnx(tmp_path / "ext.onnx"), "onnx", spec)
    assert not external.ok and "external file" in (external.reason or "")
    custom = admit(mf.custom_domain_onnx(tmp_path / "custom.onnx"), "onnx", spec)
    assert not custom.ok and "com.example" in (custom.reason or "")

    model = onnx.load(str(mf.small_unet_onnx(tmp_path / "unet.onnx")))
    twice = [helper.make_node("Add", ["a", "a"], ["b"])]
    opsets = [helper.make_opsetid("", mf.ONNX_OPSET)]
    model.functions.append(helper.make_function("", "Twice", ["a"], ["b"], twice, opsets))
    (tmp_path / "functions.onnx").write_bytes(model.SerializeToString())
    functions = admit(tmp_path / "functions.onnx", "onnx", spec)
    assert not functions.ok and "defines functions (Twice)" in (functions.reason or "")


def test_a_fixed_batch_export_is_rejected_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "fixed.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            mf.build_tiny_cnn(), (torch.zeros(1, 1, mf.SIZE, mf.SIZE),), str(path), dynamo=False
        )
    admission = admit(path, "onnx", spec_of(mf.tiny_cnn_spec()))
    assert not admission.ok
    assert "fixed batch size of 1" in (admission.reason or "")
