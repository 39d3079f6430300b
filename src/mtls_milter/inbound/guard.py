"""The one guard around every MTA-facing step: an exception never reaches the transport."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

log = logging.getLogger("mtls_milter")

_F = TypeVar("_F", bound=Callable[..., Any])


def guarded(fallback: object) -> Callable[[_F], _F]:
    """Log any exception from the decorated method and answer ``fallback`` instead.

    Mail is never lost to a bug: the transport gets a defined answer (continue, accept...) and
    the traceback goes to the log once.
    """
    shown = getattr(fallback, "action", fallback)

    def decorate(method: _F) -> _F:
        @wraps(method)
        def wrapper(self: object, *args: Any) -> Any:
            try:
                return method(self, *args)
            except Exception:
                log.exception("internal error in %s; answering %s", method.__name__, shown)
                return fallback

        return wrapper  # type: ignore[return-value]

    return decorate
