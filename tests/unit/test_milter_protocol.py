"""The sans-I/O milter protocol core against libmilter's framing, byte for byte.

The streams are built here by hand (not with the module's own encoder) the way Postfix and
Sendmail send them, and replayed at read sizes 1, 7 and 4096.
"""

from __future__ import annotations

import itertools
import logging
import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtls_milter.inbound import events as ev
from mtls_milter.inbound.negotiation import Limits, MilterOptions
from mtls_milter.inbound.protocol import MilterConnection, MilterUsageError
from mtls_milter.inbound.replies import (
    ACCEPT,
    CONTINUE,
    Action,
    AddHeader,
    ChangeHeader,
    InsertHeader,
    Quarantine,
    Reply,
    SmtpReply,
)
from mtls_milter.inbound.wire import ActionFlag, ProtocolFlag, Stage, macro_key, text

READ_SIZES = (1, 7, 4096)
POSTFIX_ACTIONS = 0x1FF
POSTFIX_PROTOCOL = 0x1FFFFF
HEADERS = ActionFlag.ADDHDRS | ActionFlag.CHGHDRS


def frame(command: bytes, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload) + 1) + command + payload


def optneg(
    version: int = 6, actions: int = POSTFIX_ACTIONS, protocol: int = POSTFIX_PROTOCOL
) -> bytes:
    return frame(b"O", struct.pack(">III", version, actions, protocol))


def macros(stage: bytes, *pairs: bytes) -> bytes:
    return frame(b"D", stage + b"".join(p + b"\0" for p in pairs))


def connect(host: bytes = b"client.test", family: bytes = b"4", port: int = 4711,
            address: bytes = b"192.0.2.25") -> bytes:  # fmt: skip
    tail = b"" if family == b"U" else struct.pack(">H", port) + address + b"\0"
    return frame(b"C", host + b"\0" + family + tail)


def strings(command: bytes, *parts: bytes) -> bytes:
    return frame(command, b"".join(p + b"\0" for p in parts))


def parse_frames(data: bytes) -> list[tuple[bytes, bytes]]:
    out = []
    while data:
        (length,) = struct.unpack(">I", data[:4])
        out.append((data[4:5], data[5 : 4 + length]))
        data = data[4 + length :]
    return out


Answer = Callable[[ev.Event], Reply]


def ended(seen: list[ev.Event]) -> ev.ConnectionClosed:
    """The last event, which must be the end of the conversation."""
    assert isinstance(seen[-1], ev.ConnectionClosed)
    return seen[-1]


def replay(
    stream: bytes,
    size: int = 4096,
    options: MilterOptions | None = None,
    answer: Answer = lambda event: CONTINUE,
    eof: bool = True,
) -> tuple[list[ev.Event], bytes]:
    """Feed ``stream`` in ``size`` pieces; answer every event that needs it."""
    core = MilterConnection(options or MilterOptions(actions=HEADERS), peer="test-mta")
    seen: list[ev.Event] = []
    out = b""

    def drain() -> None:
        nonlocal out
        while (event := core.next_event()) is not None:
            seen.append(event)
            if event.needs_reply:
                core.send_reply(answer(event))
        out += core.data_to_send()

    for i in range(0, len(stream), size):
        core.receive_data(stream[i : i + size])
        drain()
    if eof:
        core.receive_data(b"")
        drain()
    return seen, out


# -- a Postfix conversation ---------------------------------------------------------------------

POSTFIX_STREAM = b"".join(
    [
        optneg(),
        macros(b"C", b"j", b"mx.receiver.test", b"{daemon_name}", b"smtpd"),
        connect(),
        macros(b"H", b"{tls_version}", b"TLSv1.3", b"{cert_issuer}", b"Test CA"),
        strings(b"H", b"out.sender.test"),
        macros(b"M", b"i", b"4XyZ", b"{mail_addr}", b"a@sender.test"),
        strings(b"M", b"<a@sender.test>", b"SIZE=100", b"BODY=8BITMIME"),
        macros(b"R", b"{rcpt_addr}", b"b@receiver.test"),
        strings(b"R", b"<b@receiver.test>"),
        macros(b"T"),  # Postfix sends empty macro packets
        frame(b"T"),
        macros(b"L"),  # and packets for stages libmilter does not keep
        strings(b"L", b"From", b"a@sender.test"),
        strings(b"L", b"Subject", b"hello \xff"),
        macros(b"N", b"i", b"4XyZ"),
        frame(b"N"),
        frame(b"B", b"hello\r\n"),
        macros(b"E", b"i", b"4XyZ"),
        frame(b"E"),
        frame(b"A"),  # Postfix aborts after every message; libmilter ignores it then
        frame(b"Q"),
    ]
)


def eom_insert(event: ev.Event) -> Reply:
    if isinstance(event, ev.EndOfMessage):
        return Reply(modifications=(InsertHeader(0, "X-Test", "yes"),))
    return CONTINUE


