"""Single-flight DNS queries and a per-domain cap on queries in flight.

Concurrent identical lookups (same name, same RR type) share one query: the first caller (the
leader) runs it, the others wait for its decoded result, each at most its own budget. A waiter
whose budget ends gets a TEMPFAIL result while the shared query goes on and fills the cache for
whoever asks next.

A caller joins a query only if that query may still run for at least half the caller's own
budget (:data:`JOIN_SHARE`): a query led by a caller with 0.05 s left must not hand a caller with
5 s a "no answer within 0.05 s". Otherwise the caller runs its own query (the same question is
then on the wire twice), and later callers join that one. If a shared result says the query ran
out of time while the waiter's budget has time left (it joined a shorter query, or the DNS
timeout is shorter than the budget), the waiter asks once more with what is left; waiters that
do so at the same moment share that query too.

At most :data:`PER_DOMAIN` queries are in flight at once per domain group
(:func:`mtls_milter.core.lookups.lookup_group`, roughly the registered domain), so one sender
domain with slow or silent name servers cannot take every lookup thread. Time spent waiting for
a slot does not count against the query's budget (the query gets its full lifetime once it has a
slot) and pauses the budget of a MAIL FROM lookup (:func:`~.lookup_pool.budget_paused`); the
wait itself is bounded by the same budget, then the result is TEMPFAIL.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from mtls_milter.core.quote import clip
from mtls_milter.net.lookup_pool import budget_paused

__all__ = ["JOIN_SHARE", "PER_DOMAIN", "InFlight"]

PER_DOMAIN = 8  # one message's own lookups in one domain (Client MX, MX, A, AAAA, SPF, DMARC,
# DKIM) fit without waiting; a flood of distinct names under one domain does not

JOIN_SHARE = 0.5  # join a query in flight only if it may still run for this share of our budget

R = TypeVar("R")


class _Flight(Generic[R]):
    __slots__ = ("deadline", "done", "value")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline  # monotonic; only moves later (a wait for a slot is not charged)
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
        expired: Callable[[R], bool] | None = None,
    ) -> R:
        """``query(budget)``'s result, or the one a concurrent identical query gets.

        ``unavailable(text)`` builds the TEMPFAIL result when no answer comes within ``budget``
        (waiting for another caller's query) or no slot frees up within it. ``expired(result)``
        says a result means "the query ran out of time": a caller that gets such a shared
        result with budget left asks once more (sharing that query too) with what is left.
        """
        deadline = time.monotonic() + budget
        value, shared = self._join_or_lead(key, group, budget, query, unavailable)
        left = deadline - time.monotonic()
        if shared and left > 0 and expired is not None and expired(value):
            value, _ = self._join_or_lead(key, group, left, query, unavailable)
        return value

    def _join_or_lead(
        self,
        key: Hashable,
        group: str,
        budget: float,
        query: Callable[[float], R],
        unavailable: Callable[[str], R],
    ) -> tuple[R, bool]:
        """Join the query in flight for ``key`` if it may run long enough, else run our own
        (and let later callers join ours); the result, and whether it was another's."""
        now = time.monotonic()
        with self._lock:
            flight = self._flights.get(key)
            lead = flight is None or flight.deadline - now < budget * JOIN_SHARE
            if flight is None or lead:  # none, or one ending too soon for us
                flight = self._flights[key] = _Flight(now + budget)
        if lead:
            return self._lead(key, flight, group, budget, query, unavailable), False
        if not flight.done.wait(budget) or flight.value is None:
            text = f"no answer within {budget:.3g} s (query shared with another)"
            return unavailable(text), False
        return flight.value, True

    def _lead(
        self,
        key: Hashable,
        flight: _Flight[R],
        group: str,
        budget: float,
        query: Callable[[float], R],
        unavailable: Callable[[str], R],
    ) -> R:
        """Run ``query`` for ``flight`` (in a slot of ``group``) and hand its result on."""
        value: R | None = None
        try:
            if self._take_slot(group, budget, flight):
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
                if self._flights.get(key) is flight:  # a longer query may have taken the key
                    del self._flights[key]
            flight.value = value
            flight.done.set()

    def in_flight(self) -> int:
        """Queries in flight now (for tests and metrics)."""
        with self._lock:
            return len(self._flights)

    def _take_slot(self, group: str, budget: float, flight: _Flight[R]) -> bool:
        """A query slot in ``group``, waiting at most ``budget`` for one; the query's full
        budget then counts from the slot, so ``flight``'s deadline moves on by the wait."""
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
                flight.deadline = max(flight.deadline, time.monotonic() + budget)
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
