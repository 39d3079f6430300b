"""The verdict and our header field for inputs seen before: computed once, reused.

A busy receiver sees the same few senders over and over: the same MAIL FROM domain, the same
TLS facts from the MTA, the same cached Client MX answer. For those the evaluation is a pure
function of (configuration, MAIL FROM, HELO, TLS facts, Client MX answer), so its verdict is
kept in a small bounded table, and so is the rendered header value per (verdict, authserv-id).
Only verdicts that rest on nothing else are kept: no certificate chain (its validity depends
on the clock), a Client MX answer that was found (a domain without one leads to further
lookups), and no Server MX fallback. The table belongs to one engine: a reload (a new engine)
empties it. Entries are plain dict items (atomic under the GIL); a full table is emptied
rather than aged, which costs one recomputation per key.
"""

from __future__ import annotations

from collections.abc import Hashable
from concurrent.futures import Future
from typing import Generic, TypeVar

from mtls_milter.core.evaluate import Verdict
from mtls_milter.core.lookups import HostLookup, LookupStatus

MAX_ENTRIES = 512
_V = TypeVar("_V")


class Memo(Generic[_V]):
    """A bounded table of computed values, tied to one owner (the engine)."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        # The owner and its table as one value, swapped whole: a thread still judging for the
        # previous engine can only write into that engine's table, never into the new one.
        self._state: tuple[object, dict[Hashable, _V]] = (None, {})
        self._max = max_entries

    def get(self, owner: object, key: Hashable) -> _V | None:
        """The value kept for ``key`` under ``owner``, or None."""
        current, table = self._state
        return table.get(key) if current is owner else None

    def put(self, owner: object, key: Hashable, value: _V) -> None:
        """Keep ``value``; a new owner (a reload's engine) starts an empty table."""
        current, table = self._state
        if current is not owner or len(table) >= self._max:
            table = {}
            self._state = (owner, table)
        table[key] = value


VERDICTS: Memo[Verdict] = Memo()
HEADER_VALUES: Memo[str] = Memo()


def reusable_answer(held: HostLookup | None) -> bool:
    """Whether a verdict resting on this Client MX answer may be reused: a found record set."""
    return held is not None and held.status is LookupStatus.OK


_SETTLED: dict[HostLookup, Future[HostLookup]] = {}


def settled_future(answer: HostLookup) -> Future[HostLookup]:
    """A finished future holding a cached Client MX ``answer``, shared by every message that
    gets the same answer (a finished future is read-only: nothing waits on it or changes it),
    instead of a new one per message."""
    done = _SETTLED.get(answer)
    if done is None:
        done = Future()
        done.set_result(answer)
        if len(_SETTLED) >= MAX_ENTRIES:
            _SETTLED.clear()
        _SETTLED[answer] = done
    return done
