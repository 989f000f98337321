"""The one rendering of errors: RFC 9457 `application/problem+json`.

The rules and the routes raise the domain errors of service.domain.errors (`TightropeError`
subclasses); `install_error_handlers` turns them, FastAPI's validation errors, Starlette's HTTP
errors, the database's failures and anything unexpected into problem documents, so a client
always gets a stable `type`, a `title` and a `detail` it can act on, never a stack trace.
`problem_responses` documents those answers in the OpenAPI description.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy.exc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from schemas import problem as problems
from schemas.problem import PROBLEM_MEDIA_TYPE, FieldError, Problem, ProblemType
from service.domain.errors import (
    BUSY_RETRY_AFTER_SECONDS,
    MalformedRequest,
    NotFound,
    NotReady,
    ServiceBusy,
    StorageUnavailableError,
    TightropeError,
    ValidationFailed,
)
from service.storage.objects import ObjectMissing, StorageError, StorageFull

log = logging.getLogger(__name__)


def problem_response(problem: Problem, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        problem.model_dump(mode="json", exclude_none=True),
        status_code=problem.status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=dict(headers or {}),
    )


def field_errors(raw: Sequence[Any], prefix: Sequence[str | int] = ()) -> list[FieldError]:
    """Pydantic's error dicts as FieldErrors, locations prefixed (e.g. with the form field)."""
    out: list[FieldError] = []
    for err in raw:
        loc = [*prefix, *(p if isinstance(p, int) else str(p) for p in err.get("loc", ()))]
        out.append(FieldError(loc=loc, msg=str(err.get("msg", "")), type=str(err.get("type", ""))))
    return out


def describe(errors: Sequence[FieldError]) -> str:
    """One line naming every offending field, for the problem's human-readable `detail`."""
    parts = [f"{'.'.join(str(p) for p in e.loc) or '(body)'}: {e.msg}" for e in errors[:10]]
    more = f" (and {len(errors) - 10} more)" if len(errors) > 10 else ""
    return "; ".join(parts) + more


# The problem type of each status the web framework raises itself (any other: `http-error`).
_FRAMEWORK_ERRORS: dict[int, ProblemType] = {
    kind.status: kind
    for kind in (
        problems.BAD_REQUEST,
        problems.UNAUTHORIZED,
        problems.NOT_FOUND,
        problems.METHOD_NOT_ALLOWED,
        problems.NOT_ACCEPTABLE,
        problems.CONFLICT,
        problems.PAYLOAD_TOO_LARGE,
        problems.UNSUPPORTED_MEDIA_TYPE,
        problems.VALIDATION_FAILED,
    )
    if kind.status is not None
}


_DESCRIPTIONS = {
    **{status: kind.title for status, kind in _FRAMEWORK_ERRORS.items()},
    412: "Precondition failed",
    416: "Range not satisfiable (with `Content-Range: bytes */<size>`)",
    429: "Too many audits waiting (with Retry-After)",
    500: problems.INTERNAL_ERROR.title,
    503: "Not ready, or busy (with Retry-After)",
}


