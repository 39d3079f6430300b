"""``mtls-milter explain`` on a message a real MTA rejected through the real daemon.

The operator's path: a partner says "you rejected my mail"; the MTA's log has the queue id of
the rejected message; ``mtls-milter explain QUEUEID --log <the daemon's log>`` finds the verdict
line, re-runs it and says why. Then the partner publishes its certificate's name in Client MX,
and the same command says that the message would pass now (exit 1: the world changed).
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.daemon import MilterDaemon
from support.dnsserver import TestDnsServer
from support.mta import MtaTls, PostfixHarness, SendmailHarness, require_mta, send_message
from support.pki import TestPki

pytestmark = pytest.mark.e2e

MESSAGE = (
    b"From: <someone@sender.test>\r\nTo: <someone@receiver.test>\r\nSubject: explain\r\n"
    b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\nMessage-ID: <explain@sender.test>\r\n\r\nHi.\r\n"
)
# The MTA's own log line for the rejected message: Postfix "QUEUEID: milter-reject:
# END-OF-MESSAGE ...", Sendmail "QUEUEID: Milter: data, reject=550 5.7.1 ...".
REJECTED = re.compile(r"\b([0-9A-Za-z]{6,}): (?:milter-reject|Milter: data, reject=)")


@pytest.fixture
def sender_zone() -> Iterator[TestDnsServer]:
    with TestDnsServer() as server:
        server.add("sender.test", 265, "10 out.sender.test.")
        yield server


def _harness(
    kind: str, work: Path, daemon: MilterDaemon, pki: TestPki
) -> PostfixHarness | SendmailHarness:
    mx = pki.leaves["mx-server"]
    tls = MtaTls(cert_path=mx.chain_path, key_path=mx.key_path, ca_path=pki.root_path)
    if kind == "postfix":
        return PostfixHarness(
            work, milter_socket=daemon.postfix_socket, tls=tls, milter_default_action="accept"
        )
    return SendmailHarness(work, milter_socket=daemon.socket, tls=tls, milter_flags="")


def explain(daemon: MilterDaemon, dns: TestDnsServer, queue_id: str) -> tuple[int, str]:
    command = [
        sys.executable, "-m", "mtls_milter", "explain", queue_id,
        "--log", str(daemon.log_path), "--config", str(daemon.config_path),
        "--dns", dns.nameserver,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.stderr == ""
    return done.returncode, done.stdout


@pytest.mark.parametrize("kind", ["postfix", "sendmail"])
def test_a_rejected_message_is_explained_from_the_logs(
    kind: str, pki: TestPki, sender_zone: TestDnsServer, tmp_path: Path
) -> None:
    require_mta(kind)
    config: dict[str, dict[str, Any]] = {
        "dns": {"nameservers": [sender_zone.nameserver], "timeout": 1.0, "budget": 3.0},
        "tls": {"trust": [str(pki.root_path)]},
        "policy": {"on_fail": "reject"},
    }
    leaf = pki.leaves["other-host"]  # names out.other.test: not a published host
    with (
        MilterDaemon(tmp_path / "milter", config) as daemon,
        _harness(kind, tmp_path / "mta", daemon, pki) as mta,
    ):
        outcome = send_message(
            mta.port,
            mail_from="someone@sender.test",
            rcpt="someone@receiver.test",
            message=MESSAGE,
            starttls=True,
            client_chain=leaf.chain_path,
            client_key=leaf.key_path,
        )
        assert outcome.final.code == 550, outcome
        found = REJECTED.search(mta.log_text())
        assert found is not None, mta.log_text()[-3000:]
        queue_id = found[1]

        status, out = explain(daemon, sender_zone, queue_id)
        assert status == 0, out
        assert f"queue id {queue_id}:" in out
        assert "mtls=fail: no certificate name matches Client MX [name_mismatch]" in out
        assert "   action reject\n" in out
        assert "out.other.test vs out.sender.test: no, a different name" in out
        assert "action under the current policy: reject" in out
        assert "agrees with the log" in out

        sender_zone.add("sender.test", 265, "20 out.other.test.")  # the partner's fix
        status, out = explain(daemon, sender_zone, queue_id)
        assert status == 1, out
        assert "out.other.test vs out.other.test: MATCH, the same name" in out
        assert "CHANGED: result fail (name_mismatch) then, pass (ok) now" in out
        assert "action under the current policy: accept" in out
