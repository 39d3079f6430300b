"""A sans-I/O milter protocol core (version 6): bytes in, events out, answers in, bytes out.

Usage: feed what the socket gave to :meth:`MilterConnection.receive_data` (``b""`` at end of
file), take events from :meth:`~MilterConnection.next_event` until it returns None, answer every
event with ``needs_reply`` (:meth:`~MilterConnection.send_reply` or the shortcuts), and write
:meth:`~MilterConnection.data_to_send` to the socket. While an answer is due no further event is
produced, so answers can never come out of order. The core never raises on input: anything
malformed, out of order or past a limit ends the conversation with one log line (the MTA applies
its default action) and a final :class:`~.events.ConnectionClosed` event. It raises
:class:`MilterUsageError` only when its caller answers wrongly (a bug, not outside input).

The state machine is libmilter's (``engine.c``): the same transitions and "skip" rules for steps
we asked the MTA not to send, an implicit abort when a command leaves a mail transaction, and
the same tolerance of what MTAs really do (Postfix sends ABORT between transactions and HELO in
the middle of one). Where libmilter would silently ignore a command that expects a reply and
leave the MTA waiting, the core ends the conversation instead.
"""

from __future__ import annotations

import logging
from collections import deque

from mtls_milter.core.quote import quote
from mtls_milter.errors import MtlsMilterError

from . import events as ev
from .negotiation import Agreement, MilterOptions, negotiate
from .replies import (
    ACCEPT,
    CONTINUE,
    DISCARD,
    SKIP,
    Action,
    AddHeader,
    ChangeHeader,
    InsertHeader,
    Quarantine,
    Reply,
    SmtpReply,
)
from .states import (
    CLEARS_FROM,
    COMMANDS,
    KEEPS_STATE,
    NEXT_STATES,
    NO_REPLY_FLAG,
    ST_HELO,
    ST_INIT,
    ST_Q_NC,
    STATE_NAMES,
    STEP_FLAG,
    in_mail,
    parse_event,
    skippable_states,
    transition_ok,
)
from .wire import (
    HEADER_SIZE,
    MAX_DATA_SIZE_64K,
    SMFIC_ABORT,
    SMFIC_HEADER,
    SMFIC_MACRO,
    SMFIC_MAIL,
    SMFIC_OPTNEG,
    SMFIC_QUIT,
    SMFIC_QUIT_NC,
    STAGE_OF_COMMAND,
    ProtocolFlag,
    Stage,
    WireError,
    command_name,
    decode_macros,
    decode_optneg,
    encode_optneg,
    read_length,
)

log = logging.getLogger("mtls_milter")


class MilterUsageError(MtlsMilterError):
    """The core was answered wrongly (no answer due, an action not negotiated…): a bug."""


