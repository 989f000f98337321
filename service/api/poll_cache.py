"""The last answer to a status poll of each audit, kept for a moment in this gateway process.

CI gates and dashboards poll `GET /v1/audits/{id}` many times a second between them; within
`poll_cache_seconds` (default 1 s) a poll is answered from here, on the event loop, without a
database slot, a query or a thread. What this gateway changes itself (a cancel) is forgotten at
once, so a client reads its own writes; what a worker writes (progress, the end of the audit)
is seen within that time. 0 turns the cache off. Thread-safe: entries are written from the
thread pool and read on the event loop."""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.audit_views import if_none_match_hits
from service.api.auth import ApiKeyCache, cached_tenant_id


@dataclass(frozen=True)
class CachedPoll:
    etag: str
    body: bytes | None  # None: only the tag is known (the poll that read it was answered 304)
    expires: float


class PollCache:
    def __init__(
        self,
        ttl_seconds: float,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_seconds = ttl_seconds
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], CachedPoll] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, tenant_id: str, audit_id: str) -> CachedPoll | None:
        key = (tenant_id, audit_id)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry.expires <= self._clock():
                del self._entries[key]
                return None
            return entry

    def put(self, tenant_id: str, audit_id: str, etag: str, body: bytes | None) -> CachedPoll:
        """Keep (and return) an answer; a tag-only answer never replaces a body of that tag."""
        entry = CachedPoll(etag, body, self._clock() + self.ttl_seconds)
        if self.ttl_seconds <= 0:
            return entry
        with self._lock:
            known = self._entries.get((tenant_id, audit_id))
            if body is None and known is not None and known.etag == etag and known.body:
                entry = CachedPoll(etag, known.body, entry.expires)
            self._entries[(tenant_id, audit_id)] = entry
            self._entries.move_to_end((tenant_id, audit_id))
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)  # the least recently written
        return entry

    def forget(self, audit_id: str) -> None:
        with self._lock:
            for key in [key for key in self._entries if key[1] == audit_id]:
                del self._entries[key]


POLL_TEMPLATE = "/v1/audits/{audit_id}"
_POLL_PATH = re.compile(r"/v1/audits/([^/]+)")
_POLL_ROUTE = SimpleNamespace(path=POLL_TEMPLATE)  # what the metrics label it with


class CachedPollMiddleware:
    """Answers `GET /v1/audits/{id}` before routing when both the key and the poll are in this
    process's caches: the same bytes and headers as the route (service/api/audits.py
    `read_audit`) at a fraction of the cost. Anything else (no or unknown key, an expired or
    missing entry, a tag-only entry the request does not match) goes to the route, which
    authenticates and reads the database as usual."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            match = _POLL_PATH.fullmatch(scope["path"])
            if match is not None:
                response = _cached_answer(scope, match.group(1))
                if response is not None:
                    scope["route"] = _POLL_ROUTE
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def _cached_answer(scope: Scope, audit_id: str) -> Response | None:
    state = scope["app"].state
    keys: ApiKeyCache | None = getattr(state, "api_key_cache", None)
    polls: PollCache | None = getattr(state, "poll_cache", None)
    if keys is None or polls is None or polls.ttl_seconds <= 0:
        return None
    headers = Headers(scope=scope)
    tenant_id = cached_tenant_id(headers.get("authorization"), keys)
    if tenant_id is None:
        return None
    entry = polls.get(tenant_id, audit_id)
    return None if entry is None else poll_response(entry, headers.get("if-none-match"))


def poll_response(entry: CachedPoll, if_none_match: str | None) -> Response | None:
    """The answer to a poll from a kept entry: 304 when the request holds its tag, else 200
    with the body; None when the body is needed and only the tag is known. The one place
    that shapes a poll's answer, for the middleware and the route alike."""
    headers = {"ETag": entry.etag, "Cache-Control": "no-cache"}
    if if_none_match_hits(if_none_match, entry.etag):
        return Response(status_code=304, headers=headers)
    if entry.body is None:
        return None
    return Response(entry.body, media_type="application/json", headers=headers)
