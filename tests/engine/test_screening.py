"""Screening of archives and graphs (workers.engine.screening): hostile models are refused
with the operation or entry named, benign ones pass."""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from schemas.model_spec import ModelSpec
from tests.fixtures import model_factory as mf
from workers.engine.model_loading import admit
from workers.engine.rejection import ModelRejected
from workers.engine.screening import (
    detect_format,
    screen_archive,
    screen_exported_program,
    screen_torchscript_module,
)

torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*TorchScript.*")
# torch.jit.load warns that TorchScript is deprecated; loading it is what is under test
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

SPEC = ModelSpec.model_validate(mf.tiny_cnn_spec())


def jit_load(path: Path) -> torch.jit.ScriptModule:
    # Loading runs no model method; only the test does it, to reach the graph layer directly.
    return torch.jit.load(str(path))


def test_formats_are_recognised_from_the_bytes(tmp_path: Path) -> None:
    assert detect_format(mf.tiny_cnn_torchscript(tmp_path / "x.bin")) == "torchscript"
    assert detect_format(mf.tiny_cnn_export(tmp_path / "y.bin")) == "export"
    assert detect_format(mf.unet_safetensors(tmp_path / "z.bin")) == "safetensors"
    assert detect_format(mf.make_garbage(tmp_path / "g.bin")) is None
    checkpoint = tmp_path / "ckpt.pt"
    torch.save({"w": torch.zeros(2)}, checkpoint)  # a pickle in a zip: not a model format
    assert detect_format(checkpoint) is None


@pytest.mark.parametrize(
    ("make", "operation"),
    [
        (mf.malicious_from_file_torchscript, "aten::from_file"),
        (mf.malicious_save_torchscript, "aten::save"),
        (mf.printing_torchscript, "prim::Print"),
    ],
)
def test_graph_screening_names_the_refused_operation(
    tmp_path: Path, make: object, operation: str
) -> None:
    path = make(tmp_path / "evil.pt")  # type: ignore[operator]
    with pytest.raises(ModelRejected) as raised:
        screen_torchscript_module(jit_load(path))
    assert operation in raised.value.reason


def test_save_hidden_in_a_helper_method_is_found(tmp_path: Path) -> None:
    path = mf.malicious_save_torchscript(tmp_path / "evil.pt")
    with pytest.raises(ModelRejected) as raised:
        screen_torchscript_module(jit_load(path))
    # forward calls the helper: the inlined forward graph already holds the operation
    assert "aten::save" in raised.value.reason


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (mf.malicious_from_file_torchscript, "torch.from_file"),
        (mf.malicious_save_torchscript, "torch.save"),
    ],
)
def test_admission_refuses_file_operations_before_loading(
    tmp_path: Path, make: object, named: str
) -> None:
    target = tmp_path / "leak.pt"
    path = make(tmp_path / "evil.pt", str(target))  # type: ignore[operator]
    admission = admit(path, "torchscript", SPEC)
    assert not admission.ok
    assert named in str(admission.reason)
    assert not target.exists()  # nothing ran


def test_benign_graphs_pass_screening(tmp_path: Path) -> None:
    summary = screen_torchscript_module(jit_load(mf.tiny_cnn_torchscript(tmp_path / "m.pt")))
    assert summary.forward_op_count > 0
    assert summary.methods_screened >= 3  # the model's and both convolutions' methods
    program = torch.export.load(str(mf.tiny_cnn_export(tmp_path / "m.pt2")))
    assert screen_exported_program(program).forward_op_count == 4  # conv, relu, conv, add


