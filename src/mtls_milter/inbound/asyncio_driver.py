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
command (``command_timeout``) or stay idle between commands (``idle_timeout``), and the number of
connections is capped (``max_connections``; more are closed at once, the MTA applies its default
action). uvloop is used by :func:`run` when it is installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

from mtls_milter.adapters.stream_service import parse_listen_spec
from mtls_milter.core.quote import quote

from .events import ConnectionClosed, Event
from .negotiation import MilterOptions
from .protocol import MilterConnection
from .replies import CONTINUE, Reply

log = logging.getLogger("mtls_milter")

READ_BUFFER = 256 * 1024  # shared by all connections: reads are copied into the core at once
IDLE_TIMEOUT = 7210.0  # seconds between commands: libmilter's default (MI_TIMEOUT)
COMMAND_TIMEOUT = 30.0  # seconds for a started command to arrive whole (an MTA writes it at once)
MAX_CONNECTIONS = 4096
_T = TypeVar("_T")


class MilterHandler(Protocol):
    """The milter logic behind a transport; one instance per MTA connection."""

    async def on_event(self, event: Event) -> Reply | None:
        """Handle one event in conversation order.

        For an event with ``needs_reply`` the answer is the return value (None: CONTINUE); for
        the others it is ignored. :class:`~.events.ConnectionClosed` comes last, exactly once.
        An exception is logged and answered CONTINUE. Calls run one at a time in the
        connection's task; blocking work belongs in ``loop.run_in_executor``.
        """
        ...


HandlerFactory = Callable[[str], MilterHandler]  # called with the MTA's socket address