@pytest.mark.parametrize("size", READ_SIZES)
def test_postfix_conversation_events(size: int) -> None:
    seen, _ = replay(POSTFIX_STREAM, size, answer=eom_insert)
    kinds = [type(e).__name__ for e in seen]
    assert kinds == [
        "Negotiate", "Connect", "Helo", "MailFrom", "Rcpt", "Data", "Header", "Header",
        "EndOfHeaders", "Body", "EndOfMessage", "Quit", "ConnectionClosed",
    ]  # fmt: skip
    connect_event, helo, mail, rcpt = seen[1:5]
    yes = True
    assert connect_event == ev.Connect(b"client.test", "4", 4711, b"192.0.2.25", needs_reply=yes)
    assert helo == ev.Helo(b"out.sender.test", needs_reply=yes)
    assert mail == ev.MailFrom(b"<a@sender.test>", (b"SIZE=100", b"BODY=8BITMIME"), needs_reply=yes)
    assert rcpt == ev.Rcpt(b"<b@receiver.test>", needs_reply=yes)
    assert seen[7] == ev.Header(b"Subject", b"hello \xff", needs_reply=yes)
    assert text(b"hello \xff") == "hello \udcff"
    eom = seen[10]
    assert eom.macros.get("{tls_version}") == b"TLSv1.3"  # HELO-stage macros still visible
    assert eom.macros.get("{i}") == b"4XyZ" and eom.macros.get("i") == b"4XyZ"
    assert eom.macros.get("{rcpt_addr}") == b"b@receiver.test"
    assert eom.macros.get("{cert_subject}") is None
    assert seen[-1] == ev.ConnectionClosed("quit", False)


@pytest.mark.parametrize("size", READ_SIZES)
def test_postfix_conversation_replies_byte_exact(size: int) -> None:
    _, out = replay(POSTFIX_STREAM, size, answer=eom_insert)
    continue_ = b"\x00\x00\x00\x01c"
    assert out == (
        b"\x00\x00\x00\x0dO\x00\x00\x00\x06\x00\x00\x00\x11\x00\x00\x00\x00"  # optneg
        + continue_ * 9  # connect, helo, mail, rcpt, data, 2 headers, eoh, body
        + b"\x00\x00\x00\x10i\x00\x00\x00\x00X-Test\x00yes\x00"  # insert at 0
        + continue_  # end of message
    )


def test_optneg_reply_carries_macro_lists_as_libmilter() -> None:
    options = MilterOptions(
        actions=ActionFlag.ADDHDRS,
        protocol=ProtocolFlag.NOBODY | ProtocolFlag.NR_HDR,
        macros={Stage.EOM: ("i",), Stage.HELO: ("{tls_version}", "j")},
    )
    _, out = replay(optneg(), options=options, eof=False)
    payload = (
        struct.pack(">III", 6, 0x101, 0x90)
        + struct.pack(">I", 1) + b"{tls_version} j\0"
        + struct.pack(">I", 5) + b"i\0"
    )  # fmt: skip
    assert parse_frames(out) == [(b"O", payload)]


# -- replies, byte for byte ---------------------------------------------------------------------

UP_TO_EOM = b"".join(
    [optneg(), connect(), strings(b"H", b"h"), strings(b"M", b"<a@b>"), strings(b"R", b"<c@d>")]
) + b"".join([frame(b"T"), frame(b"N"), frame(b"E")])

REPLY_CASES: list[tuple[str, Reply, list[tuple[bytes, bytes]]]] = [
    ("continue", CONTINUE, [(b"c", b"")]),
    ("accept", ACCEPT, [(b"a", b"")]),
    ("reject", Reply.reject(), [(b"r", b"")]),
    ("tempfail", Reply.tempfail(), [(b"t", b"")]),
    ("discard", Reply(Action.DISCARD), [(b"d", b"")]),
    (
        "reject text",
        Reply.reject("550", "5.7.1", "mtls=fail: no"),
        [(b"y", b"550 5.7.1 mtls=fail: no\0")],
    ),
    ("reject no xcode", Reply.reject("554", None, "go away"), [(b"y", b"554 go away\0")]),
    ("reject code only", Reply.reject("554"), [(b"y", b"554 \0")]),
    ("tempfail xcode", Reply.tempfail("451", "4.7.0"), [(b"y", b"451 4.7.0\0")]),
    (
        "percent doubled",
        Reply.reject("550", "5.7.1", "100% bad"),
        [(b"y", b"550 5.7.1 100%% bad\0")],
    ),
    (
        "multi-line",
        Reply(
            Action.REJECT,
            SmtpReply("550", "5.7.1", ("first", "second", "third")),
        ),
        [(b"y", b"550-5.7.1 first\r\n550-5.7.1 second\r\n550 5.7.1 third\0")],
    ),
    (
        "multi-line default xcode",
        Reply(
            Action.TEMPFAIL,
            SmtpReply("421", None, ("a", "b")),
        ),
        [(b"y", b"421-4.0.0 a\r\n421 4.0.0 b\0")],
    ),
    (
        "header actions",
        Reply(
            modifications=(
                ChangeHeader("Authentication-Results", 2, ""),
                InsertHeader(0, "Authentication-Results", "mx; mtls=pass\n\tsmtp.mailfrom=x"),
                AddHeader("X-Bottom", "1"),
                ChangeHeader("Subject", 1, "new"),
            )
        ),
        [
            (b"m", b"\0\0\0\x02Authentication-Results\0\0"),
            (b"i", b"\0\0\0\0Authentication-Results\0mx; mtls=pass\n\tsmtp.mailfrom=x\0"),
            (b"h", b"X-Bottom\0" + b"1\0"),
            (b"m", b"\0\0\0\x01Subject\0new\0"),
            (b"c", b""),
        ],
    ),
    ("quarantine", Reply(modifications=(Quarantine("held"),)), [(b"q", b"held\0"), (b"c", b"")]),
]


