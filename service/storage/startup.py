"""What `tightrope serve` and `tightrope worker` check before they start, where workers share
no disk with the gateway (docs/deployment.md, "Workers on another machine").

- The object store: reachable, the bucket there, the credentials accepted; otherwise the start
  is refused with a message naming TIGHTROPE_STORAGE_URL (and the endpoint setting).
- The keys: the gateway publishes the id of its report-signing key and of its callback secret
  (never the secrets) as the object `signing/published-keys.json` of the store; a worker whose
  own key or secret differs refuses to start, since the reports it signed would not verify with
  the key the gateway serves (GET /v1/signing-key) and its callbacks would not verify with the
  secrets tenants read. Without a shared data directory every machine must be given the same
  key file (TIGHTROPE_SIGNING_KEY_PATH) and secret (TIGHTROPE_CALLBACK_SECRET or
  TIGHTROPE_CALLBACK_SECRET_PATH).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from service.reports import signatures as signing
from service.settings import Settings
from service.signing import callbacks
from service.storage.objects import ObjectMissing, ObjectStore, StorageError, object_store

log = logging.getLogger(__name__)

PUBLISHED_KEYS = "signing/published-keys.json"


class StartRefused(Exception):
    """The process must not start; the message says which setting to fix."""


def key_ids(settings: Settings) -> dict[str, str]:
    """The ids of the signing key and the callback secret this process would use (both are
    created on first use, as before, where they are not configured)."""
    key = signing.load_or_create_private_key(signing.key_path(settings))
    return {
        "signing_key_id": signing.key_id(key.public_key()),
        "callback_secret_id": callbacks.secret_id(settings),
    }


def check_store(settings: Settings) -> ObjectStore:
    store = object_store(settings)
    try:
        store.check()
    except StorageError as exc:
        raise StartRefused(f"the object store cannot be used: {exc}") from exc
    return store


def publish_keys(settings: Settings, store: ObjectStore) -> dict[str, str]:
    """The gateway's part: write the ids it serves (replacing an older gateway's)."""
    ids = key_ids(settings)
    published = read_published(store)
    if published is not None and published != ids:
        log.warning("replacing the published key ids %s with this gateway's %s", published, ids)
    if published != ids:
        with tempfile.TemporaryDirectory() as tmp:
            staged = Path(tmp) / "published-keys.json"
            staged.write_text(json.dumps(ids, sort_keys=True), encoding="utf-8")
            store.put_file(PUBLISHED_KEYS, staged)
    return ids


def read_published(store: ObjectStore) -> dict[str, Any] | None:
    try:
        document = json.loads(store.read_bytes(PUBLISHED_KEYS))
    except ObjectMissing:
        return None
    except ValueError:
        return None
    except StorageError as exc:
        raise StartRefused(f"the published key ids cannot be read: {exc}") from exc
    return document if isinstance(document, dict) else None


def check_worker_keys(settings: Settings, store: ObjectStore) -> None:
    """A worker's part: refuse to start when its key or secret is not the gateway's. Nothing
    published yet (no gateway has started on this store): nothing to compare, it starts."""
    published = read_published(store)
    if published is None:
        log.info("no gateway has published its key ids in %s yet", store.description)
        return
    mine = key_ids(settings)
    if published.get("signing_key_id") != mine["signing_key_id"]:
        raise StartRefused(
            f"this worker would sign reports with the Ed25519 key {mine['signing_key_id'][:16]}… "
            f"({signing.key_path(settings)}), but the gateway publishes the key "
            f"{str(published.get('signing_key_id'))[:16]}…: give every machine the same key file "
            "and point TIGHTROPE_SIGNING_KEY_PATH at it"
        )
    if published.get("callback_secret_id") != mine["callback_secret_id"]:
        raise StartRefused(
            "this worker's callback secret is not the gateway's: its callbacks would not verify "
            "with the secrets tenants read; set TIGHTROPE_CALLBACK_SECRET (or "
            "TIGHTROPE_CALLBACK_SECRET_PATH, a file) alike on every machine"
        )


def check_gateway_start(settings: Settings) -> None:
    store = check_store(settings)
    publish_keys(settings, store)


def check_worker_start(settings: Settings) -> None:
    store = check_store(settings)
    check_worker_keys(settings, store)
