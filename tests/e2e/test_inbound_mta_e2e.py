"""Our own milter transport (``mtls_milter.inbound``) against real Postfix 3.7 and Sendmail 8.17.

A small handler runs on the asyncio server (over ``inet:``, in a thread): at end of message it
inserts ``X-Inbound`` at the top with the macros it requested (queue id, TLS version) and the
HELO name, deletes the message's ``X-Remove`` field, and accepts; a MAIL FROM of ``<reject@…>``
gets a 550 with enhanced code and text. The delivered message and the SMTP replies show that
each MTA took every answer, and no conversation ended with a protocol error.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.mta import (
    MtaTls,
    PostfixHarness,
    SendmailHarness,
    require_mta,
    send_message,
)
from support.pki import TestPki

from mtls_milter.inbound import events as ev
from mtls_milter.inbound.asyncio_driver import MilterServer
from mtls_milter.inbound.negotiation import MilterOptions
from mtls_milter.inbound.replies import Action, ChangeHeader, InsertHeader, Reply, SmtpReply
from mtls_milter.inbound.wire import ActionFlag, Stage, text

pytestmark = pytest.mark.e2e

TLS_MACROS = ("{tls_version}", "i")
OPTIONS = MilterOptions(
    actions=ActionFlag.ADDHDRS | ActionFlag.CHGHDRS,
    macros={Stage.HELO: TLS_MACROS, Stage.ENVFROM: TLS_MACROS, Stage.EOM: ("i",)},
)
MESSAGE = (
    b"From: <someone@sender.test>\r\nTo: <someone@receiver.test>\r\nSubject: inbound\r\n"
    b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\nMessage-ID: <inbound@sender.test>\r\n"
    b"X-Remove: forged\r\n\r\nbody\r\n"
)


class Handler:
    """Per MTA connection: remembers HELO, answers as the module docstring says."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        self.helo = ""

    async def on_event(self, event: ev.Event) -> Reply | None:
        if isinstance(event, ev.Helo):
            self.helo = text(event.name)
        elif isinstance(event, ev.MailFrom) and event.address.startswith(b"<reject@"):
            return Reply.reject("550", "5.7.1", "inbound says no (100% sure)")
        elif isinstance(event, ev.MailFrom) and event.address.startswith(b"<later@"):
            lines = ("first line", "second line")
            return Reply(Action.TEMPFAIL, SmtpReply("451", "4.7.0", lines))
        elif isinstance(event, ev.EndOfMessage):
            value = (
                f"queue={event.macros.text('i')}; tls={event.macros.text('{tls_version}')}; "
                f"helo={self.helo}"
            )
            changes = (ChangeHeader("X-Remove", 1, ""), InsertHeader(0, "X-Inbound", value))
            return Reply(Action.ACCEPT, modifications=changes)
        elif isinstance(event, ev.ConnectionClosed) and event.error:
            self.problems.append(event.reason)
        return None


class ServerThread:
    """The asyncio milter server on its own loop in a daemon thread."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.server = MilterServer("inet:0@127.0.0.1", lambda peer: Handler(self.problems), OPTIONS)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.aclose(grace=2), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module", params=["postfix", "sendmail"])
def rig(
    request: pytest.FixtureRequest, pki: TestPki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[PostfixHarness | SendmailHarness, ServerThread]]:
    kind: str = request.param
    require_mta(kind)
    work: Path = tmp_path_factory.mktemp(f"inbound-{kind}")
    mx = pki.leaves["mx-server"]
    tls = MtaTls(cert_path=mx.chain_path, key_path=mx.key_path, ca_path=pki.root_path)
    with ServerThread() as milter:
        spec = f"inet:{milter.server.port}@127.0.0.1"
        harness: PostfixHarness | SendmailHarness
        if kind == "postfix":
            harness = PostfixHarness(
                work, milter_socket=spec, tls=tls, milter_default_action="tempfail"
            )
        else:
            harness = SendmailHarness(work, milter_socket=spec, tls=tls, milter_flags="T")
        with harness:
            yield harness, milter


def test_answers_reach_the_delivered_message(
    rig: tuple[PostfixHarness | SendmailHarness, ServerThread], caplog: pytest.LogCaptureFixture
) -> None:
    mta, milter = rig
    caplog.set_level(logging.WARNING, "mtls_milter")
    before = len(mta.sink.messages())
    outcome = send_message(
        mta.port, mail_from="someone@sender.test", rcpt="someone@receiver.test", message=MESSAGE
    )
    assert outcome.data is not None and outcome.data.code == 250, outcome
    delivered = mta.delivered(count=before + 1)[-1]
    first, rest = delivered.split(b"\r\n", 1)
    # The queue id ("i") and the TLS version come from the macros the MTA sent.
    assert re.fullmatch(
        rb"X-Inbound: queue=[0-9A-Za-z]+; tls=TLSv1\.3; helo=out\.sender\.test", first
    )
    assert b"X-Remove" not in delivered
    assert rest.endswith(MESSAGE.replace(b"X-Remove: forged\r\n", b""))
    assert milter.problems == []
    assert "milter conversation closed" not in caplog.text


def test_reject_with_reply_text(
    rig: tuple[PostfixHarness | SendmailHarness, ServerThread],
) -> None:
    mta, milter = rig
    outcome = send_message(
        mta.port, mail_from="reject@sender.test", rcpt="someone@receiver.test", message=MESSAGE
    )
    assert outcome.mail is not None and outcome.mail.code == 550
    # Sendmail puts the address in front; both show "%" once (it is sent doubled).
    assert outcome.mail.text.startswith("5.7.1 ")
    assert outcome.mail.text.endswith(" inbound says no (100% sure)"), outcome.mail.text
    assert milter.problems == []


def test_multi_line_tempfail(rig: tuple[PostfixHarness | SendmailHarness, ServerThread]) -> None:
    mta, milter = rig
    outcome = send_message(
        mta.port, mail_from="later@sender.test", rcpt="someone@receiver.test", message=MESSAGE
    )
    assert outcome.mail is not None and outcome.mail.code == 451
    lines = outcome.mail.text.splitlines()
    assert len(lines) == 2, outcome.mail.text
    assert lines[0].startswith("4.7.0 ") and lines[0].endswith("first line")
    assert lines[1] == "4.7.0 second line"
    assert milter.problems == []
