"""The FastAPI application: `create_app(settings)` (a factory for uvicorn: `--factory`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema
from starlette.concurrency import run_in_threadpool

from schemas.problem import PROBLEM_MEDIA_TYPE
from service.api import audit_routes, dataset_routes, health, model_routes, signing_key
from service.api.audit_feed import AuditChangeFeed, FeedCollector
from service.api.auth import ApiKeyCache
from service.api.body_limits import BodyLimitMiddleware
from service.api.console.routes import router as console_router
from service.api.db_slots import DatabaseSlots
from service.api.forms import UPLOAD_SPEC_MODELS
from service.api.metrics import Metrics, MetricsMiddleware
from service.api.poll_cache import AuditListCache, CachedPollMiddleware, PollCache
from service.api.problems import install_error_handlers, problem_responses
from service.db.audit_changes import announced, announcing_sessionmaker, channel_name
from service.db.migrate import upgrade_to_head
from service.db.session import make_engine
from service.queue.dispatch import Dispatcher
from service.reports import signatures as signing
from service.settings import Settings, get_settings
from service.storage.startup import check_gateway_start
from service.storage.stores import artifact_store, blob_store

log = logging.getLogger(__name__)

DESCRIPTION = """Audits trained neural networks for instability: worst-case perturbations,
random noise, false negatives and Lipschitz bounds. Errors are RFC 9457 problem documents
(`application/problem+json`). Every route except /healthz, /readyz, /metrics and /v1/signing-key
needs `Authorization: Bearer <api key>`."""


PROBLEM_REF = "#/components/schemas/Problem"
COMPONENT_REF = "#/components/schemas/{model}"
# FastAPI's own validation-error body, which no route answers (the 422 is a Problem).
UNUSED_FASTAPI_SCHEMAS = ("HTTPValidationError", "ValidationError")


def _add_upload_spec_schemas(schema: dict[str, Any]) -> None:
    """The `spec` part of the upload forms names its model (service.api.forms); file it, and
    the models it names, under components/schemas where FastAPI has not already."""
    _, definitions = models_json_schema(
        [(model, "validation") for model in UPLOAD_SPEC_MODELS.values()],
        ref_template=COMPONENT_REF,
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name, definition in definitions.get("$defs", {}).items():
        components.setdefault(name, definition)


# OpenAPI links (clients may follow them; schemathesis' stateful phase chains requests along
# them): from the answer of a create to the operations on what it created, and from a model (or
# an audit's model) to a new audit of it. (path, method, status) of the answer → link name →
# (target path, method, what it fills: a path parameter or `body.<field>`, the answer's field).
RESOURCE_LINKS: dict[tuple[str, str, str], dict[str, tuple[str, str, str, str]]] = {
    ("/v1/models", "post", "202"): {
        "GetModel": ("/v1/models/{model_id}", "get", "model_id", "id"),
        "DeleteModel": ("/v1/models/{model_id}", "delete", "model_id", "id"),
    },
    ("/v1/models/{model_id}", "get", "200"): {
        "AuditModel": ("/v1/audits", "post", "body.model_id", "id"),
    },
    ("/v1/datasets", "post", "201"): {
        "GetDataset": ("/v1/datasets/{dataset_id}", "get", "dataset_id", "id"),
    },
    ("/v1/audits", "post", "202"): {
        "GetAudit": ("/v1/audits/{audit_id}", "get", "audit_id", "id"),
        "CancelAudit": ("/v1/audits/{audit_id}/cancel", "post", "audit_id", "id"),
        "GetReport": ("/v1/audits/{audit_id}/report", "get", "audit_id", "id"),
        "GetReportHtml": ("/v1/audits/{audit_id}/report.html", "get", "audit_id", "id"),
        "GetReportJunit": ("/v1/audits/{audit_id}/report.junit.xml", "get", "audit_id", "id"),
    },
    ("/v1/audits/{audit_id}", "get", "200"): {
        "AuditModelAgain": ("/v1/audits", "post", "body.model_id", "model_id"),
    },
}


def _add_resource_links(schema: dict[str, Any]) -> None:
    """RESOURCE_LINKS into the operations' responses, naming targets by operationId."""
    paths = schema.get("paths", {})
    for (path, method, status), links in RESOURCE_LINKS.items():
        response = paths[path][method]["responses"][status]
        response["links"] = {}
        for name, (target, target_method, filled, field) in links.items():
            link: dict[str, Any] = {"operationId": paths[target][target_method]["operationId"]}
            value = f"$response.body#/{field}"
            if filled.startswith("body."):
                # The rest of the body is the client's: only this field comes from the answer.
                link["requestBody"] = {filled.removeprefix("body."): value}
            else:
                link["parameters"] = {filled: value}
            response["links"][name] = link


