"""Conformance: real MTA conversations captured on the wire, replayed through the protocol core.

tests/data/milter/*.hex were recorded by tests/support/capture_milter_fixtures.py (a proxy
between real Postfix 3.7 / Sendmail 8.17 / miltertest and ``mtls-milter serve`` on the pymilter
transport, so the answers are libmilter's bytes). Each MTA stream is fed to the core at read
sizes 1, 7, 4096 and whole; every event that awaits an answer is answered as libmilter answered
it, and the core's output must equal libmilter's byte for byte, option negotiation included (the
core is given the options libmilter announced). The event sequence, the macros visible at each
event and the header fields are checked against what the capture holds.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from support.milter_capture import TO_MTA, read_capture
from support.milter_replay import Replayed, frames, replay_conversation

from mtls_milter.inbound import events as ev
from mtls_milter.inbound.wire import Stage

DATA = Path(__file__).resolve().parents[1] / "data" / "milter"
CAPTURES = sorted(p.stem for p in DATA.glob("*.hex"))
ASYNCIO = DATA / "asyncio"  # the same cases with ``mtls-milter serve`` on the asyncio transport
ASYNCIO_CAPTURES = sorted(p.stem for p in ASYNCIO.glob("*.hex"))
LIBMILTER_ONLY = {"postfix37-full-libmilter"}  # a pymilter test milter, not mtls-milter
READ_SIZES = (1, 7, 4096, 0)  # 0: the whole stream at once


def replay(name: str, size: int, data: Path = DATA) -> tuple[Replayed, bytes, int]:
    """Replay capture ``name``: (what the core did, the milter's bytes, its answer count)."""
    (conversation,) = read_capture(data / f"{name}.hex")
    result = replay_conversation(conversation, size)
    return result, result.recorded, result.recorded_answers


def summary(event: ev.Event) -> tuple[object, ...]:
    """An event as (type name, its wire values)."""
    if isinstance(event, ev.Negotiate):
        return ("Negotiate", event.version, hex(event.protocol))
    if isinstance(event, ev.Connect):
        return ("Connect", event.hostname, event.family, event.address)
    if isinstance(event, ev.Helo):
        return ("Helo", event.name)
    if isinstance(event, ev.MailFrom | ev.Rcpt):
        return (type(event).__name__, event.address, event.args)
    if isinstance(event, ev.Header):
        return ("Header", event.name, event.value)
    if isinstance(event, ev.Unknown):
        return ("Unknown", event.command)
    if isinstance(event, ev.Body):
        return ("Body", event.chunk)
    if isinstance(event, ev.ConnectionClosed):
        return ("ConnectionClosed", event.reason, event.error)
    return (type(event).__name__,)


HEADERS = [
    ("Header", b"From", b"Some One <someone@sender.test>"),
    ("Header", b"To", b"<someone@receiver.test>"),
    ("Header", b"Subject", b"capture"),
    ("Header", b"Date", b"Mon, 01 Jan 2024 00:00:00 +0000"),
    ("Header", b"Message-ID", b"<capture@sender.test>"),
    ("Header", b"X-Folded", b"first part\n\tsecond part"),  # the MTAs send folds as LF TAB
]
NEGOTIATED = ("Negotiate", 6, "0x518")  # NORCPT, NOBODY, NOUNKNOWN, SKIP: as libmilter answered
ENVELOPE = [
    ("MailFrom", b"<someone@sender.test>", ()),
    ("Data",),  # no RCPT: the milter asked not to get it (its macros still arrive)
]
END = [("EndOfHeaders",), ("EndOfMessage",)]


def numbered_message(number: bytes) -> list[tuple[object, ...]]:
    """The events of message ``number`` of two in one session (Subject: capture N)."""
    fields = [h if h[1] != b"Subject" else (*h[:2], b"capture " + number) for h in HEADERS]
    return [("MailFrom", b"<someone@sender.test>", (b"size=223",)), ("Data",), *fields, *END]


EXPECTED_EVENTS: dict[str, list[tuple[object, ...]]] = {
    # Postfix sends HELO again after STARTTLS, with an ABORT between (no transaction: dropped),
    # and two ABORTs after the accepted message before QUIT (dropped as libmilter drops them).
    "postfix37-tls-cert": [
        NEGOTIATED,
        ("Connect", b"[127.0.0.1]", "4", b"127.0.0.1"),
        ("Helo", b"out.sender.test"),
        ("Helo", b"out.sender.test"),
        *ENVELOPE,
        *HEADERS,
        *END,
        ("Quit",),
        ("ConnectionClosed", "quit", False),
    ],
    # Every step and every kind of answer (tests/support/full_milter.py): the unknown command,
    # both recipients (one refused with a two-line reply), the body, header changes, quarantine.
    "postfix37-full-libmilter": [
        ("Negotiate", 6, "0x400"),
        ("Connect", b"[127.0.0.1]", "4", b"127.0.0.1"),
        ("Helo", b"out.sender.test"),
        ("Unknown", b"XYZZY"),
        ("MailFrom", b"<someone@sender.test>", ()),
        ("Rcpt", b"<reject@receiver.test>", ()),
        ("Rcpt", b"<someone@receiver.test>", ()),
        ("Data",),
        *HEADERS,
        ("EndOfHeaders",),
        ("Body", b"Body line.\r\n.Dot line.\r\n"),  # dot-stuffing undone by the MTA
        ("EndOfMessage",),
        ("Quit",),
        ("ConnectionClosed", "quit", False),
    ],
    # One SMTP session, two messages: one milter connection; the ABORT after each accepted
    # message is dropped (no transaction), MAIL FROM carries Postfix's SIZE parameter.
    "postfix37-tls-two-messages": [
        NEGOTIATED,
        ("Connect", b"[127.0.0.1]", "4", b"127.0.0.1"),
        ("Helo", b"out.sender.test"),
        ("Helo", b"out.sender.test"),
        *[event for number in (b"1", b"2") for event in numbered_message(number)],
        ("Quit",),
        ("ConnectionClosed", "quit", False),
    ],
    "postfix37-plain": [
        NEGOTIATED,
        ("Connect", b"[127.0.0.1]", "4", b"127.0.0.1"),
        ("Helo", b"out.sender.test"),
        *ENVELOPE,
        *HEADERS,
        *END,
        ("Quit",),
        ("ConnectionClosed", "quit", False),
    ],
    "sendmail817-tls-cert": [
        NEGOTIATED,
        ("Connect", b"localhost", "4", b"127.0.0.1"),
        ("Helo", b"out.sender.test"),
        ("Helo", b"out.sender.test"),
        *ENVELOPE,
        *HEADERS,
        *END,
        ("Quit",),
        ("ConnectionClosed", "quit", False),
    ],
    "miltertest-conversation": [
        NEGOTIATED,
        ("Connect", b"out.sender.test", "4", b"192.0.2.25"),
        ("Helo", b"out.sender.test"),
        ("MailFrom", b"<a@sender.test>", ()),
        ("Data",),
        ("Header", b"From", b"a@sender.test"),
        ("Header", b"Subject", b"bench 1"),
        *END,
        ("Quit",),
        ("ConnectionClosed", "quit", False),
    ],
}


def test_every_capture_has_expectations() -> None:
    assert sorted(EXPECTED_EVENTS) == CAPTURES


@pytest.mark.parametrize("size", READ_SIZES, ids=lambda s: f"read{s or 'all'}")
@pytest.mark.parametrize("name", CAPTURES)
def test_capture_replays_byte_for_byte(name: str, size: int) -> None:
    result, recorded, answers = replay(name, size)
    assert [summary(e) for e in result.events] == EXPECTED_EVENTS[name]
    assert result.answered == answers  # every libmilter answer was asked for, in order
    assert result.output == recorded  # option negotiation, continues, header insert, accept


TLS: dict[str, bytes | None] = {"{tls_version}": b"TLSv1.3", "{cert_subject}": b"out.sender.test"}
POSTFIX_TLS_ISSUER = {"{cert_issuer}": b"Test Intermediate CA"}
POSTFIX_CONNECT = {"j": b"mx.receiver.test", "{daemon_name}": b"mx.receiver.test",
                   "{daemon_addr}": b"127.0.0.1", "v": b"Postfix 3.7.11"}  # fmt: skip
NO_TLS: dict[str, bytes | None] = {"{tls_version}": None, "{cert_subject}": None}

# (event type, which one of that type, {macro: value visible then (None: not visible)})
EXPECTED_MACROS: dict[str, list[tuple[str, int, dict[str, bytes | None]]]] = {
    "postfix37-tls-cert": [
        ("Connect", 0, {**POSTFIX_CONNECT, **NO_TLS}),
        ("Helo", 0, NO_TLS),  # the HELO before STARTTLS
        ("Helo", 1, {**TLS, **POSTFIX_TLS_ISSUER}),  # the HELO stage's set is replaced
        ("MailFrom", 0, {**TLS, **POSTFIX_CONNECT, "{rcpt_addr}": None, "i": None}),
        ("Data", 0, {"{rcpt_addr}": b"someone@receiver.test", "i": b"E211621016F"}),
        ("Header", 5, {"i": b"E211621016F", **TLS}),
        ("EndOfHeaders", 0, {"i": b"E211621016F"}),
        ("EndOfMessage", 0, {"i": b"E211621016F", **TLS, "{rcpt_mailer}": b"smtp"}),
    ],
    "postfix37-full-libmilter": [
        ("Helo", 0, {"j": b"mx.receiver.test", "v": b"Postfix 3.7.11"}),  # empty packet dropped
        ("Unknown", 0, {"{mail_addr}": None, "j": b"mx.receiver.test"}),
        (
            "Rcpt",
            0,
            {"{rcpt_addr}": b"reject@receiver.test", "{mail_addr}": b"someone@sender.test"},
        ),
        ("Rcpt", 1, {"{rcpt_addr}": b"someone@receiver.test"}),
        ("Body", 0, {"i": b"1C1CB20E7DC", "{mail_host}": b"[127.0.0.1]:45215"}),
        ("EndOfMessage", 0, {"i": b"1C1CB20E7DC", "{rcpt_addr}": b"someone@receiver.test"}),
    ],
    "postfix37-tls-two-messages": [
        ("EndOfMessage", 0, {"i": b"AA2D121086F", **TLS}),
        # the second MAIL clears the first message's RCPT, DATA, EOH and EOM macros
        ("MailFrom", 1, {"i": None, "{rcpt_addr}": None, **TLS, **POSTFIX_CONNECT}),
        ("Data", 1, {"i": b"AD1E0210870", "{rcpt_addr}": b"someone@receiver.test"}),
        ("Header", 11, {"i": b"AD1E0210870"}),
        ("EndOfMessage", 1, {"i": b"AD1E0210870", **TLS}),
    ],
    "postfix37-plain": [
        ("Helo", 0, {**NO_TLS, "j": b"mx.receiver.test"}),
        ("MailFrom", 0, NO_TLS),
        ("EndOfMessage", 0, {**NO_TLS, "{rcpt_addr}": b"someone@receiver.test"}),
    ],
    "sendmail817-tls-cert": [
        ("Connect", 0, {"j": b"mx.receiver.test", "{client_addr}": b"127.0.0.1", **NO_TLS}),
        ("Helo", 1, {**TLS, "{cert_subject}": b"/CN=out.sender.test", "{verify}": b"OK"}),
        ("MailFrom", 0, {"{cert_issuer}": b"/CN=Test+20Intermediate+20CA", "{verify}": b"OK"}),
        ("EndOfMessage", 0, {"{msg_id}": b"<capture@sender.test>", "{verify}": b"OK"}),
    ],
    "miltertest-conversation": [
        ("Helo", 0, NO_TLS),
        ("MailFrom", 0, {**TLS, "{cert_issuer}": b"Test CA", "i": b"Q1"}),
        ("EndOfMessage", 0, {**TLS, "i": b"Q1"}),  # MAIL's macros stay visible to the end
    ],
}


def test_every_capture_has_macro_expectations() -> None:
    assert sorted(EXPECTED_MACROS) == CAPTURES


@pytest.mark.parametrize("size", (1, 0), ids=("read1", "readall"))
@pytest.mark.parametrize("name", CAPTURES)
def test_capture_macros_visible_as_libmilter_shows_them(name: str, size: int) -> None:
    events = replay(name, size)[0].events
    for kind, nth, expected in EXPECTED_MACROS[name]:
        event = [e for e in events if type(e).__name__ == kind][nth]
        seen = {macro: event.macros.get(macro) for macro in expected}
        assert seen == expected, f"{kind} #{nth}"


def test_stage_sets_are_kept_apart() -> None:
    """Sendmail's {verify} arrives at HELO and at MAIL: each stage keeps its own set."""
    events = replay("sendmail817-tls-cert", 4096)[0].events
    mail = next(e for e in events if isinstance(e, ev.MailFrom))
    assert mail.macros.stage(Stage.HELO)[b"{verify}"] == b"OK"
    assert mail.macros.stage(Stage.ENVFROM)[b"{verify}"] == b"OK"
    assert mail.macros.stage(Stage.ENVRCPT) == {}


def test_asyncio_captures_cover_the_same_cases() -> None:
    assert [c for c in CAPTURES if c not in LIBMILTER_ONLY] == ASYNCIO_CAPTURES


@pytest.mark.parametrize("size", (1, 0), ids=("read1", "readall"))
@pytest.mark.parametrize("name", ASYNCIO_CAPTURES)
def test_asyncio_capture_replays_byte_for_byte(name: str, size: int) -> None:
    """The asyncio driver's bytes on a real MTA connection are what the core alone produces."""
    result, recorded, answers = replay(name, size, ASYNCIO)
    assert [summary(e) for e in result.events][1:] == EXPECTED_EVENTS[name][1:]
    assert summary(result.events[0]) == ("Negotiate", 6, "0x118")  # no SKIP: we never skip
    assert result.answered == answers
    assert result.output == recorded


@pytest.mark.parametrize("name", ASYNCIO_CAPTURES)
def test_asyncio_answers_as_libmilter_after_negotiation(name: str) -> None:
    """Same MTA, same message: every frame after option negotiation equals libmilter's.

    Option negotiation differs on purpose: the asyncio transport asks for the actions it uses
    (add and change header fields, macro lists: 0x111) where pymilter registers all of them
    (0x1ff), and it does not ask for SKIP (libmilter does when the MTA offers it).
    """
    ours = frames(read_capture(ASYNCIO / f"{name}.hex")[0].stream(TO_MTA))
    theirs = frames(read_capture(DATA / f"{name}.hex")[0].stream(TO_MTA))
    assert ours[1:] == theirs[1:]
    version, actions, protocol = struct.unpack(">III", ours[0][1][:12])
    assert (version, actions, protocol) == (6, 0x111, 0x118)
    assert ours[0][1][12:] == theirs[0][1][12:]  # the same macro lists
