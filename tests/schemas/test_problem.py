"""The table of problem types (schemas/problem.py): the documents it makes, and how a problem
stored by an older worker reads today."""

from __future__ import annotations

import pytest

from schemas import problem as problems
from schemas.problem import PROBLEM_BASE, read_stored


def test_a_document_has_the_types_slug_title_and_status() -> None:
    document = problems.TIME_LIMIT.document("ran out", extra={"limit_seconds": 3.0})
    assert document == {
        "type": PROBLEM_BASE + "time-limit",
        "title": "Time limit exceeded",
        "status": 422,
        "detail": "ran out",
        "extra": {"limit_seconds": 3.0},
    }


def test_only_http_error_takes_its_status_from_the_occurrence() -> None:
    assert problems.HTTP_ERROR.problem("gone", status=410).status == 410
    with pytest.raises(ValueError):
        problems.HTTP_ERROR.problem("no status")
    with pytest.raises(ValueError):
        problems.NOT_FOUND.problem("a second status", status=410)


def test_every_slug_has_one_status_and_the_shared_ones_agree() -> None:
    assert all(kind.slug == slug for slug, kind in problems.PROBLEM_TYPES.items())
    assert problems.MODEL_NOT_READY.status == 409
    assert problems.INTERNAL_ERROR.slug == "internal-error"


def test_an_older_workers_internal_reads_as_internal_error() -> None:
    stored = {
        "type": PROBLEM_BASE + "internal",
        "title": "Internal error in the audit engine",
        "status": 500,
        "detail": "ValueError: one seed per image",
    }
    read = read_stored(stored)
    assert (read.type, read.title, read.status) == (
        PROBLEM_BASE + "internal-error",
        "Internal error",
        500,
    )
    assert read.detail == stored["detail"]


def test_an_older_workers_model_not_ready_reads_with_the_one_status() -> None:
    stored = {
        "type": PROBLEM_BASE + "model-not-ready",
        "title": "Model not ready",
        "status": 422,
        "detail": "model mdl_1 is not ready",
    }
    read = read_stored(stored)
    assert (read.status, read.title) == (409, problems.MODEL_NOT_READY.title)


def test_an_unknown_stored_type_is_kept_as_stored() -> None:
    stored = {
        "type": PROBLEM_BASE + "model-crashed",
        "title": "The model crashed",
        "status": 500,
        "detail": "the runner exited with signal 9",
        "extra": {"signal": 9},
    }
    assert read_stored(stored).model_dump(exclude_none=True) == stored
