"""One context-manager shape for the test servers and harnesses: start on entry, stop on exit."""

from __future__ import annotations

from types import TracebackType
from typing import Any, Self


class Running:
    """Mixin for anything with ``start()`` and ``stop()``: ``with Thing(...) as thing:``."""

    def start(self) -> Any:
        raise NotImplementedError

    def stop(self) -> object:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
