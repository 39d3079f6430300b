"""One MTA connection of the asyncio milter server: the protocol core, the handler, the answers.

Bytes arrive through :class:`asyncio.BufferedProtocol` into the server's one read buffer and are
copied into the core at once; the events they complete are handled right there, in the read
callback, when the handler can answer them without waiting (its optional ``on_event_now``): no
task wake-up, no extra loop turn per command, and every answer one read produced goes out in
one write. An event the handler must await (``on_event_now`` answers :data:`LATER`, or the
handler has no ``on_event_now``) runs in a task; the events after it wait until it is answered,
so answers stay in order and one answer goes out per command.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
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

        A handler may also have ``on_event_now(event)``: the same answer without awaiting, or
        :data:`LATER` when this event needs :meth:`on_event` (it runs in the read callback, so
        it must not block); and ``answered()``, called each time answers were written (work
        that should not delay them, such as a log line, goes there).
        """
        ...


class StreamOwner(Protocol):
    """What a stream needs from its server."""

    read_buffer: memoryview

    def options(self) -> MilterOptions: ...

    def make_handler(self, peer: str) -> MilterHandler: ...

    def release(self, stream: MilterStream) -> None: ...


class Later:
    """The type of :data:`LATER`."""

    def __repr__(self) -> str:
        return "LATER"


LATER = Later()  # on_event_now's answer for "await on_event for this one"
NowHandler = Callable[[Event], "Reply | Later | None"]


class MilterStream(asyncio.BufferedProtocol):
    """One MTA connection: the core, the handler and the answers."""

    def __init__(self, server: StreamOwner, peer_id: str) -> None:
        self._server = server
        self.peer_id = peer_id  # whom the connection caps count it for (IP address or uid)
        self._transport: asyncio.Transport | None = None
        self._core: MilterConnection | None = None
        self._handler: MilterHandler | None = None
        self._now: NowHandler | None = None
        self._answered: Callable[[], None] | None = None  # the handler's "answers written" hook
        self._busy: asyncio.Task[None] | None = None  # an awaited handler call in flight
        self._ended = False
        self._done: asyncio.Future[None] | None = None  # made by shutdown() only
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
            self._now = getattr(self._handler, "on_event_now", None)
            self._answered = getattr(self._handler, "answered", None)
        except Exception:
            log.exception("milter: cannot create a handler for %s", quote(peer))
            self._core.close("no handler")
        self._pump()

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
        self._pump()

    def eof_received(self) -> bool:
        if self._core is not None:
            self._core.receive_data(b"")
            self._pump()
        return True  # keep the transport until the conversation has ended

    def connection_lost(self, exc: Exception | None) -> None:
        if self._core is not None:
            self._core.receive_data(b"")
            self._pump()
        else:
            self._server.release(self)

    # -- the conversation -------------------------------------------------------------------------

    def _pump(self) -> None:
        """Handle the events the core has, in order, until one must be awaited or none is left;
        then write what the answers produced."""
        core, transport = self._core, self._transport
        if self._busy is not None or self._ended or core is None or transport is None:
            return
        now = self._now
        while True:
            event = core.next_event()
            if event is None:
                break
            self._waiting_since = 0.0
            if type(event) is MailFrom:
                self.in_message = True
            reply: Reply | Later | None = LATER
            if now is not None:
                try:
                    reply = now(event)
                except Exception:
                    log.exception(_FAILED, type(event).__name__)
                    reply = None
            if reply is LATER:
                if self._handler is not None:
                    self._flush(core, transport)  # earlier answers first
                    self._busy = asyncio.get_running_loop().create_task(self._later(event))
                    return
                reply = None
            if self._done_with(event, cast("Reply | None", reply)):
                return
        self._flush(core, transport)
        self._note_waiting(core)

    async def _later(self, event: Event) -> None:
        """Await the handler for ``event`` in this task, answer, and go on with the rest."""
        assert self._handler is not None
        reply: Reply | None = None
        try:
            reply = await self._handler.on_event(event)
        except Exception:
            log.exception(_FAILED, type(event).__name__)
        self._busy = None
        if not self._done_with(event, reply):
            self._pump()

    def _done_with(self, event: Event, reply: Reply | None) -> bool:
        """Answer ``event`` if it needs an answer; True when the conversation has ended."""
        core = self._core
        assert core is not None
        kind = type(event)
        if event.needs_reply:
            self._answer(core, reply)
        if kind in _MESSAGE_ENDS:
            self.in_message = False
        if kind is ConnectionClosed:
            self._end()
            return True
        return False

    def _end(self) -> None:
        """The conversation is over: write what is left, close, count the connection out."""
        if self._ended:
            return
        self._ended = True
        if self._core is not None and self._transport is not None:
            self._flush(self._core, self._transport)
            self._transport.close()
        self._server.release(self)
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

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
            if self._answered is not None:
                try:
                    self._answered()
                except Exception:
                    log.exception("milter handler failed after its answers were written")
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

    # -- timeouts and shutdown --------------------------------------------------------------------

    def check_timeouts(self, now: float, command_timeout: float, idle_timeout: float) -> None:
        """Close the conversation when it stalls inside a command or idles too long."""
        core = self._core
        if core is None or core.closed or not self._waiting_since or self._busy is not None:
            return
        if self._partial_since and now - self._partial_since > command_timeout:
            core.close(f"incomplete command for {command_timeout:g} s")
        elif now - self._waiting_since > idle_timeout:
            core.close(f"idle for {idle_timeout:g} s")
        else:
            return
        self._pump()

    def cancel(self) -> None:
        """Stop an awaited handler call and end the conversation now."""
        if self._busy is not None:
            self._busy.cancel()
            self._busy = None
        self._end()

    async def shutdown(self, reason: str) -> None:
        """End the conversation now and wait until its handler has seen the end."""
        if self._core is not None and not self._core.closed:
            self._core.close(reason)
        self._pump()
        if self._ended:
            return
        if self._done is None:
            self._done = asyncio.get_running_loop().create_future()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(self._done)


_FAILED = "milter handler failed on %s; answering CONTINUE"
_MESSAGE_ENDS = frozenset((EndOfMessage, Abort, QuitNewConnection, ConnectionClosed))


def _peer_name(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"[{peer[0]}]:{peer[1]}" if ":" in str(peer[0]) else f"{peer[0]}:{peer[1]}"
    sockname = transport.get_extra_info("sockname")
    return f"unix:{sockname}" if sockname else "unix"
