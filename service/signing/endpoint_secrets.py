"""The auth secrets of endpoint models, encrypted at rest (docs/security.md, "Endpoints").

A registration's auth header value is write-only: the gateway encrypts it before the row is
stored, no answer returns it, and only a worker decrypts it, just before it queries the
endpoint. AES-256-GCM (the `cryptography` library), a fresh 96-bit nonce per secret, and the
model's id as associated data, so a ciphertext copied onto another model's row does not
decrypt. Stored as `v1:<urlsafe base64 of nonce ‖ ciphertext ‖ tag>`.

The key: `TIGHTROPE_ENDPOINT_SECRET_KEY` (urlsafe base64 of 32 bytes, e.g. the output of
`python -c "import base64, os; print(base64.urlsafe_b64encode(os.urandom(32)).decode())"`),
or the file at `TIGHTROPE_ENDPOINT_SECRET_KEY_PATH`, or one generated on first use in
`<data_dir>/signing/endpoint-key` (0600). Gateway and workers must share it.

Torch-free: the gateway encrypts, the workers decrypt.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from service.settings import Settings
from service.signing.generated_files import generated_secret

VERSION = "v1"
NONCE_BYTES = 12


class SecretKeyError(RuntimeError):
    """The configured key cannot be read or is not 32 bytes of urlsafe base64."""


class SecretUnreadable(ValueError):
    """A stored secret does not decrypt with this key for this model (another key, another
    row's ciphertext, or damaged)."""


def key_path(settings: Settings) -> Path:
    return settings.data_dir / "signing" / "endpoint-key"


def _decode_key(text: str, where: str) -> bytes:
    try:
        key = base64.urlsafe_b64decode(text.strip().encode("ascii"))
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise SecretKeyError(f"{where}: not urlsafe base64") from None
    if len(key) != 32:
        raise SecretKeyError(f"{where}: the key must be 32 bytes, not {len(key)}")
    return key


def secret_key(settings: Settings) -> bytes:
    """The configured key, or the generated one (created 0600 by the first process)."""
    if settings.endpoint_secret_key:
        return _decode_key(settings.endpoint_secret_key, "TIGHTROPE_ENDPOINT_SECRET_KEY")
    if settings.endpoint_secret_key_path is not None:
        where = f"TIGHTROPE_ENDPOINT_SECRET_KEY_PATH ({settings.endpoint_secret_key_path})"
        return _decode_key(settings.endpoint_secret_key_path.read_text(encoding="utf-8"), where)
    path = key_path(settings)
    text = generated_secret(
        path, lambda: base64.urlsafe_b64encode(secrets.token_bytes(32)).decode("ascii")
    )
    if text is not None:
        return _decode_key(text, str(path))
    raise SecretKeyError(f"the endpoint key file {path} is empty")


def _associated(model_id: str) -> bytes:
    return f"tightrope-endpoint-secret:{model_id}".encode()


def encrypt(settings: Settings, model_id: str, secret: str) -> str:
    nonce = secrets.token_bytes(NONCE_BYTES)
    sealed = AESGCM(secret_key(settings)).encrypt(
        nonce, secret.encode("utf-8"), _associated(model_id)
    )
    return f"{VERSION}:" + base64.urlsafe_b64encode(nonce + sealed).decode("ascii")


def decrypt(settings: Settings, model_id: str, stored: str) -> str:
    version, _, body = stored.partition(":")
    if version != VERSION:
        raise SecretUnreadable(f"unknown secret format {version!r}")
    try:
        raw = base64.urlsafe_b64decode(body.encode("ascii"))
        plain = AESGCM(secret_key(settings)).decrypt(
            raw[:NONCE_BYTES], raw[NONCE_BYTES:], _associated(model_id)
        )
    except (binascii.Error, ValueError, InvalidTag):
        raise SecretUnreadable(
            "the endpoint's secret does not decrypt with this service's key (was "
            "TIGHTROPE_ENDPOINT_SECRET_KEY changed?): register the endpoint again"
        ) from None
    return plain.decode("utf-8")
