"""The content-filter reinjection recipe of docs/operations.md, on a real Postfix 3.7.

A second smtpd (the port a content filter hands mail back on) runs with
``-o receive_override_options=no_milters``: mail arriving there is not judged again (no
``mtls=fail`` for the filter's own hop), while the public port still gets the header.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.daemon import MilterDaemon
from support.dnsserver import TestDnsServer
from support.mta import MtaTls, PostfixHarness, missing_mta, send_message
from support.pki import TestPki
from support.ports import free_port

pytestmark = pytest.mark.e2e

RECIPE = "-o receive_override_options=no_milters"


class ReinjectingPostfix(PostfixHarness):
    """The harness's Postfix plus a reinjection smtpd on ``reinject_port``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reinject_port = free_port()

    def _write_config(self) -> None:
        super()._write_config()
        master = self.config_dir / "master.cf"
        line = f"127.0.0.1:{self.reinject_port} inet n - n - - smtpd {RECIPE}\n"
        stat = master.stat()  # keep the harness's back-dated mtime (fast start-up)
        master.write_text(master.read_text() + line)
        os.utime(master, (stat.st_atime, stat.st_mtime))


def _message(subject: str) -> bytes:
    return (
        f"From: <someone@sender.test>\r\nTo: <someone@receiver.test>\r\nSubject: {subject}\r\n"
        f"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\nMessage-ID: <{subject}@sender.test>\r\n"
        "\r\nbody\r\n"
    ).encode()


@pytest.fixture(scope="module")
def postfix(pki: TestPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReinjectingPostfix]:
    reason = missing_mta("postfix")
    if reason:
        pytest.skip(f"cannot run postfix: {reason}")
    work: Path = tmp_path_factory.mktemp("relays")
    with TestDnsServer() as dns:
        dns.add("sender.test", 265, "10 out.sender.test.")
        config: dict[str, dict[str, Any]] = {
            "milter": {"authserv_id": "mx.receiver.test"},
            "dns": {"nameservers": [dns.nameserver], "timeout": 1.0, "budget": 3.0},
            "tls": {"trust": [str(pki.root_path)]},
        }
        with MilterDaemon(work / "milter", config) as daemon:
            mx = pki.leaves["mx-server"]
            tls = MtaTls(cert_path=mx.chain_path, key_path=mx.key_path, ca_path=pki.root_path)
            with ReinjectingPostfix(
                work / "mta", milter_socket=daemon.postfix_socket, tls=tls
            ) as harness:
                yield harness


@pytest.mark.parametrize("reinjected", [False, True], ids=["public-port", "reinjection-port"])
def test_only_the_public_port_is_judged(
    reinjected: bool, postfix: ReinjectingPostfix, pki: TestPki
) -> None:
    before = len(postfix.sink.messages())
    # a content filter talks plain SMTP without a client certificate: at the public port that
    # is "fail" for a domain that publishes Client MX
    outcome = send_message(
        postfix.reinject_port if reinjected else postfix.port,
        mail_from="someone@sender.test",
        rcpt="someone@receiver.test",
        message=_message(f"relay-{reinjected}"),
        starttls=False,
    )
    assert outcome.accepted, f"{outcome}\n{postfix.log_text()[-3000:]}"
    delivered = postfix.delivered(count=before + 1)[before]
    if reinjected:
        assert b"Authentication-Results:" not in delivered, delivered[:400]
        assert delivered.startswith(b"Received: from "), delivered[:400]
    else:
        assert delivered.startswith(b"Authentication-Results: mx.receiver.test; mtls=fail"), (
            delivered[:400]
        )
