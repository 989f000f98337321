"""A small in-process cache whose expiry is refreshed by one request, not by all of them.

The gateway keeps two such caches (live API keys, the last answer to each status poll). A
plain time-to-live cache makes every client that arrives just after an entry expires go to the
database together: with 64 pollers that is 64 queries queued behind a few slots, once per TTL,
and the slowest of them sets the tail latency. Here an expired entry stays *stale* for a short
grace period: the first request that asks for it (`get`) is told to refresh it (it gets None
and goes to the database; its `put` ends the refresh), and every other request meanwhile is
answered the stale value. A refresh that never comes back (its request failed) is given up
after the grace period, and the next request is told to refresh instead.

So a value is at most `ttl + grace` seconds old, never older. `peek` never volunteers: it is
for a fast path that, on a miss, hands the request to a slower path that calls `get`.

Thread-safe: values are written from the thread pool and read on the event loop.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass
class _Entry(Generic[V]):
    value: V
    fresh_until: float
    stale_until: float
    weight: int
    # A request was sent to refresh it. The claim needs no deadline of its own: it lasts until
    # the stale value does, and a `put` replaces the entry.
    refresh_claimed: bool = False


class RefreshingCache(Generic[K, V]):
    def __init__(
        self,
        ttl_seconds: float,
        grace_seconds: float,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        max_weight: int | None = None,
        weigh: Callable[[V], int] | None = None,
    ) -> None:
        """`max_entries`, and with `weigh` (a value's size, say its bytes) `max_weight`: the
        least recently written entries go first when either is exceeded."""
        self.ttl_seconds = ttl_seconds
        self.grace_seconds = max(grace_seconds, 0.0)
        self.max_entries = max_entries
        self.max_weight = max_weight
        self._weigh = weigh
        self._weight = 0
        self._clock = clock
        self._entries: OrderedDict[K, _Entry[V]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def weight(self) -> int:
        """The summed weight of the entries held."""
        return self._weight

    @property
    def enabled(self) -> bool:
        return self.ttl_seconds > 0

    def get(self, key: K) -> V | None:
        """The value, fresh or (while another request refreshes it) stale; None when the
        caller must read it anew and `put` it: then no one else is told so for a grace period."""
        return self._lookup(key, volunteer=True)

    def peek(self, key: K) -> V | None:
        """As `get`, but a stale value no one is refreshing yet is None without a claim."""
        return self._lookup(key, volunteer=False)

    def current(self, key: K) -> V | None:
        """The value held, however old (for merging a new answer with the last one)."""
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else entry.value

    def put(self, key: K, value: V) -> None:
        if not self.enabled:
            return
        weight = self._weigh(value) if self._weigh is not None else 0
        if self.max_weight is not None and weight > self.max_weight:
            return  # larger than the whole budget: not kept at all
        now = self._clock()
        fresh_until = now + self.ttl_seconds
        entry = _Entry(value, fresh_until, fresh_until + self.grace_seconds, weight)
        with self._lock:
            self._remove(key)
            self._entries[key] = entry
            self._weight += weight
            while len(self._entries) > self.max_entries or (
                self.max_weight is not None and self._weight > self.max_weight
            ):
                self._remove(next(iter(self._entries)))  # the least recently written

    def forget(self, key: K) -> None:
        with self._lock:
            self._remove(key)

    def forget_where(self, predicate: Callable[[K], bool]) -> None:
        with self._lock:
            for key in [key for key in self._entries if predicate(key)]:
                self._remove(key)

    def _remove(self, key: K) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._weight -= entry.weight

    def _lookup(self, key: K, volunteer: bool) -> V | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            now = self._clock()
            if now < entry.fresh_until:
                return entry.value
            if now >= entry.stale_until:
                self._remove(key)
                return None
            if entry.refresh_claimed:
                return entry.value  # someone is refreshing it: the stale value meanwhile
            entry.refresh_claimed = volunteer
            return None
