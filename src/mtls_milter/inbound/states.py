"""libmilter's command states and transitions (``engine.c``), and command payloads → events.

Each command moves the conversation to its state. A move is allowed when the new state is in the
current state's set of next states, or reachable through states the milter asked the MTA not to
send (the "skip" bit that libmilter's ``fix_stm`` sets for NO* protocol flags).
"""

from __future__ import annotations

from collections.abc import Callable

from . import events as ev
from .wire import (
    SMFIC_ABORT,
    SMFIC_BODY,
    SMFIC_BODYEOB,
    SMFIC_CONNECT,
    SMFIC_DATA,
    SMFIC_EOH,
    SMFIC_HEADER,
    SMFIC_HELO,
    SMFIC_MAIL,
    SMFIC_OPTNEG,
    SMFIC_QUIT,
    SMFIC_QUIT_NC,
    SMFIC_RCPT,
    SMFIC_UNKNOWN,
    ProtocolFlag,
    Stage,
    WireError,
    command_name,
    decode_connect,
    decode_header,
    one_string,
    strings,
)

ST_INIT = 0
ST_OPTS = 1
ST_CONN = 2
ST_HELO = 3
ST_MAIL = 4
ST_RCPT = 5
ST_DATA = 6
ST_HDRS = 7
ST_EOHS = 8
ST_BODY = 9
ST_ENDM = 10
ST_QUIT = 11
ST_ABRT = 12
ST_UNKN = 13
ST_Q_NC = 14
STATE_NAMES = (
    "init", "options", "connect", "helo", "mail", "rcpt", "data", "headers",
    "end of headers", "body", "end of message", "quit", "abort", "unknown", "quit (new conn)",
)  # fmt: skip
SKIP_BIT = 1 << 16  # "this state may be skipped": set for steps the MTA will not send


def _mask(*states: int) -> int:
    return sum(1 << state for state in states)


NEXT_STATES = (
    _mask(ST_OPTS),  # init
    _mask(ST_CONN, ST_UNKN),  # options
    _mask(ST_HELO, ST_MAIL, ST_UNKN),  # connect
    _mask(ST_HELO, ST_MAIL, ST_UNKN),  # helo
    _mask(ST_RCPT, ST_ABRT, ST_UNKN),  # mail
    _mask(ST_HDRS, ST_EOHS, ST_DATA, ST_BODY, ST_ENDM, ST_RCPT, ST_ABRT, ST_UNKN),  # rcpt
    _mask(ST_EOHS, ST_HDRS, ST_ABRT),  # data
    _mask(ST_EOHS, ST_HDRS, ST_ABRT),  # headers
    _mask(ST_BODY, ST_ENDM, ST_ABRT),  # end of headers
    _mask(ST_ENDM, ST_BODY, ST_ABRT),  # body
    _mask(ST_QUIT, ST_MAIL, ST_UNKN, ST_Q_NC),  # end of message
    0,  # quit
    0,  # abort
    _mask(ST_HELO, ST_MAIL, ST_RCPT, ST_ABRT, ST_DATA, ST_BODY, ST_UNKN, ST_QUIT, ST_Q_NC),
    _mask(ST_CONN, ST_UNKN),  # quit, new connection follows
)

# The state each command moves to (the macro command has none).
COMMANDS = {
    SMFIC_ABORT: ST_ABRT,
    SMFIC_BODY: ST_BODY,
    SMFIC_CONNECT: ST_CONN,
    SMFIC_BODYEOB: ST_ENDM,
    SMFIC_HELO: ST_HELO,
    SMFIC_HEADER: ST_HDRS,
    SMFIC_MAIL: ST_MAIL,
    SMFIC_OPTNEG: ST_OPTS,
    SMFIC_EOH: ST_EOHS,
    SMFIC_QUIT: ST_QUIT,
    SMFIC_DATA: ST_DATA,
    SMFIC_RCPT: ST_RCPT,
    SMFIC_UNKNOWN: ST_UNKN,
    SMFIC_QUIT_NC: ST_Q_NC,
}

# Commands answered with a reply, and the NR_* flag that turns that reply off (0: none can).
NO_REPLY_FLAG = {
    SMFIC_CONNECT: int(ProtocolFlag.NR_CONN),
    SMFIC_HELO: int(ProtocolFlag.NR_HELO),
    SMFIC_MAIL: int(ProtocolFlag.NR_MAIL),
    SMFIC_RCPT: int(ProtocolFlag.NR_RCPT),
    SMFIC_DATA: int(ProtocolFlag.NR_DATA),
    SMFIC_UNKNOWN: int(ProtocolFlag.NR_UNKN),
    SMFIC_HEADER: int(ProtocolFlag.NR_HDR),
    SMFIC_EOH: int(ProtocolFlag.NR_EOH),
    SMFIC_BODY: int(ProtocolFlag.NR_BODY),
    SMFIC_BODYEOB: 0,
}

