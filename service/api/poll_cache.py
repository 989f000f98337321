"""The last answer to a status poll of each audit, and to each page of the audit list, kept in
this gateway process until the audit changes.

CI gates and dashboards poll `GET /v1/audits/{id}` (and `GET /v1/audits`) many times a second
between them; a kept answer is answered from here, on the event loop, without a database slot,
a query or a thread. How long one is kept:

- While this gateway is subscribed to the announcements of audit changes
  (service/api/audit_feed.py, service/db/audit_changes.py), until its audit changes: the
  announcement makes it stale (one poll reads the audit anew, the others get the last answer
  for at most 0.5 s), with `poll_cache_subscribed_seconds` (default 60 s) as a safety net. A
  page of the list is kept until any audit of its tenant changes.
- Otherwise (Redis unreachable, the connection lost, not subscribed yet) for
  `poll_cache_seconds` (default 1 s): then one poll reads the audit anew while the others are
  answered the last answer for at most another `poll_cache_seconds`
  (service/api/refresh_cache.py), so a worker's change is seen within twice that time.

What this gateway changes itself (a cancel; a new audit, for the lists) is forgotten at once,
so a client reads its own writes. `poll_cache_seconds` 0 turns the caches off."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
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

    @cached_property
    def raw_200(self) -> list[tuple[bytes, bytes]]:
        """The headers of its 200 as the route's Response has them (made once per entry)."""
        return _answer(self, None).raw_headers  # type: ignore[union-attr]

    @cached_property
    def raw_304(self) -> list[tuple[bytes, bytes]]:
        return _answer(self, "*").raw_headers  # type: ignore[union-attr]


class PollCache:
    def __init__(
        self,
        ttl_seconds: float,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cache: RefreshingCache[tuple[str, str], CachedPoll] = RefreshingCache(
            ttl_seconds,
            grace_seconds=ttl_seconds,
            max_entries=max_entries,
            clock=clock,
            group=lambda key: key[1],  # the audit
        )

    @property
    def ttl_seconds(self) -> float:
        return self._cache.ttl_seconds

    @property
    def cache(self) -> RefreshingCache[tuple[str, str], CachedPoll]:
        """The entries (the change feed sets their time to live, invalidates and clears)."""
        return self._cache

    def token(self) -> int:
        """Take before reading an audit whose answer will be `put`."""
        return self._cache.token()

    def get(self, tenant_id: str, audit_id: str) -> CachedPoll | None:
        """The kept answer; None when this request must read the audit (and `put` it)."""
        return self._cache.get((tenant_id, audit_id))

    def peek(self, tenant_id: str, audit_id: str) -> CachedPoll | None:
        """The kept answer, claiming no refresh (the middleware: a miss goes to the route)."""
        return self._cache.peek((tenant_id, audit_id))

    def put(
        self,
        tenant_id: str,
        audit_id: str,
        etag: str,
        body: bytes | None,
        token: int | None = None,
    ) -> CachedPoll:
        """Keep (and return) an answer, unless the audit changed since `token` (taken before
        it was read); a tag-only answer never replaces a body of that tag."""
        entry = CachedPoll(etag, body)
        if body is None:
            known = self._cache.current((tenant_id, audit_id))
            if known is not None and known.etag == etag and known.body:
                entry = known
        self._cache.put((tenant_id, audit_id), entry, token=token)
        return entry

    def forget(self, audit_id: str) -> None:
        """This gateway changed the audit: its answers go at once (a read in flight keeps
        nothing)."""
        self._cache.invalidate(audit_id, drop=True)

    def changed(self, audit_id: str) -> None:
        """The audit changed elsewhere (an announcement)."""
        self._cache.invalidate(audit_id)


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
            group=lambda key: key[0],  # the tenant
        )

    @property
    def ttl_seconds(self) -> float:
        return self._cache.ttl_seconds

    @property
    def cache(self) -> RefreshingCache[tuple[str, str], bytes]:
        return self._cache

    def token(self) -> int:
        """Take before reading a page that will be `put`."""
        return self._cache.token()

    @property
    def bytes_held(self) -> int:
        return self._cache.weight

    def get(self, tenant_id: str, key: str) -> bytes | None:
        return self._cache.get((tenant_id, key))

    def peek(self, tenant_id: str, key: str) -> bytes | None:
        return self._cache.peek((tenant_id, key))

    def put(self, tenant_id: str, key: str, body: bytes, token: int | None = None) -> None:
        """Keep a page, unless an audit of the tenant changed since `token`."""
        self._cache.put((tenant_id, key), body, token=token)

    def forget_tenant(self, tenant_id: str) -> None:
        """After this gateway added or cancelled one of the tenant's audits."""
        self._cache.invalidate(tenant_id, drop=True)

    def changed(self, tenant_id: str) -> None:
        """An audit of the tenant changed elsewhere (an announcement)."""
        self._cache.invalidate(tenant_id)


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
    (service/api/audit_routes.py `read_audit`, `list_audits`) at a fraction of the cost. Anything
    else (no or unknown key, an expired or missing entry, a tag-only entry the request does not
    match) goes to the route, which authenticates and reads the database as usual."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            path = scope["path"]
            if path == LIST_PATH:
                response = _cached_list(scope)
                if response is not None:
                    scope["route"] = _LIST_ROUTE
                    await response(scope, receive, send)
                    return
            elif (match := _POLL_PATH.fullmatch(path)) is not None:
                answer = _cached_poll(scope, match.group(1))
                if answer is not None:
                    # The route's status, headers and bytes, sent as they are (the hot path:
                    # no Response object per poll).
                    scope["route"] = _POLL_ROUTE
                    status, headers, body = answer
                    await send(
                        {"type": "http.response.start", "status": status, "headers": headers}
                    )
                    await send({"type": "http.response.body", "body": body})
                    return
        await self.app(scope, receive, send)


