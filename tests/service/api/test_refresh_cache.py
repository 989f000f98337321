"""The single-flight refresh of the gateway's caches (service/api/refresh_cache.py): when an
entry's time is up exactly one request is sent to refresh it, the rest are answered the stale
value for at most the grace period, and nothing older than ttl + grace is ever answered."""

from __future__ import annotations

import threading

from service.api.auth import ApiKeyCache
from service.api.poll_cache import PollCache, list_cache_key
from service.api.refresh_cache import RefreshingCache
from service.db.tables import Tenant, utcnow


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_one_request_refreshes_an_expired_entry_the_others_get_the_stale_value() -> None:
    clock = FakeClock()
    cache: RefreshingCache[str, int] = RefreshingCache(1.0, grace_seconds=0.5, clock=clock)
    cache.put("k", 1)
    assert cache.get("k") == 1 and cache.peek("k") == 1
    clock.now += 1.0  # the TTL is up
    assert cache.peek("k") is None  # the fast path does not volunteer: it asks the slow one
    assert cache.get("k") is None  # the first asker refreshes ...
    assert [cache.get("k") for _ in range(5)] == [1] * 5  # ... the rest are answered stale
    assert cache.peek("k") == 1
    cache.put("k", 2)  # the refresh lands
    assert cache.get("k") == 2 and cache.peek("k") == 2


def test_a_refresh_that_never_lands_is_given_up_and_nothing_older_than_ttl_plus_grace() -> None:
    clock = FakeClock()
    cache: RefreshingCache[str, int] = RefreshingCache(1.0, grace_seconds=0.5, clock=clock)
    cache.put("k", 1)
    clock.now += 1.2
    assert cache.get("k") is None  # claimed; that request then fails and never puts
    assert cache.get("k") == 1
    clock.now += 0.3  # past ttl + grace: gone for everyone
    assert cache.get("k") is None and cache.peek("k") is None and cache.current("k") is None