# Every method RFC 9110 defines, and PATCH (RFC 5789): the candidates a 405's `Allow` may list.
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route of the app answers at this request's path (for a 405's `Allow`,
    RFC 9110 section 15.5.6): each candidate is put to the app's own routes, so a path served by
    several routes (GET and DELETE /v1/models/{id}) lists them all."""
    routes = request.app.router.routes
    allowed = []
    for method in HTTP_METHODS:
        scope = {
            "type": "http",
            "path": request.scope["path"],
            "root_path": request.scope.get("root_path", ""),
            "method": method,
        }
        if any(route.matches(scope)[0] is Match.FULL for route in routes):
            allowed.append(method)
    return allowed


async def _on_tightrope_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, TightropeError)
    return problem_response(exc.problem(instance=request.url.path), exc.headers)


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = field_errors(exc.errors())
    problem = ValidationFailed(describe(errors), errors=errors).problem(instance=request.url.path)
    return problem_response(problem)


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    kind = _FRAMEWORK_ERRORS.get(exc.status_code)
    title = kind.title if kind is not None else problems.HTTP_ERROR.title
    detail = exc.detail if isinstance(exc.detail, str) else title
    if kind is not None:
        problem = kind.problem(detail, instance=request.url.path)
    else:
        problem = problems.HTTP_ERROR.problem(
            detail, status=exc.status_code, instance=request.url.path
        )
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        # Starlette names only the methods of the one route it tried.
        allowed = allowed_methods(request)
        if allowed:
            headers["Allow"] = ", ".join(allowed)
    return problem_response(problem, headers)


async def _on_pool_timeout(request: Request, exc: Exception) -> JSONResponse:
    # No connection within db_pool_timeout_seconds: overload, not a fault of the request.
    log.warning("no database connection in time for %s %s", request.method, request.url.path)
    busy = ServiceBusy("No database connection was free in time; retry after Retry-After.")
    return problem_response(busy.problem(instance=request.url.path), busy.headers)


# Seconds a client should wait while the database is unreachable (a restart takes seconds).
DATABASE_DOWN_RETRY_AFTER_SECONDS = 5


async def _on_database_down(request: Request, exc: Exception) -> JSONResponse:
    # The database went away (a restart, a failover): nothing the request did is at fault,
    # and nothing was half-written (each request is one transaction).
    log.warning("database unreachable on %s %s: %s", request.method, request.url.path, exc)
    down = NotReady(
        "The database is unreachable for the moment; retry after Retry-After.",
        headers={"Retry-After": str(DATABASE_DOWN_RETRY_AFTER_SECONDS)},
    )
    return problem_response(down.problem(instance=request.url.path), down.headers)


async def _on_storage_error(request: Request, exc: Exception) -> JSONResponse:
    # The object store (service/storage/objects.py) failed a read or a write this request
    # needed: the upload is not stored, the download not sent (nothing half of either).
    if isinstance(exc, ObjectMissing):  # gone between the lookup and the read
        gone = NotFound("No such file.")
        return problem_response(gone.problem(instance=request.url.path))
    log.warning("object store failed on %s %s: %s", request.method, request.url.path, exc)
    if isinstance(exc, StorageFull):
        full = problems.STORAGE_FULL.problem(
            "The service's object store is full; nothing was stored. Retry later.",
            instance=request.url.path,
        )
        return problem_response(full)
    down = StorageUnavailableError(
        "The service's object store is unavailable for the moment; nothing was stored or sent. "
        "Retry after Retry-After."
    )
    return problem_response(down.problem(instance=request.url.path), down.headers)


async def _on_unstorable_value(request: Request, exc: Exception) -> JSONResponse:
    # psycopg refuses a NUL character in text (and similar values no column can hold): the
    # request's fault, and the transaction is rolled back, so nothing was stored.
    log.info("unstorable value on %s %s: %s", request.method, request.url.path, exc)
    refused = MalformedRequest(
        "A value in the request cannot be stored or looked up (NUL characters are not "
        "accepted in ids, names or any other text)."
    )
    return problem_response(refused.problem(instance=request.url.path))


async def _on_client_gone(request: Request, exc: Exception) -> JSONResponse:
    # Not a fault of the server: a client that closed its connection mid-request (an upload
    # cancelled). Nobody reads the answer; one line in the log, no traceback.
    log.info("client disconnected during %s %s", request.method, request.url.path)
    gone = MalformedRequest("The client closed the connection before the request was complete.")
    return problem_response(gone.problem(instance=request.url.path))


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    # The traceback goes to the log only: internals (paths, SQL, secrets) never reach a client.
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    problem = problems.INTERNAL_ERROR.problem(
        "The server failed to handle the request; it has been logged. Retry later.",
        instance=request.url.path,
    )
    return problem_response(problem)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(TightropeError, _on_tightrope_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(sqlalchemy.exc.TimeoutError, _on_pool_timeout)
    app.add_exception_handler(sqlalchemy.exc.OperationalError, _on_database_down)
    app.add_exception_handler(sqlalchemy.exc.InterfaceError, _on_database_down)
    app.add_exception_handler(sqlalchemy.exc.DataError, _on_unstorable_value)
    app.add_exception_handler(StorageError, _on_storage_error)
    app.add_exception_handler(ClientDisconnect, _on_client_gone)
    app.add_exception_handler(Exception, _on_unexpected)


def response_header(
    description: str, *, required: bool = True, schema: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """An OpenAPI response-header object (a string unless `schema` says otherwise)."""
    return {
        "description": description,
        "required": required,
        "schema": dict(schema) if schema is not None else {"type": "string"},
    }


def retry_after_header(description: str, *, required: bool = True) -> dict[str, Any]:
    """`Retry-After`: this service always sends delay-seconds, never an HTTP date."""
    return response_header(description, required=required, schema={"type": "integer", "minimum": 0})


# The headers each problem status always carries (a route may add or relax some: see
# `problem_responses(headers=...)`).
_PROBLEM_HEADERS: dict[int, dict[str, dict[str, Any]]] = {
    401: {
        "WWW-Authenticate": response_header(
            'The scheme to use (RFC 6750): `Bearer realm="tightrope"`'
        )
    },
    429: {"Retry-After": retry_after_header("Seconds to wait before submitting again")},
    503: {
        "Retry-After": retry_after_header(
            f"Seconds to wait before retrying ({BUSY_RETRY_AFTER_SECONDS} when busy, "
            f"{DATABASE_DOWN_RETRY_AFTER_SECONDS} while the database is unreachable)"
        )
    },
}


def problem_responses(
    *statuses: int, headers: Mapping[int, Mapping[str, dict[str, Any]]] | None = None
) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries documenting problem documents for the given statuses, with
    the headers each status carries (401: WWW-Authenticate; 429, 503: Retry-After); `headers`
    adds to or replaces those of a status (e.g. a Retry-After sent only sometimes)."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {
            "model": Problem,
            "description": _DESCRIPTIONS.get(status, "Problem"),
            "content": {PROBLEM_MEDIA_TYPE: {}},
        }
        declared = {**_PROBLEM_HEADERS.get(status, {}), **(headers or {}).get(status, {})}
        if declared:
            entry["headers"] = declared
        responses[status] = entry
    return responses