def _request_headers(scope: Scope) -> tuple[str | None, str | None]:
    """(Authorization, If-None-Match) of the request, in one pass over its headers (the
    first of each, as starlette's Headers.get)."""
    authorization = if_none_match = None
    for name, value in scope["headers"]:
        if name == b"authorization" and authorization is None:
            authorization = value.decode("latin-1")
        elif name == b"if-none-match" and if_none_match is None:
            if_none_match = value.decode("latin-1")
    return authorization, if_none_match


def _cached_tenant_id(scope: Scope, authorization: str | None) -> str | None:
    keys: ApiKeyCache | None = getattr(scope["app"].state, "api_key_cache", None)
    return None if keys is None else cached_tenant_id(authorization, keys)


def _cached_tenant(scope: Scope) -> tuple[str, Headers] | None:
    headers = Headers(scope=scope)
    tenant_id = _cached_tenant_id(scope, headers.get("authorization"))
    return None if tenant_id is None else (tenant_id, headers)


def _cached_poll(
    scope: Scope, audit_id: str
) -> tuple[int, list[tuple[bytes, bytes]], bytes] | None:
    """(status, headers, body) of the answer `poll_response` gives from a kept entry."""
    polls: PollCache | None = getattr(scope["app"].state, "poll_cache", None)
    if polls is None or polls.ttl_seconds <= 0:
        return None
    authorization, if_none_match = _request_headers(scope)
    tenant_id = _cached_tenant_id(scope, authorization)
    if tenant_id is None:
        return None
    entry = polls.peek(tenant_id, audit_id)
    if entry is None:
        return None
    if if_none_match_hits(if_none_match, entry.etag):
        return 304, entry.raw_304, b""
    if entry.body is None:
        return None
    return 200, entry.raw_200, entry.body


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
    that shapes a poll's answer, for the route and (its headers made once per entry,
    `CachedPoll.raw_200`) the middleware alike."""
    return _answer(entry, if_none_match)


def _answer(entry: CachedPoll, if_none_match: str | None) -> Response | None:
    headers = {"ETag": entry.etag, "Cache-Control": "no-cache"}
    if if_none_match_hits(if_none_match, entry.etag):
        return Response(status_code=304, headers=headers)
    if entry.body is None:
        return None
    return Response(entry.body, media_type="application/json", headers=headers)
