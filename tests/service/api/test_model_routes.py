"""`/v1/models`: uploads stream to the blob store, bad files are refused with a reason."""

from __future__ import annotations

import pickle
from pathlib import Path

import redis
import torch
from fastapi.testclient import TestClient

from service.db.tables import Model
from service.queue.broker import QUEUE_ADMISSION
from tests.fixtures import model_factory
from tests.service.conftest import (
    MAX_UPLOAD,
    SPEC,
    ModelFiles,
    assert_problem,
    broker_count,
    broker_messages,
    new_key,
    sessions_of,
    upload_model,
)


def blobs(client: TestClient) -> list[Path]:
    """Every file in the blob store, staging area included."""
    root: Path = client.app.state.blobs.root  # type: ignore[attr-defined]
    return [p for p in root.rglob("*") if p.is_file()]


def test_torchscript_upload_is_stored_and_enqueued(
    client: TestClient, auth: dict[str, str], model_files: ModelFiles, broker: redis.Redis
) -> None:
    queued_before = broker_count(broker)
    response = upload_model(client, auth, model_files.torchscript)
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "validating"
    assert body["format"] == "torchscript"
    assert body["size_bytes"] == model_files.torchscript.stat().st_size
    assert response.headers["location"] == f"/v1/models/{body['id']}"
    with sessions_of(client)() as session:
        row = session.get(Model, body["id"])
        assert row is not None and row.status == "validating"
    assert client.app.state.blobs.exists(body["sha256"])  # type: ignore[attr-defined]
    # Admissions have their own queue: they never wait behind an audit.
    assert broker_count(broker) == queued_before + 1
    _, message = broker_messages(broker, QUEUE_ADMISSION)[-1]
    assert message["headers"]["task"] == "tightrope.admit_model"
    assert message["headers"]["argsrepr"] == repr([body["id"]])


def test_export_and_safetensors_formats_are_detected(
    client: TestClient, auth: dict[str, str], model_files: ModelFiles
) -> None:
    exported = upload_model(client, auth, model_files.export)
    assert exported.status_code == 202, exported.text
    assert exported.json()["format"] == "export"
    spec = model_factory.registered_spec("unet")
    weights = upload_model(client, auth, model_files.safetensors, spec)
    assert weights.status_code == 202, weights.text
    assert weights.json()["format"] == "safetensors"


def test_safetensors_without_architecture_is_refused(
    client: TestClient, auth: dict[str, str], model_files: ModelFiles
) -> None:
    body = assert_problem(
        upload_model(client, auth, model_files.safetensors), 422, "invalid-upload"
    )
    assert "spec.architecture" in body["detail"]


def test_upload_over_the_cap_is_413_and_keeps_nothing(
    client: TestClient, auth: dict[str, str], tmp_path: Path
) -> None:
    big = tmp_path / "big.pt"
    big.write_bytes(b"\0" * (MAX_UPLOAD + 1))
    assert_problem(upload_model(client, auth, big), 413, "payload-too-large")
    assert blobs(client) == []


def test_garbage_is_refused_and_nothing_is_kept(
    client: TestClient, auth: dict[str, str], tmp_path: Path
) -> None:
    garbage = model_factory.make_garbage(tmp_path / "garbage.pt")
    assert_problem(upload_model(client, auth, garbage), 422, "invalid-upload")
    assert blobs(client) == []
    assert client.get("/v1/models", headers=auth).json()["items"] == []


def test_truncated_archive_is_refused(
    client: TestClient, auth: dict[str, str], model_files: ModelFiles, tmp_path: Path
) -> None:
    truncated = model_factory.truncated_copy(model_files.torchscript, tmp_path / "cut.pt")
    body = assert_problem(upload_model(client, auth, truncated), 422, "invalid-upload")
    assert "truncated" in body["detail"]


def test_hostile_archives_are_refused(
    client: TestClient, auth: dict[str, str], model_files: ModelFiles, tmp_path: Path
) -> None:
    base = model_files.torchscript
    cases = {
        "../evil": "climbs out",
        "/etc/evil": "absolute",
        "tiny\\evil": "backslash",
        "tiny/libevil.so": "native library",
    }
    for i, (name, reason) in enumerate(cases.items()):
        hostile = model_factory.zip_with_entry(tmp_path / f"h{i}.pt", name, base=base)
        body = assert_problem(upload_model(client, auth, hostile), 422, "invalid-upload")
        assert reason in body["detail"], (name, body["detail"])
    link = model_factory.zip_with_entry(
        tmp_path / "link.pt", "tiny/data/link", b"/etc/passwd", base=base, symlink=True
    )
    body = assert_problem(upload_model(client, auth, link), 422, "invalid-upload")
    assert "symbolic link" in body["detail"]


def test_zip_bombs_are_refused(
    client: TestClient, auth: dict[str, str], model_files: ModelFiles, tmp_path: Path
) -> None:
    # 8 MiB of zeros in ~8 KiB: under the 16 MiB total cap, far over the 200-fold ratio cap.
    ratio = model_factory.zip_bomb(tmp_path / "ratio.pt", 8 * 1024**2, base=model_files.torchscript)
    body = assert_problem(upload_model(client, auth, ratio), 422, "invalid-upload")
    assert "fold" in body["detail"]
    # 64 MiB expanded: past the total cap whatever the ratio.
    total = model_factory.zip_bomb(tmp_path / "total.pt", 64 * 1024**2)
    body = assert_problem(upload_model(client, auth, total), 422, "invalid-upload")
    assert "expand past" in body["detail"]


