"""DMARC end to end (docs/dmarc.md): real Postfix (and Sendmail for the main cases) call the real
``mtls-milter serve`` daemon with ``[dmarc] enabled`` (asyncio, the default transport, on both
MTAs; pymilter on Postfix); DMARC and DKIM records live in the in-process test DNS server; DKIM
signatures are made here with dkimpy.

Each MTA runs two milters in sequence: first an "upstream" mtls-milter daemon with its own
authserv-id that verifies DKIM, then ours. That measures whether a milter sees the
Authentication-Results field an earlier milter added (``trusted-results`` mode depends on it):
the answer is asserted by test_earlier_milter_field_is_visible and written in docs/dmarc.md.
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from support.daemon import MilterDaemon
from support.dnsserver import TestDnsServer
from support.mta import (
    MtaTls,
    PostfixHarness,
    SendmailHarness,
    require_mta,
    send_message,
)
from support.pki import TestPki

pytestmark = pytest.mark.e2e

AUTHSERV_ID = "mx.receiver.test"
UPSTREAM_ID = "upstream.receiver.test"  # the earlier milter
RELAY_ID = "relay.receiver.test"  # a trusted id named in client-sent fields
RCPT = "someone@receiver.test"

KEY = rsa.generate_private_key(public_exponent=65537, key_size=1024)
KEY_PEM = KEY.private_bytes(
    serialization.Encoding.PEM,
    serialization.PrivateFormat.TraditionalOpenSSL,
    serialization.NoEncryption(),
)
KEY_PUBLIC = base64.b64encode(
    KEY.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
).decode()

Harness = PostfixHarness | SendmailHarness


def message(author: str, subject: str, *extra: str, sign: bool = False) -> bytes:
    head = (
        f"From: <{author}>\r\nTo: <{RCPT}>\r\nSubject: {subject}\r\n"
        f"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\nMessage-ID: <{subject}@test>\r\n"
        + "".join(f"{line}\r\n" for line in extra)
    ).encode()
    raw = head + b"\r\nBody line one.\r\n.Dot line.\r\n"
    if not sign:
        return raw
    domain = author.rpartition("@")[2].encode()
    return (
        bytes(dkim.sign(raw, b"s1", domain, KEY_PEM, include_headers=[b"from", b"subject"])) + raw
    )


@dataclass
class Rig:
    kind: str
    mta: Harness
    ours: MilterDaemon
    upstream: MilterDaemon
    pki: TestPki
    base: dict[str, dict[str, Any]]

    def send(self, raw: bytes, mail_from: str, leaf: str | None = "client") -> Any:
        kwargs: dict[str, Any] = {}
        if leaf is not None:
            issued = self.pki.leaves[leaf]
            kwargs.update(client_chain=issued.chain_path, client_key=issued.key_path)
        return send_message(self.mta.port, mail_from=mail_from, rcpt=RCPT, message=raw, **kwargs)

    def ours_field(self, raw: bytes, mail_from: str, leaf: str | None = "client") -> str:
        """Send; require 250; our field of the delivered message, unfolded."""
        before = len(self.mta.sink.messages())
        outcome = self.send(raw, mail_from, leaf)
        assert outcome.accepted, f"{outcome}\n{self.logs()}"
        delivered = self.mta.delivered(count=before + 1)[before]
        header = delivered.split(b"\r\n\r\n", 1)[0].decode("ascii")
        unfolded = re.sub(r"\r\n[ \t]", " ", header).split("\r\n")
        ours = [f for f in unfolded if f.startswith(f"Authentication-Results: {AUTHSERV_ID};")]
        assert len(ours) == 1, header
        return ours[0]

    def reconfigure(self, **dmarc: Any) -> None:
        config = {name: dict(keys) for name, keys in self.base.items()}
        config["dmarc"].update(dmarc)
        assert self.ours.reload(config), self.ours.log_tail()

    def restore(self) -> None:
        assert self.ours.reload(self.base), self.ours.log_tail()

    def logs(self) -> str:
        return f"{self.mta.log_text()[-3000:]}\n--- ours ---\n{self.ours.log_tail(3000)}"


@pytest.fixture(scope="module")
def zone() -> Iterator[TestDnsServer]:
    with TestDnsServer() as server:
        server.add("sender.test", 265, "10 out.sender.test.")
        server.add("_dmarc.sender.test", "TXT", '"v=DMARC1; p=reject"')
        server.add("quarantined.test", 265, "10 out.sender.test.")
        server.add("_dmarc.quarantined.test", "TXT", '"v=DMARC1; p=quarantine"')
        server.add("signer.test", "A", "192.0.2.1")  # no Client MX, no SPF
        server.add("_dmarc.signer.test", "TXT", '"v=DMARC1; p=reject"')
        server.add("s1._domainkey.signer.test", "TXT", f'"v=DKIM1; k=rsa; p={KEY_PUBLIC}"')
        yield server


def _config(zone: TestDnsServer, pki: TestPki, authserv_id: str, **dmarc: Any) -> Any:
    return {
        "milter": {"authserv_id": authserv_id, "transport": "asyncio"},
        "dns": {"nameservers": [zone.nameserver], "timeout": 1.0, "budget": 3.0},
        "tls": {"trust": [str(pki.root_path)]},
        "dmarc": {"enabled": True, **dmarc},
    }


def _harness(kind: str, work: Path, first: MilterDaemon, second: MilterDaemon, pki: TestPki) -> Any:
    mx = pki.leaves["mx-server"]
    tls = MtaTls(cert_path=mx.chain_path, key_path=mx.key_path, ca_path=pki.root_path)
    if kind == "postfix":
        both = " ".join(f"{{ {d.postfix_socket}, default_action=accept }}" for d in (first, second))
        return PostfixHarness(
            work, milter_socket=first.postfix_socket, tls=tls, extra_main_cf={"smtpd_milters": both}
        )
    second_filter = f"INPUT_MAIL_FILTER(`second', `S={second.socket}')dnl"
    return SendmailHarness(
        work, milter_socket=first.socket, tls=tls, milter_flags="", extra_mc=[second_filter]
    )


@pytest.fixture(
    scope="module",
    params=[("postfix", "asyncio"), ("sendmail", "asyncio"), ("postfix", "pymilter")],
    ids=["postfix-asyncio", "sendmail-asyncio", "postfix-pymilter"],
)
def rig(
    request: pytest.FixtureRequest,
    pki: TestPki,
    zone: TestDnsServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Rig]:
    kind, transport = request.param
    require_mta(kind)
    work = tmp_path_factory.mktemp(f"dmarc-{kind}-{transport}")
    base = _config(zone, pki, AUTHSERV_ID)
    base["milter"]["transport"] = transport  # ours; the upstream milter is always asyncio
    upstream_config = _config(zone, pki, UPSTREAM_ID, spf="off")
    with (
        MilterDaemon(work / "upstream", upstream_config) as upstream,
        MilterDaemon(work / "ours", base) as ours,
        _harness(kind, work / "mta", upstream, ours, pki) as mta,
    ):
        yield Rig(kind, mta, ours, upstream, pki, base)


# One MTA is enough for these cases (the milter code is the same): Postfix, on both transports.
postfix_only = pytest.mark.parametrize(
    "rig",
    [("postfix", "asyncio"), ("postfix", "pymilter")],
    ids=["postfix-asyncio", "postfix-pymilter"],
    indirect=True,
)


def test_mtls_pass_alone_passes_dmarc(rig: Rig) -> None:
    """No SPF record, no DKIM signature: the mtls pass aligns with the author domain."""
    got = rig.ours_field(message("someone@sender.test", "mtls-pass"), "someone@sender.test")
    assert got.startswith(f"Authentication-Results: {AUTHSERV_ID}; mtls=pass "), got
    assert got.endswith("; dmarc=pass (p=reject; aligned=mtls) header.from=sender.test"), got


def test_earlier_milter_field_is_visible(rig: Rig) -> None:
    """trusted-results mode takes the upstream milter's dkim=pass: visible on both MTAs."""
    rig.reconfigure(dkim="trusted-results", trusted_authserv_ids=[UPSTREAM_ID])
    try:
        raw = message("bob@signer.test", "earlier-milter", sign=True)
        got = rig.ours_field(raw, "bob@signer.test", leaf=None)
    finally:
        rig.restore()
    assert got.endswith("; dmarc=pass (p=reject; aligned=dkim) header.from=signer.test"), got


