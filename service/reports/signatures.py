"""Ed25519 signatures of audit reports (docs/reports.md, "Signatures").

The service holds one private key, generated on first use at `settings.signing_key_path`
(default `<data_dir>/signing/ed25519.pem`, mode 0600). The gateway and the workers share the
data directory, so whichever starts first creates the key and the other loads it. A report's
signature covers the canonical JSON (schemas.canonical) of the report without its `signature`
field, so the file's own layout (indentation, key order) does not matter to a verifier.

Torch-free: the gateway serves the public key, the workers sign, the CLI verifies.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from schemas.canonical import canonical_json
from service.settings import Settings

ALGORITHM = "ed25519"
SIGNATURE_FIELD = "signature"


class KeyFormatError(ValueError):
    """A key file that is neither an Ed25519 PEM key nor the JSON of GET /v1/signing-key."""


def key_path(settings: Settings) -> Path:
    return settings.signing_key_path or settings.data_dir / "signing" / "ed25519.pem"


def _private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFormatError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
    return key


def load_or_create_private_key(path: Path) -> Ed25519PrivateKey:
    """The key at `path`, created (0600) if missing. Two processes racing to create it end up
    with the same key: the file appears atomically (written aside, then hard-linked into place,
    which fails if another process got there first)."""
    if path.is_file():
        return load_private_key(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = Ed25519PrivateKey.generate()
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_private_pem(key))
        os.link(staging, path)
    except FileExistsError:
        return load_private_key(path)
    finally:
        staging.unlink(missing_ok=True)
    return key


def public_raw(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_pem(public_key: Ed25519PublicKey) -> str:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def key_id(public_key: Ed25519PublicKey) -> str:
    """sha256 of the raw 32-byte public key, hex: names the key a report was signed with."""
    return hashlib.sha256(public_raw(public_key)).hexdigest()


def public_key_document(public_key: Ed25519PublicKey) -> dict[str, str]:
    """The body of GET /v1/signing-key (and what `tightrope verify --key` accepts saved)."""
    return {
        "algorithm": ALGORITHM,
        "key_id": key_id(public_key),
        "public_key_pem": public_pem(public_key),
        "public_key": base64.b64encode(public_raw(public_key)).decode("ascii"),
    }


def load_public_key(data: bytes) -> Ed25519PublicKey:
    """A public key from a PEM public key, a PEM private key (its public half), or the JSON of
    GET /v1/signing-key."""
    text = data.strip()
    if text.startswith(b"{"):
        try:
            document = json.loads(text)
            pem = document["public_key_pem"].encode("ascii")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise KeyFormatError("a JSON key file needs the field public_key_pem") from exc
        return load_public_key(pem)
    try:
        if b"PRIVATE KEY" in text:
            private = serialization.load_pem_private_key(text, password=None)
            if isinstance(private, Ed25519PrivateKey):
                return private.public_key()
            raise KeyFormatError(f"not an Ed25519 key but a {type(private).__name__}")
        public = serialization.load_pem_public_key(text)
    except (ValueError, TypeError) as exc:
        raise KeyFormatError(f"not a PEM key: {exc}") from exc
    if not isinstance(public, Ed25519PublicKey):
        raise KeyFormatError(f"not an Ed25519 key but a {type(public).__name__}")
    return public


def signed_bytes(report: dict[str, Any]) -> bytes:
    """What the signature covers: the canonical JSON of the report without `signature`."""
    unsigned = {k: v for k, v in report.items() if k != SIGNATURE_FIELD}
    return canonical_json(unsigned).encode("utf-8")


def sign_report(report: dict[str, Any], private_key: Ed25519PrivateKey) -> dict[str, Any]:
    """A copy of the report with its `signature` field set."""
    value = private_key.sign(signed_bytes(report))
    return {
        **report,
        SIGNATURE_FIELD: {
            "algorithm": ALGORITHM,
            "key_id": key_id(private_key.public_key()),
            "value": base64.b64encode(value).decode("ascii"),
        },
    }


def verify(report: dict[str, Any], public_key: Ed25519PublicKey) -> bool:
    """True when the report carries a valid Ed25519 signature by this key over its content."""
    signature = report.get(SIGNATURE_FIELD)
    if not isinstance(signature, dict) or signature.get("algorithm") != ALGORITHM:
        return False
    if signature.get("key_id") != key_id(public_key):
        return False
    try:
        value = base64.b64decode(str(signature.get("value", "")), validate=True)
        public_key.verify(value, signed_bytes(report))
    except (binascii.Error, InvalidSignature, ValueError):
        return False
    return True
