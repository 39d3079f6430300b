"""DMARC through both milter transports (docs/dmarc.md): what the MTA is asked for (the body
only for DKIM verified here, the quarantine action), the header field, the SMTP reply of a
p=reject failure, the quarantine of a p=quarantine failure, and the verdict log line. The
pymilter adapter runs against the fake libmilter context of test_milter_adapter.py; the asyncio
adapter behind the real asyncio server, with raw milter frames."""

from __future__ import annotations

import base64
import logging
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import dkim
import Milter
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from support.dnsserver import TestDnsServer
from support.pki import TestPki
from test_asyncio_handler import SENDMAIL_OTHER, frame, macros, run_one, strings
from test_milter_adapter import (
    ACCEPT,
    AUTHSERV_ID,
    POSTFIX_OTHER_CN,
    POSTFIX_TRUSTED,
    REJECT,
    Conversation,
    FakeCtx,
    _one_verdict,
)

from mtls_milter.config import config_from_mapping
from mtls_milter.engine import Engine
from mtls_milter.inbound.asyncio_driver import MilterServer
from mtls_milter.inbound.asyncio_handler import OPTIONS, handler_factory, options_for
from mtls_milter.inbound.session import EngineHolder, MilterSession
from mtls_milter.inbound.wire import ActionFlag, ProtocolFlag

DKIM_KEY = rsa.generate_private_key(public_exponent=65537, key_size=1024)
DKIM_PEM = DKIM_KEY.private_bytes(
    serialization.Encoding.PEM,
    serialization.PrivateFormat.TraditionalOpenSSL,
    serialization.NoEncryption(),
)
DKIM_PUBLIC = base64.b64encode(
    DKIM_KEY.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
).decode()
FROM = "Alice <alice@sender.test>"


@pytest.fixture
def zone(dns_server: TestDnsServer) -> TestDnsServer:
    dns_server.add("sender.test", 265, "10 out.sender.test.")
    dns_server.add("_dmarc.sender.test", "TXT", '"v=DMARC1; p=reject"')
    dns_server.add("_dmarc.quarantined.test", "TXT", '"v=DMARC1; p=quarantine"')
    dns_server.add("quarantined.test", 265, "10 out.sender.test.")
    dns_server.add("signer.test", "A", "192.0.2.1")
    dns_server.add("_dmarc.signer.test", "TXT", '"v=DMARC1; p=reject"')
    dns_server.add("s1._domainkey.signer.test", "TXT", f'"v=DKIM1; k=rsa; p={DKIM_PUBLIC}"')
    return dns_server


@pytest.fixture
def executor() -> Any:
    pool = ThreadPoolExecutor(4)
    yield pool
    pool.shutdown(cancel_futures=True)


@pytest.fixture(autouse=True)
def _info_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mtls_milter")


def engine(zone: TestDnsServer, pki: TestPki, **dmarc: Any) -> Engine:
    raw: dict[str, dict[str, Any]] = {
        "milter": {"authserv_id": AUTHSERV_ID},
        "dns": {"nameservers": [zone.nameserver], "timeout": 1.0, "budget": 2.0},
        "tls": {"trust": [str(pki.root_path)]},
        "dmarc": {"enabled": True, "spf": "off", **dmarc},
    }
    return Engine.from_config(config_from_mapping(raw))


class QuarantineCtx(FakeCtx):
    def __init__(self) -> None:
        super().__init__()
        self.quarantined: list[str] = []

    def quarantine(self, reason: str) -> None:
        self.quarantined.append(reason)


def started(eng: Engine, executor: ThreadPoolExecutor) -> Conversation:
    conv = Conversation(eng, executor)
    conv.ctx = QuarantineCtx()
    conv.milter._setctx(conv.ctx)
    return conv.start()


def our_field(conv: Conversation) -> str:
    added = conv.ctx.added()
    assert len(added) == 1, added
    return added[0][1]


def signed_message(body: bytes = b"Hello.\r\n") -> tuple[list[tuple[str, str]], bytes]:
    header = b"From: Bob <bob@signer.test>\r\nSubject: signed\r\n"
    signature = dkim.sign(
        header + b"\r\n" + body, b"s1", b"signer.test", DKIM_PEM, include_headers=[b"from"]
    )
    name, _, value = bytes(signature).rstrip(b"\r\n").partition(b": ")
    fields = [
        (name.decode(), value.decode().replace("\r\n", "\n")),
        ("From", "Bob <bob@signer.test>"),
        ("Subject", "signed"),
    ]
    return fields, body


# ---------------------------------------------------------------------------------------------
# pymilter


def test_pymilter_mtls_pass_gives_dmarc_pass_aligned_mtls(
    zone: TestDnsServer, pki: TestPki, executor: ThreadPoolExecutor, caplog: Any
) -> None:
    conv = started(engine(zone, pki, dkim="off"), executor)
    assert conv.message("<alice@sender.test>", POSTFIX_TRUSTED, [("From", FROM)]) == ACCEPT
    value = our_field(conv)
    assert value.startswith(f"{AUTHSERV_ID}; mtls=pass ")
    assert value.endswith("; dmarc=pass (p=reject; aligned=mtls) header.from=sender.test")
    record = _one_verdict(caplog)["dmarc"]
    assert record["result"] == "pass" and record["aligned"] == ["mtls"]
    assert record["action"] == "none"