@postfix_only
def test_certificate_mismatch_fails_and_enforce_rejects(rig: Rig) -> None:
    raw = message("someone@sender.test", "mismatch")
    got = rig.ours_field(raw, "someone@sender.test", leaf="other-host")
    assert "; dmarc=fail (p=reject" in got and got.endswith("header.from=sender.test"), got
    rig.reconfigure(enforce=True)
    try:
        outcome = rig.send(
            message("someone@sender.test", "mismatch-enforced"), "someone@sender.test", "other-host"
        )
    finally:
        rig.restore()
    assert outcome.data is not None and outcome.data.code == 550, outcome
    assert outcome.data.text.startswith("5.7.1 DMARC policy of sender.test rejects"), outcome


@postfix_only
def test_quarantine_puts_the_message_on_hold(rig: Rig) -> None:
    assert isinstance(rig.mta, PostfixHarness)
    hold = rig.mta.queue_dir / "hold"
    before = set(hold.iterdir()) if hold.exists() else set()
    rig.reconfigure(enforce=True)
    try:
        raw = message("a@quarantined.test", "quarantine")
        outcome = rig.send(raw, "a@quarantined.test", "other-host")
    finally:
        rig.restore()
    assert outcome.accepted, outcome
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not set(hold.iterdir()) - before:
        time.sleep(0.1)
    assert set(hold.iterdir()) - before, rig.logs()


@postfix_only
def test_dkim_signed_message_passes_without_mtls(rig: Rig) -> None:
    raw = message("bob@signer.test", "dkim-signed", sign=True)
    got = rig.ours_field(raw, "bob@signer.test", leaf=None)
    assert "; dkim=pass header.d=signer.test header.s=s1;" in got, got
    assert got.endswith("; dmarc=pass (p=reject; aligned=dkim) header.from=signer.test"), got


@postfix_only
def test_trusted_results_from_a_trusted_and_an_untrusted_id(rig: Rig) -> None:
    rig.reconfigure(dkim="trusted-results", trusted_authserv_ids=[UPSTREAM_ID, RELAY_ID])
    try:
        trusted = f"Authentication-Results: {RELAY_ID}; dkim=pass header.d=signer.test"
        untrusted = "Authentication-Results: evil.test; dkim=pass header.d=signer.test"
        good = rig.ours_field(message("bob@signer.test", "trusted", trusted), "bob@signer.test")
        bad = rig.ours_field(message("bob@signer.test", "untrusted", untrusted), "bob@signer.test")
    finally:
        rig.restore()
    assert good.endswith("; dmarc=pass (p=reject; aligned=dkim) header.from=signer.test"), good
    assert "; dmarc=fail (p=reject" in bad, bad
