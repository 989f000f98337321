"""Loading every format, and admission's verdicts on good and bad models
(workers.engine.model_loading)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from schemas.model_spec import ModelSpec
from tests.fixtures import hostile_models as hostile
from tests.fixtures import model_factory as mf
from workers.engine.model_loading import ModelRejected, admit, load_model

torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*TorchScript.*")
# torch.jit.load warns that TorchScript is deprecated; loading it is what is under test
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")


def spec_of(raw: dict[str, Any]) -> ModelSpec:
    return ModelSpec.model_validate(raw)


def probe_batch(channels: int = 1, size: int = mf.SIZE) -> torch.Tensor:
    return torch.rand(3, channels, size, size, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("channels", [1, 2])
def test_torchscript_matches_its_eager_module(tmp_path: Path, channels: int) -> None:
    path = mf.tiny_cnn_torchscript(tmp_path / "m.pt", channels=channels)
    model = load_model(path, "torchscript", spec_of(mf.tiny_cnn_spec(channels)))
    x = probe_batch(channels)
    torch.testing.assert_close(model(x), mf.build_tiny_cnn(channels)(x))
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())


def test_export_matches_its_eager_module_at_another_size(tmp_path: Path) -> None:
    path = mf.tiny_cnn_export(tmp_path / "m.pt2")
    model = load_model(path, "export", spec_of(mf.tiny_cnn_spec()))
    x = probe_batch(size=24)  # exported at 16×16 with dynamic height and width
    torch.testing.assert_close(model(x), mf.build_tiny_cnn()(x))
    assert all(not p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("architecture", ["unet", "dncnn"])
def test_safetensors_matches_the_registered_architecture(tmp_path: Path, architecture: str) -> None:
    writer = mf.unet_safetensors if architecture == "unet" else mf.dncnn_safetensors
    path = writer(tmp_path / "w.safetensors")
    model = load_model(path, "safetensors", spec_of(mf.registered_spec(architecture)))
    eager = mf.build_registered(
        architecture, mf.SMALL_UNET_PARAMS if architecture == "unet" else mf.SMALL_DNCNN_PARAMS
    )
    x = probe_batch()
    torch.testing.assert_close(model(x), eager(x))


def test_linear_model_is_exactly_its_matrix(tmp_path: Path) -> None:
    matrix = torch.randn(16, 8, generator=torch.Generator().manual_seed(2))
    path = mf.linear_model_torchscript(tmp_path / "lin.pt", matrix, (1, 4, 4))
    model = load_model(path, "torchscript", spec_of(mf.linear_spec((1, 4, 4))))
    y = torch.randn(2, 8, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(model(y), (y @ matrix.t()).reshape(2, 1, 4, 4))


def test_benign_models_are_admitted_with_their_facts(tmp_path: Path) -> None:
    admission = admit(
        mf.tiny_cnn_torchscript(tmp_path / "m.pt"), "torchscript", spec_of(mf.tiny_cnn_spec())
    )
    assert admission.ok, admission.reason
    info = admission.info
    assert info["format"] == "torchscript"
    assert info["parameter_count"] == (1 * 4 * 9 + 4) + (4 * 1 * 9 + 1)  # two 3×3 convolutions
    assert info["output_shape"] == [2, 1, 16, 16]
    assert info["graph_op_count"] > 0 and info["probe_seconds"] >= 0

    classifier = admit(
        mf.tiny_classifier_torchscript(tmp_path / "c.pt"),
        "torchscript",
        spec_of(mf.classifier_spec(num_classes=3)),
    )
    assert classifier.ok, classifier.reason
    assert classifier.info["output_shape"] == [2, 3]


def test_a_measurement_model_without_operator_defers_its_probe_with_a_note(
    tmp_path: Path,
) -> None:
    path = mf.linear_model_torchscript(tmp_path / "lin.pt", torch.eye(16), (1, 4, 4))
    admission = admit(path, "torchscript", spec_of(mf.linear_spec((1, 4, 4))))
    assert admission.ok
    assert admission.info["probe"] == "deferred"
    assert "first audit" in admission.info["probe_note"]


def test_a_measurement_model_is_probed_through_the_operator_its_spec_names(
    tmp_path: Path,
) -> None:
    """A(x) of 12 values per image: the probe feeds [2, 12] and expects [2, 1, 4, 4]."""
    matrix = torch.randn(16, 12, generator=torch.Generator().manual_seed(0))
    path = mf.linear_model_torchscript(tmp_path / "lin.pt", matrix, (1, 4, 4))
    spec = dict(mf.linear_spec((1, 4, 4)), operator={"kind": "gaussian", "m": 12})
    admission = admit(path, "torchscript", spec_of(spec))
    assert admission.ok, admission.reason
    assert (admission.info["probe"], admission.info["probe_input"]) == ("passed", "operator")
    assert admission.info["input_shape"] == [2, 12]
    assert admission.info["output_shape"] == [2, 1, 4, 4]

    wrong = dict(mf.linear_spec((1, 4, 4)), operator={"kind": "gaussian", "m": 10})
    rejected = admit(path, "torchscript", spec_of(wrong))
    assert not rejected.ok and "[2, 10]" in (rejected.reason or "")


def test_a_measurement_shape_lets_the_admission_probe(tmp_path: Path) -> None:
    matrix = torch.randn(16, 12, generator=torch.Generator().manual_seed(0))
    path = mf.linear_model_torchscript(tmp_path / "lin.pt", matrix, (1, 4, 4))
    spec = dict(mf.linear_spec((1, 4, 4)), measurement_shape=[12])
    admission = admit(path, "torchscript", spec_of(spec))
    assert admission.ok, admission.reason
    assert admission.info["probe_input"] == "measurement_shape"


def test_a_model_that_hogs_memory_is_rejected_by_its_probe_naming_the_model(
    tmp_path: Path,
) -> None:
    path = hostile.allocates_without_end_torchscript(tmp_path / "hog.pt")
    spec = dict(mf.linear_spec((1, 4, 4)), measurement_shape=[1, 4, 4])
    admission = admit(path, "torchscript", spec_of(spec))
    assert not admission.ok
    assert "the model ran out of memory on a probe of 2 inputs" in (admission.reason or "")


def test_wrong_output_shape_is_rejected_with_both_shapes(tmp_path: Path) -> None:
    path = mf.wrong_output_shape_torchscript(tmp_path / "w.pt")
    admission = admit(path, "torchscript", spec_of(mf.tiny_cnn_spec()))
    assert not admission.ok
    assert admission.reason is not None
    assert "output shape [2, 3, 16, 16] does not match the spec's image_shape [1, 16, 16]" in (
        admission.reason
    )


def test_classifier_with_wrong_class_count_is_rejected(tmp_path: Path) -> None:
    path = mf.tiny_classifier_torchscript(tmp_path / "c.pt", num_classes=3)
    admission = admit(path, "torchscript", spec_of(mf.classifier_spec(num_classes=5)))
    assert not admission.ok
    assert "num_classes 5" in str(admission.reason)


def test_nan_output_is_rejected(tmp_path: Path) -> None:
    admission = admit(
        mf.nan_torchscript(tmp_path / "n.pt"), "torchscript", spec_of(mf.tiny_cnn_spec())
    )
    assert not admission.ok
    assert "NaN" in str(admission.reason)


def test_model_without_input_gradient_is_rejected(tmp_path: Path) -> None:
    admission = admit(
        mf.detached_torchscript(tmp_path / "d.pt"), "torchscript", spec_of(mf.tiny_cnn_spec())
    )
    assert not admission.ok
    assert "gradient" in str(admission.reason)


def test_safetensors_with_wrong_keys_names_them(tmp_path: Path) -> None:
    good = mf.unet_safetensors(tmp_path / "u.safetensors")
    bad = mf.edit_safetensors(
        good,
        tmp_path / "bad.safetensors",
        drop=("Conv_1x1.weight",),
        add={"surplus.weight": torch.zeros(2)},
    )
    spec = spec_of(mf.registered_spec("unet"))
    with pytest.raises(ModelRejected) as raised:
        load_model(bad, "safetensors", spec)
    assert "missing keys [Conv_1x1.weight]" in raised.value.reason
    assert "unexpected keys [surplus.weight]" in raised.value.reason
    assert not admit(bad, "safetensors", spec).ok


def test_safetensors_with_other_widths_names_the_shapes(tmp_path: Path) -> None:
    path = mf.dncnn_safetensors(tmp_path / "n.safetensors", params={"depth": 3, "nf": 8})
    admission = admit(path, "safetensors", spec_of(mf.registered_spec("dncnn")))  # nf 4
    assert not admission.ok
    assert "shape mismatch" in str(admission.reason)
    assert "in_conv.weight: file [8, 1, 3, 3] vs model [4, 1, 3, 3]" in str(admission.reason)


def test_safetensors_refuses_constructor_parameters_that_read_files(tmp_path: Path) -> None:
    path = mf.dncnn_safetensors(tmp_path / "n.safetensors")
    raw = mf.registered_spec("dncnn", params={"depth": 3, "nf": 4, "pretrained": "/etc/passwd"})
    admission = admit(path, "safetensors", spec_of(raw))
    assert not admission.ok
    assert "pretrained" in str(admission.reason)


def test_safetensors_needs_an_architecture(tmp_path: Path) -> None:
    path = mf.unet_safetensors(tmp_path / "u.safetensors")
    admission = admit(path, "safetensors", spec_of(mf.tiny_cnn_spec()))
    assert not admission.ok
    assert "spec.architecture" in str(admission.reason)


@pytest.mark.parametrize(
    ("make", "fmt", "expected"),
    [
        (lambda d: mf.make_garbage(d / "g.bin"), "torchscript", "no accepted model format"),
        (lambda d: mf.make_garbage(d / "g.bin"), "safetensors", "no accepted model format"),
        (
            lambda d: mf.truncated_copy(mf.tiny_cnn_torchscript(d / "m.pt"), d / "t.pt"),
            "torchscript",
            "truncated or corrupt",
        ),
        (
            lambda d: mf.truncated_copy(mf.unet_safetensors(d / "u.st"), d / "t.st"),
            "safetensors",
            "safetensors",
        ),
        (lambda d: mf.tiny_cnn_export(d / "m.pt2"), "torchscript", "torch.export .pt2 archive"),
    ],
)
def test_broken_or_mislabelled_files_are_rejected_not_raised(
    tmp_path: Path, make: Any, fmt: Any, expected: str
) -> None:
    spec = mf.registered_spec("unet") if fmt == "safetensors" else mf.tiny_cnn_spec()
    admission = admit(make(tmp_path), fmt, spec_of(spec))
    assert not admission.ok
    assert expected in str(admission.reason)


# --- stochastic models (issue 26): two calls at the same input --------------------------------


def test_a_sampler_is_admitted_as_stochastic_with_its_output_spread(tmp_path: Path) -> None:
    """Ψ(y) = y + 0.05·ξ: the probe's two calls draw ξ₁, ξ₂ one after the other from torch's
    generator, so the spread is max over the probe's inputs of 0.05‖ξ₁ − ξ₂‖ / ‖y + 0.05ξ₁‖,
    computed here from the same draws."""
    from schemas.runner import PROBE_BATCH
    from workers.engine.probe import STOCHASTIC_TOLERANCE, probe_input, probe_model

    path = mf.noisy_identity_torchscript(tmp_path / "noisy.pt", sigma=0.05)
    spec = spec_of(mf.identity_spec())
    model = load_model(path, "torchscript", spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        info = probe_model(model, spec, torch.device("cpu"))
        torch.manual_seed(11)
        x, _ = probe_input(spec, torch.device("cpu"))
        assert x is not None
        first, second = torch.randn_like(x), torch.randn_like(x)
    y1 = (x + 0.05 * first).flatten(1).double()
    expected = (0.05 * (first - second).flatten(1).double().norm(dim=1) / y1.norm(dim=1)).max()
    assert info["stochastic"] is True
    assert info["output_spread"] == pytest.approx(float(expected), rel=1e-5)
    # the order of magnitude: ‖ξ₁ − ξ₂‖ ≈ √(2n), ‖y‖ ≈ √(n/3) for y uniform in [0, 1]
    assert 0.5 * 0.05 * 6**0.5 < info["output_spread"] < 2 * 0.05 * 6**0.5
    assert info["output_spread"] > 1000 * STOCHASTIC_TOLERANCE and PROBE_BATCH == 2

    admission = admit(path, "torchscript", spec)  # the admission's own probe says the same
    assert admission.ok, admission.reason
    assert admission.info["stochastic"] is True
    assert 0.5 * 0.05 * 6**0.5 < admission.info["output_spread"] < 2 * 0.05 * 6**0.5


def test_deterministic_models_are_admitted_as_not_stochastic(tmp_path: Path) -> None:
    for path, spec in [
        (mf.tiny_cnn_torchscript(tmp_path / "m.pt"), mf.tiny_cnn_spec()),
        (mf.identity_torchscript(tmp_path / "i.pt"), mf.identity_spec()),
        (mf.tiny_classifier_torchscript(tmp_path / "c.pt"), mf.classifier_spec(num_classes=3)),
    ]:
        admission = admit(path, "torchscript", spec_of(spec))
        assert admission.ok, admission.reason
        assert (admission.info["stochastic"], admission.info["output_spread"]) == (False, 0.0)


def test_a_deferred_probe_does_not_claim_determinism(tmp_path: Path) -> None:
    path = mf.linear_model_torchscript(tmp_path / "lin.pt", torch.eye(16), (1, 4, 4))
    admission = admit(path, "torchscript", spec_of(mf.linear_spec((1, 4, 4))))
    assert admission.info["probe"] == "deferred" and "stochastic" not in admission.info


def test_output_spread_is_relative_per_input_and_tiny_noise_is_not_stochastic() -> None:
    from workers.engine.probe import output_spread, stochasticity

    a = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    b = torch.tensor([[3.0, 4.5], [1.0, 0.0]])
    assert output_spread(a, b) == pytest.approx(0.1)  # 0.5 / 5 for the first, 0 for the second
    assert output_spread(torch.zeros(1, 2), torch.tensor([[0.0, 2.0]])) == 2.0  # absolute at 0
    float_noise = stochasticity(a, a + 1e-7)  # float32 rounding of a deterministic model
    assert float_noise["stochastic"] is False and 0 < float_noise["output_spread"] < 1e-6
    assert stochasticity(a, a.flip(0))["stochastic"] is True
