"""Run an asyncio service in a daemon thread with its own event loop.

The milter daemon runs its policy listener this way beside libmilter's threads, and the tests run
the ACME responder and the socketmap service the same way. A service is one coroutine function
``serve(stop, ready)``: it opens its sockets, calls ``ready()``, and serves until ``stop`` is set,
closing what it opened on the way out. An error before ``ready()`` is raised by :meth:`start`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Self

Serve = Callable[[asyncio.Event, Callable[[], None]], Awaitable[None]]


class ServiceThread:
    """One service, one thread, one event loop; usable as a context manager."""

    def __init__(
        self, serve: Serve, *, name: str, log: logging.Logger, join_timeout: float = 10.0
    ) -> None:
        self._serve = serve
        self._what = name.replace("-", " ")  # for messages: "policy service"
        self._log = log
        self._join_timeout = join_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self, timeout: float = 10.0) -> Self:
        """Start and wait until the service is ready; re-raise what kept it from starting."""
        self._thread.start()
        if not self._ready.wait(timeout):
            raise OSError(f"{self._what} did not start within {timeout:g} s")
        if self._error is not None:
            self._thread.join(self._join_timeout)
            raise self._error
        return self

    def stop(self) -> None:
        """Ask the service to stop and join the thread."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed in the meantime
                loop.call_soon_threadsafe(stop.set)
        if self._thread.is_alive():
            self._thread.join(self._join_timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception:
            self._log.exception("%s stopped with an error", self._what)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            await self._serve(self._stop, self._ready.set)
        except BaseException as exc:
            if self._ready.is_set():
                raise
            self._error = exc
            self._ready.set()
