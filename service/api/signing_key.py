"""`/v1/signing-key` (the public key that signs reports) and `/v1/callback-secret` (the tenant's
HMAC secret for callback deliveries). docs/reports.md has both schemes.

The public key needs no API key: whoever received a report from a vendor can fetch it and
check the signature. The callback secret is the tenant's own and needs its API key.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from service.api.deps import SettingsDep, TenantDep, public_key_of
from service.api.problems import problem_responses
from service.reports import signatures as signing
from service.signing import callbacks as callback_signing

router = APIRouter(prefix="/v1", tags=["signing"])

PEM_MEDIA_TYPE = "application/x-pem-file"


class PEMResponse(Response):
    """OpenAPI only: names the media type the PEM route sends (it builds its own Response)."""

    media_type = PEM_MEDIA_TYPE


class SigningKey(BaseModel):
    """The body of GET /v1/signing-key (service.reports.signatures.public_key_document)."""

    # These state the body's keys; a key added to the body later is never dropped.
    model_config = ConfigDict(extra="allow")

    algorithm: str = Field(description="`ed25519`")
    key_id: str = Field(description="sha256 of the raw public key, hex: a report's `key_id`")
    public_key_pem: str = Field(description="SubjectPublicKeyInfo, PEM")
    public_key: str = Field(description="The raw 32-byte public key, base64")


class CallbackSecret(BaseModel):
    """The body of GET /v1/callback-secret."""

    model_config = ConfigDict(extra="allow")

    secret: str = Field(description="This tenant's HMAC-SHA256 key")
    header: str = Field(description="The request header a delivery's signature is in")
    scheme: str = Field(description="How the header's value is built")


@router.get(
    "/signing-key",
    summary="The Ed25519 public key that signs reports (no API key needed)",
    response_model=SigningKey,
    responses={200: {"description": "algorithm, key_id, public_key_pem, public_key (base64)"}},
)
def read_signing_key(request: Request) -> dict[str, str]:
    return signing.public_key_document(public_key_of(request))


@router.get(
    "/signing-key.pem",
    summary="The same public key as a PEM file",
    response_class=PEMResponse,
    responses={
        200: {
            "content": {PEM_MEDIA_TYPE: {"schema": {"type": "string"}}},
            "description": "SubjectPublicKeyInfo, PEM (`-----BEGIN PUBLIC KEY-----` ...): text",
        }
    },
)
def read_signing_key_pem(request: Request) -> Response:
    return Response(signing.public_pem(public_key_of(request)), media_type=PEM_MEDIA_TYPE)


@router.get(
    "/callback-secret",
    summary="This tenant's HMAC secret for verifying callback deliveries",
    response_model=CallbackSecret,
    responses=problem_responses(401, 503),
)
def read_callback_secret(tenant: TenantDep, settings: SettingsDep) -> dict[str, str]:
    return {
        "secret": callback_signing.tenant_secret(settings, tenant.id),
        "header": callback_signing.HEADER,
        "scheme": "t=<unix seconds>,v1=hex(HMAC-SHA256(secret, f'{t}.{body}'))",
    }
