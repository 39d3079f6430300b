"""The clock the core reads, injected so tests and the CLI can fix the validation time."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    """Wall-clock time for certificate validity, monotonic time for budgets."""

    def now(self) -> datetime: ...

    def monotonic(self) -> float: ...


@dataclass(frozen=True, slots=True)
class SystemClock:
    """The real clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()


@dataclass(frozen=True, slots=True)
class FixedClock:
    """A fixed wall-clock instant (``check --at``); budgets still use real monotonic time."""

    instant: datetime

    def now(self) -> datetime:
        return self.instant

    def monotonic(self) -> float:
        return time.monotonic()