def _drop_unused_fastapi_schemas(schema: dict[str, Any]) -> None:
    components = schema.get("components", {}).get("schemas", {})
    for name in UNUSED_FASTAPI_SCHEMAS:
        components.pop(name, None)


def _openapi_with_problem_media_type(app: FastAPI) -> dict[str, Any]:
    """FastAPI files a response `model` under application/json and documents its own 422 body;
    this service answers every error as application/problem+json, so say so (built once). Also:
    every operation may answer a 500 `internal-error`; the upload forms' `spec` models are
    filed under components (the routes read the form themselves); the creates link to the
    operations on what they created (RESOURCE_LINKS)."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    problem_content = {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": PROBLEM_REF}}}
    internal_error = problem_responses(500)[500]
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            responses.setdefault(
                "500",
                {"description": internal_error["description"], "content": dict(problem_content)},
            )
            for status, response in responses.items():
                content = response.get("content", {})
                is_problem = PROBLEM_MEDIA_TYPE in content
                # FastAPI's own 422 entry describes its default error body, not ours.
                if status == "422" or is_problem:
                    response["content"] = dict(problem_content)
                if status == "422":
                    response["description"] = "The request is not valid"
    _add_upload_spec_schemas(schema)
    _add_resource_links(schema)
    _drop_unused_fastapi_schemas(schema)
    app.openapi_schema = schema
    return schema


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    engine = make_engine(
        settings.resolved_database_url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_timeout=settings.db_pool_timeout_seconds,
    )
    db_slots = DatabaseSlots(settings.db_pool_size, settings.db_queue_timeout_seconds)
    # This gateway's own writes (a submit, a cancel) are announced to the others, as the
    # workers' are (service/db/audit_changes.py).
    sessions = announcing_sessionmaker(engine, settings)
    polls = PollCache(settings.poll_cache_seconds)
    lists = AuditListCache(settings.poll_cache_seconds)
    # Polls kept until their audit changes, while subscribed (service/api/audit_feed.py).
    feed = AuditChangeFeed(
        settings.broker_url,
        channel_name(settings),
        polls,
        lists,
        long_ttl_seconds=settings.poll_cache_subscribed_seconds,
    )
    subscribe = (
        settings.poll_cache_seconds > 0
        and settings.poll_cache_subscribed_seconds > 0
        and announced(settings)
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        if settings.auto_migrate:
            upgrade_to_head(settings.resolved_database_url)
        # The object store (the data directory, or a bucket): checked before serving, so wrong
        # credentials or a missing bucket stop the start with a message naming the setting.
        app.state.blobs = blob_store(settings)
        app.state.artifacts = artifact_store(settings)
        # …and the ids of this gateway's signing key and callback secret are published there,
        # for workers that share no disk to compare theirs with (service/storage/startup.py).
        await run_in_threadpool(check_gateway_start, settings)
        # Generated on the first start; the workers sign with the same file (shared data dir).
        app.state.signing_key = signing.load_or_create_private_key(signing.key_path(settings))
        db_slots.open()  # on this event loop
        listening = asyncio.create_task(feed.run()) if subscribe else None
        try:
            yield
        finally:
            if listening is not None:
                listening.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await listening
            engine.dispose()

    app = FastAPI(
        title="Tightrope",
        version="1.0.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        # The service's metrics are its own (/metrics). FastAPI's native OpenTelemetry asks
        # on every request whether a provider is configured (about a fifth of a cached
        # poll's CPU, docs/benchmarks.md "Polling clients"); none is.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessionmaker = sessions
    app.state.db_slots = db_slots
    app.state.api_key_cache = ApiKeyCache(settings.api_key_cache_seconds)
    app.state.poll_cache = polls
    app.state.audit_list_cache = lists
    app.state.audit_feed = feed
    app.state.dispatcher = Dispatcher.from_settings(settings)
    app.state.metrics = Metrics(sessions)
    app.state.metrics.registry.register(FeedCollector(feed))

    install_error_handlers(app)
    app.openapi = lambda: _openapi_with_problem_media_type(app)  # type: ignore[method-assign]
    # Innermost: cached status polls are answered before routing (counted by the metrics).
    app.add_middleware(CachedPollMiddleware)
    # Inside the metrics middleware, so that its 413s and 400s are counted too.
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_json_body_bytes,
        max_depth=settings.max_json_depth,
    )
    app.add_middleware(MetricsMiddleware, metrics=lambda: app.state.metrics)
    for router in (
        health.router,
        model_routes.router,
        model_routes.endpoint_router,
        dataset_routes.router,
        audit_routes.router,
        signing_key.router,
        console_router,  # /ui: the web console (HTML, not in the OpenAPI description)
    ):
        app.include_router(router)
    return app
