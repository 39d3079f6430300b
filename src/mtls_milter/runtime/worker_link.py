"""A worker's channel to its supervising parent, and the message kinds on it.

The channel is one end of an AF_UNIX SOCK_SEQPACKET socket pair per worker: each message is one
datagram (never half of one). A worker sends ``REQUEST`` + an 8-byte id + a payload and reads
the parent's reply (the same id + the answer); ``UP`` (serving) and ``RELOADED`` (a reload is
done) need no reply. Also the parent's small helpers about a worker process: its memory, its
exit status in words, the delay before restarting it, its record and the hooks called.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

MAX_MESSAGE = 65536
REQUEST, UP, RELOADED = b"?", b"U", b"R"  # the first byte of a message from a worker
ID = struct.Struct("!Q")

STABLE_AFTER = 10.0  # seconds; a worker that lived this long is restarted without delay
FIRST_DELAY = 0.5  # seconds before restarting a worker that died young
QUICK_DELAY = 0.1  # seconds before restarting a worker that had a normal life
MAX_DELAY = 30.0


def rss_bytes(pid: int | str = "self") -> int:
    """Resident memory of a process from /proc/PID/statm; 0 when unreadable."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def mib(size: int) -> str:
    return f"{size / 1048576:.1f}MiB"


class RestartBackoff:
    """How long to wait before restarting a worker slot, from how long its worker lived."""

    def __init__(
        self, stable_after: float = STABLE_AFTER, first: float = FIRST_DELAY, top: float = MAX_DELAY
    ) -> None:
        self._stable_after, self._first, self._top = stable_after, first, top
        self._last: dict[int, float] = {}  # slot -> the delay last given to a young death

    def delay(self, slot: int, lived: float) -> float:
        if lived >= self._stable_after:
            self._last.pop(slot, None)
            return QUICK_DELAY
        previous = self._last.get(slot)
        delay = self._first if previous is None else min(previous * 2, self._top)
        self._last[slot] = delay
        return delay


def describe_status(status: int) -> str:
    """A wait status in words: ``killed by signal SIGKILL`` or ``exited with status 1``."""
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = str(number)
        return f"killed by signal {name}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


class WorkerLink:
    """A worker's end of its channel to the parent; :meth:`request` is thread-safe."""

    def __init__(self, sock: socket.socket, slot: int) -> None:
        self.sock = sock
        self.slot = slot
        self._lock = threading.Lock()
        self._next = 0

    def tell(self, kind: bytes, payload: bytes = b"") -> None:
        """A one-way message (no reply); lost silently when the parent is gone."""
        with contextlib.suppress(OSError):
            self.sock.send(kind + payload)

    def request(self, payload: bytes, timeout: float) -> bytes | None:
        """Ask the parent; its reply, or None on a broken channel or when no reply came within
        ``timeout`` seconds in all (waiting for another thread's request included)."""
        deadline = time.monotonic() + timeout
        # Bounded: the caller may be an event loop, and another thread may be waiting too.
        if not self._lock.acquire(timeout=timeout):
            return None
        try:
            self._next += 1
            ident = ID.pack(self._next)
            try:
                if (remaining := deadline - time.monotonic()) <= 0:
                    return None
                self.sock.settimeout(remaining)
                self.sock.send(REQUEST + ident + payload)
                while (remaining := deadline - time.monotonic()) > 0:
                    self.sock.settimeout(remaining)
                    reply = self.sock.recv(MAX_MESSAGE)
                    if not reply:
                        return None
                    if reply[: ID.size] == ident:
                        return reply[ID.size :]
                    # else: the late reply to an earlier request that timed out
            except OSError:
                return None
            return None
        finally:
            self._lock.release()


@dataclass
class SupervisorHooks:
    """Optional callbacks in the parent, each quick (one that raises is logged and ignored)."""

    before_fork: Callable[[int], None] | None = None  # slot
    worker_started: Callable[[int, int], None] | None = None  # slot, pid
    worker_exited: Callable[[int, int, int], None] | None = None  # slot, pid, wait status


@dataclass
class Worker:
    """The parent's record of one worker process."""

    slot: int
    pid: int
    channel: socket.socket  # the parent's end
    started: float
    up: bool = False
    reloaded: bool = True
    late: int = 0  # confirmations still due from reloads that timed out, not to be counted


@dataclass
class ReloadState:
    """A reload under way: checked in a thread, then confirmed by the workers."""

    trigger: str
    checked: bool = False  # set by the checking thread once ``summary`` is final
    summary: str | None = None  # None: refused (or the check failed)
    deadline: float = float("inf")  # for the workers' confirmations, once they are signalled


def memory_text(workers: Iterable[Worker]) -> str:
    """Each worker's slot, pid and resident memory: ``0:pid=4711:rss=35.7MiB 1:pid=…``."""
    return " ".join(
        f"{w.slot}:pid={w.pid}:rss={mib(rss_bytes(w.pid))}"
        for w in sorted(workers, key=lambda w: w.slot)
    )