class MilterConnection:
    """One milter conversation with one MTA connection."""

    def __init__(self, options: MilterOptions, *, peer: str = "") -> None:
        self.options = options
        self.peer = peer  # the MTA's socket address, for log lines
        self.client = ""  # the SMTP client's address once the MTA told us
        self.agreement: Agreement | None = None
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._out = bytearray()
        self._events: deque[ev.Event] = deque()
        self._state = ST_INIT
        self._next = list(NEXT_STATES)
        self._slots: list[dict[bytes, bytes] | None] = [None] * len(Stage)
        self._awaiting: ev.Event | None = None
        self._awaiting_command = 0
        self._max_data = MAX_DATA_SIZE_64K
        self._unwanted = 0  # NO* flags: steps answered CONTINUE without an event
        self._headers = 0
        self.closed = False

    # -- input ------------------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes from the MTA; ``b""`` means end of file."""
        if self.closed:
            return
        if not data:
            self._eof = True
            return
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet turned into events (for flow control)."""
        return len(self._buf) - self._pos

    @property
    def awaiting(self) -> ev.Event | None:
        """The event whose answer is due, if any."""
        return self._awaiting

    def next_event(self) -> ev.Event | None:
        """The next event, or None when more input (or an answer) is needed first."""
        while not self._events and self._awaiting is None and not self.closed:
            command_payload = self._next_frame()
            if command_payload is None:
                if self._eof:
                    self._end_of_file()
                break
            self._dispatch(*command_payload)
        return self._events.popleft() if self._events else None

    def _next_frame(self) -> tuple[int, bytes] | None:
        buf, pos = self._buf, self._pos
        available = len(buf) - pos
        if available < 4:
            return None
        length = read_length(buf, pos)
        if length == 0:
            self._fail("frame of length 0")
            return None
        if length - 1 > self._max_data:
            self._fail(f"frame of {length} bytes exceeds the limit of {self._max_data + 1}")
            return None
        if available < 4 + length:
            return None
        command = buf[pos + 4]
        payload = bytes(buf[pos + HEADER_SIZE : pos + 4 + length])
        self._pos = pos + 4 + length
        return command, payload

    def _end_of_file(self) -> None:
        pending = self.buffered
        if pending:
            whole = 4 + read_length(self._buf, self._pos) if pending >= 4 else HEADER_SIZE
            self._fail(f"connection closed inside a frame ({pending} of {whole} bytes)")
        else:
            self._close("eof", error=False)

    # -- commands ---------------------------------------------------------------------------------

    def _dispatch(self, command: int, payload: bytes) -> None:
        try:
            if command == SMFIC_MACRO:
                self._on_macros(payload)
            elif command not in COMMANDS:
                raise WireError(f"unknown command {command_name(command)}")
            elif self._state == ST_INIT and command not in (SMFIC_OPTNEG, SMFIC_QUIT):
                raise WireError(f"command {command_name(command)} before option negotiation")
            elif command in (SMFIC_QUIT, SMFIC_QUIT_NC):
                self._on_quit(command, payload)
            elif self._enter(command):
                self._on_command(command, payload)
        except WireError as exc:
            self._fail(str(exc))

    def _enter(self, command: int) -> bool:
        """Move to the command's state as libmilter does; False when the command is dropped."""
        new_state, old_state = COMMANDS[command], self._state
        if transition_ok(self._next, old_state, new_state):
            self._state = new_state
            return True
        if in_mail(self._state):  # libmilter calls abort when a command leaves a transaction
            self._queue(ev.Abort(macros=ev.Macros(tuple(self._slots))))
        self._state = ST_HELO  # and retries from HELO, as if the transaction had ended
        if transition_ok(self._next, ST_HELO, new_state):
            self._state = new_state
            return True
        if command == SMFIC_ABORT:
            return False  # no transaction to abort (Postfix sends these): libmilter ignores it
        after = STATE_NAMES[old_state]
        raise WireError(f"command {command_name(command)} out of order (after {after})")

    def _on_command(self, command: int, payload: bytes) -> None:
        if command == SMFIC_OPTNEG:
            self._on_optneg(payload)
            return
        clear_from = CLEARS_FROM.get(command)
        if clear_from is not None:
            for stage in range(clear_from, len(Stage)):
                self._slots[stage] = None
        if command == SMFIC_MAIL:
            self._headers = 0
        elif command == SMFIC_HEADER:
            self._headers += 1
            if self._headers > self.options.limits.max_headers:
                limit = self.options.limits.max_headers
                raise WireError(f"more than {limit} header fields in one message")
        needs_reply, we_continue, deliver = self._who_answers(command)
        event = parse_event(command, payload, ev.Macros(tuple(self._slots)), needs_reply)
        if isinstance(event, ev.Connect):
            self.client = event.address.decode("ascii", "replace")
        if we_continue:
            self._out += CONTINUE.wire
        if needs_reply:
            self._awaiting, self._awaiting_command = event, command
        if deliver:
            self._queue(event)

    def _who_answers(self, command: int) -> tuple[bool, bool, bool]:
        """(the caller answers, we answer CONTINUE, the caller sees the event) for a command."""
        agreement = self.agreement
        if agreement is None:  # cannot happen: the state machine starts with OPTNEG
            raise WireError("command before option negotiation")
        wanted = not self._unwanted & STEP_FLAG.get(command, 0)
        no_reply = NO_REPLY_FLAG.get(command)
        if no_reply is None:  # ABORT: never answered
            return False, False, True
        if no_reply and agreement.wanted & no_reply:  # we said we would not reply
            return False, bool(agreement.fake_no_reply & no_reply), wanted
        if not wanted:  # a step we asked not to get: libmilter just continues
            return False, True, False
        return True, False, True

    def _on_optneg(self, payload: bytes) -> None:
        for stage in range(len(Stage)):
            self._slots[stage] = None
        offered = decode_optneg(payload)
        agreement = negotiate(self.options, *offered)
        self.agreement = agreement
        self._max_data = agreement.max_data_size
        self._unwanted = agreement.wanted & sum(STEP_FLAG.values())  # NO* flags, plain int
        self._next = skippable_states(agreement.wanted)
        self._out += encode_optneg(*agreement.reply, agreement.macro_lists)
        self._queue(
            ev.Negotiate(
                *offered,
                version=agreement.version,
                actions=agreement.actions,
                protocol=agreement.protocol,
                max_data_size=agreement.max_data_size,
            )
        )

    def _on_macros(self, payload: bytes) -> None:
        limits = self.options.limits
        command, macros = decode_macros(payload, limits.max_macros, limits.max_macro_name)
        stage = STAGE_OF_COMMAND.get(command)
        if stage is not None and macros:  # libmilter drops empty packets and other stages
            self._slots[stage] = macros

    def _on_quit(self, command: int, payload: bytes) -> None:
        if payload:
            raise WireError(f"command {command_name(command)} with a payload")
        if in_mail(self._state):
            self._queue(ev.Abort(macros=ev.Macros(tuple(self._slots))))
        if command == SMFIC_QUIT:
            self._queue(ev.Quit())
            self._close("quit", error=False)
            return
        self._queue(ev.QuitNewConnection())
        self._slots = [None] * len(Stage)
        self._state, self._headers, self.client = ST_Q_NC, 0, ""

    # -- answers ----------------------------------------------------------------------------------

    def send_reply(self, reply: Reply) -> None:
        """Answer the event that awaits one (modifications first, then the action)."""
        if self.closed:
            return  # the conversation ended while the answer was being made
        event = self._awaiting
        if event is None:
            raise MilterUsageError("no event awaits an answer")
        if reply.needs or reply.action is Action.SKIP:
            self._check(event, reply)
        self._out += reply.wire
        self._awaiting = None
        if reply.action is Action.ACCEPT or (
            reply.action in (Action.REJECT, Action.TEMPFAIL, Action.DISCARD)
            and self._awaiting_command not in KEEPS_STATE
        ):
            self._state = ST_HELO

    def _check(self, event: ev.Event, reply: Reply) -> None:
        agreement = self.agreement
        if reply.modifications and not isinstance(event, ev.EndOfMessage):
            raise MilterUsageError(f"modifications only at end of message, not {event!r}")
        if agreement is not None and reply.needs & ~agreement.actions:
            raise MilterUsageError("a modification that was not negotiated")
        if reply.action is Action.SKIP and not (
            isinstance(event, ev.Body)
            and agreement is not None
            and agreement.protocol & ProtocolFlag.SKIP
        ):
            raise MilterUsageError("SKIP answers only body chunks, when negotiated")

    def continue_(self) -> None:
        self.send_reply(CONTINUE)

    def accept(self) -> None:
        self.send_reply(ACCEPT)

    def discard(self) -> None:
        self.send_reply(DISCARD)

    def skip(self) -> None:
        self.send_reply(SKIP)

    def reject(self, code: str = "550", xcode: str | None = None, text: str = "") -> None:
        self.send_reply(Reply.reject(code, xcode, text))

    def tempfail(self, code: str = "451", xcode: str | None = None, text: str = "") -> None:
        self.send_reply(Reply.tempfail(code, xcode, text))

    def reply_code(self, code: str, xcode: str | None = None, lines: tuple[str, ...] = ()) -> None:
        """Reject (5xx) or tempfail (4xx) with a (multi-line) SMTP reply."""
        action = Action.REJECT if code.startswith("5") else Action.TEMPFAIL
        self.send_reply(Reply(action, SmtpReply(code, xcode, lines)))

    def modify(self, *modifications: AddHeader | InsertHeader | ChangeHeader | Quarantine) -> None:
        """Send modifications now (end of message only); the final answer follows separately."""
        if self.closed:
            return
        event = self._awaiting
        if event is None:
            raise MilterUsageError("no event awaits an answer")
        staged = Reply(modifications=modifications)
        self._check(event, staged)
        self._out += staged.wire[: -len(CONTINUE.wire)]  # without the final CONTINUE

    def add_header(self, name: str | bytes, value: str | bytes) -> None:
        self.modify(AddHeader(name, value))

    def insert_header(self, index: int, name: str | bytes, value: str | bytes) -> None:
        self.modify(InsertHeader(index, name, value))

    def change_header(self, name: str | bytes, index: int, value: str | bytes) -> None:
        self.modify(ChangeHeader(name, index, value))

    def delete_header(self, name: str | bytes, index: int) -> None:
        self.modify(ChangeHeader(name, index, b""))

    def quarantine(self, reason: str | bytes) -> None:
        self.modify(Quarantine(reason))

    # -- output and end ---------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Bytes for the MTA (empty when there are none)."""
        if not self._out:
            return b""
        out = bytes(self._out)
        self._out.clear()
        return out

    def close(self, reason: str) -> None:
        """End the conversation from our side (a timeout, shutdown): logs ``reason``."""
        if not self.closed:
            self._fail(reason)

    def _fail(self, reason: str) -> None:
        client = f" client={quote(self.client)}" if self.client else ""
        log.warning("milter conversation closed: peer=%s%s: %s", quote(self.peer), client, reason)
        self._close(reason, error=True)

    def _close(self, reason: str, *, error: bool) -> None:
        if self.closed:
            return
        self.closed = True
        if in_mail(self._state):
            self._queue(ev.Abort(macros=ev.Macros(tuple(self._slots))))
        self._queue(ev.ConnectionClosed(reason, error))
        self._awaiting = None
        self._buf.clear()
        self._pos = 0
        self._state = ST_INIT

    def _queue(self, event: ev.Event) -> None:
        self._events.append(event)
