"""libmilter's command states and transitions (``engine.c``), and command payloads → events.

Each command moves the conversation to its state. A move is allowed when the new state is in the
current state's set of next states, or reachable through states the milter asked the MTA not to
send (the "skip" bit that libmilter's ``fix_stm`` sets for NO* protocol flags).
"""

from __future__ import annotations

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
    SMFIC_CONNECT: ProtocolFlag.NR_CONN,
    SMFIC_HELO: ProtocolFlag.NR_HELO,
    SMFIC_MAIL: ProtocolFlag.NR_MAIL,
    SMFIC_RCPT: ProtocolFlag.NR_RCPT,
    SMFIC_DATA: ProtocolFlag.NR_DATA,
    SMFIC_UNKNOWN: ProtocolFlag.NR_UNKN,
    SMFIC_HEADER: ProtocolFlag.NR_HDR,
    SMFIC_EOH: ProtocolFlag.NR_EOH,
    SMFIC_BODY: ProtocolFlag.NR_BODY,
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
    SMFIC_CONNECT: ProtocolFlag.NOCONNECT,
    SMFIC_HELO: ProtocolFlag.NOHELO,
    SMFIC_MAIL: ProtocolFlag.NOMAIL,
    SMFIC_RCPT: ProtocolFlag.NORCPT,
    SMFIC_BODY: ProtocolFlag.NOBODY,
    SMFIC_HEADER: ProtocolFlag.NOHDRS,
    SMFIC_EOH: ProtocolFlag.NOEOH,
    SMFIC_UNKNOWN: ProtocolFlag.NOUNKNOWN,
    SMFIC_DATA: ProtocolFlag.NODATA,
}

# The state of each step a NO* flag removes.
_SKIPPED_BY = {
    ProtocolFlag.NOCONNECT: ST_CONN,
    ProtocolFlag.NOHELO: ST_HELO,
    ProtocolFlag.NOMAIL: ST_MAIL,
    ProtocolFlag.NORCPT: ST_RCPT,
    ProtocolFlag.NOHDRS: ST_HDRS,
    ProtocolFlag.NOEOH: ST_EOHS,
    ProtocolFlag.NOBODY: ST_BODY,
    ProtocolFlag.NODATA: ST_DATA,
    ProtocolFlag.NOUNKNOWN: ST_UNKN,
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


def parse_event(command: int, payload: bytes, macros: ev.Macros, needs_reply: bool) -> ev.Event:
    """The event for one command (not OPTNEG, QUIT, QUIT_NC, macros); WireError if malformed."""
    if command in _NO_PAYLOAD and payload:
        raise WireError(f"command {command_name(command)} with a payload")
    if command == SMFIC_CONNECT:
        host, family, port, address = decode_connect(payload)
        return ev.Connect(host, family, port, address, macros=macros, needs_reply=needs_reply)
    if command == SMFIC_HELO:
        return ev.Helo(one_string(payload, "HELO"), macros=macros, needs_reply=needs_reply)
    if command in (SMFIC_MAIL, SMFIC_RCPT):
        what = "MAIL FROM" if command == SMFIC_MAIL else "RCPT TO"
        address, *args = strings(payload, what)
        kind = ev.MailFrom if command == SMFIC_MAIL else ev.Rcpt
        return kind(address, tuple(args), macros=macros, needs_reply=needs_reply)
    if command == SMFIC_HEADER:
        name, value = decode_header(payload)
        return ev.Header(name, value, macros=macros, needs_reply=needs_reply)
    if command == SMFIC_BODY:
        if not payload:
            raise WireError("empty body chunk")
        return ev.Body(payload, macros=macros, needs_reply=needs_reply)
    if command == SMFIC_BODYEOB:
        return ev.EndOfMessage(payload, macros=macros, needs_reply=needs_reply)
    if command == SMFIC_UNKNOWN:
        line = one_string(payload, "unknown command")
        return ev.Unknown(line, macros=macros, needs_reply=needs_reply)
    if command == SMFIC_DATA:
        return ev.Data(macros=macros, needs_reply=needs_reply)
    if command == SMFIC_EOH:
        return ev.EndOfHeaders(macros=macros, needs_reply=needs_reply)
    return ev.Abort(macros=macros)
