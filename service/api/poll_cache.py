"""The last answer to a status poll of each audit, and to each page of the audit list, kept for a
moment in this gateway process.

CI gates and dashboards poll `GET /v1/audits/{id}` (and `GET /v1/audits`) many times a second
between them; within `poll_cache_seconds` (default 1 s) a poll is answered from here, on the
event loop, without a database slot, a query or a thread. When that time is up, one poll reads
the audit anew while the others are answered the last answer for at most another
`poll_cache_seconds`
(service/api/refresh_cache.py), so a worker's change (progress, the end of the audit) is seen
within twice that time. What this gateway changes itself (a cancel; a new audit, for the
lists) is forgotten at once, so a client reads its own writes. 0 turns the caches off."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from urllib.parse import parse_qsl, urlencode

from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.audit_views import if_none_match_hits
from service.api.auth import ApiKeyCache, cached_tenant_id
from service.api.refresh_cache import RefreshingCache


@dataclass(frozen=True)
class CachedPoll:
    etag: str
    body: bytes | None  # None: only the tag is known (the poll that read it was answered 304)


class PollCache:
    def __init__(
        self,
        ttl_seconds: float,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cache: RefreshingCache[tuple[str, str], CachedPoll] = RefreshingCache(
            ttl_seconds, grace_seconds=ttl_seconds, max_entries=max_entries, clock=clock
        )

    @property
    def ttl_seconds(self) -> float:
        return self._cache.ttl_seconds

    def get(self, tenant_id: str, audit_id: str) -> CachedPoll | None:
        """The kept answer; None when this request must read the audit (and `put` it)."""
        return self._cache.get((tenant_id, audit_id))

    def peek(self, tenant_id: str, audit_id: str) -> CachedPoll | None:
        """The kept answer, claiming no refresh (the middleware: a miss goes to the route)."""
        return self._cache.peek((tenant_id, audit_id))

    def put(self, tenant_id: str, audit_id: str, etag: str, body: bytes | None) -> CachedPoll:
        """Keep (and return) an answer; a tag-only answer never replaces a body of that tag."""
        entry = CachedPoll(etag, body)
        if body is None:
            known = self._cache.current((tenant_id, audit_id))
            if known is not None and known.etag == etag and known.body:
                entry = known
        self._cache.put((tenant_id, audit_id), entry)
        return entry

    def forget(self, audit_id: str) -> None:
        self._cache.forget_where(lambda key: key[1] == audit_id)


# The query parameters of GET /v1/audits: a page is kept only for a query of these, each at
# most once, so that made-up parameters cannot fill the cache with copies of one page.
LIST_PARAMETERS = frozenset({"status", "model_id", "page_size", "page_token"})
LIST_CACHE_BYTES = 16 * 1024**2  # the pages one gateway process keeps, all tenants together


def list_cache_key(query_string: bytes) -> str | None:
    """The page's key: its parameters in one order; None when the query has another parameter
    or one twice (then the page is read from the database, and not kept)."""
    pairs = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names) or not set(names) <= LIST_PARAMETERS:
        return None
    return urlencode(sorted(pairs))


class AuditListCache:
    """The JSON bytes of each page of a tenant's audit list, by its parameters
    (`list_cache_key`): `GET /v1/audits` as the route answers it. At most `max_bytes` of pages
    are kept, the least recently written going first."""

    def __init__(
        self,
        ttl_seconds: float,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        max_bytes: int = LIST_CACHE_BYTES,
    ) -> None:
        self._cache: RefreshingCache[tuple[str, str], bytes] = RefreshingCache(
            ttl_seconds,
            grace_seconds=ttl_seconds,
            max_entries=max_entries,
            clock=clock,
            max_weight=max_bytes,
            weigh=len,
        )

    @property
    def ttl_seconds(self) -> float:
        return self._cache.ttl_seconds

    @property
    def bytes_held(self) -> int:
        return self._cache.weight

    def get(self, tenant_id: str, key: str) -> bytes | None:
        return self._cache.get((tenant_id, key))

    def peek(self, tenant_id: str, key: str) -> bytes | None:
        return self._cache.peek((tenant_id, key))

    def put(self, tenant_id: str, key: str, body: bytes) -> None:
        self._cache.put((tenant_id, key), body)

    def forget_tenant(self, tenant_id: str) -> None:
        """After this gateway added or cancelled one of the tenant's audits."""
        self._cache.forget_where(lambda key: key[0] == tenant_id)


def list_response(body: bytes) -> Response:
    """The answer to `GET /v1/audits` from a page's bytes (the middleware and the route)."""
    return Response(body, media_type="application/json", headers={"Cache-Control": "no-cache"})


LIST_PATH = "/v1/audits"
POLL_TEMPLATE = "/v1/audits/{audit_id}"
_POLL_PATH = re.compile(r"/v1/audits/([^/]+)")
_POLL_ROUTE = SimpleNamespace(path=POLL_TEMPLATE)  # what the metrics label it with
_LIST_ROUTE = SimpleNamespace(path=LIST_PATH)


class CachedPollMiddleware:
    """Answers `GET /v1/audits/{id}` and `GET /v1/audits` before routing when both the key and
    the answer are in this process's caches: the same bytes and headers as the routes
    (service/api/audits.py `read_audit`, `list_audits`) at a fraction of the cost. Anything
    else (no or unknown key, an expired or missing entry, a tag-only entry the request does not
    match) goes to the route, which authenticates and reads the database as usual."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            path = scope["path"]
            response: Response | None = None
            if path == LIST_PATH:
                response, route = _cached_list(scope), _LIST_ROUTE
            elif (match := _POLL_PATH.fullmatch(path)) is not None:
                response, route = _cached_poll(scope, match.group(1)), _POLL_ROUTE
            if response is not None:
                scope["route"] = route
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _cached_tenant(scope: Scope) -> tuple[str, Headers] | None:
    keys: ApiKeyCache | None = getattr(scope["app"].state, "api_key_cache", None)
    if keys is None:
        return None
    headers = Headers(scope=scope)
    tenant_id = cached_tenant_id(headers.get("authorization"), keys)
    return None if tenant_id is None else (tenant_id, headers)


def _cached_poll(scope: Scope, audit_id: str) -> Response | None:
    polls: PollCache | None = getattr(scope["app"].state, "poll_cache", None)
    if polls is None or polls.ttl_seconds <= 0:
        return None
    known = _cached_tenant(scope)
    if known is None:
        return None
    tenant_id, headers = known
    entry = polls.peek(tenant_id, audit_id)
    return None if entry is None else poll_response(entry, headers.get("if-none-match"))


def _cached_list(scope: Scope) -> Response | None:
    lists: AuditListCache | None = getattr(scope["app"].state, "audit_list_cache", None)
    if lists is None or lists.ttl_seconds <= 0:
        return None
    key = list_cache_key(scope["query_string"])
    known = None if key is None else _cached_tenant(scope)
    if key is None or known is None:
        return None
    body = lists.peek(known[0], key)
    return None if body is None else list_response(body)


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