def test_pymilter_mtls_fail_with_enforce_rejects_with_the_author_domain(
    zone: TestDnsServer, pki: TestPki, executor: ThreadPoolExecutor, caplog: Any
) -> None:
    conv = started(engine(zone, pki, dkim="off", enforce=True), executor)
    assert conv.message("<alice@sender.test>", POSTFIX_OTHER_CN, [("From", FROM)]) == REJECT
    assert conv.ctx.reply == (
        "550",
        "5.7.1",
        "DMARC policy of sender.test rejects this message (no aligned authentication)",
    )
    assert "dmarc=fail (p=reject" in our_field(conv)
    line = _one_verdict(caplog)
    assert line["action"] == "reject" and line["dmarc"]["action"] == "reject"


def test_pymilter_without_enforce_only_annotates(
    zone: TestDnsServer, pki: TestPki, executor: ThreadPoolExecutor
) -> None:
    conv = started(engine(zone, pki, dkim="off"), executor)
    assert conv.message("<alice@sender.test>", POSTFIX_OTHER_CN, [("From", FROM)]) == ACCEPT
    assert conv.ctx.reply is None
    assert "; dmarc=fail (p=reject" in our_field(conv)


def test_pymilter_mtls_reject_stands_before_dmarc(
    zone: TestDnsServer, pki: TestPki, executor: ThreadPoolExecutor
) -> None:
    eng = engine(zone, pki, dkim="off", enforce=True)
    raw = {**_raw(eng), "policy": {"on_fail": "reject"}}
    conv = started(Engine.from_config(config_from_mapping(raw)), executor)
    assert conv.message("<alice@sender.test>", POSTFIX_OTHER_CN, [("From", FROM)]) == REJECT
    assert conv.ctx.reply is not None and conv.ctx.reply[2].startswith("mtls=fail: ")


def _raw(eng: Engine) -> dict[str, dict[str, Any]]:
    config = eng.config
    return {
        "milter": {"authserv_id": AUTHSERV_ID},
        "dns": {"nameservers": list(config.dns.nameservers), "timeout": 1.0, "budget": 2.0},
        "tls": {"trust": list(config.tls.trust)},
        "dmarc": {"enabled": True, "spf": "off", "dkim": "off", "enforce": True},
    }


def test_pymilter_quarantine(
    zone: TestDnsServer, pki: TestPki, executor: ThreadPoolExecutor, caplog: Any
) -> None:
    conv = started(engine(zone, pki, dkim="off", enforce=True), executor)
    author = [("From", "<a@quarantined.test>")]
    assert conv.message("<a@quarantined.test>", POSTFIX_OTHER_CN, author) == ACCEPT
    assert conv.ctx.quarantined == ["dmarc=fail, p=quarantine"]  # type: ignore[attr-defined]
    assert _one_verdict(caplog)["action"] == "quarantine"


def test_pymilter_dkim_signed_message_passes_without_mtls(
    zone: TestDnsServer, pki: TestPki, executor: ThreadPoolExecutor
) -> None:
    conv = started(engine(zone, pki), executor)
    opts = [Milter.CURR_ACTS, 0x1FFFFF, 0, 0]
    conv.milter.negotiate(opts)
    assert not opts[1] & Milter.P_NOBODY  # DKIM verified here: the body is asked for
    fields, body = signed_message()
    assert conv.mail("<bob@signer.test>", {}) == Milter.CONTINUE
    for name, value in fields:
        conv.header(name, value)
    conv.milter.body(body[:3])
    conv.milter.body(body[3:])
    assert conv.eom() == ACCEPT
    value = our_field(conv)
    assert "mtls=none" in value
    assert "; dkim=pass header.d=signer.test header.s=s1" in value
    assert value.endswith("; dmarc=pass (p=reject; aligned=dkim) header.from=signer.test")


def test_pymilter_body_is_not_asked_for_without_dkim_verify(
    zone: TestDnsServer, pki: TestPki, executor: ThreadPoolExecutor
) -> None:
    for eng in (engine(zone, pki, dkim="off"), Engine.from_config(config_from_mapping({}))):
        conv = Conversation(eng, executor)
        opts = [Milter.CURR_ACTS, 0x1FFFFF, 0, 0]
        conv.milter.negotiate(opts)
        assert opts[1] & Milter.P_NOBODY


def test_pymilter_forged_dmarc_field_of_our_id_is_deleted(
    zone: TestDnsServer, pki: TestPki, executor: ThreadPoolExecutor
) -> None:
    conv = started(engine(zone, pki, dkim="off"), executor)
    forged = f"{AUTHSERV_ID}; dmarc=pass header.from=sender.test"
    headers = [("Authentication-Results", forged), ("From", FROM)]
    assert conv.message("<alice@sender.test>", POSTFIX_OTHER_CN, headers) == ACCEPT
    assert conv.ctx.deletions() == [1]


