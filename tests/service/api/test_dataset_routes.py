"""`/v1/datasets`: numeric arrays only, read without unpickling."""

from __future__ import annotations

import io
import json
import zipfile
from typing import Any

import numpy as np
from fastapi.testclient import TestClient

from tests.service.conftest import assert_problem, new_key


def upload(client: TestClient, auth: dict[str, str], name: str, data: bytes, **spec: Any) -> Any:
    return client.post(
        "/v1/datasets",
        headers=auth,
        files={"file": (name, data)},
        data={"spec": json.dumps({"name": "images", **spec})},
    )


def npy_bytes(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def test_npy_upload(client: TestClient, auth: dict[str, str]) -> None:
    images = np.random.default_rng(0).random((3, 1, 16, 16)).astype(np.float32)
    response = upload(client, auth, "x.npy", npy_bytes(images))
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["format"] == "npy" and body["shape"] == [3, 1, 16, 16]
    assert response.headers["location"] == f"/v1/datasets/{body['id']}"
    assert client.get(f"/v1/datasets/{body['id']}", headers=auth).json() == body
    assert [d["id"] for d in client.get("/v1/datasets", headers=auth).json()["items"]] == [
        body["id"]
    ]


def test_three_dimensional_images_get_one_channel(client: TestClient, auth: dict[str, str]) -> None:
    response = upload(client, auth, "x.npy", npy_bytes(np.zeros((2, 8, 8), np.uint8)))
    assert response.status_code == 201 and response.json()["shape"] == [2, 1, 8, 8]


def test_npz_with_key_records_every_array(client: TestClient, auth: dict[str, str]) -> None:
    data = npz_bytes(mask=np.ones((16, 16)), images=np.zeros((2, 2, 16, 16), np.float32))
    response = upload(client, auth, "x.npz", data, key="images")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["format"] == "npz" and body["shape"] == [2, 2, 16, 16]
    assert body["arrays"] == {"mask": [16, 16], "images": [2, 2, 16, 16]}
    missing = assert_problem(upload(client, auth, "x.npz", data, key="nope"), 422)
    assert "nope" in missing["detail"]


def test_bad_datasets_are_refused(client: TestClient, auth: dict[str, str]) -> None:
    pickled = npy_bytes(np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    body = assert_problem(upload(client, auth, "x.npy", pickled), 422, "invalid-upload")
    assert "pickl" in body["detail"]
    nan = np.zeros((1, 1, 4, 4))
    nan[0, 0, 1, 1] = np.nan
    assert "NaN" in assert_problem(upload(client, auth, "x.npy", npy_bytes(nan)), 422)["detail"]
    flat = npy_bytes(np.zeros((16,)))
    assert "[N, C, H, W]" in assert_problem(upload(client, auth, "x.npy", flat), 422)["detail"]
    strings = npy_bytes(np.array([["a"]]))
    assert_problem(upload(client, auth, "x.npy", strings), 422)
    assert_problem(upload(client, auth, "x.npy", npy_bytes(np.zeros((2, 8, 8)))[:100]), 422)
    assert_problem(upload(client, auth, "x.bin", b"just some bytes"), 422, "invalid-upload")
    pngs = io.BytesIO()
    with zipfile.ZipFile(pngs, "w") as archive:
        archive.writestr("a.png", b"\x89PNG")
    body = assert_problem(upload(client, auth, "x.zip", pngs.getvalue()), 422)
    assert ".npy" in body["detail"]
    spec = client.post(
        "/v1/datasets",
        headers=auth,
        files={"file": ("x.npy", npy_bytes(np.zeros((1, 4, 4))))},
        data={"spec": json.dumps({"name": ""})},
    )
    assert assert_problem(spec, 422)["errors"][0]["loc"] == ["spec", "name"]
    assert client.get("/v1/datasets", headers=auth).json()["items"] == []


def test_uploads_every_audit_would_refuse_are_refused_here(
    client: TestClient, auth: dict[str, str]
) -> None:
    """The gateway and the engine share one rule (schemas.archive_rules): no upload is accepted
    that every audit then refuses."""
    complex_images = npy_bytes(np.zeros((2, 8, 8), np.complex64))
    detail = assert_problem(upload(client, auth, "x.npy", complex_images), 422)["detail"]
    assert "complex" in detail and "two channels" in detail
    too_many = npy_bytes(np.zeros((4097, 1, 1), np.uint8))
    detail = assert_problem(upload(client, auth, "x.npy", too_many), 422)["detail"]
    assert "4097 images" in detail and "4096" in detail
    ok = upload(client, auth, "x.npy", npy_bytes(np.zeros((4096, 1, 1), np.uint8)))
    assert ok.status_code == 201, ok.text


def test_other_tenants_dataset_is_404(client: TestClient, auth: dict[str, str]) -> None:
    dataset_id = upload(client, auth, "x.npy", npy_bytes(np.zeros((1, 4, 4)))).json()["id"]
    assert_problem(client.get(f"/v1/datasets/{dataset_id}", headers=new_key(client)), 404)
    assert_problem(client.get("/v1/datasets/ds_nope", headers=auth), 404)


def test_pickled_npz_member_is_refused(client: TestClient, auth: dict[str, str]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, images=np.array([object()], dtype=object))
    body = assert_problem(upload(client, auth, "x.npz", buffer.getvalue()), 422, "invalid-upload")
    assert "pickl" in body["detail"]