@pytest.mark.parametrize(("reply", "frames"), [pytest.param(*c[1:], id=c[0]) for c in REPLY_CASES])
def test_reply_bytes(reply: Reply, frames: list[tuple[bytes, bytes]]) -> None:
    options = MilterOptions(actions=HEADERS | ActionFlag.QUARANTINE)
    answer: Answer = lambda e: reply if isinstance(e, ev.EndOfMessage) else CONTINUE  # noqa: E731
    _, out = replay(UP_TO_EOM, options=options, answer=answer, eof=False)
    assert parse_frames(out)[7:] == frames  # after optneg + 6 CONTINUEs


def test_shortcut_methods_write_the_same_bytes() -> None:
    core = MilterConnection(MilterOptions(actions=HEADERS | ActionFlag.QUARANTINE))
    core.receive_data(UP_TO_EOM)
    while (event := core.next_event()) is not None:
        if isinstance(event, ev.EndOfMessage):
            core.delete_header("X-Old", 1)
            core.insert_header(0, "X-New", "v")
            core.add_header(b"X-End", b"w")
            core.change_header("X-Mid", 3, "z")
            core.quarantine("why")
            core.reject("550", "5.7.1", "no")
        elif event.needs_reply:
            core.continue_()
    assert parse_frames(core.data_to_send())[7:] == [
        (b"m", b"\0\0\0\x01X-Old\0\0"),
        (b"i", b"\0\0\0\0X-New\0v\0"),
        (b"h", b"X-End\0w\0"),
        (b"m", b"\0\0\0\x03X-Mid\0z\0"),
        (b"q", b"why\0"),
        (b"y", b"550 5.7.1 no\0"),
    ]


# -- negotiation --------------------------------------------------------------------------------


def negotiated(
    stream: bytes, options: MilterOptions
) -> tuple[list[ev.Event], list[tuple[bytes, bytes]]]:
    seen, out = replay(stream, options=options, eof=False)
    return seen, parse_frames(out)


def test_older_mta_version_is_echoed() -> None:
    seen, frames = negotiated(optneg(version=2, actions=0x3F, protocol=0x7F), MilterOptions())
    assert frames == [(b"O", struct.pack(">III", 2, 0, 0))]
    assert isinstance(seen[0], ev.Negotiate) and seen[0].version == 2


