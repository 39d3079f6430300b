"""What the asyncio services (policy-map socketmap, Postfix policy listener, ACME responder)
share: opening a ``unix:``/``inet:`` socket, serving each connection in a tracked task, closing
them all — and the limits that keep a hostile or broken client from exhausting the process.

Limits (docs/security.md):

- a cap on open connections in total and per peer (a TCP peer is its IP address; a unix-socket
  peer is its user id, so a local user cannot take the slots of the MTA's user). A connection
  over a cap is closed at once;
- running out of file descriptors (``EMFILE`` and friends on ``accept``): the accept loop
  (:class:`Listener`) waits a second before it tries again — no busy loop — and says so in at
  most one line per 10 s;
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
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from mtls_milter.endpoints import parse_socket_spec

STREAM_LIMIT = 2**16  # asyncio's default buffer limit for readuntil/readline
MAX_CONNECTIONS = 512  # open connections per service
MAX_PER_PEER = 256  # open connections per peer (IP address or unix user id)
LOG_INTERVAL = 10.0  # seconds between two lines about the same kind of trouble
LISTEN_BACKLOG = 128  # the kernel's queue of connections not accepted yet
ACCEPT_RETRY_DELAY = 1.0  # seconds without accept() after it ran out of resources
# accept() errors that mean "out of resources": wait, then try again
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def parse_listen_spec(spec: str) -> tuple[str, str | int, str]:
    """``unix:/path`` → ("unix", path, ""); ``inet:PORT@HOST``/``inet6:…`` → ("inet", port, host).

    Port 0 (an ephemeral port, for tests) is allowed here; the configuration never accepts it.
    """
    try:
        parsed = parse_socket_spec(spec, ephemeral_port=True)
    except ValueError:
        raise ValueError(f"bad socket {spec!r}: expected unix:/path or inet:PORT@HOST") from None
    if parsed.kind == "unix":
        return "unix", parsed.path, ""
    return "inet", parsed.port, parsed.host


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


class OpenConnections:
    """The connections one service holds: admitted under its limits, tracked so that closing
    the service can end them. The one admit/track/release path of every asyncio service."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self._tasks: set[asyncio.Task[Any]] = set()

    @contextlib.asynccontextmanager
    async def admitted(self, writer: asyncio.StreamWriter) -> AsyncIterator[str | None]:
        """The peer's identity while its connection is open, or None when a limit refuses it."""
        peer = peer_identity(writer)
        if not self.limits.admit(peer):  # logged there, rate-limited
            yield None
            return
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            yield peer
        finally:
            self.limits.release(peer)
            if task is not None:
                self._tasks.discard(task)

    async def cancel_all(self) -> None:
        """Cancel every open connection (but the caller's own) and wait for them."""
        tasks = [task for task in self._tasks if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


ConnectedCallback = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Listener:
    """Listening sockets, each with an accept loop handing connections over as streams.

    This replaces ``asyncio.start_server``. On running out of descriptors, asyncio (3.11; fixed
    upstream later, CPython gh-151615) keeps calling ``accept()`` for the rest of its batch and
    schedules one retry per failure; the retries multiply and the loop spins at 100 % CPU
    (measured: 3 s of CPU in 3 s with 100 connections over RLIMIT_NOFILE = 64). Here one failed
    ``accept()`` logs (rate-limited) and waits :data:`ACCEPT_RETRY_DELAY` seconds; the
    connections wait in the kernel's listen backlog meanwhile.
    """

    def __init__(
        self,
        sockets: list[socket.socket],
        on_connect: ConnectedCallback,
        *,
        log: RateLimitedLog,
        limit: int = STREAM_LIMIT,
        retry_delay: float = ACCEPT_RETRY_DELAY,
    ) -> None:
        self.sockets = sockets
        self._on_connect = on_connect
        self._log = log
        self._limit = limit
        self._retry_delay = retry_delay
        self._serving: set[asyncio.Task[None]] = set()
        loop = asyncio.get_running_loop()
        for sock in sockets:
            sock.setblocking(False)
        self._accepting = [loop.create_task(self._accept_loop(sock)) for sock in sockets]

    def close(self) -> None:
        """Stop accepting and close the listening sockets (open connections stay)."""
        for task in self._accepting:
            task.cancel()
        for sock in self.sockets:
            sock.close()

    async def wait_closed(self) -> None:
        await asyncio.gather(*self._accepting, return_exceptions=True)

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except (ConnectionAbortedError, InterruptedError):
                continue  # the client gave up before we took it
            except OSError as exc:
                if exc.errno in RESOURCE_ERRNOS:
                    self._log.warning(
                        "cannot accept connections: %s; retrying every %g s",
                        exc.strerror or exc,
                        self._retry_delay,
                    )
                else:  # not expected on a listening socket; never spin on it
                    self._log.warning("accept() failed: %s", exc)
                await asyncio.sleep(self._retry_delay)
                continue
            task = loop.create_task(self._serve(conn))
            self._serving.add(task)  # a reference, so the task is not garbage-collected
            task.add_done_callback(self._serving.discard)

    async def _serve(self, conn: socket.socket) -> None:
        try:
            if conn.family == socket.AF_UNIX:
                reader, writer = await asyncio.open_unix_connection(sock=conn, limit=self._limit)
            else:
                reader, writer = await asyncio.open_connection(sock=conn, limit=self._limit)
        except OSError:
            conn.close()
            return
        await self._on_connect(reader, writer)


def unix_listener_socket(path: Path, mode: int) -> socket.socket:
    """A listening unix socket at ``path`` (a stale socket there is replaced), chmod ``mode``."""
    with contextlib.suppress(FileNotFoundError):
        if path.is_socket():
            path.unlink()  # a stale socket from an earlier run
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, mode)
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def tcp_listener_sockets(host: str, port: int) -> list[socket.socket]:
    """Listening TCP sockets for every address ``host`` resolves to (as asyncio would bind)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(LISTEN_BACKLOG)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


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
        self.connections = OpenConnections(ConnectionLimits(log, max_connections, max_per_peer))
        self._accept_log = RateLimitedLog(log)
        self._limit = limit

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Serve one client until it is done."""
        raise NotImplementedError

    async def listen(self) -> Listener:
        """Open the socket (a stale unix socket is replaced); OSError/ValueError if impossible."""
        kind, where, host = parse_listen_spec(self.spec)
        if kind == "unix":
            sockets = [unix_listener_socket(Path(str(where)), self._socket_mode)]
        else:
            sockets = tcp_listener_sockets(host, int(where))
            self.port = int(sockets[0].getsockname()[1])
        return Listener(sockets, self._on_connect, log=self._accept_log, limit=self._limit)

    @property
    def limits(self) -> ConnectionLimits:
        """The caps on open connections (their counters too)."""
        return self.connections.limits

    async def close_connections(self) -> None:
        """Cancel the open connections and wait for them."""
        await self.connections.cancel_all()

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with self.connections.admitted(writer) as peer:
                if peer is not None:
                    await self.serve_connection(reader, writer)
        except asyncio.CancelledError:
            pass
        except Exception:  # one bad connection must never take the service down
            self._log.exception("connection failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
