"""ONNX models as people export them (tests/fixtures/onnx_corpus.py): every pattern, exported at
opsets 13 and 17 and at the default opset of both of torch 2.14's exporters, is admitted, computes
what its PyTorch twin computes at any batch size, and audits to the twin's figures."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from schemas.model_spec import ModelSpec
from tests.engine.test_onnx_models import assert_figures_close, audit_both
from tests.fixtures import onnx_corpus as corpus
from workers.engine import onnx_models
from workers.engine.model_loading import ModelRejected, admit, load_model

torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*TorchScript.*")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

# (label, opset_version given to torch.onnx.export, dynamo): "default" is plain
# torch.onnx.export(model, args, f, ...), the torch.export-based exporter at its default opset.
EXPORTS = [
    ("legacy-13", 13, False),
    ("legacy-17", 17, False),
    ("legacy-default", None, False),
    ("default", None, True),
]
# The default exporter takes seconds a model: it exports the patterns whose graphs differ from
# the legacy exporter's in what the engine must handle (Reshape with allowzero=1, Resize 18+,
# LayerNormalization, Gelu).
DEFAULT_EXPORTED = ("view", "resize_bilinear", "norms", "gelu_silu")
CASES = [
    (name, label)
    for name in corpus.PATTERNS
    for label, _, dynamo in EXPORTS
    if not dynamo or name in DEFAULT_EXPORTED
]
# The converted model against its eager twin: the admission's tolerance (the twin and
# onnxruntime compute the same operations, in float32, in other orders).
RTOL, ATOL = onnx_models.RELATIVE_TOLERANCE, onnx_models.ABSOLUTE_TOLERANCE


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Each (pattern, export) written once for the module's tests."""
    folder = tmp_path_factory.mktemp("onnx-corpus")
    cache: dict[tuple[str, str], Path] = {}

    def get(name: str, label: str) -> Path:
        if (name, label) not in cache:
            _, opset, dynamo = next(e for e in EXPORTS if e[0] == label)
            cache[name, label] = corpus.export(name, folder / f"{name}-{label}.onnx", opset, dynamo)
        return cache[name, label]

    return get


def spec_of(name: str) -> ModelSpec:
    return ModelSpec.model_validate(corpus.PATTERNS[name].spec())


