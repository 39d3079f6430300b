"""A worker's channel to its supervising parent, and the message kinds on it.

The channel is one end of an AF_UNIX SOCK_SEQPACKET socket pair per worker: each message is one
datagram (never half of one). A worker sends ``REQUEST`` + an 8-byte id + a payload and reads
the parent's reply (the same id + the answer); ``UP`` (serving) and ``RELOADED`` (a reload is
done) need no reply.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time

MAX_MESSAGE = 65536
REQUEST, UP, RELOADED = b"?", b"U", b"R"  # the first byte of a message from a worker
ID = struct.Struct("!Q")


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