def test_invalid_spec_names_the_field(
    client: TestClient, auth: dict[str, str], model_files: ModelFiles
) -> None:
    spec = {**SPEC, "image_shape": [1, 16]}
    body = assert_problem(upload_model(client, auth, model_files.torchscript, spec), 422)
    assert body["errors"][0]["loc"][:2] == ["spec", "image_shape"]
    assert "spec.image_shape" in body["detail"]
    not_json = assert_problem(upload_model(client, auth, model_files.torchscript, "{oops"), 422)
    assert not_json["errors"][0]["loc"][0] == "spec"
    response = client.post(
        "/v1/models",
        headers=auth,
        files={"file": ("m.pt", model_files.torchscript.read_bytes())},
    )
    assert "spec" in assert_problem(response, 422)["detail"]
    assert blobs(client) == []


def test_not_multipart_is_415(client: TestClient, auth: dict[str, str]) -> None:
    response = client.post("/v1/models", headers=auth, json={"spec": SPEC})
    assert_problem(response, 415, "unsupported-media-type")


def test_list_read_delete(
    client: TestClient, auth: dict[str, str], model_files: ModelFiles
) -> None:
    ids = [upload_model(client, auth, model_files.torchscript).json()["id"] for _ in range(3)]
    first = client.get("/v1/models", headers=auth, params={"page_size": 2}).json()
    assert [m["id"] for m in first["items"]] == ids[::-1][:2]  # newest first
    second = client.get(
        "/v1/models", headers=auth, params={"page_size": 2, "page_token": first["next_page_token"]}
    ).json()
    assert [m["id"] for m in second["items"]] == [ids[0]]
    assert second["next_page_token"] is None

    assert client.get(f"/v1/models/{ids[0]}", headers=auth).json()["id"] == ids[0]
    assert client.delete(f"/v1/models/{ids[0]}", headers=auth).status_code == 204
    assert_problem(client.get(f"/v1/models/{ids[0]}", headers=auth), 404, "not-found")
    assert_problem(client.delete(f"/v1/models/{ids[0]}", headers=auth), 404)
    assert len(client.get("/v1/models", headers=auth).json()["items"]) == 2


def test_unknown_and_foreign_models_are_404(
    client: TestClient, auth: dict[str, str], model_files: ModelFiles
) -> None:
    assert_problem(client.get("/v1/models/mdl_nope", headers=auth), 404, "not-found")
    model_id = upload_model(client, auth, model_files.torchscript).json()["id"]
    other = new_key(client)
    assert_problem(client.get(f"/v1/models/{model_id}", headers=other), 404, "not-found")
    assert_problem(client.delete(f"/v1/models/{model_id}", headers=other), 404)
    assert client.get("/v1/models", headers=other).json()["items"] == []


def test_bad_page_token_and_page_size(client: TestClient, auth: dict[str, str]) -> None:
    body = assert_problem(
        client.get("/v1/models", headers=auth, params={"page_token": "not-a-token"}), 422
    )
    assert body["errors"][0]["loc"] == ["query", "page_token"]
    body = assert_problem(client.get("/v1/models", headers=auth, params={"page_size": 0}), 422)
    assert body["errors"][0]["loc"] == ["query", "page_size"]


def test_a_raw_pickle_is_refused_with_the_formats_and_how_to_save(
    client: TestClient, auth: dict[str, str], tmp_path: Path
) -> None:
    """A `.pt` that is a raw pickle (torch.save without its zip format, or pickle.dump) is
    refused for what it is, with the accepted formats and how to save each: not as "not a
    .safetensors file"."""
    legacy = tmp_path / "legacy.pt"
    weights = {"conv.weight": torch.zeros(4, 1, 3, 3)}
    torch.save(weights, legacy, _use_new_zipfile_serialization=False)
    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps({"conv.weight": [0.0] * 36}, protocol=4))
    latest = tmp_path / "latest.pt"
    latest.write_bytes(pickle.dumps({"conv.weight": [0.0] * 36}, protocol=5))
    for path in (legacy, plain, latest):
        body = assert_problem(upload_model(client, auth, path), 422, "invalid-upload")
        detail = body["detail"]
        assert "not a .safetensors file" not in detail, detail
        assert "raw pickle" in detail and "not accepted" in detail, detail
        for how in ("torch.jit.save", "torch.export.save", "torch.onnx.export", "save_file"):
            assert how in detail, (how, detail)
    assert blobs(client) == []


def test_the_resource_says_whether_the_admission_found_a_sampler(
    client: TestClient, auth: dict[str, str], model_files: ModelFiles
) -> None:
    """`stochastic` and `output_spread` come from the admission probe's facts; null before."""
    body = upload_model(client, auth, model_files.torchscript).json()
    assert (body["stochastic"], body["output_spread"]) == (None, None)  # validating
    for info, expected in [
        ({"probe": "passed", "stochastic": True, "output_spread": 0.122}, (True, 0.122)),
        ({"probe": "passed", "stochastic": False, "output_spread": 0.0}, (False, 0.0)),
        ({"probe": "deferred"}, (None, None)),
    ]:
        with sessions_of(client)() as session:
            row = session.get(Model, body["id"])
            assert row is not None
            row.status, row.admission_info = "ready", info
            session.commit()
        read = client.get(f"/v1/models/{body['id']}", headers=auth).json()
        assert (read["stochastic"], read["output_spread"]) == expected
