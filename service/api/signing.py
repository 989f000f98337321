"""`/v1/signing-key` (the public key that signs reports) and `/v1/callback-secret` (the tenant's
HMAC secret for callback deliveries). docs/reports.md has both schemes.

The public key needs no API key: whoever received a report from a vendor can fetch it and
check the signature. The callback secret is the tenant's own and needs its API key.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from service import callback_signing, signing
from service.api.deps import SettingsDep, TenantDep
from service.errors import problem_responses

router = APIRouter(prefix="/v1", tags=["signing"])

PEM_MEDIA_TYPE = "application/x-pem-file"


def public_key_of(request: Request) -> Any:
    """The key loaded (or created) at start-up by the app's lifespan."""
    state = request.app.state
    if getattr(state, "signing_key", None) is None:  # an app used without its lifespan
        state.signing_key = signing.load_or_create_private_key(signing.key_path(state.settings))
    return state.signing_key.public_key()


@router.get(
    "/signing-key",
    summary="The Ed25519 public key that signs reports (no API key needed)",
    responses={200: {"description": "algorithm, key_id, public_key_pem, public_key (base64)"}},
)
def read_signing_key(request: Request) -> dict[str, str]:
    return signing.public_key_document(public_key_of(request))


@router.get(
    "/signing-key.pem",
    summary="The same public key as a PEM file",
    responses={200: {"content": {PEM_MEDIA_TYPE: {}}, "description": "SubjectPublicKeyInfo"}},
)
def read_signing_key_pem(request: Request) -> Response:
    return Response(signing.public_pem(public_key_of(request)), media_type=PEM_MEDIA_TYPE)


@router.get(
    "/callback-secret",
    summary="This tenant's HMAC secret for verifying callback deliveries",
    responses=problem_responses(401),
)
def read_callback_secret(tenant: TenantDep, settings: SettingsDep) -> dict[str, str]:
    return {
        "secret": callback_signing.tenant_secret(settings, tenant.id),
        "header": callback_signing.HEADER,
        "scheme": "t=<unix seconds>,v1=hex(HMAC-SHA256(secret, f'{t}.{body}'))",
    }
