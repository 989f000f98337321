"""The domain errors: one exception class per kind of problem a client caused or can act on,
each carrying its entry of the one table of problem types (schemas.problem: slug, title,
status).

The rules (service.domain.audit_rules, service.domain.resource_rules, and the page tokens of
service.domain.pagination) raise the first group; the HTTP layer raises the second while it
reads a request (its body, its key, its upload, a range) or finds the service unable to serve
it. Nothing here speaks HTTP: the `headers` an error carries (Retry-After, WWW-Authenticate) are
what its rendering must send along. The API renders every one of them as a problem document
(service/api/problems.py, its one exception handler); the console as an error page with the
same status and words (service/api/console/routes.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from schemas import problem as problems
from schemas.problem import FieldError, Problem, ProblemType


class TightropeError(Exception):
    """A problem a client caused or can act on; `kind` is its entry in the table of problem
    types (schemas.problem.PROBLEM_TYPES), which gives its slug, title and status."""

    kind: ClassVar[ProblemType] = problems.BAD_REQUEST

    def __init__(
        self,
        detail: str,
        *,
        errors: Sequence[FieldError] | None = None,
        headers: Mapping[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = list(errors) if errors is not None else None
        self.headers = dict(headers or {})
        self.extra = extra

    @property
    def status(self) -> int:
        assert self.kind.status is not None
        return self.kind.status

    @property
    def type(self) -> str:
        return self.kind.slug

    @property
    def title(self) -> str:
        return self.kind.title

    def problem(self, instance: str | None = None) -> Problem:
        return self.kind.problem(
            self.detail, instance=instance, errors=self.errors, extra=self.extra
        )


# -- Raised by the rules (ValidationFailed by the HTTP layer too, for a body it cannot read) ----


class NotFound(TightropeError):
    kind = problems.NOT_FOUND


class Conflict(TightropeError):
    kind = problems.CONFLICT


class ModelNotReady(Conflict):
    kind = problems.MODEL_NOT_READY


class AuditFinished(Conflict):
    kind = problems.AUDIT_FINISHED


class ReportNotReady(Conflict):
    kind = problems.REPORT_NOT_READY


class ValidationFailed(TightropeError):
    kind = problems.VALIDATION_FAILED


class IdempotencyKeyReused(TightropeError):
    kind = problems.IDEMPOTENCY_KEY_REUSED


# Seconds a tenant told `too-many-audits` should wait before it submits again.
TOO_MANY_AUDITS_RETRY_AFTER_SECONDS = 30


class TooManyAudits(TightropeError):
    """The tenant already has tenant_max_queued_audits audits waiting to start (docs/http-api.md,
    "Fair share and quotas"): nothing was stored; the client retries after Retry-After."""

    kind = problems.TOO_MANY_AUDITS

    def __init__(self, limit: int, queued: int) -> None:
        super().__init__(
            f"This tenant has {queued} audits queued; the limit is {limit}. Submit again once "
            "some have started (poll GET /v1/audits?status=queued), or cancel some.",
            headers={"Retry-After": str(TOO_MANY_AUDITS_RETRY_AFTER_SECONDS)},
            extra={"limit": limit, "queued": queued},
        )


# -- Raised by the HTTP layer: the request itself, its key, its upload, the service's state ----


class MalformedRequest(TightropeError):
    kind = problems.MALFORMED_REQUEST


class Unauthorized(TightropeError):
    kind = problems.UNAUTHORIZED

    def __init__(self, detail: str) -> None:
        # RFC 6750: a 401 for bearer auth names the scheme the client must use.
        super().__init__(detail, headers={"WWW-Authenticate": 'Bearer realm="tightrope"'})


class RangeNotSatisfiableError(TightropeError):
    kind = problems.RANGE_NOT_SATISFIABLE


class PreconditionFailed(TightropeError):
    kind = problems.PRECONDITION_FAILED


class PayloadTooLarge(TightropeError):
    kind = problems.PAYLOAD_TOO_LARGE


class UnsupportedMediaType(TightropeError):
    kind = problems.UNSUPPORTED_MEDIA_TYPE


class InvalidUpload(TightropeError):
    kind = problems.INVALID_UPLOAD


class NotReady(TightropeError):
    kind = problems.NOT_READY


# Seconds a client told `busy` should wait before it retries.
BUSY_RETRY_AFTER_SECONDS = 1


class ServiceBusy(TightropeError):
    """Every database slot stayed taken for the whole wait (service.api.db_slots), or no pooled
    connection came in time: the request did nothing; the client retries after Retry-After."""

    kind = problems.BUSY

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"Retry-After": str(BUSY_RETRY_AFTER_SECONDS)})


# Seconds a client told `storage-unavailable` should wait before it retries.
STORAGE_RETRY_AFTER_SECONDS = 5


class StorageUnavailableError(TightropeError):
    """The object store could not be reached or refused the service: nothing was stored (an
    upload) or sent (a download); the client retries after Retry-After."""

    kind = problems.STORAGE_UNAVAILABLE

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"Retry-After": str(STORAGE_RETRY_AFTER_SECONDS)})