def test_concurrent_askers_of_an_expired_entry_send_exactly_one_to_refresh() -> None:
    clock = FakeClock()
    cache: RefreshingCache[str, int] = RefreshingCache(1.0, grace_seconds=1.0, clock=clock)
    cache.put("k", 1)
    clock.now += 1.5
    answers: list[int | None] = []
    start = threading.Barrier(16)

    def ask() -> None:
        start.wait()
        answer = cache.get("k")
        answers.append(answer)

    threads = [threading.Thread(target=ask) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers.count(None) == 1 and answers.count(1) == 15


def test_disabled_bounded_and_forgotten() -> None:
    clock = FakeClock()
    off: RefreshingCache[str, int] = RefreshingCache(0, grace_seconds=0, clock=clock)
    off.put("k", 1)
    assert off.get("k") is None and not off.enabled
    cache: RefreshingCache[str, int] = RefreshingCache(
        5.0, grace_seconds=1.0, max_entries=2, clock=clock
    )
    for key in ("a", "b", "c"):
        cache.put(key, 1)
    assert cache.get("a") is None and cache.get("c") == 1  # the least recently written went
    cache.forget("c")
    cache.forget_where(lambda key: key == "b")
    assert cache.get("b") is None and cache.get("c") is None


def test_poll_cache_refreshes_one_poll_at_a_time() -> None:
    clock = FakeClock()
    polls = PollCache(1.0, clock=clock)
    polls.put("t", "a", '"1"', b"one")
    clock.now += 1.0
    assert polls.peek("t", "a") is None  # the middleware passes the request to the route
    assert polls.get("t", "a") is None  # the route reads the audit
    stale = polls.peek("t", "a")  # meanwhile the middleware answers the last answer
    assert stale is not None and stale.body == b"one"
    clock.now += 1.0  # a poll's answer is never older than twice poll_cache_seconds
    assert polls.peek("t", "a") is None and polls.get("t", "a") is None


def test_a_key_revoked_elsewhere_stops_every_request_once_one_has_rechecked_it() -> None:
    clock = FakeClock()
    keys = ApiKeyCache(5.0, clock=clock)
    tenant = Tenant(id="t1", name="acme", created_at=utcnow())
    keys.put("digest", tenant)
    clock.now += 5.0
    assert keys.tenant_id("digest") is None  # the middleware does not re-check
    assert keys.get("digest") is None  # the route re-checks (service.api.auth.authenticate)
    assert keys.tenant_id("digest") == "t1"  # other polls meanwhile: at most 1 s of grace
    keys.forget("digest")  # what authenticate does when it finds the key revoked
    assert keys.tenant_id("digest") is None and keys.get("digest") is None


def test_a_weight_budget_evicts_the_least_recently_written() -> None:
    clock = FakeClock()
    cache: RefreshingCache[str, bytes] = RefreshingCache(
        5.0, grace_seconds=1.0, clock=clock, max_weight=10, weigh=len
    )
    cache.put("a", b"1234")
    cache.put("b", b"1234")
    assert cache.weight == 8
    cache.put("a", b"12")  # rewritten: its old weight is given back, and it is now the newest
    assert cache.weight == 6
    cache.put("c", b"12345")  # 11 > 10: "b", the least recently written, goes
    assert cache.get("b") is None and cache.get("a") == b"12" and cache.weight == 7
    cache.put("huge", b"x" * 11)  # over the whole budget: not kept, nothing evicted for it
    assert cache.get("huge") is None and cache.weight == 7
    cache.forget_where(lambda key: True)
    assert cache.weight == 0
    cache.put("d", b"1")
    clock.now += 10  # past ttl + grace: dropped on the next read, its weight with it
    assert cache.get("d") is None and cache.weight == 0


def test_only_a_query_of_the_lists_own_parameters_is_a_cache_key() -> None:
    assert list_cache_key(b"") == ""
    assert list_cache_key(b"status=queued&page_size=5") == list_cache_key(
        b"page_size=5&status=queued"
    )
    assert list_cache_key(b"page_token=") == "page_token="
    assert list_cache_key(b"status=queued&status=running") is None  # a parameter twice
    assert list_cache_key(b"nonce=1") is None  # made-up parameters make no new entries


def test_an_invalidated_group_is_stale_at_once_and_refreshed_by_one_request() -> None:
    clock = FakeClock()
    polls = PollCache(1.0, clock=clock)
    polls.cache.set_long_ttl(60.0)  # subscribed to announcements: kept until a change
    polls.put("t", "a", '"1"', b"one")
    polls.put("t", "b", '"1"', b"bee")
    clock.now += 30.0
    assert polls.peek("t", "a") is not None  # far past poll_cache_seconds
    polls.changed("a")  # announced
    assert polls.peek("t", "a") is None  # the middleware passes it to the route
    assert polls.get("t", "a") is None  # which reads it anew ...
    stale = polls.peek("t", "a")  # ... while the others get the last answer
    assert stale is not None and stale.body == b"one"
    clock.now += 0.5  # but for at most half a second
    assert polls.peek("t", "a") is None and polls.get("t", "a") is None
    assert polls.peek("t", "b") is not None  # another audit's answer is untouched
    clock.now += 31.0  # the safety net: nothing outlives poll_cache_subscribed_seconds + grace
    assert polls.peek("t", "b") is None


def test_a_read_that_began_before_a_change_keeps_nothing() -> None:
    clock = FakeClock()
    polls = PollCache(1.0, clock=clock)
    polls.cache.set_long_ttl(60.0)
    token = polls.token()  # a poll starts reading audit "a" (the old row) ...
    polls.changed("a")  # ... a worker's change is announced meanwhile ...
    polls.put("t", "a", '"old"', b"old", token)  # ... and the old answer arrives: not kept
    assert polls.peek("t", "a") is None
    polls.put("t", "b", '"1"', b"bee", token)  # another audit did not change: kept
    assert polls.peek("t", "b") is not None
    fresh = polls.token()
    polls.put("t", "a", '"new"', b"new", fresh)
    entry = polls.peek("t", "a")
    assert entry is not None and entry.body == b"new"
    # cleared (the subscription lost or regained): every read in flight keeps nothing
    polls.cache.clear()
    polls.put("t", "a", '"new"', b"new", fresh)
    assert polls.peek("t", "a") is None
    # this gateway's own write: gone at once, and a read in flight keeps nothing
    polls.put("t", "a", '"new"', b"new", polls.token())
    before = polls.token()
    polls.forget("a")
    assert polls.peek("t", "a") is None
    polls.put("t", "a", '"new"', b"new", before)
    assert polls.peek("t", "a") is None


def test_lists_are_invalidated_by_tenant_and_the_short_ttl_comes_back() -> None:
    from service.api.poll_cache import AuditListCache

    clock = FakeClock()
    lists = AuditListCache(1.0, clock=clock)
    lists.cache.set_long_ttl(60.0)
    lists.put("t1", "", b"page1")
    lists.put("t1", "status=queued", b"page1q")
    lists.put("t2", "", b"page2")
    clock.now += 10.0
    lists.changed("t1")
    assert lists.peek("t1", "") is None and lists.peek("t1", "status=queued") is None
    assert lists.peek("t2", "") == b"page2"
    lists.cache.set_long_ttl(None)  # the subscription is lost: entries written now are short
    lists.put("t3", "", b"page3")
    clock.now += 2.5  # past poll_cache_seconds and its grace
    assert lists.peek("t3", "") is None
