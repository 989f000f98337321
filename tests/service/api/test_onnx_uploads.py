"""`POST /v1/models` with ONNX files: recognised from the protobuf's bytes by the gateway
(service.api.inspect_onnx, no onnx or torch), refused with a reason when the worker would refuse
them anyway."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api.inspect_onnx import inspect_onnx
from service.domain.errors import InvalidUpload
from tests.fixtures import model_factory
from tests.service.conftest import MAX_UPLOAD, assert_problem, upload_model

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def unet_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_factory.small_unet_onnx(tmp_path_factory.mktemp("onnx") / "unet.bin")


def test_an_onnx_upload_is_detected_from_its_bytes(
    client: TestClient, auth: dict[str, str], unet_onnx: Path
) -> None:
    response = upload_model(client, auth, unet_onnx, model_factory.small_unet_spec())
    assert response.status_code == 202, response.text
    assert response.json()["format"] == "onnx"  # named .bin: the bytes decide
    facts = inspect_onnx(unet_onnx)
    assert facts["opsets"] == {"ai.onnx": model_factory.ONNX_OPSET}
    assert facts["nodes"] > 5 and facts["initializers"] > 0


def test_a_malformed_onnx_protobuf_is_refused(
    client: TestClient, auth: dict[str, str], unet_onnx: Path, tmp_path: Path
) -> None:
    cut = model_factory.truncated_copy(unet_onnx, tmp_path / "cut.onnx", fraction=0.6)
    body = assert_problem(upload_model(client, auth, cut), 422, "invalid-upload")
    assert "not an ONNX model: the protobuf is malformed or truncated" in body["detail"]


def test_an_oversized_onnx_model_is_413(
    client: TestClient, auth: dict[str, str], unet_onnx: Path, tmp_path: Path
) -> None:
    big = model_factory.oversized_onnx(unet_onnx, tmp_path / "big.onnx", MAX_UPLOAD + 1)
    assert inspect_onnx(big)["nodes"] > 5  # a valid model, only too large
    assert_problem(upload_model(client, auth, big), 413, "payload-too-large")


@pytest.mark.parametrize(
    ("writer", "words"),
    [
        (model_factory.external_data_onnx, "stored in an external file"),
        (model_factory.custom_domain_onnx, "com.example"),
    ],
)
def test_external_data_and_custom_operators_are_refused_at_the_gateway(
    client: TestClient, auth: dict[str, str], tmp_path: Path, writer, words: str
) -> None:
    path = writer(tmp_path / "model.onnx")
    body = assert_problem(upload_model(client, auth, path), 422, "invalid-upload")
    assert words in body["detail"]


def test_onnx_functions_are_refused(tmp_path: Path, unet_onnx: Path) -> None:
    import onnx
    from onnx import helper

    model = onnx.load(str(unet_onnx))
    twice = [helper.make_node("Add", ["a", "a"], ["b"])]
    opsets = [helper.make_opsetid("", model_factory.ONNX_OPSET)]
    model.functions.append(helper.make_function("", "Twice", ["a"], ["b"], twice, opsets))
    (tmp_path / "functions.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(InvalidUpload, match="defines functions"):
        inspect_onnx(tmp_path / "functions.onnx")
