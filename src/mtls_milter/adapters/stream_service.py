"""What the asyncio services (policy-map socketmap, Postfix policy listener, ACME responder)
share: opening a ``unix:``/``inet:`` socket, serving each connection in a tracked task, closing
them all — and the limits that keep a hostile or broken client from exhausting the process.

Limits (docs/security.md):

- a cap on open connections in total and per peer (a TCP peer is its IP address; a unix-socket
  peer is its user id, so a local user cannot take the slots of the MTA's user). A connection
  over a cap is closed at once;
- running out of file descriptors (``EMFILE`` and friends on ``accept``): asyncio stops
  accepting for a second and retries, so there is no busy loop, and
  :func:`guard_accept_errors` turns its traceback per retry into one warning per 10 s;
- both warnings are rate-limited (:class:`RateLimitedLog`): a flood of refused connections
  gives one line per 10 s saying how many were refused meanwhile.

Idle time is bounded by each service's own read timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

STREAM_LIMIT = 2**16  # asyncio's default buffer limit for readuntil/readline
MAX_CONNECTIONS = 512  # open connections per service
MAX_PER_PEER = 256  # open connections per peer (IP address or unix user id)
LOG_INTERVAL = 10.0  # seconds between two lines about the same kind of trouble
# accept() errors that mean "out of resources", on which asyncio pauses accepting for a second
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

ExceptionHandler = Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object]


def parse_listen_spec(spec: str) -> tuple[str, str | int, str]:
    """``unix:/path`` → ("unix", path, ""); ``inet:PORT@HOST``/``inet6:…`` → ("inet", port, host).

    Port 0 (an ephemeral port, for tests) is allowed here; the configuration never accepts it.
    """
    kind, _, rest = spec.partition(":")
    if kind in ("unix", "local") and rest.startswith("/"):
        return "unix", rest, ""
    if kind in ("inet", "inet6"):
        port, _, host = rest.partition("@")
        if port.isdigit() and int(port) < 65536 and host:
            return "inet", int(port), host.strip("[]")
    raise ValueError(f"bad socket {spec!r}: expected unix:/path or inet:PORT@HOST")


class RateLimitedLog:
    """Log one kind of event at most once per ``interval`` seconds.

    The first event is logged at once; later ones within the interval are counted, and the next
    line that is logged says how many were suppressed since the previous one.
    """

    def __init__(
        self,
        log: logging.Logger,
        interval: float = LOG_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = log
        self._interval = interval
        self._clock = clock  # injectable for tests
        self._last: float | None = None
        self.suppressed = 0  # events not logged since the last line

    def warning(self, message: str, *args: object) -> bool:
        """Log ``message % args`` unless a line was logged less than ``interval`` s ago."""
        now = self._clock()
        if self._last is not None and now - self._last < self._interval:
            self.suppressed += 1
            return False
        if self.suppressed:
            message += " (and %d more times in the last %.0f s)"
            args = (*args, self.suppressed, now - (self._last or now))
        self._log.warning(message, *args)
        self._last = now
        self.suppressed = 0
        return True


def peer_identity(writer: asyncio.StreamWriter) -> str:
    """Who is connected: ``uid N`` on a unix socket (SO_PEERCRED), the IP address over TCP."""
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family == socket.AF_UNIX:
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return "unix"
        return f"uid {struct.unpack('3i', creds)[1]}"
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return "-"


class ConnectionLimits:
    """Open connections counted in total and per peer; refusals logged rate-limited."""

    def __init__(self, log: logging.Logger, total: int, per_peer: int) -> None:
        self.total = total  # 0: no cap
        self.per_peer = per_peer  # 0: no cap
        self.active = 0
        self._peers: Counter[str] = Counter()
        self._total_log = RateLimitedLog(log)
        self._peer_log = RateLimitedLog(log)

    def admit(self, peer: str) -> bool:
        """Count a new connection from ``peer`` in, or refuse it (False, logged)."""
        if self.total and self.active >= self.total:
            self._total_log.warning("%d connections open: refusing new ones", self.active)
            return False
        if self.per_peer and self._peers[peer] >= self.per_peer:
            self._peer_log.warning(
                "%d connections open from %s: refusing new ones", self._peers[peer], peer
            )
            return False
        self.active += 1
        self._peers[peer] += 1
        return True

    def release(self, peer: str) -> None:
        """Count an admitted connection out."""
        self.active -= 1
        self._peers[peer] -= 1
        if self._peers[peer] <= 0:
            del self._peers[peer]


def guard_accept_errors(loop: asyncio.AbstractEventLoop, log: logging.Logger) -> None:
    """Log ``accept()`` running out of resources as one line per 10 s, not a traceback per retry.

    asyncio already stops accepting for a second on such an error and then retries (no busy
    loop); the connections wait in the listen backlog meanwhile. Other errors go to the handler
    that was installed before. Installing it twice on a loop is a no-op.
    """
    previous: ExceptionHandler | None = loop.get_exception_handler()
    if getattr(previous, "accept_guard", False):
        return
    limited = RateLimitedLog(log)

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        message = str(context.get("message", ""))
        if (
            isinstance(exc, OSError)
            and exc.errno in RESOURCE_ERRNOS
            and message.startswith("socket.accept()")
        ):
            limited.warning(
                "cannot accept connections: %s; retrying every second", exc.strerror or exc
            )
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    handler.accept_guard = True  # type: ignore[attr-defined]
    loop.set_exception_handler(handler)


class StreamService:
    """Base class: subclasses implement :meth:`serve_connection`."""

    def __init__(
        self,
        spec: str,
        *,
        socket_mode: int,
        log: logging.Logger,
        max_connections: int = MAX_CONNECTIONS,
        max_per_peer: int = MAX_PER_PEER,
        limit: int = STREAM_LIMIT,
    ) -> None:
        self.spec = spec
        self.port = 0  # the bound TCP port (useful with inet:0@HOST in tests)
        self._socket_mode = socket_mode
        self._log = log
        self.limits = ConnectionLimits(log, max_connections, max_per_peer)
        self._limit = limit
        self._connections: set[asyncio.Task[None]] = set()

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Serve one client until it is done."""
        raise NotImplementedError

    async def listen(self) -> asyncio.Server:
        """Open the socket (a stale unix socket is replaced); OSError/ValueError if impossible."""
        kind, where, host = parse_listen_spec(self.spec)
        guard_accept_errors(asyncio.get_running_loop(), self._log)
        if kind == "unix":
            path = Path(str(where))
            with contextlib.suppress(FileNotFoundError):
                if path.is_socket():
                    path.unlink()  # a stale socket from an earlier run
            server = await asyncio.start_unix_server(
                self._on_connect, path=str(path), limit=self._limit
            )
            os.chmod(path, self._socket_mode)
            return server
        server = await asyncio.start_server(
            self._on_connect, host=host, port=int(where), reuse_address=True, limit=self._limit
        )
        self.port = int(server.sockets[0].getsockname()[1])
        return server

    async def close_connections(self) -> None:
        """Cancel the open connections and wait for them."""
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = peer_identity(writer)
        if not self.limits.admit(peer):
            writer.close()
            return
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            await self.serve_connection(reader, writer)
        except asyncio.CancelledError:
            pass
        except Exception:  # one bad connection must never take the service down
            self._log.exception("connection failed")
        finally:
            self.limits.release(peer)
            if task is not None:
                self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
