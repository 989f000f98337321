"""RFC 9457 problem details, and the one table of the problem types this service writes.

Every problem document, the gateway's answers (the domain errors of service.domain.errors,
rendered by service.api.problems) and the `error` of a failed audit (workers.execution), is made
by `ProblemType.problem` or `.document` from an entry of `PROBLEM_TYPES`: one slug, one title,
one status each (docs/http-api.md, "Problem types", lists the same slugs; tests/test_layers.py
checks both, and that no slug is spelled elsewhere).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_BASE = "https://tightrope.dev/problems/"


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class Problem(BaseModel):
    type: str = Field(description="Stable URI naming the kind of problem")
    title: str
    status: int
    detail: str
    instance: str | None = None
    errors: list[FieldError] | None = Field(default=None, description="Per-field validation errors")
    extra: dict[str, Any] | None = None


@dataclass(frozen=True)
class ProblemType:
    """One kind of problem: `type` is PROBLEM_BASE + slug. `status` None only for `http-error`,
    whose status is the one the web framework raised."""

    slug: str
    status: int | None
    title: str

    @property
    def uri(self) -> str:
        return PROBLEM_BASE + self.slug

    def problem(
        self,
        detail: str,
        *,
        status: int | None = None,
        instance: str | None = None,
        errors: Sequence[FieldError] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Problem:
        """The problem document of one occurrence; `status` only where the table has none."""
        if (status is None) == (self.status is None):
            raise ValueError(f"{self.slug}: a status is given exactly where the table has none")
        return Problem(
            type=self.uri,
            title=self.title,
            status=self.status if self.status is not None else status,
            detail=detail,
            instance=instance,
            errors=list(errors) if errors is not None else None,
            extra=extra,
        )

    def document(
        self, detail: str, *, status: int | None = None, extra: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """`problem` as the JSON object a failed audit stores in its `error`."""
        found = self.problem(detail, status=status, extra=extra)
        return found.model_dump(mode="json", exclude_none=True)


PROBLEM_TYPES: dict[str, ProblemType] = {}


def _define(slug: str, status: int | None, title: str) -> ProblemType:
    assert slug not in PROBLEM_TYPES, slug
    PROBLEM_TYPES[slug] = ProblemType(slug, status, title)
    return PROBLEM_TYPES[slug]


# Answers of the gateway (the domain errors of service.domain.errors).
BAD_REQUEST = _define("bad-request", 400, "Bad request")
MALFORMED_REQUEST = _define("malformed-request", 400, "The request could not be parsed")
UNAUTHORIZED = _define("unauthorized", 401, "Missing or invalid API key")
NOT_FOUND = _define("not-found", 404, "Not found")
METHOD_NOT_ALLOWED = _define("method-not-allowed", 405, "Method not allowed")
NOT_ACCEPTABLE = _define("not-acceptable", 406, "Not acceptable")
CONFLICT = _define("conflict", 409, "Conflict with the resource's state")
AUDIT_FINISHED = _define("audit-finished", 409, "The audit has already finished")
REPORT_NOT_READY = _define("report-not-ready", 409, "The report is not ready")
PRECONDITION_FAILED = _define("precondition-failed", 412, "Precondition failed")
PAYLOAD_TOO_LARGE = _define("payload-too-large", 413, "Request body too large")
UNSUPPORTED_MEDIA_TYPE = _define("unsupported-media-type", 415, "Unsupported media type")
RANGE_NOT_SATISFIABLE = _define("range-not-satisfiable", 416, "Range not satisfiable")
VALIDATION_FAILED = _define("validation-failed", 422, "The request is not valid")
INVALID_UPLOAD = _define("invalid-upload", 422, "The uploaded file was refused")
IDEMPOTENCY_KEY_REUSED = _define(
    "idempotency-key-reused", 422, "Idempotency-Key reused with another body"
)
TOO_MANY_AUDITS = _define("too-many-audits", 429, "Too many audits waiting")
NOT_READY = _define("not-ready", 503, "The service is not ready")
BUSY = _define("busy", 503, "The service is busy")
HTTP_ERROR = _define("http-error", None, "HTTP error")

# Both: the gateway answers them, and an audit fails with them (its `error`).
# The model is not `ready`: at submission (the gateway, with Retry-After while it validates),
# or by the time a worker takes the audit (deleted meanwhile). 409 in both: the model's state,
# not the audit request, is what is wrong (workers said 422 before; stored ones read as 409).
MODEL_NOT_READY = _define("model-not-ready", 409, "The model is not ready for audits")
# A fault of the service, never blamed on the input: the gateway's unexpected exception, the
# engine's own bug, a report or plan of the runner that cannot be read.
INTERNAL_ERROR = _define("internal-error", 500, "Internal error")

# Failures of an audit (its `error`; workers.execution writes them).
TIME_LIMIT = _define("time-limit", 422, "Time limit exceeded")
MODEL_HUNG = _define("model-hung", 422, "Model hung")
MODEL_FAILED = _define("model-failed", 422, "The model failed its probe")
MEMORY_LIMIT = _define("memory-limit", 422, "Memory limit exceeded")
INVALID_AUDIT_INPUT = _define("invalid-audit-input", 422, "Invalid audit input")
ATTEMPTS_EXHAUSTED = _define("attempts-exhausted", 500, "Audit failed")
STORAGE_FULL = _define("storage-full", 507, "Storage full")
# The object store (TIGHTROPE_STORAGE_URL) cannot be reached, or refuses the service: the
# gateway answers it (with Retry-After) when an upload or a download needs the store; an audit
# fails with it only when the store refuses the workers (credentials, a missing bucket).
STORAGE_UNAVAILABLE = _define("storage-unavailable", 503, "The object store is unavailable")
# An endpoint model's audit (docs/models.md, "Endpoint models"): the vendor's endpoint could
# not be queried enough (it kept failing, time-outs, its circuit breaker stayed open), or the
# audit's query budget was spent before the checks had their queries. Either way the audit
# fails rather than passing on too few answers.
ENDPOINT_UNAVAILABLE = _define("endpoint-unavailable", 502, "The model's endpoint failed")
QUERY_BUDGET_EXHAUSTED = _define("query-budget-exhausted", 422, "The audit's query budget is spent")

# Slugs an older version stored in failed audits, and what they read as now.
LEGACY_SLUGS: dict[str, ProblemType] = {"internal": INTERNAL_ERROR}


def read_stored(error: dict[str, Any]) -> Problem:
    """A stored problem (a failed audit's `error`) as the table defines it today: a slug of an
    older version (`internal`) reads as its successor, and a known slug gets the table's title
    and status (a `model-not-ready` stored with 422 reads as 409); detail, extra and an unknown
    type are kept as stored."""
    problem = Problem.model_validate(error)
    if not problem.type.startswith(PROBLEM_BASE):
        return problem
    slug = problem.type[len(PROBLEM_BASE) :]
    kind = PROBLEM_TYPES.get(slug) or LEGACY_SLUGS.get(slug)
    if kind is None or kind.status is None:
        return problem
    return problem.model_copy(update={"type": kind.uri, "title": kind.title, "status": kind.status})
