"""One MTA connection of the asyncio milter server: the protocol core, the handler, the task.

Bytes arrive through :class:`asyncio.BufferedProtocol` into the server's one read buffer and are
copied into the core at once. One task per connection takes the core's events in order, awaits
the handler for each, and writes each answer before the next event's handler runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from typing import Protocol, cast

from mtls_milter.core.quote import quote

from .events import (
    Abort,
    ConnectionClosed,
    EndOfMessage,
    Event,
    MailFrom,
    QuitNewConnection,
)
from .negotiation import MilterOptions
from .protocol import MilterConnection
from .replies import CONTINUE, Reply

log = logging.getLogger("mtls_milter")


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


class StreamOwner(Protocol):
    """What a stream needs from its server."""

    read_buffer: memoryview

    def options(self) -> MilterOptions: ...

    def make_handler(self, peer: str) -> MilterHandler: ...

    def release(self, stream: MilterStream) -> None: ...


class MilterStream(asyncio.BufferedProtocol):
    """One MTA connection: the core, the handler and the task that runs them."""

    def __init__(self, server: StreamOwner, peer_id: str) -> None:
        self._server = server
        self.peer_id = peer_id  # whom the connection caps count it for (IP address or uid)
        self._transport: asyncio.Transport | None = None
        self._core: MilterConnection | None = None
        self._handler: MilterHandler | None = None
        self._task: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Future[None] | None = None
        self._waiting_since = 0.0  # when we began waiting for the next command (0: busy)
        self._partial_since = 0.0  # when the incomplete command now buffered began (0: none)
        self._paused = False
        self._pause_above = 0
        # MAIL FROM seen, end of message not yet answered: a stop waits for such a message.
        self.in_message = False

    # -- asyncio protocol callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
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
            self._handler = self._server.make_handler(peer)
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
                kind = type(event)
                if kind is MailFrom:
                    self.in_message = True
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
                if kind in _MESSAGE_ENDS:
                    self.in_message = False
                if kind is ConnectionClosed:
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


_MESSAGE_ENDS = frozenset((EndOfMessage, Abort, QuitNewConnection, ConnectionClosed))


def _peer_name(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"[{peer[0]}]:{peer[1]}" if ":" in str(peer[0]) else f"{peer[0]}:{peer[1]}"
    sockname = transport.get_extra_info("sockname")
    return f"unix:{sockname}" if sockname else "unix"