def test_exported_graph_with_a_denied_operation_is_rejected() -> None:
    class Seeds(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.ops.aten.add.Tensor(x, 1.0)

    program = torch.export.export(Seeds(), (torch.zeros(1, 1, 4, 4),))
    # swap the target for a refused one: export itself would not trace a file operation
    for node in program.graph_module.graph.nodes:
        if node.op == "call_function":
            node.target = torch.ops.aten.from_file.default
    with pytest.raises(ModelRejected, match="aten::from_file"):
        screen_exported_program(program)


def test_pt2_with_a_native_library_is_rejected(tmp_path: Path) -> None:
    valid = mf.tiny_cnn_export(tmp_path / "m.pt2")
    root = mf_root(valid)
    hostile = mf.zip_with_entry(
        tmp_path / "so.pt2", f"{root}/data/aotinductor/model/m.so", base=valid
    )
    with pytest.raises(ModelRejected, match=r"m\.so' is a native library"):
        screen_archive(hostile, "export")
    assert not admit(hostile, "export", SPEC).ok


def test_pt2_with_an_unexpected_entry_is_rejected(tmp_path: Path) -> None:
    valid = mf.tiny_cnn_export(tmp_path / "m.pt2")
    hostile = mf.zip_with_entry(tmp_path / "x.pt2", f"{mf_root(valid)}/payload.pkl", base=valid)
    with pytest.raises(ModelRejected, match="payload.pkl' is not part of"):
        screen_archive(hostile, "export")


def test_pt2_with_pickled_weights_is_rejected(tmp_path: Path) -> None:
    valid = mf.tiny_cnn_export(tmp_path / "m.pt2")
    config = b'{"config": {"w": {"path_name": "weight_9", "use_pickle": true}}}'
    hostile = mf.zip_rewritten(
        valid, tmp_path / "pickled.pt2", {"data/weights/model_weights_config.json": config}
    )
    with pytest.raises(ModelRejected, match="is pickled"):
        screen_archive(hostile, "export")


@pytest.mark.parametrize(
    ("name", "symlink", "expected"),
    [
        ("../evil", False, "climbs out of the archive"),
        ("/etc/cron.d/evil", False, "absolute"),
        ("{root}/data/7", True, "symbolic link"),
        ("{root}/lib/libevil.so.1", False, "native library"),
    ],
)
def test_hostile_entries_in_a_torchscript_archive_are_rejected(
    tmp_path: Path, name: str, symlink: bool, expected: str
) -> None:
    valid = mf.tiny_cnn_torchscript(tmp_path / "m.pt")
    hostile = mf.zip_with_entry(
        tmp_path / "h.pt", name.format(root=mf_root(valid)), base=valid, symlink=symlink
    )
    with pytest.raises(ModelRejected, match=expected):
        screen_archive(hostile, "torchscript")


def test_zip_bomb_is_rejected_without_extracting(tmp_path: Path) -> None:
    valid = mf.tiny_cnn_torchscript(tmp_path / "m.pt")
    bomb = mf.zip_bomb(tmp_path / "bomb.pt", base=valid)
    assert bomb.stat().st_size < 1024**2  # the file is small; its entry claims 64 MiB
    with pytest.raises(ModelRejected, match="compression bomb"):
        screen_archive(bomb, "torchscript")


def test_safetensors_header_longer_than_the_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "lying.safetensors"
    path.write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(ModelRejected, match="header claims"):
        screen_archive(path, "safetensors")


def mf_root(archive: Path) -> str:
    with zipfile.ZipFile(archive) as z:
        return z.namelist()[0].split("/")[0]


def test_a_traced_model_keeping_its_example_inputs_is_admitted(tmp_path: Path) -> None:
    """torch.jit.trace stores its example inputs (`traced_inputs/`) unless told not to."""
    eager = mf.build_tiny_cnn()
    path = tmp_path / "traced.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(eager.eval(), torch.zeros(1, 1, 16, 16)), str(path))
    assert any("traced_inputs" in n for n in zipfile.ZipFile(path).namelist())
    spec = ModelSpec.model_validate(
        {"name": "traced", "task": "reconstruction", "input": "adjoint", "image_shape": [1, 16, 16]}
    )
    admission = admit(path, "torchscript", spec, "cpu")
    assert admission.ok, admission.reason