@pytest.mark.parametrize(
    ("offer", "options", "reason"),
    [
        (optneg(version=1), MilterOptions(), "MTA protocol version 1 < 2"),
        (optneg(protocol=0x3F), MilterOptions(protocol=ProtocolFlag.SKIP), "missing SKIP"),
        (frame(b"O", b"\0" * 11), MilterOptions(), "11 bytes instead of 12"),
    ],
)
def test_negotiation_refused_closes(
    offer: bytes, options: MilterOptions, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    seen, frames = negotiated(offer, options)
    assert frames == []  # libmilter answers nothing and closes
    assert isinstance(seen[-1], ev.ConnectionClosed) and seen[-1].error
    assert reason in seen[-1].reason
    assert reason in caplog.text


@pytest.mark.parametrize(
    ("offer", "options", "actions", "lists"),
    [
        (optneg(actions=0x01), MilterOptions(actions=HEADERS), 0x01, b""),
        (optneg(actions=0), MilterOptions(actions=HEADERS), 0x01, b""),  # 0 means V1: ADDHDRS
        (optneg(actions=0x0F), MilterOptions(macros={Stage.HELO: ("j",)}), 0, b""),
        (optneg(actions=0x1FF), MilterOptions(macros={Stage.HELO: ("j",)}), 0x100, b"j\0"),
    ],
)
def test_an_action_the_mta_withholds_is_dropped_not_fatal(
    offer: bytes, options: MilterOptions, actions: int, lists: bytes
) -> None:
    """The conversation goes on with what the MTA allows; the handler degrades (it sees the
    agreed actions in Negotiate). Macro lists are sent only when SETSYMLIST is agreed."""
    seen, frames = negotiated(offer, options)
    assert isinstance(seen[0], ev.Negotiate) and seen[0].actions == actions
    assert frames[0][0] == b"O" and struct.unpack(">I", frames[0][1][4:8])[0] == actions
    assert frames[0][1][12:] == (struct.pack(">I", 1) + lists if lists else b"")


def test_no_reply_flags_the_mta_lacks_are_answered_by_the_core() -> None:
    options = MilterOptions(protocol=ProtocolFlag.NR_HDR | ProtocolFlag.NR_CONN)
    stream = optneg(protocol=0x7F) + connect() + strings(b"H", b"h") + strings(b"M", b"<a>")
    stream += strings(b"R", b"<b>") + strings(b"L", b"From", b"x")
    seen, out = replay(stream, options=options, eof=False)
    frames = parse_frames(out)
    assert frames[0] == (b"O", struct.pack(">III", 6, 0, 0))  # NR_* not offered: not asked
    assert [f[0] for f in frames[1:]] == [b"c"] * 5  # the MTA still waits: the core continues
    assert [e.needs_reply for e in seen[1:]] == [False, True, True, True, False]


def test_no_reply_flags_the_mta_offers_mean_silence() -> None:
    options = MilterOptions(protocol=ProtocolFlag.NR_HDR | ProtocolFlag.NR_CONN)
    stream = optneg() + connect() + strings(b"H", b"h") + strings(b"M", b"<a>")
    stream += strings(b"R", b"<b>") + strings(b"L", b"From", b"x") + strings(b"L", b"To", b"y")
    _, out = replay(stream, options=options, eof=False)
    frames = parse_frames(out)
    assert frames[0] == (b"O", struct.pack(">III", 6, 0, 0x1080))
    assert [f[0] for f in frames[1:]] == [b"c"] * 3  # helo, mail, rcpt; none for connect/headers


def test_steps_we_do_not_want_are_skipped_by_the_state_machine() -> None:
    options = MilterOptions(protocol=ProtocolFlag.NOHELO | ProtocolFlag.NORCPT)
    stream = optneg() + connect() + strings(b"M", b"<a>") + frame(b"T") + frame(b"N")
    seen, _ = replay(stream + frame(b"E"), options=options)
    assert [type(e).__name__ for e in seen] == [
        "Negotiate", "Connect", "MailFrom", "Data", "EndOfHeaders", "EndOfMessage",
        "ConnectionClosed",
    ]  # fmt: skip
    assert not ended(seen).error


@pytest.mark.parametrize(
    ("offered", "allowed", "flag", "size"),
    [
        (ProtocolFlag.MDS_256K, 256 * 1024 - 1, ProtocolFlag.MDS_256K, 256 * 1024 - 1),
        (ProtocolFlag.MDS_1M, 1024 * 1024 - 1, ProtocolFlag.MDS_1M, 1024 * 1024 - 1),
        (ProtocolFlag.MDS_1M, 256 * 1024 - 1, 0, 64 * 1024 - 1),
        (ProtocolFlag.MDS_256K, 64 * 1024 - 1, 0, 64 * 1024 - 1),
    ],
)
def test_larger_frames_only_when_offered_and_allowed(
    offered: int, allowed: int, flag: int, size: int
) -> None:
    options = MilterOptions(max_data_size=allowed)
    stream = optneg(protocol=POSTFIX_PROTOCOL | offered) + connect() + strings(b"H", b"h")
    stream += strings(b"M", b"<a>") + strings(b"R", b"<b>") + frame(b"T") + frame(b"N")
    seen, out = replay(stream + frame(b"B", b"x" * size), options=options, eof=False)
    assert parse_frames(out)[0][1][8:12] == struct.pack(">I", POSTFIX_PROTOCOL & 0 | flag)
    assert isinstance(seen[0], ev.Negotiate) and seen[0].max_data_size == size
    assert isinstance(seen[-1], ev.Body) and len(seen[-1].chunk) == size
    seen, _ = replay(stream + frame(b"B", b"x" * (size + 1)), options=options, eof=False)
    assert isinstance(seen[-1], ev.ConnectionClosed)
    assert f"frame of {size + 2} bytes exceeds the limit of {size + 1}" in seen[-1].reason


# -- macros -------------------------------------------------------------------------------------

BEFORE_MAIL = optneg() + connect() + strings(b"H", b"h")


def last_macros(stream: bytes) -> ev.Macros:
    seen, _ = replay(stream, eof=False)
    return seen[-1].macros


def test_later_stage_wins_and_earlier_stages_stay_visible() -> None:
    stream = macros(b"C", b"j", b"conn", b"x", b"from-connect") + connect()
    stream = optneg() + stream + macros(b"H", b"j", b"helo") + strings(b"H", b"h")
    stream += macros(b"M", b"j", b"mail") + strings(b"M", b"<a>")
    got = last_macros(stream)
    assert (got.get("j"), got.get("{x}"), got.text("x")) == (
        b"mail",
        b"from-connect",
        "from-connect",
    )


def test_a_macro_packet_replaces_its_stage_and_mail_clears_later_stages() -> None:
    stream = BEFORE_MAIL + macros(b"M", b"a", b"1") + strings(b"M", b"<a>")
    stream += macros(b"R", b"r", b"1") + strings(b"R", b"<b>") + frame(b"E")  # end of message
    stream += macros(b"M", b"b", b"2") + strings(b"M", b"<c>")  # the next transaction
    got = last_macros(stream)
    assert (got.get("a"), got.get("b"), got.get("r")) == (None, b"2", None)


def test_first_of_repeated_names_wins_and_braces_alias() -> None:
    stream = BEFORE_MAIL + macros(b"M", b"{i}", b"first", b"i", b"second", b"{long}", b"v")
    got = last_macros(stream + strings(b"M", b"<a>"))
    assert (got.get("i"), got.get("{i}"), got.get("long"), got.get("{long}")) == (
        b"first", b"first", None, b"v",
    )  # fmt: skip
    assert got.get("") is None


def test_empty_and_foreign_stage_packets_are_dropped_like_libmilter() -> None:
    stream = BEFORE_MAIL + macros(b"M", b"a", b"1") + macros(b"M") + macros(b"L", b"a", b"2")
    got = last_macros(stream + strings(b"M", b"<a>"))
    assert got.get("a") == b"1"
    assert got.stage(Stage.ENVFROM) == {b"a": b"1"}


def test_end_of_headers_macros_are_searched_before_end_of_message_ones() -> None:
    stream = BEFORE_MAIL + strings(b"M", b"<a>") + strings(b"R", b"<b>") + frame(b"T")
    stream += macros(b"N", b"q", b"eoh") + frame(b"N") + macros(b"E", b"q", b"eom") + frame(b"E")
    assert last_macros(stream).get("q") == b"eoh"  # libmilter's array order: EOH after EOM


# -- hostile and broken input: the conversation ends, with one log line, never an exception -----

IN_HEADERS = BEFORE_MAIL + strings(b"M", b"<a>") + strings(b"R", b"<b>") + frame(b"T")

MALFORMED: list[tuple[str, bytes, str]] = [
    ("odd macro strings", BEFORE_MAIL + frame(b"D", b"Mi\0x\0j\0"), "odd number of strings (3)"),
    ("macro not terminated", BEFORE_MAIL + frame(b"D", b"Mi\0x"), "not NUL-terminated"),
    ("macro no command", BEFORE_MAIL + frame(b"D"), "macro packet without a command"),
    ("macro bad command", BEFORE_MAIL + macros(b"z", b"i", b"x"), "unknown command 'z'"),
    ("length 2^31", optneg() + b"\x80\x00\x00\x00M", "frame of 2147483648 bytes exceeds"),
    ("length 2^31 at once", b"\x80\x00\x00\x00", "frame of 2147483648 bytes exceeds"),
    ("length 0", optneg() + b"\x00\x00\x00\x00", "frame of length 0"),
    ("truncated at close", optneg() + connect()[:-3], "closed inside a frame (28 of 31 bytes)"),
    ("truncated length", optneg() + b"\x00\x00", "closed inside a frame (2 of 5 bytes)"),
    ("before negotiation", connect(), "command 'C' before option negotiation"),
    ("negotiation twice", optneg() + optneg(), "command 'O' out of order"),
    (
        "header after connect",
        optneg() + connect() + strings(b"L", b"a", b"b"),
        "'L' out of order (after connect)",
    ),
    ("end without mail", BEFORE_MAIL + frame(b"E"), "command 'E' out of order"),
    ("unknown command", BEFORE_MAIL + frame(b"X", b"zz"), "unknown command 'X'"),
    ("unknown command byte", BEFORE_MAIL + frame(b"\x01"), "unknown command 0x01"),
    ("helo without NUL", optneg() + connect() + frame(b"H", b"name"), "not NUL-terminated"),
    ("helo two strings", optneg() + connect() + frame(b"H", b"a\0b\0"), "expected one string"),
    ("mail without NUL", BEFORE_MAIL + frame(b"M", b"<a>"), "not NUL-terminated"),
    ("connect bad family", optneg() + connect(family=b"X"), "unknown address family 'X'"),
    ("connect bad ip", optneg() + connect(address=b"300.1.1.1"), "bad address '300.1.1.1'"),
    ("connect v4 as v6", optneg() + connect(family=b"6"), "is not of family 6"),
    ("connect no family", optneg() + frame(b"C", b"host\0"), "no host name and family"),
    ("connect short", optneg() + frame(b"C", b"host\x004\x00"), "no port and address"),
    ("header one string", IN_HEADERS + strings(b"L", b"From"), "expected a name and a value"),
    ("header empty name", IN_HEADERS + strings(b"L", b"", b"v"), "expected a name and a value"),
    ("payload on data", IN_HEADERS[:-5] + frame(b"T", b"x"), "'T' with a payload"),
    ("payload on quit", optneg() + frame(b"Q", b"x"), "'Q' with a payload"),
    ("empty body chunk", IN_HEADERS + frame(b"N") + frame(b"B"), "empty body chunk"),
    (
        "oversized frame",
        BEFORE_MAIL + frame(b"M", b"a" * 65535 + b"\0"),
        "frame of 65537 bytes exceeds the limit of 65536",
    ),
]


@pytest.mark.parametrize("size", READ_SIZES)
@pytest.mark.parametrize(("stream", "reason"), [pytest.param(*c[1:], id=c[0]) for c in MALFORMED])
def test_malformed_input_closes_the_conversation(
    stream: bytes, reason: str, size: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "mtls_milter")
    seen, _ = replay(stream, size)
    closed = seen[-1]
    assert isinstance(closed, ev.ConnectionClosed) and closed.error
    assert reason in closed.reason
    assert [type(e) for e in seen].count(ev.ConnectionClosed) == 1
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and reason in lines[0]
    assert "peer='test-mta'" in lines[0]


def test_log_line_names_the_client_and_quotes_the_garbage(caplog: pytest.LogCaptureFixture) -> None:
    garbage = b"\x1b[31m" + b"A" * 500 + b"\n"
    replay(optneg() + connect() + frame(b"H", garbage))
    line = caplog.records[-1].getMessage()
    assert "client='192.0.2.25'" in line
    assert "\\x1b[31m" in line and "\n" not in line and "AAA..." in line
    assert len(line) <= 300  # the quoted part is at most 200 characters
    assert line.count("A") < 200


def test_a_transaction_broken_off_is_aborted_first() -> None:
    seen, _ = replay(IN_HEADERS + strings(b"L", b"only-name"))
    assert [type(e).__name__ for e in seen[-2:]] == ["Abort", "ConnectionClosed"]


def test_limits_on_headers_and_macros(caplog: pytest.LogCaptureFixture) -> None:
    options = MilterOptions(limits=Limits(max_headers=3, max_macros=2, max_macro_name=8))
    three = strings(b"L", b"a", b"1") * 3
    seen, _ = replay(IN_HEADERS + three + frame(b"N"), options=options)
    assert not ended(seen).error
    seen, _ = replay(IN_HEADERS + three + strings(b"L", b"a", b"1"), options=options)
    assert "more than 3 header fields" in ended(seen).reason
    seen, _ = replay(BEFORE_MAIL + macros(b"M", *[b"n", b"v"] * 3), options=options)
    assert "3 macros (limit 2)" in ended(seen).reason
    seen, _ = replay(BEFORE_MAIL + macros(b"M", b"{123456789}", b"v"), options=options)
    assert "macro name longer than 8 bytes" in ended(seen).reason


# -- what real MTAs do that libmilter tolerates -------------------------------------------------


def kinds(stream: bytes, answer: Answer = lambda e: CONTINUE) -> list[str]:
    seen, _ = replay(stream, answer=answer)
    return [type(e).__name__ for e in seen]


def test_abort_between_transactions_is_ignored() -> None:
    stream = BEFORE_MAIL + frame(b"A") + strings(b"M", b"<a>") + frame(b"A") + frame(b"A")
    assert kinds(stream + frame(b"Q")) == [
        "Negotiate", "Connect", "Helo", "MailFrom", "Abort", "Quit", "ConnectionClosed",
    ]  # fmt: skip


def test_helo_inside_a_transaction_aborts_it() -> None:
    stream = BEFORE_MAIL + strings(b"M", b"<a>") + strings(b"H", b"again") + frame(b"A")
    assert kinds(stream)[3:] == ["MailFrom", "Abort", "Helo", "ConnectionClosed"]


def test_accept_at_mail_ends_the_transaction_for_us() -> None:
    answer: Answer = lambda e: ACCEPT if e == ev.MailFrom(b"<a>", needs_reply=True) else CONTINUE  # noqa: E731
    stream = BEFORE_MAIL + strings(b"M", b"<a>") + frame(b"A") + strings(b"M", b"<b>")
    assert kinds(stream, answer)[3:] == ["MailFrom", "MailFrom", "Abort", "ConnectionClosed"]


def test_rejected_recipient_keeps_the_transaction() -> None:
    answer: Answer = lambda e: Reply.reject() if isinstance(e, ev.Rcpt) else CONTINUE  # noqa: E731
    stream = BEFORE_MAIL + strings(b"M", b"<a>") + strings(b"R", b"<b>") + strings(b"R", b"<c>")
    stream += frame(b"T") + frame(b"N") + frame(b"E")
    assert kinds(stream, answer)[3:] == [
        "MailFrom", "Rcpt", "Rcpt", "Data", "EndOfHeaders", "EndOfMessage", "ConnectionClosed",
    ]  # fmt: skip


def test_quit_new_connection_starts_over() -> None:
    stream = BEFORE_MAIL + strings(b"M", b"<a>") + frame(b"K") + macros(b"C", b"j", b"x")
    stream += connect(host=b"second.test", family=b"U") + frame(b"Q")
    seen, _ = replay(stream)
    assert [type(e).__name__ for e in seen][3:] == [
        "MailFrom", "Abort", "QuitNewConnection", "Connect", "Quit", "ConnectionClosed",
    ]  # fmt: skip
    assert seen[6] == ev.Connect(b"second.test", "U", 0, b"", needs_reply=True)
    assert seen[6].macros.get("j") == b"x" and seen[6].macros.get("{tls_version}") is None


def test_quit_from_any_state_and_eof_without_quit() -> None:
    assert kinds(BEFORE_MAIL + frame(b"Q"))[-2:] == ["Quit", "ConnectionClosed"]
    seen, _ = replay(BEFORE_MAIL + strings(b"M", b"<a>"))
    assert seen[-2:] == [ev.Abort(), ev.ConnectionClosed("eof", False)]


def test_connect_forms_sent_by_mtas() -> None:
    for family, address, port in [(b"6", b"2001:db8::1", 25), (b"6", b"IPv6:2001:db8::1", 1),
                                  (b"L", b"/var/run/x", 0), (b"4", b"127.0.0.1", 0)]:  # fmt: skip
        seen, _ = replay(optneg() + connect(family=family, address=address, port=port))
        assert seen[1] == ev.Connect(
            b"client.test", family.decode(), port, address, needs_reply=True
        )


# -- answering wrongly is a bug in the caller: it raises ----------------------------------------


def at_event(stream: bytes, options: MilterOptions | None = None) -> MilterConnection:
    core = MilterConnection(options or MilterOptions())
    core.receive_data(stream)
    while (event := core.next_event()) is not None:
        if event.needs_reply and core.awaiting is not None and core.buffered:
            core.continue_()
    return core


def test_usage_errors() -> None:
    core = at_event(optneg())
    with pytest.raises(MilterUsageError, match="no event awaits"):
        core.accept()
    core = at_event(optneg() + connect())
    with pytest.raises(MilterUsageError, match="only at end of message"):
        core.add_header("X", "y")
    with pytest.raises(MilterUsageError, match="SKIP answers only body"):
        core.skip()
    core = at_event(UP_TO_EOM)  # ADDHDRS not negotiated
    with pytest.raises(MilterUsageError, match="not negotiated"):
        core.send_reply(Reply(modifications=(AddHeader("X", "y"),)))
    assert core.data_to_send().endswith(b"\x00\x00\x00\x01c")  # nothing of the refused answer
    core.close("test over")
    core.accept()  # after the end an answer is dropped, not an error
    assert core.data_to_send() == b""


@pytest.mark.parametrize(
    "build",
    [
        lambda: SmtpReply("250"),
        lambda: SmtpReply("550", "4.7.1"),
        lambda: SmtpReply("550", "5.7"),
        lambda: SmtpReply("550", None, ("a\r\nb",)),
        lambda: SmtpReply("550", None, ("x" * 981,)),
        lambda: SmtpReply("550", None, ("x",) * 33),
        lambda: Reply.tempfail("550"),
        lambda: Reply(ACCEPT.action, SmtpReply("550")),
        lambda: Reply(modifications=(AddHeader("Bad: name", "v"),)),
        lambda: Reply(modifications=(AddHeader("", "v"),)),
        lambda: Reply(modifications=(AddHeader("X", "a\0b"),)),
        lambda: Reply(modifications=(InsertHeader(-1, "X", "v"),)),
        lambda: Reply(modifications=(ChangeHeader("X", 2**31, "v"),)),
        lambda: Reply(modifications=(Quarantine(""),)),
        lambda: Reply(modifications=(AddHeader("X", "v" * 65535),)),
    ],
)
def test_answers_that_cannot_be_sent_are_refused_when_built(build: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        build()


def test_text_round_trips_any_bytes() -> None:
    from mtls_milter.inbound.wire import to_bytes

    raw = bytes(range(256))
    assert to_bytes(text(raw)) == raw


# -- properties: any input, any split --------------------------------------------------------------

FINAL_REPLIES = frozenset(b"acdrtsy")
NO_REPLY_COMMANDS = frozenset(b"ADQK")
NR_OF = {  # the NR_* flag of each command
    ord("C"): 0x1000, ord("H"): 0x2000, ord("M"): 0x4000, ord("R"): 0x8000, ord("T"): 0x10000,
    ord("U"): 0x20000, ord("L"): 0x80, ord("N"): 0x40000, ord("B"): 0x80000,
}  # fmt: skip

_names = st.binary(min_size=1, max_size=6).filter(lambda b: b"\0" not in b)
_strings = st.lists(_names, min_size=0, max_size=4).map(lambda xs: b"".join(x + b"\0" for x in xs))
_payloads = {
    "C": st.sampled_from([connect()[5:], connect(family=b"U")[5:], connect(family=b"6")[5:]]),
    "H": _names.map(lambda b: b + b"\0"),
    "M": _strings,
    "R": _strings,
    "L": st.tuples(_names, _names).map(lambda t: t[0] + b"\0" + t[1] + b"\0"),
    "B": st.binary(min_size=0, max_size=20),
    "E": st.binary(max_size=4),
    "D": st.tuples(st.sampled_from(list(b"CHMRTENLBUz")), _strings).map(
        lambda t: bytes([t[0]]) + t[1]
    ),
    "O": st.tuples(st.integers(0, 7), st.integers(0, 0x1FF), st.integers(0, 0x3FFFFFFF)).map(
        lambda t: struct.pack(">III", *t)
    ),
    "U": _names.map(lambda b: b + b"\0"),
}
_command = st.sampled_from("ABCDEHKLMNOQRTUX")
_frames = _command.flatmap(
    lambda c: (_payloads.get(c, st.just(b"")) | st.binary(max_size=8)).map(
        lambda p: frame(c.encode(), p)
    )
)


def _conversation(messages: int, recipients: int, headers: int) -> list[bytes]:
    """What Postfix sends after negotiation, ``messages`` transactions long."""
    frames = [macros(b"C", b"j", b"mx"), connect(), strings(b"H", b"client")]
    for _ in range(messages):
        frames += [macros(b"M", b"i", b"Q1"), strings(b"M", b"<a@b>")]
        frames += [strings(b"R", b"<c@d>")] * recipients + [frame(b"T")]
        frames += [strings(b"L", b"Subject", b"x")] * headers
        frames += [frame(b"N"), frame(b"B", b"body"), frame(b"E"), frame(b"A")]
    return [*frames, frame(b"Q")]


def _mutate(frames: list[bytes], edits: list[tuple[int, int, bytes]]) -> list[bytes]:
    """Drop (0), repeat (1) or insert before (2) a frame, at positions taken modulo the length."""
    out = list(frames)
    for position, kind, extra in edits:
        i = position % (len(out) + 1)
        if kind == 0 and i < len(out):
            del out[i]
        elif kind == 1 and i < len(out):
            out.insert(i, out[i])
        else:
            out.insert(i, extra)
    return out


# Mostly plausible conversations with a few edits: random frame lists rarely get past CONNECT.
_sequences = st.builds(
    _mutate,
    st.builds(_conversation, st.integers(1, 3), st.integers(1, 3), st.integers(0, 3)),
    st.lists(st.tuples(st.integers(0, 60), st.integers(0, 2), _frames), max_size=3),
) | st.lists(_frames, max_size=25)

_answers = st.sampled_from(
    [CONTINUE, ACCEPT, Reply.reject(), Reply.tempfail("421", "4.7.0", "later"),
     Reply(Action.DISCARD),
     Reply(modifications=(InsertHeader(0, "X-A", "1"), ChangeHeader("X-B", 1, "")))]
)  # fmt: skip


def feed_all(
    core: MilterConnection, data: bytes, cuts: list[int], data_draw: st.DataObject
) -> list[ev.Event]:
    seen: list[ev.Event] = []
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for start, end in itertools.pairwise(points):
        core.receive_data(data[start:end])
        while (event := core.next_event()) is not None:
            seen.append(event)
            if event.needs_reply:
                reply = data_draw.draw(_answers)
                if reply.modifications and not isinstance(event, ev.EndOfMessage):
                    reply = CONTINUE
                core.send_reply(reply)
    return seen


@settings(max_examples=200, deadline=None)
@given(
    start=st.sampled_from([b"", optneg(), optneg(protocol=0x3F)]),
    frames=st.lists(_frames, max_size=25),
    tail=st.binary(max_size=12),
    cuts=st.lists(st.integers(0, 10_000), max_size=8),
    data=st.data(),
)
def test_any_input_any_split_never_raises(
    start: bytes, frames: list[bytes], tail: bytes, cuts: list[int], data: st.DataObject
) -> None:
    core = MilterConnection(MilterOptions(actions=ActionFlag.ADDHDRS | ActionFlag.CHGHDRS))
    stream = start + b"".join(frames) + tail
    seen = feed_all(core, stream, cuts, data)
    core.receive_data(b"")
    while (event := core.next_event()) is not None:
        seen.append(event)
    assert isinstance(seen[-1], ev.ConnectionClosed)
    assert [type(e) for e in seen].count(ev.ConnectionClosed) == 1
    out = core.data_to_send()
    assert b"".join(frame(c, p) for c, p in parse_frames(out)) == out  # whole frames only


@settings(max_examples=200, deadline=None)
@given(
    mta_protocol=st.integers(0, 0x1FFFFF),
    no_reply=st.integers(0, 0xFF080).map(lambda n: n & 0xFF080),
    frames=_sequences,
    data=st.data(),
)
def test_one_answer_per_command_that_expects_one(
    mta_protocol: int, no_reply: int, frames: list[bytes], data: st.DataObject
) -> None:
    """Fed frame by frame: at most one final reply per command, none for commands the MTA will
    not wait for (ABORT, macros, QUIT, and the no-reply steps it agreed to)."""
    core = MilterConnection(MilterOptions(actions=HEADERS, protocol=no_reply))
    feed_all(core, optneg(protocol=mta_protocol), [], data)
    out = parse_frames(core.data_to_send())
    agreed = struct.unpack(">I", out[0][1][8:12])[0] if out else 0
    for item in frames:
        feed_all(core, item, [3, 6], data)
        finals = [c for c, _ in parse_frames(core.data_to_send()) if c[0] in FINAL_REPLIES]
        command = item[4]
        if command in NO_REPLY_COMMANDS or agreed & NR_OF.get(command, 0):
            assert finals == []
        else:
            assert len(finals) <= 1
        if core.closed:
            break


_NAME_BYTES = st.sampled_from([b"i", b"j", b"{i}", b"{j}", b"{tls_version}", b"{cert_fp}", b"x"])
_STAGE_SET = st.none() | st.dictionaries(
    _NAME_BYTES.map(macro_key), st.binary(max_size=12), max_size=5
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_STAGE_SET, min_size=len(Stage), max_size=len(Stage)), st.lists(_NAME_BYTES))
def test_macro_texts_for_several_names_equal_one_lookup_each(
    slots: list[dict[bytes, bytes] | None], names: list[bytes]
) -> None:
    macros = ev.Macros(tuple(slots))
    wanted = tuple((text(n), macro_key(n)) for n in names)
    assert macros.texts(wanted) == {text(n): macros.text(n) for n in names}
