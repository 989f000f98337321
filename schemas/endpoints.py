"""Endpoint models: a model audited through its inference endpoint, never its weights
(docs/models.md, "Endpoint models").

The endpoint speaks the Open Inference Protocol (the KServe v2 REST protocol of Triton,
KServe, MLServer and TorchServe). A registration names its URL, the model's name and version,
the spec as for uploads, an optional auth header (its secret is write-only: stored encrypted,
never returned, logged or written into a report) and the limits the workers hold to when they
query it. Standard library and pydantic only: the gateway validates a registration with it, the
workers' client (workers/endpoints/) reads the limits from it.
"""

from __future__ import annotations

import hashlib
import json
import re
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator

from schemas.common import StrictModel
from schemas.model_spec import ModelSpec

# The `format` of an endpoint model's row and resource (an uploaded model's is its file's).
ENDPOINT_FORMAT = "endpoint"
# A model name or version as the protocol puts it into a URL path segment.
ENDPOINT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
# An HTTP header name (RFC 9110 token), and the headers an auth header may not be.
HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,100}$")
RESERVED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "content-type",
        "transfer-encoding",
        "connection",
        "accept",
        "accept-encoding",
        "user-agent",
        "inference-header-content-length",
        "te",
        "upgrade",
        "proxy-authorization",
        "expect",
    }
)
MAX_URL_LENGTH = 2000
# The checks an endpoint model's audit can run: forward passes only, or a query-only search
# (docs/models.md, "What a query-only audit can and cannot prove"). Others need gradients or
# the weights: a request naming one is a 422.
QUERY_ONLY_CHECKS = frozenset(
    {"random_noise", "worst_case", "false_negative", "minimal_perturbation", "adversarial"}
)
MAX_SECRET_LENGTH = 8192

# The limits' defaults and caps (docs/models.md, "Endpoint models": "Limits").
DEFAULT_REQUESTS_PER_SECOND = 20.0
MAX_REQUESTS_PER_SECOND = 1000.0
DEFAULT_CONCURRENCY = 4
MAX_CONCURRENCY = 64
DEFAULT_TIMEOUT_SECONDS = 30.0
MAX_TIMEOUT_SECONDS = 300.0
DEFAULT_MAX_BATCH = 16
MAX_BATCH = 1024


class EndpointLimits(StrictModel):
    """How hard the workers may use the endpoint: each audit's queries stay under these."""

    requests_per_second: float = Field(
        default=DEFAULT_REQUESTS_PER_SECOND,
        gt=0.0,
        le=MAX_REQUESTS_PER_SECOND,
        description="Inference requests per second, at most (each worker's client)",
    )
    concurrency: int = Field(
        default=DEFAULT_CONCURRENCY,
        ge=1,
        le=MAX_CONCURRENCY,
        description="Inference requests in flight at once, at most",
    )
    timeout_seconds: float = Field(
        default=DEFAULT_TIMEOUT_SECONDS,
        gt=0.0,
        le=MAX_TIMEOUT_SECONDS,
        description="Time limit of one request (connect, send, answer); a request over it "
        "fails and is retried",
    )
    max_batch: int = Field(
        default=DEFAULT_MAX_BATCH,
        ge=1,
        le=MAX_BATCH,
        description="Inputs per inference request, at most; larger batches are split",
    )


class EndpointAuth(StrictModel):
    """One header the endpoint wants on every request, e.g. `Authorization: Bearer …`. The
    value is write-only."""

    header: str = Field(default="Authorization", description="The header's name")
    secret: SecretStr = Field(
        description="The header's value (write-only: stored encrypted, never returned)"
    )

    @field_validator("header")
    @classmethod
    def _header_name(cls, value: str) -> str:
        if not HEADER_NAME.fullmatch(value):
            raise ValueError("not an HTTP header name (letters, digits and !#$%&'*+.^_`|~-)")
        if value.lower() in RESERVED_HEADERS:
            raise ValueError(f"{value!r} is set by the protocol and cannot carry the secret")
        return value

    @field_validator("secret")
    @classmethod
    def _secret_value(cls, value: SecretStr) -> SecretStr:
        text = value.get_secret_value()
        if not text or len(text) > MAX_SECRET_LENGTH:
            raise ValueError(f"the secret is 1 to {MAX_SECRET_LENGTH} characters")
        if any(ord(c) < 0x20 or ord(c) == 0x7F or ord(c) > 0x7E for c in text):
            raise ValueError("the secret must be printable ASCII without line breaks")
        return value


