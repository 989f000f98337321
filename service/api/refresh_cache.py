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

Told of changes (the poll caches, service/api/audit_feed.py), a cache can keep entries longer:
`set_long_ttl` gives the entries written from then on a longer life, `invalidate(group)` makes
the entries of a group (an audit, a tenant) stale at once (one request refreshes them, the
others get the last value for at most `INVALIDATED_GRACE_SECONDS`), and `clear` drops all. A
value read before a change and written after it must not outlive the change: the reader takes
a `token()` before it reads, and `put(..., token=...)` keeps nothing when its group was
invalidated (or the cache cleared) since that token.

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

# How long the entries of an invalidated group are still answered while one request reads
# them anew (a refresh that fails is given up after it): a change is seen within this time
# (plus the message's and the read's) by every client.
INVALIDATED_GRACE_SECONDS = 0.5
# Invalidated groups remembered for the tokens of reads in flight; past it the oldest are
# forgotten and reads older than them keep nothing.
INVALIDATED_REMEMBERED = 100_000


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
        group: Callable[[K], Hashable] | None = None,
    ) -> None:
        """`max_entries`, and with `weigh` (a value's size, say its bytes) `max_weight`: the
        least recently written entries go first when either is exceeded. `group`: the group
        of a key, for `invalidate` (default: the key itself)."""
        self.ttl_seconds = ttl_seconds
        self.grace_seconds = max(grace_seconds, 0.0)
        self.max_entries = max_entries
        self.max_weight = max_weight
        self._weigh = weigh
        self._weight = 0
        self._clock = clock
        self._entries: OrderedDict[K, _Entry[V]] = OrderedDict()
        self._lock = threading.Lock()
        self._group: Callable[[K], Hashable] = group or (lambda key: key)
        self._members: dict[Hashable, set[K]] = {}  # group → its keys held
        self._long_ttl: float | None = None
        # Change tracking: every invalidation or clear is a step of `_seq`; a group's last
        # step is in `_invalidated`; a token below `_floor` predates a clear (or a forgotten
        # invalidation).
        self._seq = 0
        self._floor = 0
        self._invalidated: OrderedDict[Hashable, int] = OrderedDict()

    @property
    def weight(self) -> int:
        """The summed weight of the entries held."""
        return self._weight

    @property
    def enabled(self) -> bool:
        return self.ttl_seconds > 0

    @property
    def long_ttl_seconds(self) -> float | None:
        return self._long_ttl

    def set_long_ttl(self, seconds: float | None) -> None:
        """From now on entries are written to live `seconds` (None: `ttl_seconds` again, the
        entries already written keeping theirs: `clear` them where that is not right)."""
        with self._lock:
            self._long_ttl = seconds if seconds and seconds > 0 else None

    def token(self) -> int:
        """Take before reading a value that will be `put`: see the module's docs."""
        with self._lock:
            return self._seq

    def invalidate(self, group: Hashable, drop: bool = False) -> None:
        """The group's values changed: its entries are stale from now (one request refreshes
        each, the others get the last value for at most INVALIDATED_GRACE_SECONDS; `drop`:
        they are forgotten at once), and a read that began before now keeps nothing."""
        with self._lock:
            self._seq += 1
            self._invalidated[group] = self._seq
            self._invalidated.move_to_end(group)
            while len(self._invalidated) > INVALIDATED_REMEMBERED:
                _, step = self._invalidated.popitem(last=False)
                self._floor = max(self._floor, step)
            members = self._members.get(group)
            if not members:
                return
            if drop:
                for key in list(members):
                    self._remove(key)
                return
            now = self._clock()
            grace = min(self.grace_seconds, INVALIDATED_GRACE_SECONDS)
            for key in members:
                entry = self._entries.get(key)
                if entry is not None:
                    entry.fresh_until = min(entry.fresh_until, now)
                    entry.stale_until = min(entry.stale_until, now + grace)
                    entry.refresh_claimed = False

    def clear(self) -> None:
        """Forget every entry; a read that began before now keeps nothing."""
        with self._lock:
            self._seq += 1
            self._floor = self._seq
            self._invalidated.clear()
            self._entries.clear()
            self._members.clear()
            self._weight = 0

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

    def put(self, key: K, value: V, token: int | None = None) -> bool:
        """Keep `value`; with the `token` taken before it was read, only if its group has not
        changed since. Whether it was kept."""
        if not self.enabled:
            return False
        weight = self._weigh(value) if self._weigh is not None else 0
        if self.max_weight is not None and weight > self.max_weight:
            return False  # larger than the whole budget: not kept at all
        group = self._group(key)
        with self._lock:
            if token is not None and (
                token < self._floor or self._invalidated.get(group, -1) > token
            ):
                return False  # read before a change it may not show
            now = self._clock()
            fresh_until = now + (self._long_ttl or self.ttl_seconds)
            entry = _Entry(value, fresh_until, fresh_until + self.grace_seconds, weight)
            self._remove(key)
            self._entries[key] = entry
            self._members.setdefault(group, set()).add(key)
            self._weight += weight
            while len(self._entries) > self.max_entries or (
                self.max_weight is not None and self._weight > self.max_weight
            ):
                self._remove(next(iter(self._entries)))  # the least recently written
        return True

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
            group = self._group(key)
            members = self._members.get(group)
            if members is not None:
                members.discard(key)
                if not members:
                    del self._members[group]

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
