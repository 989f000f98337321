"""Typed dependencies shared by the routers. Everything comes from `app.state`, which
`create_app(settings)` fills, so an app never reads another app's configuration."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from service.auth import authenticate
from service.db.models import Tenant
from service.dispatch import Dispatcher
from service.settings import Settings
from service.storage import ArtifactStore, BlobStore


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_db(request: Request) -> Iterator[Session]:
    factory: sessionmaker[Session] = request.app.state.sessionmaker
    with factory() as session:
        yield session


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


# Declared through HTTPBearer so that OpenAPI documents the scheme; the checking is ours, so
# that a missing or malformed header is a 401 problem like a wrong key.
_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer tr_...`")


def get_tenant(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Tenant:
    header = f"Bearer {credentials.credentials}" if credentials is not None else None
    return authenticate(session, header)


TenantDep = Annotated[Tenant, Depends(get_tenant)]
