"""The stored request read back typed (service/db/stored_request.py): the schema's defaults for
what the stored document leaves out, and a clear error, naming the audit and the field, for a
document that no longer validates; the callback reader tolerates such a document."""

from __future__ import annotations

import pytest

from service.db.stored_request import StoredRequestInvalid, stored_callback_url, stored_request

STORED = {
    "model_id": "mdl_1",
    "dataset": {"builtin": "shepp_logan", "count": 2, "size": 16, "seed": 0},
    "checks": [{"kind": "random_noise", "levels": [0.01], "samples": 2}],
}


def test_a_stored_request_reads_back_typed_with_the_schemas_defaults() -> None:
    request = stored_request(
        dict(STORED, budget={"wall_seconds": 30}, callback_url="https://example.com/hook")
    )
    assert request.model_id == "mdl_1"
    assert request.budget.wall_seconds == 30.0
    assert str(request.callback_url) == "https://example.com/hook"
    assert (request.device, request.priority, request.compare_with) == ("auto", "normal", None)

    bare = stored_request(STORED)
    assert bare.budget.wall_seconds is None and bare.callback_url is None


def test_a_stored_request_that_no_longer_validates_names_the_audit_and_the_field() -> None:
    with pytest.raises(StoredRequestInvalid) as raised:
        stored_request(dict(STORED, retired_field=1), audit_id="aud_old")
    message = str(raised.value)
    assert "audit aud_old" in message and "no longer validates" in message
    assert "retired_field" in message
    assert isinstance(raised.value, ValueError)
    with pytest.raises(StoredRequestInvalid, match="checks"):
        stored_request(None)


def test_the_callback_reader_finds_none_in_a_request_that_no_longer_validates() -> None:
    assert stored_callback_url(dict(STORED, callback_url="http://127.0.0.1:9/")) == (
        "http://127.0.0.1:9/"
    )
    assert stored_callback_url(STORED) is None
    assert stored_callback_url({"callback_url": "http://127.0.0.1:9/"}, audit_id="a") is None