# Commands after which libmilter clears the later stages' macros (and what it clears from).
CLEARS_FROM = {
    SMFIC_OPTNEG: 0,
    SMFIC_CONNECT: Stage.CONNECT + 1,
    SMFIC_HELO: Stage.HELO + 1,
    SMFIC_MAIL: Stage.ENVFROM + 1,
    SMFIC_RCPT: Stage.ENVRCPT + 1,
}
# Commands whose reject/tempfail/discard leave the state as is (libmilter's CT_IGNO).
KEEPS_STATE = frozenset((SMFIC_RCPT, SMFIC_UNKNOWN))
# What a step we asked not to get means, when an MTA sends it anyway: answered CONTINUE by us.
STEP_FLAG = {
    SMFIC_CONNECT: int(ProtocolFlag.NOCONNECT),
    SMFIC_HELO: int(ProtocolFlag.NOHELO),
    SMFIC_MAIL: int(ProtocolFlag.NOMAIL),
    SMFIC_RCPT: int(ProtocolFlag.NORCPT),
    SMFIC_BODY: int(ProtocolFlag.NOBODY),
    SMFIC_HEADER: int(ProtocolFlag.NOHDRS),
    SMFIC_EOH: int(ProtocolFlag.NOEOH),
    SMFIC_UNKNOWN: int(ProtocolFlag.NOUNKNOWN),
    SMFIC_DATA: int(ProtocolFlag.NODATA),
}

# The state of each step a NO* flag removes.
_SKIPPED_BY = {
    int(ProtocolFlag.NOCONNECT): ST_CONN,
    int(ProtocolFlag.NOHELO): ST_HELO,
    int(ProtocolFlag.NOMAIL): ST_MAIL,
    int(ProtocolFlag.NORCPT): ST_RCPT,
    int(ProtocolFlag.NOHDRS): ST_HDRS,
    int(ProtocolFlag.NOEOH): ST_EOHS,
    int(ProtocolFlag.NOBODY): ST_BODY,
    int(ProtocolFlag.NODATA): ST_DATA,
    int(ProtocolFlag.NOUNKNOWN): ST_UNKN,
}


def skippable_states(protocol: int) -> list[int]:
    """The next-state table with the skip bit on every step ``protocol`` turns off."""
    table = list(NEXT_STATES)
    for flag, state in _SKIPPED_BY.items():
        if protocol & flag:
            table[state] |= SKIP_BIT
    return table


def transition_ok(table: list[int], old: int, new: int) -> bool:
    """libmilter's ``trans_ok``: ``new`` follows ``old``, possibly across skippable states."""
    state = old
    while True:
        if table[state] & (1 << new):
            return True
        state += 1
        if state >= len(table) or not table[state] & SKIP_BIT:
            return False


def in_mail(state: int) -> bool:
    """Inside a mail transaction (MAIL FROM seen, end of message not yet)."""
    return ST_MAIL <= state < ST_ENDM


_NO_PAYLOAD = frozenset((SMFIC_ABORT, SMFIC_DATA, SMFIC_EOH))
_Parser = Callable[[bytes, ev.Macros, bool], ev.Event]


def _connect(payload: bytes, macros: ev.Macros, needs_reply: bool) -> ev.Event:
    host, family, port, address = decode_connect(payload)
    return ev.Connect(host, family, port, address, macros=macros, needs_reply=needs_reply)


def _envelope(kind: type[ev.MailFrom] | type[ev.Rcpt], what: str) -> _Parser:
    def parse(payload: bytes, macros: ev.Macros, needs_reply: bool) -> ev.Event:
        address, *args = strings(payload, what)
        return kind(address, tuple(args), macros=macros, needs_reply=needs_reply)

    return parse


def _header(payload: bytes, macros: ev.Macros, needs_reply: bool) -> ev.Event:
    name, value = decode_header(payload)
    return ev.Header(name, value, macros=macros, needs_reply=needs_reply)


def _body(payload: bytes, macros: ev.Macros, needs_reply: bool) -> ev.Event:
    if not payload:
        raise WireError("empty body chunk")
    return ev.Body(payload, macros=macros, needs_reply=needs_reply)


_PARSERS: dict[int, _Parser] = {
    SMFIC_CONNECT: _connect,
    SMFIC_HELO: lambda p, m, r: ev.Helo(one_string(p, "HELO"), macros=m, needs_reply=r),
    SMFIC_MAIL: _envelope(ev.MailFrom, "MAIL FROM"),
    SMFIC_RCPT: _envelope(ev.Rcpt, "RCPT TO"),
    SMFIC_HEADER: _header,
    SMFIC_BODY: _body,
    SMFIC_BODYEOB: lambda p, m, r: ev.EndOfMessage(p, macros=m, needs_reply=r),
    SMFIC_UNKNOWN: lambda p, m, r: ev.Unknown(
        one_string(p, "unknown command"), macros=m, needs_reply=r
    ),
    SMFIC_DATA: lambda p, m, r: ev.Data(macros=m, needs_reply=r),
    SMFIC_EOH: lambda p, m, r: ev.EndOfHeaders(macros=m, needs_reply=r),
    SMFIC_ABORT: lambda p, m, r: ev.Abort(macros=m),
}


def parse_event(command: int, payload: bytes, macros: ev.Macros, needs_reply: bool) -> ev.Event:
    """The event for one command (not OPTNEG, QUIT, QUIT_NC, macros); WireError if malformed."""
    if payload and command in _NO_PAYLOAD:
        raise WireError(f"command {command_name(command)} with a payload")
    return _PARSERS[command](payload, macros, needs_reply)