# ---------------------------------------------------------------------------------------------
# asyncio


def test_asyncio_options_follow_the_dmarc_configuration(zone: TestDnsServer, pki: TestPki) -> None:
    assert options_for(Engine.from_config(config_from_mapping({})).config) is OPTIONS
    verify = options_for(engine(zone, pki).config)
    assert not verify.protocol & ProtocolFlag.NOBODY
    assert verify.actions & ActionFlag.QUARANTINE
    trusted = options_for(
        engine(zone, pki, dkim="trusted-results", trusted_authserv_ids=["mx.up.test"]).config
    )
    assert trusted.protocol & ProtocolFlag.NOBODY and trusted.actions & ActionFlag.QUARANTINE


def serve(tmp_path: Path, eng: Engine, executor: ThreadPoolExecutor) -> MilterServer:
    holder = EngineHolder(eng)
    factory = handler_factory(lambda: MilterSession(holder, executor), executor)
    return MilterServer(f"unix:{tmp_path / 'm.sock'}", factory, options_for(eng.config))


def asyncio_conversation(
    tls: dict[str, str], sender: bytes, fields: list[tuple[str, str]], body: bytes = b""
) -> bytes:
    parts = [
        frame(b"O", struct.pack(">III", 6, 0x1FF, 0x1FFFFF)),
        macros(b"H", {"j": AUTHSERV_ID, **tls}),
        strings(b"H", b"out.sender.test"),
        strings(b"M", sender),
        frame(b"T"),
        *(strings(b"L", n.encode(), v.encode()) for n, v in fields),
        frame(b"N"),
        *([frame(b"B", body)] if body else []),
        frame(b"E"),
        frame(b"Q"),
    ]
    return b"".join(parts)


def test_asyncio_reject_and_field(
    tmp_path: Path, zone: TestDnsServer, pki: TestPki, executor: ThreadPoolExecutor
) -> None:
    server = serve(tmp_path, engine(zone, pki, dkim="off", enforce=True), executor)
    got = run_one(
        server, asyncio_conversation(SENDMAIL_OTHER, b"<a@sender.test>", [("From", FROM)])
    )
    reply = [p for c, p in got if c == b"y"]
    assert reply == [
        b"550 5.7.1 DMARC policy of sender.test rejects this message (no aligned authentication)\0"
    ]
    inserted = [p for c, p in got if c == b"i"]
    assert len(inserted) == 1 and b"; dmarc=fail (p=reject" in inserted[0].replace(b"\n\t", b" ")


def test_asyncio_quarantine(
    tmp_path: Path, zone: TestDnsServer, pki: TestPki, executor: ThreadPoolExecutor
) -> None:
    server = serve(tmp_path, engine(zone, pki, dkim="off", enforce=True), executor)
    author = [("From", "<a@quarantined.test>")]
    got = run_one(server, asyncio_conversation(SENDMAIL_OTHER, b"<a@quarantined.test>", author))
    assert (b"q", b"dmarc=fail, p=quarantine\0") in got
    assert got[-1][0] == b"a"  # accepted, on hold


def test_asyncio_quarantine_the_mta_withholds_is_left_out(
    tmp_path: Path, zone: TestDnsServer, pki: TestPki, executor: ThreadPoolExecutor, caplog: Any
) -> None:
    """No QUARANTINE offered (0x20 missing): the message is accepted with our field, without a
    quarantine request the MTA would refuse, and the log says so."""
    server = serve(tmp_path, engine(zone, pki, dkim="off", enforce=True), executor)
    author = [("From", "<a@quarantined.test>")]
    stream = asyncio_conversation(SENDMAIL_OTHER, b"<a@quarantined.test>", author)
    offer = frame(b"O", struct.pack(">III", 6, 0x1FF, 0x1FFFFF))
    got = run_one(
        server, stream.replace(offer, frame(b"O", struct.pack(">III", 6, 0x1DF, 0x1FFFFF)))
    )
    assert b"q" not in [c for c, _ in got]
    assert any(c == b"i" and b"dmarc=fail" in p for c, p in got)
    assert got[-1][0] == b"a"
    assert "the MTA did not agree to" in caplog.text


def test_asyncio_dkim_body_chunks_verify(
    tmp_path: Path, zone: TestDnsServer, pki: TestPki, executor: ThreadPoolExecutor
) -> None:
    server = serve(tmp_path, engine(zone, pki), executor)
    fields, body = signed_message()
    got = run_one(server, asyncio_conversation({}, b"<bob@signer.test>", fields, body))
    inserted = [p.replace(b"\n\t", b" ") for c, p in got if c == b"i"]
    assert len(inserted) == 1
    assert b"; dkim=pass header.d=signer.test header.s=s1" in inserted[0]
    assert b"; dmarc=pass (p=reject; aligned=dkim) header.from=signer.test" in inserted[0]
