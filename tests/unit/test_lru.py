"""The one expiring LRU behind the DNS, chain-verdict, fetched-chain and session caches."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mtls_milter.core.lru import ExpiringLRU, TimedLRU


def test_least_recently_used_goes_first() -> None:
    cache: ExpiringLRU[str, int] = ExpiringLRU(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "a" is now the most recently used
    cache.put("c", 3)
    assert list(cache) == ["a", "c"]


def test_a_stale_entry_is_a_miss_and_is_dropped() -> None:
    cache: ExpiringLRU[str, int] = ExpiringLRU(4)
    cache.put("a", 1)
    assert cache.get("a", lambda value: value > 1) is None
    assert len(cache) == 0
    assert cache.stats() == {"hits": 0, "misses": 1, "size": 0}


def test_timed_entries_expire_at_their_instant() -> None:
    cache: TimedLRU[str, str] = TimedLRU(4)
    cache.put_until("k", "v", expires=10.0)
    assert cache.get_at("k", 9.999) == "v"
    assert cache.get_at("k", 10.0) is None
    assert cache.stats() == {"hits": 1, "misses": 1, "size": 0}


def test_size_zero_caches_nothing() -> None:
    cache: ExpiringLRU[str, int] = ExpiringLRU(0)
    cache.put("a", 1)
    assert cache.get("a") is None and len(cache) == 0


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 5), st.lists(st.integers(0, 9), max_size=40))
def test_never_holds_more_than_its_size(size: int, keys: list[int]) -> None:
    cache: ExpiringLRU[int, int] = ExpiringLRU(size)
    for key in keys:
        if cache.get(key) is None:
            cache.put(key, key)
        assert len(cache) <= size
    assert list(cache) == list(dict.fromkeys(reversed(keys)))[:size][::-1] or size == 0
