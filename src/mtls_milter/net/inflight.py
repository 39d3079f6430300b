"""Single-flight DNS queries and a per-domain cap on queries in flight.

Concurrent identical lookups (same name, same RR type) share one query: the first caller (the
leader) runs it, the others wait for its decoded result, each at most its own budget. A waiter
whose budget ends gets a TEMPFAIL result while the shared query goes on and fills the cache for
whoever asks next.

At most :data:`PER_DOMAIN` queries are in flight at once per domain group
(:func:`mtls_milter.core.lookups.lookup_group`, roughly the registered domain), so one sender
domain with slow or silent name servers cannot take every lookup thread. Time spent waiting for
a slot does not count against the query's budget (the query gets its full lifetime once it has a
slot) and pauses the budget of a MAIL FROM lookup (:func:`~.lookup_pool.budget_paused`); the
wait itself is bounded by the same budget, then the result is TEMPFAIL.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from mtls_milter.core.quote import clip
from mtls_milter.net.lookup_pool import budget_paused

__all__ = ["PER_DOMAIN", "InFlight"]

PER_DOMAIN = 8  # one message's own lookups in one domain (Client MX, MX, A, AAAA, SPF, DMARC,
# DKIM) fit without waiting; a flood of distinct names under one domain does not

R = TypeVar("R")


class _Flight(Generic[R]):
    __slots__ = ("done", "value")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: R | None = None


class InFlight(Generic[R]):
    """The queries in flight, by key, and the slots in use, by domain group."""

    def __init__(self, per_domain: int = PER_DOMAIN) -> None:
        self.per_domain = max(1, per_domain)
        self._lock = threading.Lock()
        self._flights: dict[Hashable, _Flight[R]] = {}
        self._slots = threading.Condition(self._lock)
        self._in_use: dict[str, int] = {}
        self._slot_waiters = 0

    def run(
        self,
        key: Hashable,
        group: str,
        budget: float,
        query: Callable[[float], R],
        unavailable: Callable[[str], R],
    ) -> R:
        """``query(budget)``'s result, or the one a concurrent identical query gets.

        ``unavailable(text)`` builds the TEMPFAIL result when no answer comes within ``budget``
        (waiting for another caller's query) or no slot frees up within it.
        """
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight()
        if not leader:
            if flight.done.wait(budget) and flight.value is not None:
                return flight.value
            return unavailable(f"no answer within {budget:.3g} s (query shared with another)")
        value: R | None = None
        try:
            if self._take_slot(group, budget):
                try:
                    value = query(budget)
                finally:
                    self._give_slot(group)
            else:
                busy = f"{self.per_domain} lookups under {clip(group)} busy"
                value = unavailable(f"{busy} for {budget:.3g} s")
            return value
        finally:
            with self._lock:
                del self._flights[key]
            flight.value = value
            flight.done.set()

    def in_flight(self) -> int:
        """Queries in flight now (for tests and metrics)."""
        with self._lock:
            return len(self._flights)

    def _take_slot(self, group: str, budget: float) -> bool:
        with self._lock:
            if self._in_use.get(group, 0) < self.per_domain:  # the common case: no wait
                self._in_use[group] = self._in_use.get(group, 0) + 1
                return True
        with budget_paused(), self._slots:
            self._slot_waiters += 1
            try:
                free = self._slots.wait_for(
                    lambda: self._in_use.get(group, 0) < self.per_domain, timeout=budget
                )
            finally:
                self._slot_waiters -= 1
            if free:
                self._in_use[group] = self._in_use.get(group, 0) + 1
            return free

    def _give_slot(self, group: str) -> None:
        with self._lock:
            left = self._in_use[group] - 1
            if left:
                self._in_use[group] = left
            else:
                del self._in_use[group]
            if self._slot_waiters:
                self._slots.notify_all()