def check_endpoint_url(url: str) -> str:
    """An http(s) URL with a host and no credentials, query or fragment; the path, if any, is
    the prefix the protocol's paths (`/v2/...`) go under. Returns it without a trailing slash."""
    if len(url) > MAX_URL_LENGTH:
        raise ValueError(f"at most {MAX_URL_LENGTH} characters")
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        raise ValueError("spaces and control characters are not allowed")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise ValueError(f"not a valid URL: {exc}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError("the scheme must be http or https")
    if not parts.hostname:
        raise ValueError("the URL has no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("credentials do not go into the URL: give them as `auth`")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise ValueError("the URL takes no query or fragment")
    return url.rstrip("/")


class EndpointTarget(StrictModel):
    """Where the model answers: the server's base URL, the model's name and version."""

    url: str = Field(
        min_length=1,
        max_length=MAX_URL_LENGTH,
        description="Base URL of an Open Inference Protocol server (http or https), e.g. "
        "`https://models.example.com`; a path is a prefix of `/v2/...`",
        json_schema_extra={"pattern": "^[Hh][Tt][Tt][Pp][Ss]?://[^/?#@\\s]+"},
    )
    model_name: str = Field(
        description="The model's name on the server",
        json_schema_extra={"pattern": ENDPOINT_NAME.pattern},
    )
    model_version: str | None = Field(
        default=None, description="The version to query; none: the server's default"
    )
    input_name: str | None = Field(
        default=None, description="The input tensor's name; none: the model's only input"
    )
    output_name: str | None = Field(
        default=None, description="The output tensor's name; none: the model's only output"
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return check_endpoint_url(value)

    @field_validator("model_name", "model_version", "input_name", "output_name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and not ENDPOINT_NAME.fullmatch(value):
            raise ValueError("1 to 200 letters, digits, '.', '_' or '-', starting alphanumeric")
        return value


class EndpointRegistration(EndpointTarget):
    """The body of `POST /v1/endpoint-models`."""

    spec: ModelSpec
    auth: EndpointAuth | None = None
    limits: EndpointLimits = Field(default_factory=EndpointLimits)

    def public(self) -> EndpointView:
        """What the service stores and shows of the endpoint: everything but the secret."""
        return EndpointView(
            **self.model_dump(exclude={"spec", "auth"}),
            auth_header=None if self.auth is None else self.auth.header,
        )


class EndpointView(EndpointTarget):
    """An endpoint model's endpoint as stored (the `models.endpoint` column) and shown: the
    auth header's name, never its value."""

    auth_header: str | None = Field(
        default=None, description="The header that carries the secret (its value is write-only)"
    )
    limits: EndpointLimits = Field(default_factory=EndpointLimits)


def endpoint_identity_bytes(target: EndpointTarget) -> bytes:
    """What names an endpoint model: its URL, model name and version, and the tensors it names
    (no secret, no limits). A job directory holds these bytes in place of a model file."""
    fields = [target.url, target.model_name, target.model_version]
    fields += [target.input_name, target.output_name]
    return json.dumps(fields).encode("utf-8")


def endpoint_identity(target: EndpointTarget) -> str:
    """The sha256 that names an endpoint model in place of a file's (`GET /v1/models?sha256=`):
    of endpoint_identity_bytes."""
    return hashlib.sha256(endpoint_identity_bytes(target)).hexdigest()
