"""Threads for DNS lookups started at MAIL FROM: one per lookup, on demand, no shared queue.

A fixed pool (``ThreadPoolExecutor(32)``) makes the 33rd concurrent cold lookup wait for a
thread, and that wait used to count against the message's DNS budget: a burst of mail from
distinct cold domains with slow name servers turned into ``temperror`` from queueing alone.
:class:`LookupPool` instead hands every lookup to an idle thread or starts a new one, so
unrelated messages never wait for each other. Idle threads linger :data:`IDLE_SECONDS` for the
next lookup, then exit. :data:`MAX_THREADS` is only a safety ceiling against a flood: beyond it
lookups wait in order for a thread, and that wait pauses their budget (see below).

The budget of a lookup run here starts when a thread starts it, and pauses while it waits for
one of its domain's lookup slots (:func:`budget_paused`, used by :mod:`mtls_milter.net.inflight`).
:func:`lookup_deadline` tells the waiting side (end of message) when that budget really ends.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

__all__ = [
    "IDLE_SECONDS",
    "MAX_THREADS",
    "LookupFuture",
    "LookupPool",
    "budget_paused",
    "lookup_deadline",
    "paused_seconds",
]

T = TypeVar("T")

MAX_THREADS = 1024  # safety ceiling: ~1024 lookups in flight at once (8 MiB virtual stack each)
IDLE_SECONDS = 30.0  # an idle thread waits this long for the next lookup, then exits
MAX_PAUSE_FACTOR = 1.0  # pauses may extend a lookup's deadline by at most one more budget

_local = threading.local()  # .future: the LookupFuture this thread runs; .paused: seconds


class LookupFuture(Future[T]):
    """A :class:`~concurrent.futures.Future` that knows when its work started and how long
    that work has been paused waiting for a slot (written by the worker, read by the waiter)."""

    def __init__(self) -> None:
        super().__init__()
        self.submitted = time.monotonic()
        self.started: float | None = None  # when a thread took it
        self.paused = 0.0  # seconds of finished pauses
        self.pause_since: float | None = None  # a pause in progress


def lookup_deadline(future: Future[Any], budget: float, since: float) -> float:
    """The monotonic instant the budget of ``future``'s lookup ends, as far as known now.

    For a :class:`LookupFuture`: its start plus ``budget`` plus its pauses (not yet started
    counts as paused), extended by at most another ``budget`` beyond ``since + budget``. For any
    other future: ``since + budget``, the budget counted from ``since``.
    """
    limit = since + budget
    if not isinstance(future, LookupFuture):
        return limit
    now = time.monotonic()
    started, pause_since = future.started, future.pause_since
    if started is None:
        return min(now + budget, limit + budget * MAX_PAUSE_FACTOR)
    paused = future.paused + (now - pause_since if pause_since is not None else 0.0)
    return min(started + budget + paused, limit + budget * MAX_PAUSE_FACTOR)


@contextlib.contextmanager
def budget_paused() -> Iterator[None]:
    """Pause the budget of the lookup this thread runs (and count the pause for the thread)."""
    future: LookupFuture[Any] | None = getattr(_local, "future", None)
    began = time.monotonic()
    if future is not None:
        future.pause_since = began
    try:
        yield
    finally:
        spent = time.monotonic() - began
        _local.paused = getattr(_local, "paused", 0.0) + spent
        if future is not None:
            future.paused += spent
            future.pause_since = None


def paused_seconds() -> float:
    """Seconds this thread has spent in :func:`budget_paused` (a running total)."""
    total: float = getattr(_local, "paused", 0.0)
    return total


class _Work:
    __slots__ = ("args", "fn", "future", "kwargs")

    def __init__(
        self, future: LookupFuture[Any], fn: Callable[..., Any], args: Any, kwargs: Any
    ) -> None:
        self.future, self.fn, self.args, self.kwargs = future, fn, args, kwargs

    def run(self) -> None:
        future = self.future
        if not future.set_running_or_notify_cancel():
            return
        future.started = time.monotonic()
        _local.future = future
        try:
            result = self.fn(*self.args, **self.kwargs)
        except BaseException as exc:  # handed to the waiter, as ThreadPoolExecutor does
            future.set_exception(exc)
        else:
            future.set_result(result)
        finally:
            _local.future = None


class LookupPool(Executor):
    """An executor that runs each submitted call at once on an idle or a new daemon thread."""

    def __init__(
        self,
        max_threads: int = MAX_THREADS,
        *,
        idle_seconds: float = IDLE_SECONDS,
        name: str = "lookup",
    ) -> None:
        self._max_threads = max(1, max_threads)
        self._idle_seconds = idle_seconds
        self._name = name
        self._started = 0  # for thread names
        self._shutdown = False
        self._reset()

    def _reset(self) -> None:
        """Fresh bookkeeping: at creation, and in a forked child (the parent's threads, their
        idle counts and a lock one of them held do not exist there)."""
        self._pid = os.getpid()
        self._work: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards the three counts below
        self._threads = 0  # threads alive
        self._idle = 0  # threads waiting for work that no queued work is promised to yet
        self._backlog = 0  # queued work no thread is promised to (submitted at the ceiling)

    @property
    def threads(self) -> int:
        """Threads alive now (running a lookup or idle)."""
        return self._threads

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> LookupFuture[T]:
        """Run ``fn(*args, **kwargs)`` now; the future is a :class:`LookupFuture`."""
        future: LookupFuture[T] = LookupFuture()
        if os.getpid() != self._pid:
            self._reset()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot submit after shutdown")
            self._work.put(_Work(future, fn, args, kwargs))
            if self._idle:
                self._idle -= 1
                return future  # an idle thread takes it
            if self._threads >= self._max_threads:
                self._backlog += 1
                return future  # at the ceiling: the next thread to finish takes it
            self._threads += 1
            self._started += 1
            number = self._started
        thread = threading.Thread(target=self._worker, name=f"{self._name}-{number}", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # the system would not start another thread
            with self._lock:
                self._threads -= 1
                if not self._threads:
                    raise  # nobody will run it: the caller decides (a lookup's caller: temperror)
                self._backlog += 1  # a running thread takes it when it finishes
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking work; optionally cancel what waits; idle threads exit."""
        with self._lock:
            self._shutdown = True
            threads = self._threads
        if cancel_futures:
            while True:
                try:
                    item = self._work.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item.future.cancel()
        for _ in range(threads):
            self._work.put(None)
        if wait:
            while self._threads:
                time.sleep(0.01)

    def _worker(self) -> None:
        """Run work until idle for ``idle_seconds`` (or told to stop by shutdown).

        Every queued item is promised to exactly one thread: an idle one (its idle count
        taken by the submitter), a new one, or, at the ceiling, the next one to finish (the
        backlog). A thread that finishes work first serves the backlog, and only otherwise
        counts itself idle, so the idle count never exceeds the threads really waiting.
        """
        while True:
            try:
                item = self._work.get(timeout=self._idle_seconds)
            except queue.Empty:
                with self._lock:
                    if self._idle:  # nobody has promised us work: leave
                        self._idle -= 1
                        self._threads -= 1
                        return
                continue  # a submitter just took our idle count: its work is on the way
            if item is None:
                break
            item.run()
            del item  # drop the finished work's references before idling
            with self._lock:
                if self._backlog:
                    self._backlog -= 1  # the queue holds work waiting for a thread: take it
                else:
                    self._idle += 1
        with self._lock:
            self._threads -= 1
