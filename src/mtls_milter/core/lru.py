"""One bounded, thread-safe LRU map whose entries go stale, with hit and miss counters.

Used for DNS answers, chain verdicts, fetched chains and policy-session facts. Each user says what
"fresh" means for its entries (a TTL on a monotonic clock, a certificate validity window), so the
map needs no clock of its own: ``get`` takes a predicate, and a stale entry is dropped on sight.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def _always(_value: object) -> bool:
    return True


class ExpiringLRU(Generic[K, V]):
    """At most ``size`` entries, least recently used evicted first; ``size`` 0 caches nothing."""

    def __init__(self, size: int) -> None:
        self.size = max(0, size)
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K, fresh: Callable[[V], bool] = _always) -> V | None:
        """The entry for ``key`` if present and ``fresh``; a stale entry is removed."""
        if not self.size:
            return None
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                if fresh(value):
                    self._items.move_to_end(key)
                    self.hits += 1
                    return value
                del self._items[key]
            self.misses += 1
            return None

    def put(self, key: K, value: V) -> None:
        """Store ``value`` as the most recently used entry, evicting beyond ``size``."""
        if not self.size:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def stats(self) -> dict[str, int]:
        """Hits, misses and the number of entries held (for metrics and tests)."""
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "size": len(self._items)}

    def __iter__(self) -> Iterator[K]:
        """The keys held, least recently used first (a snapshot)."""
        with self._lock:
            return iter(list(self._items))

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


class TimedLRU(ExpiringLRU[K, tuple[float, V]]):
    """An :class:`ExpiringLRU` whose entries expire at an instant of one (monotonic) clock."""

    def get_at(self, key: K, now: float) -> V | None:
        """The value for ``key`` if it expires after ``now``."""
        entry = self.get(key, lambda entry: entry[0] > now)
        return None if entry is None else entry[1]

    def put_until(self, key: K, value: V, expires: float) -> None:
        """Store ``value`` until the instant ``expires``."""
        self.put(key, (expires, value))