class MilterServer:
    """Serve the milter protocol on one listening socket."""

    def __init__(
        self,
        spec: str,
        factory: HandlerFactory,
        options: MilterOptions | Callable[[], MilterOptions],
        *,
        max_connections: int = MAX_CONNECTIONS,
        idle_timeout: float = IDLE_TIMEOUT,
        command_timeout: float = COMMAND_TIMEOUT,
        socket_mode: int = 0o660,
    ) -> None:
        self.spec = spec
        self.port = 0  # the bound TCP port (useful with inet:0@HOST in tests)
        self.factory = factory
        self._options = options
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.command_timeout = command_timeout
        self._socket_mode = socket_mode
        self._streams: set[_MilterStream] = set()
        self._refused = 0
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.read_buffer = memoryview(bytearray(READ_BUFFER))

    @property
    def connections(self) -> int:
        """Open MTA connections."""
        return len(self._streams)

    def options(self) -> MilterOptions:
        """The options for a new connection (a callable is asked each time, e.g. after reload)."""
        return self._options if isinstance(self._options, MilterOptions) else self._options()

    async def start(self) -> None:
        """Open the socket (a stale unix socket is replaced); OSError/ValueError if impossible."""
        loop = asyncio.get_running_loop()
        kind, where, host = parse_listen_spec(self.spec)
        if kind == "unix":
            path = Path(str(where))
            with contextlib.suppress(FileNotFoundError):
                if path.is_socket():
                    path.unlink()  # a stale socket from an earlier run
            self._server = await loop.create_unix_server(lambda: _MilterStream(self), str(path))
            os.chmod(path, self._socket_mode)
        else:
            self._server = await loop.create_server(
                lambda: _MilterStream(self), host=host, port=int(where), reuse_address=True
            )
            self.port = int(self._server.sockets[0].getsockname()[1])
        interval = max(min(1.0, self.command_timeout / 4, self.idle_timeout / 4), 0.01)
        self._sweeper = loop.create_task(self._sweep(interval))

    async def serve_forever(self) -> None:
        """Start if needed and serve until cancelled."""
        if self._server is None:
            await self.start()
        assert self._server is not None
        await self._server.serve_forever()

    async def aclose(self, grace: float = 10.0) -> None:
        """Stop listening, end every conversation; handlers get ``grace`` seconds to finish."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._server.close()
        tasks = [
            asyncio.ensure_future(stream.shutdown("server shutting down"))
            for stream in list(self._streams)
        ]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for stream in list(self._streams):
                stream.cancel()  # a handler still busy after the grace period
            await asyncio.gather(*pending, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def admit(self, stream: _MilterStream) -> bool:
        """Take a new connection unless the cap is reached."""
        if len(self._streams) >= self.max_connections:
            self._refused += 1
            return False
        self._streams.add(stream)
        return True

    def release(self, stream: _MilterStream) -> None:
        self._streams.discard(stream)

    async def _sweep(self, interval: float) -> None:
        """Close stalled and idle connections; report refused ones (once per interval)."""
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for stream in list(self._streams):
                stream.check_timeouts(now, self.command_timeout, self.idle_timeout)
            if self._refused:
                log.warning(
                    "milter: refused %d connection(s): %d open (max_connections)",
                    self._refused,
                    self.max_connections,
                )
                self._refused = 0


class _MilterStream(asyncio.BufferedProtocol):
    """One MTA connection: the core, the handler and the task that runs them."""

    def __init__(self, server: MilterServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._core: MilterConnection | None = None
        self._handler: MilterHandler | None = None
        self._task: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Future[None] | None = None
        self._waiting_since = 0.0  # when we began waiting for the next command (0: busy)
        self._partial_since = 0.0  # when the incomplete command now buffered began (0: none)
        self._paused = False
        self._pause_above = 0

    # -- asyncio protocol callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        if not self._server.admit(self):
            self._transport.abort()
            return
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = _peer_name(transport)
        options = self._server.options()
        self._core = MilterConnection(options, peer=peer)
        self._pause_above = 2 * (options.max_data_size + 5)
        self._waiting_since = time.monotonic()
        try:
            self._handler = self._server.factory(peer)
        except Exception:
            log.exception("milter: cannot create a handler for %s", quote(peer))
            self._core.close("no handler")
        self._task = asyncio.get_running_loop().create_task(self._run())

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._server.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        core = self._core
        if core is None:
            return
        core.receive_data(self._server.read_buffer[:nbytes])
        if not self._partial_since:
            self._partial_since = time.monotonic()
        if core.buffered > self._pause_above and not self._paused and self._transport:
            self._transport.pause_reading()  # the handler is behind: let TCP push back
            self._paused = True
        self._wake()

    def eof_received(self) -> bool:
        if self._core is not None:
            self._core.receive_data(b"")
            self._wake()
        return True  # keep the transport until the task closes it

    def connection_lost(self, exc: Exception | None) -> None:
        if self._core is not None:
            self._core.receive_data(b"")
            self._wake()
        else:
            self._server.release(self)

    # -- the conversation -------------------------------------------------------------------------

    async def _run(self) -> None:
        core, transport, handler = self._core, self._transport, self._handler
        assert core is not None and transport is not None
        loop = asyncio.get_running_loop()
        try:
            while True:
                event = core.next_event()
                if event is None:
                    self._flush(core, transport)
                    self._note_waiting(core)
                    self._wakeup = loop.create_future()
                    await self._wakeup
                    self._wakeup = None
                    continue
                self._waiting_since = 0.0
                reply: Reply | None = None
                if handler is not None:
                    try:
                        reply = await handler.on_event(event)
                    except Exception:
                        name = type(event).__name__
                        log.exception("milter handler failed on %s; answering CONTINUE", name)
                if event.needs_reply:
                    self._answer(core, reply)
                    self._flush(core, transport)  # before the next event's handler runs
                if type(event) is ConnectionClosed:
                    break
        finally:
            self._flush(core, transport)
            transport.close()
            self._server.release(self)

    @staticmethod
    def _answer(core: MilterConnection, reply: Reply | None) -> None:
        try:
            core.send_reply(reply or CONTINUE)
        except Exception:  # a reply the core refuses (not negotiated, wrong stage): a bug
            log.exception("milter handler answered wrongly; answering CONTINUE")
            core.send_reply(CONTINUE)

    def _flush(self, core: MilterConnection, transport: asyncio.Transport) -> None:
        data = core.data_to_send()
        if data and not transport.is_closing():
            transport.write(data)
        if self._paused and core.buffered <= self._pause_above:
            self._paused = False
            transport.resume_reading()

    def _note_waiting(self, core: MilterConnection) -> None:
        """Start the idle clock, and the command clock when part of a command is buffered."""
        now = time.monotonic()
        self._waiting_since = self._waiting_since or now
        if not core.buffered:
            self._partial_since = 0.0
        elif not self._partial_since:
            self._partial_since = now

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    # -- timeouts and shutdown --------------------------------------------------------------------

    def check_timeouts(self, now: float, command_timeout: float, idle_timeout: float) -> None:
        """Close the conversation when it stalls inside a command or idles too long."""
        core = self._core
        if core is None or core.closed or not self._waiting_since:
            return
        if self._partial_since and now - self._partial_since > command_timeout:
            core.close(f"incomplete command for {command_timeout:g} s")
        elif now - self._waiting_since > idle_timeout:
            core.close(f"idle for {idle_timeout:g} s")
        else:
            return
        self._wake()

    def cancel(self) -> None:
        """Stop the conversation's task (its transport is closed on the way out)."""
        if self._task is not None:
            self._task.cancel()

    async def shutdown(self, reason: str) -> None:
        """End the conversation now and wait until its handler has seen the end."""
        if self._core is not None and not self._core.closed:
            self._core.close(reason)
            self._wake()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def _peer_name(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"[{peer[0]}]:{peer[1]}" if ":" in str(peer[0]) else f"{peer[0]}:{peer[1]}"
    sockname = transport.get_extra_info("sockname")
    return f"unix:{sockname}" if sockname else "unix"


def run(main: Coroutine[Any, Any, _T]) -> _T:
    """Run ``main`` on uvloop when it is installed, on the stock asyncio loop otherwise."""
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        return asyncio.run(main)
    result: _T = uvloop.run(main)
    return result
