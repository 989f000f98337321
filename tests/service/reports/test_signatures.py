"""Ed25519 report signatures: round trip, any changed byte fails, key files."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from schemas.canonical import canonical_json
from service.reports import signatures as signing
from tests.service.reports.sample import make_report


@pytest.fixture
def key(tmp_path: Path) -> signing.Ed25519PrivateKey:
    return signing.load_or_create_private_key(tmp_path / "signing" / "ed25519.pem")


def test_round_trip_and_layout_independence(key: signing.Ed25519PrivateKey) -> None:
    signed = signing.sign_report(make_report(), key)
    assert signed["signature"]["algorithm"] == "ed25519"
    assert signed["signature"]["key_id"] == signing.key_id(key.public_key())
    assert signing.verify(signed, key.public_key())
    # indentation and key order of the file do not matter: the canonical JSON is signed
    reparsed = json.loads(json.dumps(signed, indent=4))
    assert signing.verify(reparsed, key.public_key())


def test_every_changed_byte_of_the_content_fails(key: signing.Ed25519PrivateKey) -> None:
    signed = signing.sign_report(make_report(), key)
    text = canonical_json(signed)
    body_end = text.index('"signature"')  # change bytes of the signed part, one at a time
    changed = 0
    for position in range(1, body_end, 37):
        original = text[position]
        replacement = "7" if original.isdigit() and original != "7" else None
        if replacement is None:
            continue
        tampered = json.loads(text[:position] + replacement + text[position + 1 :])
        assert not signing.verify(tampered, key.public_key()), position
        changed += 1
    assert changed >= 5
    verdict_flipped = dict(signed, verdict="pass")
    assert not signing.verify(verdict_flipped, key.public_key())


def test_bad_signatures_and_other_keys(key: signing.Ed25519PrivateKey, tmp_path: Path) -> None:
    signed = signing.sign_report(make_report(), key)
    other = signing.load_or_create_private_key(tmp_path / "other.pem")
    assert not signing.verify(signed, other.public_key())
    assert not signing.verify(make_report(), key.public_key())  # unsigned
    broken = dict(signed, signature=dict(signed["signature"], value="not base64!"))
    assert not signing.verify(broken, key.public_key())
    forged = signing.sign_report(make_report(), other)
    forged["signature"]["key_id"] = signing.key_id(key.public_key())
    assert not signing.verify(forged, key.public_key())


def test_key_file_created_once_private_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "ed25519.pem"
    first = signing.load_or_create_private_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    second = signing.load_or_create_private_key(path)
    assert signing.key_id(first.public_key()) == signing.key_id(second.public_key())
    assert list(path.parent.iterdir()) == [path]  # no staging file left behind


def test_public_key_formats(key: signing.Ed25519PrivateKey, tmp_path: Path) -> None:
    public = key.public_key()
    document = signing.public_key_document(public)
    expected = signing.key_id(public)
    for data in (
        signing.public_pem(public).encode(),
        json.dumps(document).encode(),
        (tmp_path / "signing" / "ed25519.pem").read_bytes(),
    ):
        assert signing.key_id(signing.load_public_key(data)) == expected
    for bad in (b"hello", b'{"no": "key"}'):
        with pytest.raises(signing.KeyFormatError):
            signing.load_public_key(bad)
