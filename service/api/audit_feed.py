"""The gateway's subscription to the announcements of audit changes (service/db/audit_changes.py):
a background task on the app's event loop that keeps the poll caches (service/api/poll_cache.py)
honest.

While subscribed and healthy, the caches keep answers for `poll_cache_subscribed_seconds` and
each announcement makes the answers of its audit (and the list pages of its tenant) stale at
once. The subscription is healthy from the confirmation of its SUBSCRIBE for as long as
Redis answers a PING every `PING_SECONDS` within `DEAD_AFTER_SECONDS`. Whenever it is not (not
yet subscribed, Redis unreachable or restarted, the connection closed or silent, a message that
cannot be read), this gateway may have missed announcements: it clears both caches and falls
back to `poll_cache_seconds`, and clears them again once it is subscribed anew (reconnecting
with exponential backoff), so it never answers from an entry older than what it may have
missed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Iterator

import redis.asyncio as aioredis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from service.api.poll_cache import AuditListCache, PollCache
from service.db.audit_changes import AuditChanges

log = logging.getLogger(__name__)

PING_SECONDS = 1.0
DEAD_AFTER_SECONDS = 3.0  # nothing heard (not even a pong) for this long: the connection is lost
CONNECT_TIMEOUT_SECONDS = 2.0
BACKOFF_FIRST_SECONDS = 0.1
BACKOFF_MAX_SECONDS = 5.0
MIN_WAIT_SECONDS = 0.05
_PING_PAYLOAD = "tightrope-audit-feed"


class FeedLost(Exception):
    """The subscription can no longer be trusted to have delivered every message."""


class AuditChangeFeed:
    def __init__(
        self,
        url: str,
        channel: str,
        polls: PollCache,
        lists: AuditListCache,
        long_ttl_seconds: float,
        ping_seconds: float = PING_SECONDS,
        dead_after_seconds: float = DEAD_AFTER_SECONDS,
    ) -> None:
        self.url = url
        self.channel = channel
        self.polls = polls
        self.lists = lists
        self.long_ttl_seconds = long_ttl_seconds
        self.ping_seconds = ping_seconds
        self.dead_after_seconds = dead_after_seconds
        self.subscribed = False
        self.messages = 0  # announcements applied
        self.subscriptions = 0  # times subscribed (the first, and each reconnection)
        self.losses = 0  # times the subscription was lost

    # -- the caches -------------------------------------------------------------------------

    def _caches(self) -> tuple[PollCache, AuditListCache]:
        return self.polls, self.lists

    def _gained(self) -> None:
        # Clear first: an entry (or a read in flight) from before the subscription may miss
        # a change nobody will announce again. Then the entries written live long.
        for cache in self._caches():
            cache.cache.clear()
            cache.cache.set_long_ttl(self.long_ttl_seconds)
        self.subscribed = True
        self.subscriptions += 1
        log.info("subscribed to audit changes on %s: polls kept until they change", self.channel)

    def _lost(self, reason: str, level: int = logging.WARNING) -> None:
        if not self.subscribed:
            return
        # Short entries first, then clear: whatever is written after the clear is short.
        for cache in self._caches():
            cache.cache.set_long_ttl(None)
            cache.cache.clear()
        self.subscribed = False
        self.losses += 1
        log.log(
            level,
            "audit changes on %s no longer heard (%s): polls kept for poll_cache_seconds",
            self.channel,
            reason,
        )

    def apply(self, data: bytes | str) -> None:
        """One announcement: the answers of its audits, and the pages of their tenants, are
        stale; a message naming no audit (or one that cannot be read) clears both caches."""
        changes = AuditChanges.decode(data)
        self.messages += 1
        if changes.everything:
            for cache in self._caches():
                cache.cache.clear()
            return
        lists_cleared = False
        for audit_id, tenant_id in changes.audits.items():
            self.polls.changed(audit_id)
            if tenant_id is not None:
                self.lists.changed(tenant_id)
            elif not lists_cleared:
                self.lists.cache.clear()  # whose pages show it is not known
                lists_cleared = True

    # -- the subscription -------------------------------------------------------------------

    async def run(self) -> None:
        """Subscribe, listen, and on any failure start again after a growing pause (reset by a
        subscription that lasted); until cancelled (the app's shutdown)."""
        backoff = BACKOFF_FIRST_SECONDS
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                await self._listen()
            except asyncio.CancelledError:
                self._lost("gateway stopping", logging.INFO)
                raise
            except (aioredis.RedisError, OSError, FeedLost) as exc:
                self._lost(f"{type(exc).__name__}: {exc}")
            except Exception as exc:  # a bug must not end the subscription for good
                log.exception("the audit-change subscription failed")
                self._lost(f"{type(exc).__name__}: {exc}")
            if loop.time() - started > BACKOFF_MAX_SECONDS:
                backoff = BACKOFF_FIRST_SECONDS  # it worked for a while: try again at once
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, BACKOFF_MAX_SECONDS)

    async def _listen(self) -> None:
        client = aioredis.Redis.from_url(
            self.url,
            socket_connect_timeout=CONNECT_TIMEOUT_SECONDS,
            socket_timeout=self.dead_after_seconds,
            # Never reconnect (and resubscribe) behind our back: a gap is a loss to handle.
            retry=Retry(NoBackoff(), 0),
            client_name=f"tightrope-gateway-{os.getpid()}",
        )
        pubsub = client.pubsub()
        try:
            await pubsub.subscribe(self.channel)
            loop = asyncio.get_running_loop()
            heard = loop.time()  # the last time Redis said anything (a message, a pong)
            next_ping = heard + self.ping_seconds
            confirmed = False
            while True:
                now = loop.time()
                wait = min(next_ping, heard + self.dead_after_seconds) - now
                # Never 0: after the event loop was busy (a burst of requests), what Redis
                # sent meanwhile must be read before its silence is judged.
                message = await pubsub.get_message(timeout=max(MIN_WAIT_SECONDS, wait))
                now = loop.time()
                if message is not None:
                    heard = now
                    kind = message["type"]
                    if kind == "message":
                        self.apply(message["data"])
                    elif kind == "subscribe":
                        if confirmed:  # subscribed again: the connection was replaced
                            raise FeedLost("the subscription was renewed")
                        confirmed = True
                        self._gained()
                    elif kind == "unsubscribe":
                        raise FeedLost("unsubscribed")
                elif now - heard > self.dead_after_seconds:
                    raise FeedLost(f"no answer from Redis for {self.dead_after_seconds:g} s")
                if now >= next_ping:
                    await pubsub.ping(_PING_PAYLOAD)
                    next_ping = now + self.ping_seconds
        finally:
            try:
                await pubsub.aclose()
            finally:
                await client.aclose()


class FeedCollector(Collector):
    """/metrics: whether this gateway is subscribed, and what the subscription did."""

    def __init__(self, feed: AuditChangeFeed) -> None:
        self.feed = feed

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "tightrope_poll_cache_subscribed",
            "1 while this gateway hears audit-change announcements (polls kept until they "
            "change), 0 while it falls back to poll_cache_seconds",
            value=1.0 if self.feed.subscribed else 0.0,
        )
        yield CounterMetricFamily(
            "tightrope_audit_change_messages",
            "Audit-change announcements applied to this gateway's caches",
            value=float(self.feed.messages),
        )
        yield CounterMetricFamily(
            "tightrope_audit_change_subscription_losses",
            "Times this gateway lost its audit-change subscription (caches cleared)",
            value=float(self.feed.losses),
        )
