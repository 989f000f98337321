"""Typed dependencies shared by the routers. Everything comes from `app.state`, which
`create_app(settings)` fills, so an app never reads another app's configuration."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypeVar

import anyio
import anyio.to_thread
from fastapi import Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from service.api.auth import ApiKeyCache, authenticate, cached_tenant
from service.api.db_slots import DatabaseSlots
from service.db.tables import Tenant
from service.queue.dispatch import Dispatcher
from service.reports import signatures as signing
from service.settings import Settings
from service.storage.stores import ArtifactStore, BlobStore

T = TypeVar("T")


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


@asynccontextmanager
async def session_in_slot(request: Request) -> AsyncIterator[Session]:
    """A session, while holding one of the database slots (service.api.db_slots). Made on the
    event loop (no I/O until the first query); closed, whatever happened, in a worker thread (the
    close returns the connection to the pool) before the slot is given back."""
    db_slots: DatabaseSlots = request.app.state.db_slots
    factory: sessionmaker[Session] = request.app.state.sessionmaker
    async with db_slots.slot():
        session = factory()
        try:
            yield session
        finally:
            # Shielded: a client that went away must not leave the connection checked out. Its
            # own limiter, as FastAPI does for the exit of sync dependencies: never queued
            # behind a full thread pool.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(session.close, limiter=anyio.CapacityLimiter(1))


async def run_in_slot(request: Request, work: Callable[..., T], *args: Any) -> T:
    """`work(session, *args)` in one worker thread, holding one of the database slots: the session
    is made, used and closed in that thread (one thread hop, where `session_in_slot` takes
    two). For the hot reads (a poll, a page of the list). A cancelled request still waits for
    the thread, so the connection is back in the pool before the slot is."""
    db_slots: DatabaseSlots = request.app.state.db_slots
    factory: sessionmaker[Session] = request.app.state.sessionmaker

    def in_thread() -> T:
        with factory() as session:
            return work(session, *args)

    async with db_slots.slot():
        return await anyio.to_thread.run_sync(in_thread)


async def get_db(request: Request) -> AsyncIterator[Session]:
    """A session for the whole request (session_in_slot): for routes that answer quickly."""
    async with session_in_slot(request) as session:
        yield session


def public_key_of(request: Request) -> Any:
    """The report-signing key loaded (or created) at start-up by the app's lifespan."""
    state = request.app.state
    if getattr(state, "signing_key", None) is None:  # an app used without its lifespan
        state.signing_key = signing.load_or_create_private_key(signing.key_path(state.settings))
    return state.signing_key.public_key()


def get_blobs(request: Request) -> BlobStore:
    blobs: BlobStore = request.app.state.blobs
    return blobs


def get_artifacts(request: Request) -> ArtifactStore:
    artifacts: ArtifactStore = request.app.state.artifacts
    return artifacts


def get_dispatcher(request: Request) -> Dispatcher:
    dispatcher: Dispatcher = request.app.state.dispatcher
    return dispatcher


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_db)]
BlobsDep = Annotated[BlobStore, Depends(get_blobs)]
ArtifactsDep = Annotated[ArtifactStore, Depends(get_artifacts)]
DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]

# The `page_token` of the list routes, as service.domain.pagination reads it.
PageTokenQuery = Annotated[
    str | None,
    Query(
        description="Opaque: the `next_page_token` of the previous page, passed back unchanged. "
        "Leave it out (or empty) for the first page. A value that is not such a token is a 422 "
        "`validation-failed` naming `query.page_token`.",
    ),
]


# Declared through HTTPBearer so that OpenAPI documents the scheme; the checking is ours, so
# that a missing or malformed header is a 401 problem like a wrong key.
_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer tr_...`")


async def get_tenant(
    request: Request,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Tenant:
    """A key in the cache (service.api.auth.ApiKeyCache) is answered on the event loop; otherwise
    the lookup runs in the thread pool."""
    header = f"Bearer {credentials.credentials}" if credentials is not None else None
    cache: ApiKeyCache | None = getattr(request.app.state, "api_key_cache", None)
    if cache is not None:
        cached = cached_tenant(header, cache)
        if cached is not None:
            return cached
    return await run_in_threadpool(authenticate, session, header, cache)


TenantDep = Annotated[Tenant, Depends(get_tenant)]


async def get_tenant_briefly(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Tenant:
    """The tenant, holding a database slot only for the key lookup (none when the key is
    cached): an upload streams its body for as long as the client takes and must not keep a
    slot that status polls need; a cached poll needs none at all."""
    header = f"Bearer {credentials.credentials}" if credentials is not None else None
    cache: ApiKeyCache | None = getattr(request.app.state, "api_key_cache", None)
    if cache is not None:
        cached = cached_tenant(header, cache)
        if cached is not None:
            return cached
    async with session_in_slot(request) as session:
        return await run_in_threadpool(authenticate, session, header, cache)


# The tenant without a session for the request: uploads (authenticated before the body is read,
# a session only around what they store) and status polls (answered from the poll cache).
TenantLookupDep = Annotated[Tenant, Depends(get_tenant_briefly)]