@pytest.mark.parametrize(("name", "label"), CASES)
def test_each_export_is_admitted_and_computes_its_twin(name: str, label: str, exported) -> None:
    path = exported(name, label)
    requested = next(e[1] for e in EXPORTS if e[0] == label)
    assert corpus.opset_of(path) == (requested or corpus.DEFAULT_OPSET)
    spec = spec_of(name)
    admission = admit(path, "onnx", spec)
    assert admission.ok, admission.reason
    info = admission.info
    assert info["onnx_opsets"]["ai.onnx"] == corpus.opset_of(path)
    assert onnx_models.LOWEST_TARGET_OPSET <= info["onnx_converted_opset"] <= corpus.opset_of(path)
    assert info["onnx_max_difference"] <= info["onnx_tolerance"]
    model = load_model(path, "onnx", spec)
    twin = corpus.PATTERNS[name].build()
    generator = torch.Generator().manual_seed(5)
    for batch in (3, 1):  # the export's example had 2
        x = torch.rand(batch, 1, corpus.SIDE, corpus.SIDE, generator=generator)
        with torch.no_grad():
            expected = twin(x)
            torch.testing.assert_close(model(x), expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", list(corpus.PATTERNS))
def test_an_audit_of_a_default_opset_export_gives_the_figures_of_its_twin(
    name: str, exported, tmp_path: Path
) -> None:
    """A short worst_case (reconstruction) or adversarial (classification) search, whose
    figures follow the model's gradients, on the model exported at the default opset (by the
    default exporter where it ran) and on the twin."""
    pattern = corpus.PATTERNS[name]
    twin = corpus.twin_torchscript(name, tmp_path / "twin.pt")
    if pattern.task == "classification":
        rng = np.random.default_rng(0)
        images = rng.uniform(0.0, 1.0, size=(3, 1, corpus.SIDE, corpus.SIDE)).astype(np.float32)
        np.savez(tmp_path / "data.npz", images=images, labels=np.array([0, 1, 2]))
        config: dict[str, Any] = {
            "dataset": {"file": "data.npz"},
            "checks": [{"kind": "adversarial", "epsilons": [0.05, 0.5], "steps": 3}],
        }
    else:
        config = {
            "dataset": {"builtin": "ellipses", "count": 2, "size": corpus.SIDE, "seed": 1},
            "operator": {"kind": "denoising"},
            "noise_level": 0.01,
            "checks": [{"kind": "worst_case", "levels": [0.05], "steps": 3, "restarts": 1}],
        }
    config.update(seed=7, device="cpu")
    onnx_report, twin_report = audit_both(
        tmp_path,
        exported(name, "default" if name in DEFAULT_EXPORTED else "legacy-default"),
        twin,
        spec_of(name),
        config,
    )
    assert onnx_report["model"]["format"] == "onnx"
    assert [c["kind"] for c in onnx_report["checks"]] == [config["checks"][0]["kind"]]
    assert_figures_close(onnx_report["checks"], twin_report["checks"])
    assert onnx_report["verdict"] == twin_report["verdict"]


class Tril(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tril(x)


def test_an_operator_without_a_rule_is_refused_by_name_and_opset(tmp_path: Path) -> None:
    """torch.tril: exported as Trilu (opset 14 on), for which onnx2torch has no rule at any
    opset, so lowering cannot help."""
    path = tmp_path / "tril.onnx"
    module = Tril()
    with corpus._quiet():
        torch.onnx.export(
            module,
            (corpus.example(),),
            str(path),
            dynamo=False,
            input_names=["x"],
            dynamic_axes={"x": {0: "batch"}},
        )
    admission = admit(path, "onnx", spec_of("permute"))
    assert not admission.ok
    assert admission.reason == (
        "the ONNX model uses operator(s) the converter to PyTorch does not support: "
        f"Constant (opset {corpus.DEFAULT_OPSET}), Trilu (opset {corpus.DEFAULT_OPSET}); it has "
        "no rule for Trilu at any opset"
    )


def test_an_opset_the_converter_cannot_reach_is_refused_with_the_fix(tmp_path: Path) -> None:
    """A default-opset model that onnx's version converter cannot bring down (monkeypatched
    failure: no adapter) is refused naming the operators, the opsets tried (the highest at which
    the converter has every rule, 18, first) and the fix."""
    path = corpus.export("view", tmp_path / "view.onnx")
    proto = onnx_models.read_onnx(path)

    def no_adapter(model: Any, target: int) -> Any:
        raise RuntimeError(f"no adapter for Reshape to opset {target}")

    import onnx.version_converter

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(onnx.version_converter, "convert_version", no_adapter)
        with pytest.raises(ModelRejected) as rejected:
            onnx_models.supported_opset(proto)
    reason = rejected.value.reason
    assert reason.startswith(
        "the ONNX model uses operator(s) the converter to PyTorch does not support: "
        f"Constant (opset {corpus.DEFAULT_OPSET}), Reshape (opset {corpus.DEFAULT_OPSET}), "
        f"Shape (opset {corpus.DEFAULT_OPSET}), and onnx's version converter cannot bring it "
        "down to an opset the converter supports (opset 18: no adapter for Reshape to opset 18; "
        "opset 17: no adapter for Reshape to opset 17; opset 16: no adapter"
    )
    assert reason.endswith("export with opset_version=17")


def test_allowzero_is_kept_where_it_matters(tmp_path: Path) -> None:
    """`Reshape(allowzero=1)` with a computed shape may mean a dimension of 0: not rewritten,
    so the converter's refusal names it."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Reshape", ["x", "s"], ["y"], allowzero=1),
    ]
    shape = ["batch", 1, corpus.SIDE, corpus.SIDE]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "allowzero.onnx"))
    admission = admit(tmp_path / "allowzero.onnx", "onnx", spec_of("permute"))
    assert not admission.ok
    assert "allowzero=1" in (admission.reason or "")


def test_the_converted_graph_is_screened_before_each_operator_runs(
    exported, capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A converted module that would print or read a file (what a faulty or subverted converter
    rule could do through aten) is refused at the first such operator, which never runs."""
    path = exported("view", "legacy-17")
    proto = onnx_models.read_onnx(path)
    secret = tmp_path / "secret"
    secret.write_bytes(b"\0" * 4)

    def swallowed(t: torch.Tensor) -> None:
        with contextlib.suppress(Exception):  # a rule that hides the screen's refusal
            torch.ops.aten._print("LEAKED")

    for operation, reason in (
        (lambda t: torch.ops.aten._print("LEAKED"), "uses aten::_print, which writes to"),
        (lambda t: torch.from_file(str(secret), size=1), "uses aten::from_file, which reads"),
        (swallowed, "uses aten::_print, which writes to"),
    ):
        module = onnx_models.convert(onnx_models.prepare(proto))
        reshape = next(m for m in module.modules() if type(m).__name__ == "OnnxReshape")
        original = reshape.forward

        def subverted(*args: Any, _original: Any = original, _op: Any = operation) -> Any:
            _op(args[0])
            return _original(*args)

        reshape.forward = subverted  # type: ignore[method-assign]
        with pytest.raises(ModelRejected) as rejected:
            onnx_models.screen_converted(module, corpus.example())
        assert rejected.value.reason.startswith("the converted ONNX graph ")
        assert reason in rejected.value.reason
    assert "LEAKED" not in capfd.readouterr().out
