"""An asyncio milter server around the sans-I/O core: sockets, timeouts, limits, the handler.

The server listens on ``unix:/path``, ``inet:PORT@HOST`` or ``inet6:PORT@HOST``. Each MTA
connection gets a :class:`~.protocol.MilterConnection` and a handler from the factory; one task
per connection takes the core's events in order and awaits ``handler.on_event`` for each. The
handler decides where blocking work runs (``loop.run_in_executor``); the driver only guarantees
order, one answer per command, and that a failing handler costs a CONTINUE, never the server.

Reading uses :class:`asyncio.BufferedProtocol` into one buffer shared by every connection (the
plain ``data_received`` path allocates a fresh 256 KiB buffer per read). TCP sockets get
TCP_NODELAY: answers are small, and without it the second of two small writes waits for the
MTA's delayed ACK (~40 ms per message). A periodic sweep closes connections that stall inside a
command (``command_timeout``) or stay idle between commands (``idle_timeout``). The number of
connections is capped in total and optionally per peer (``max_connections``, ``max_per_peer``;
more are closed at once, the MTA applies its default action; refusals are logged at most once
per 10 s). The accept loop is our own: on running out of descriptors it pauses a second instead
of spinning. uvloop is used by :func:`run` when it is installed.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import socket
import struct
import time
from collections.abc import Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from mtls_milter.runtime.stream_service import (
    ACCEPT_RETRY_DELAY,
    RESOURCE_ERRNOS,
    ConnectionLimits,
    RateLimitedLog,
    parse_listen_spec,
    tcp_listener_sockets,
    unix_listener_socket,
)

from .asyncio_stream import MilterHandler, MilterStream
from .negotiation import MilterOptions
from .wire import NO_REPLY_FLAGS

log = logging.getLogger("mtls_milter")

READ_BUFFER = 256 * 1024  # shared by all connections: reads are copied into the core at once
IDLE_TIMEOUT = 7210.0  # seconds between commands: libmilter's default (MI_TIMEOUT)
COMMAND_TIMEOUT = 30.0  # seconds for a started command to arrive whole (an MTA writes it at once)
MAX_CONNECTIONS = 4096
ACCEPT_BATCH = 100  # connections taken per readiness of the listening socket
_T = TypeVar("_T")


HandlerFactory = Callable[[str], MilterHandler]  # called with the MTA's socket address


class MilterServer:
    """Serve the milter protocol on one listening socket (``unix:``, ``inet:`` or ``inet6:``)."""

    def __init__(
        self,
        spec: str,
        factory: HandlerFactory,
        options: MilterOptions | Callable[[], MilterOptions],
        *,
        max_connections: int = MAX_CONNECTIONS,
        max_per_peer: int = 0,
        idle_timeout: float = IDLE_TIMEOUT,
        command_timeout: float = COMMAND_TIMEOUT,
        socket_mode: int = 0o660,
        listeners: list[socket.socket] | None = None,
    ) -> None:
        self.spec = spec
        self._listeners = listeners  # already open (inherited from a supervising parent)
        self.port = 0  # the bound TCP port (useful with inet:0@HOST in tests)
        self.factory = factory
        self._options = options
        self.idle_timeout = idle_timeout
        self.command_timeout = command_timeout
        self._socket_mode = socket_mode
        # The MTA is usually one peer (one uid or one address), hence no per-peer cap by default.
        self._limits = ConnectionLimits(log, max_connections, max_per_peer)
        self._accept_log = RateLimitedLog(log)
        self._streams: set[MilterStream] = set()
        self._starting: set[asyncio.Task[None]] = set()
        self._sockets: list[socket.socket] = []
        self._retry: asyncio.TimerHandle | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._closed: asyncio.Future[None] | None = None
        self.read_buffer = memoryview(bytearray(READ_BUFFER))
        self._tcp = False  # set by start()
        self._tcp_options: tuple[MilterOptions | None, MilterOptions] = (None, MilterOptions())

    @property
    def connections(self) -> int:
        """Open MTA connections."""
        return len(self._streams)

    def options(self) -> MilterOptions:
        """The options for a new connection (a callable is asked each time, e.g. after reload);
        over TCP without "no reply" steps, whatever was asked: the MTA's next small write would
        wait under Nagle for our delayed ACK (docs/performance.md)."""
        options = self._options if isinstance(self._options, MilterOptions) else self._options()
        if self._tcp and options.protocol & NO_REPLY_FLAGS:
            if self._tcp_options[0] is not options:
                answered = replace(options, protocol=options.protocol & ~NO_REPLY_FLAGS)
                self._tcp_options = (options, answered)
            return self._tcp_options[1]
        return options

    def make_handler(self, peer: str) -> MilterHandler:
        return self.factory(peer)

    async def start(self) -> None:
        """Open the socket (a stale unix socket is replaced) unless ``listeners`` were given;
        OSError/ValueError if impossible."""
        loop = asyncio.get_running_loop()
        kind, where, host = parse_listen_spec(self.spec)
        self._tcp = kind != "unix"
        if self._listeners is not None:
            self._sockets = list(self._listeners)
            if kind != "unix":
                self.port = int(self._sockets[0].getsockname()[1])
        elif kind == "unix":
            self._sockets = [unix_listener_socket(Path(str(where)), self._socket_mode)]
        else:
            self._sockets = tcp_listener_sockets(host, int(where))
            self.port = int(self._sockets[0].getsockname()[1])
        for sock in self._sockets:
            sock.setblocking(False)
            loop.add_reader(sock.fileno(), self._accept, sock)
        self._closed = loop.create_future()
        interval = max(min(1.0, self.command_timeout / 4, self.idle_timeout / 4), 0.01)
        self._sweeper = loop.create_task(self._sweep(interval))

    async def serve_forever(self) -> None:
        """Start if needed and serve until :meth:`aclose` (or cancellation)."""
        if self._closed is None:
            await self.start()
        assert self._closed is not None
        await asyncio.shield(self._closed)

    async def aclose(self, grace: float = 10.0) -> None:
        """Stop listening; messages in flight (MAIL FROM seen, end of message not answered)
        get up to ``grace`` seconds to finish, then every conversation ends."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._retry is not None:
            self._retry.cancel()
        for sock in self._sockets:
            loop.remove_reader(sock.fileno())
            sock.close()
        self._sockets = []
        await asyncio.gather(*self._starting, return_exceptions=True)
        while any(stream.in_message for stream in self._streams) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        grace = max(deadline - loop.time(), 0.1)
        tasks = [
            asyncio.ensure_future(stream.shutdown("server shutting down"))
            for stream in list(self._streams)
        ]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for stream in list(self._streams):
                stream.cancel()  # a handler still busy after the grace period
            await asyncio.gather(*pending, return_exceptions=True)
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    def release(self, stream: MilterStream) -> None:
        """Count a finished connection out."""
        if stream in self._streams:
            self._streams.remove(stream)
            self._limits.release(stream.peer_id)

    # -- accepting --------------------------------------------------------------------------------

    def _accept(self, sock: socket.socket) -> None:
        """Take what the listen backlog holds; when out of descriptors, pause instead of spinning.

        (asyncio 3.11's own accept loop retries at once after EMFILE and spins at 100 % CPU.)
        """
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the MTA gave up before we took it
            except OSError as exc:
                self._pause_accepting(sock, exc)
                return
            self._admit(conn)

    def _pause_accepting(self, sock: socket.socket, exc: OSError) -> None:
        what = "cannot accept connections" if exc.errno in RESOURCE_ERRNOS else "accept() failed"
        self._accept_log.warning(
            "milter: %s: %s; retrying in %g s", what, exc.strerror or exc, ACCEPT_RETRY_DELAY
        )
        loop = asyncio.get_running_loop()
        loop.remove_reader(sock.fileno())
        self._retry = loop.call_later(ACCEPT_RETRY_DELAY, self._resume_accepting, sock)

    def _resume_accepting(self, sock: socket.socket) -> None:
        self._retry = None
        if sock in self._sockets:
            asyncio.get_running_loop().add_reader(sock.fileno(), self._accept, sock)

    def _admit(self, conn: socket.socket) -> None:
        # Who the connection counts for matters only under a per-peer cap (a syscall on unix).
        peer_id = _peer_identity(conn) if self._limits.per_peer else "-"
        if not self._limits.admit(peer_id):  # logged there, rate-limited
            conn.close()
            return
        conn.setblocking(False)
        stream = MilterStream(self, peer_id)
        self._streams.add(stream)
        loop = asyncio.get_running_loop()
        # The stock selector loop makes the transport at once (what connect_accepted_socket
        # does inside, minus a task and a future per connection); other loops (uvloop) get the
        # public coroutine.
        make_transport = getattr(loop, "_make_socket_transport", None)
        if make_transport is not None:
            try:
                make_transport(conn, stream)
            except OSError:
                conn.close()
                self.release(stream)
            return
        task = loop.create_task(self._connect(conn, stream))
        self._starting.add(task)  # a reference, so the task is not garbage-collected
        task.add_done_callback(self._starting.discard)

    async def _connect(self, conn: socket.socket, stream: MilterStream) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: stream, sock=conn)
        except OSError:
            conn.close()
            self.release(stream)

    async def _sweep(self, interval: float) -> None:
        """Close stalled and idle connections."""
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for stream in list(self._streams):
                stream.check_timeouts(now, self.command_timeout, self.idle_timeout)


def _peer_identity(conn: socket.socket) -> str:
    """Whom a connection is counted for: ``uid N`` on a unix socket, the IP address over TCP."""
    if conn.family == socket.AF_UNIX:
        try:
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return "unix"
        return f"uid {struct.unpack('3i', creds)[1]}"
    try:
        return str(conn.getpeername()[0])
    except OSError:
        return "-"


def run(main: Coroutine[Any, Any, _T]) -> _T:
    """Run ``main`` on uvloop when it is installed, on the stock asyncio loop otherwise."""
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        return asyncio.run(main)
    result: _T = uvloop.run(main)
    return result
