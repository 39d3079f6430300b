"""A live capture: real Postfix 3.7 talks to ``mtls-milter serve`` (asyncio transport) through
the recording proxy (tests/support/milter_capture.py).

The message is delivered with our header, and the recorded conversation replays through the
protocol core at read sizes 1 and whole: same events, same answers, the daemon's bytes exactly.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from support.daemon import MilterDaemon
from support.dnsserver import TestDnsServer
from support.milter_capture import TO_MILTER, CaptureProxy, Conversation
from support.milter_replay import replay_conversation
from support.mta import MtaTls, PostfixHarness, missing_mta, send_message
from support.pki import TestPki

from mtls_milter.inbound import events as ev

pytestmark = pytest.mark.e2e

MESSAGE = (
    b"From: Some One <someone@sender.test>\r\n"
    b"To: <someone@receiver.test>\r\n"
    b"Subject: live capture\r\n"
    b"Message-ID: <live-capture@sender.test>\r\n"
    b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n"  # else Postfix adds one
    b"\r\n"
    b"Body.\r\n"
)
PASS_FIELD = (
    b"Authentication-Results: mx.receiver.test; mtls=pass (evidence=mta; matched\r\n"
    b"\tout.sender.test in client-mx) smtp.mailfrom=sender.test\r\n"
)


@pytest.fixture(scope="module")
def captured(
    pki: TestPki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[bytes, Conversation]]:
    """(the delivered message, the recorded milter conversation) for one TLS message."""
    reason = missing_mta("postfix")
    if reason:
        pytest.skip(f"cannot run postfix: {reason}")
    work = tmp_path_factory.mktemp("capture-e2e")
    mx = pki.leaves["mx-server"]
    tls = MtaTls(cert_path=mx.chain_path, key_path=mx.key_path, ca_path=pki.root_path)
    with TestDnsServer() as dns:
        dns.add("sender.test", 265, "10 out.sender.test.")
        config: dict[str, dict[str, Any]] = {
            "milter": {"authserv_id": "mx.receiver.test", "transport": "asyncio"},
            "dns": {"nameservers": [dns.nameserver], "timeout": 1.0, "budget": 3.0},
            "tls": {"trust": [str(pki.root_path)]},
        }
        with (
            MilterDaemon(work / "milter", config) as daemon,
            CaptureProxy(("127.0.0.1", daemon.port)) as proxy,
            PostfixHarness(work / "mta", milter_socket=proxy.postfix_socket, tls=tls) as mta,
        ):
            leaf = pki.leaves["client"]
            outcome = send_message(
                mta.port,
                mail_from="someone@sender.test",
                rcpt="someone@receiver.test",
                message=MESSAGE,
                client_chain=leaf.chain_path,
                client_key=leaf.key_path,
            )
            assert outcome.accepted, f"{outcome}\n{mta.log_text()[-3000:]}"
            delivered = mta.delivered()[0]
            # Earlier connections are the harness's start-up probes (a greeting, then QUIT).
            (conversation,) = [
                c for c in proxy.conversations if b"live capture" in c.stream(TO_MILTER)
            ]
            _wait_ended(conversation)
            yield delivered, conversation


def _wait_ended(conversation: Conversation, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not conversation.ended and time.monotonic() < deadline:
        time.sleep(0.05)
    assert conversation.ended, "Postfix kept the milter connection open"


def test_header_reaches_the_delivered_message(captured: tuple[bytes, Conversation]) -> None:
    delivered, _ = captured
    assert delivered.startswith(PASS_FIELD), delivered[:400]
    assert delivered.endswith(MESSAGE), delivered[-400:]


@pytest.mark.parametrize("size", (1, 0), ids=("read1", "readall"))
def test_live_capture_replays_byte_for_byte(
    captured: tuple[bytes, Conversation], size: int
) -> None:
    _, conversation = captured
    result = replay_conversation(conversation, size)
    assert result.output == result.recorded
    assert result.answered == result.recorded_answers
    kinds = [type(e).__name__ for e in result.events]
    assert kinds[:2] == ["Negotiate", "Connect"]
    assert kinds[-2:] == ["Quit", "ConnectionClosed"]
    eom = next(e for e in result.events if isinstance(e, ev.EndOfMessage))
    assert eom.macros.get("{cert_subject}") == b"out.sender.test"
    headers = [(e.name, e.value) for e in result.events if isinstance(e, ev.Header)]
    assert (b"Subject", b"live capture") in headers
