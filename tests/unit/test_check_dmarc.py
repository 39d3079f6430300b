"""`check --message`: DMARC offline from a raw message, against the in-process DNS server.

Golden tests: an .eml in, the JSON `dmarc` object and our Authentication-Results field out.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from support.dnsserver import TestDnsServer
from support.pki import TestPki

from mtls_milter.cli.main import main

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PRIVATE_PEM = KEY.private_bytes(
    serialization.Encoding.PEM,
    serialization.PrivateFormat.TraditionalOpenSSL,
    serialization.NoEncryption(),
)
PUBLIC_B64 = base64.b64encode(
    KEY.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
).decode()
BODY = b"To: b@receiver.test\r\nSubject: test\r\n\r\nHello.\r\n"


def txt(text: str) -> str:
    """TXT rdata text: ``text`` in quoted character-strings of at most 255 bytes."""
    return " ".join(f'"{text[i : i + 255]}"' for i in range(0, len(text), 255))


@pytest.fixture
def dmarc_dns(dns_server: TestDnsServer) -> TestDnsServer:
    dns_server.add("sender.test", 265, "10 out.sender.test.")
    dns_server.add("_dmarc.sender.test", "TXT", txt("v=DMARC1; p=reject"))
    dns_server.add("sender.test", "TXT", txt("v=spf1 ip4:192.0.2.1 -all"))
    dns_server.add("sel1._domainkey.sender.test", "TXT", txt(f"v=DKIM1; k=rsa; p={PUBLIC_B64}"))
    dns_server.add("huge._domainkey.sender.test", "TXT", txt("v=DKIM1; k=rsa; p=" + "A" * 9000))
    return dns_server


def check(
    capsys: pytest.CaptureFixture[str],
    pki: TestPki,
    dns: TestDnsServer,
    tmp_path: Path,
    message: bytes,
    *args: str,
    mta_cn: str = "out.sender.test",
    config: str = "",
) -> dict[str, Any]:
    eml = tmp_path / "message.eml"
    eml.write_bytes(message)
    toml = tmp_path / "mtls-milter.toml"
    toml.write_text(config)
    argv = [
        "check", "--mail-from", "a@sender.test", "--mta-cn", mta_cn, "--message", str(eml),
        "--config", str(toml), "--trust", str(pki.root_path), "--no-system-trust",
        "--dns", dns.nameserver, "--authserv-id", "mx.receiver.test", "--json", *args,
    ]  # fmt: skip
    assert main(argv) == 0
    report: dict[str, Any] = json.loads(capsys.readouterr().out)
    return report


@pytest.fixture
def run(
    capsys: pytest.CaptureFixture[str], pki: TestPki, dmarc_dns: TestDnsServer, tmp_path: Path
) -> Any:
    def go(message: bytes, *args: str, **kwargs: str) -> dict[str, Any]:
        return check(capsys, pki, dmarc_dns, tmp_path, message, *args, **kwargs)

    return go


def test_mtls_only_sender_passes_dmarc(run: Any) -> None:
    report = run(b"From: A <a@sender.test>\r\n" + BODY)
    assert report["header"] == (
        "Authentication-Results: mx.receiver.test; mtls=pass "
        "(evidence=mta; matched out.sender.test in client-mx) smtp.mailfrom=sender.test; "
        "dmarc=pass (p=reject; aligned=mtls) header.from=sender.test"
    )
    dmarc = report["dmarc"]
    assert (dmarc["result"], dmarc["policy"], dmarc["domain"]) == ("pass", "reject", "sender.test")
    assert (dmarc["aligned"], dmarc["action"]) == (["mtls"], "none")


def test_mismatching_certificate_fails_dmarc_and_enforce_rejects(run: Any) -> None:
    message = b"From: a@sender.test\r\n" + BODY
    report = run(message, mta_cn="out.other.test")
    assert report["header"].endswith(
        "dmarc=fail (p=reject; no aligned authenticated identifier) header.from=sender.test"
    )
    assert report["dmarc"]["action"] == "none"  # annotate only by default
    enforced = run(message, mta_cn="out.other.test", config="[dmarc]\nenforce = true\n")
    assert enforced["dmarc"]["action"] == "reject"


def test_dkim_signed_message_passes_without_mtls(run: Any) -> None:
    message = b"From: a@sender.test\r\n" + BODY
    signed = dkim.sign(message, b"sel1", b"sender.test", PRIVATE_PEM, include_headers=[b"from"])
    report = run(bytes(signed) + message, mta_cn="out.other.test")
    assert report["dmarc"]["aligned"] == ["dkim"]
    assert report["dmarc"]["dkim"] == [
        {"result": "pass", "domain": "sender.test", "selector": "sel1"}
    ]
    assert (
        "dkim=pass header.d=sender.test header.s=sel1; dmarc=pass (p=reject; aligned=dkim)"
        in (report["header"])
    )


def test_spf_pass_from_the_client_ip_aligns(run: Any) -> None:
    report = run(b"From: a@sender.test\r\n" + BODY, "--client-ip", "192.0.2.1")
    assert report["dmarc"]["spf"] == {"result": "pass", "domain": "sender.test"}
    assert report["dmarc"]["aligned"] == ["mtls", "spf"]
    assert "; spf=pass smtp.mailfrom=sender.test; dmarc=pass" in report["header"]


def test_from_option_replaces_the_from_field(run: Any) -> None:
    report = run(b"From: a@sender.test\r\n" + BODY, "--from", "x@elsewhere.test")
    assert (report["dmarc"]["result"], report["dmarc"]["domain"]) == ("none", "elsewhere.test")


@pytest.mark.parametrize(
    ("from_field", "result", "reason"),
    [
        (b"From: \r\n", "none", "From header field without an address"),
        (b"", "none", "no From header field"),
        (b"From: undisclosed-recipients:;\r\n", "none", "From header field without an address"),
        (b"From: a@sender.test, b@other.test\r\n", "permerror", "several author domains"),
        (
            b"From: " + b", ".join(b"u%d@sender.test" % i for i in range(101)) + b"\r\n",
            "permerror",
            "more than 100 addresses",
        ),
        (b"From: a@s\xe9nder.test\r\n", "permerror", "author domain invalid"),
        (b"From: a@=?utf-8?q?s=C3=A9nder?=.test\r\n", "permerror", "encoded word"),
    ],
)
def test_bad_from_fields_have_defined_results(
    run: Any, from_field: bytes, result: str, reason: str
) -> None:
    dmarc = run(from_field + BODY)["dmarc"]
    assert dmarc["result"] == result
    assert reason in dmarc["reason"]


@pytest.mark.parametrize(
    ("record", "result", "warning"),
    [
        ("v=DMARC1 p=reject", "none", None),  # no ";" after the version: not a DMARC record
        ("v=DMARC1; p=reject; foo=bar; x", "pass", "unknown tags ignored: 'foo'"),
        ("v=DMARC1; p=reject; rua=mailto:" + "r" * 10000 + "@sender.test", "pass", "bytes read"),
        ("v=DMARC1; p=bogus", "pass", "invalid p='bogus' ignored"),
    ],
)
def test_bad_dmarc_records_have_defined_results(
    run: Any, dmarc_dns: TestDnsServer, record: str, result: str, warning: str | None
) -> None:
    dmarc_dns.add("_dmarc.odd.test", "TXT", txt(record))
    dmarc_dns.add("odd.test", 265, "10 out.sender.test.")
    dmarc = run(b"From: a@odd.test\r\n" + BODY, "--mail-from", "a@odd.test")["dmarc"]
    assert dmarc["result"] == result
    if warning is not None:
        assert any(warning in w for w in dmarc["warnings"]), dmarc["warnings"]


@pytest.mark.parametrize(
    ("signature", "result"),
    [
        (b"DKIM-Signature: v=1; a=rsa-sha256; d=sender.test; junk\r\n", "permerror"),
        (b"DKIM-Signature: v=1; a=rsa-sha256; d=sender.test; s=huge; h=from; bh=AAAA; b=AAAA\r\n",
         "fail"),
    ],
)  # fmt: skip
def test_bad_dkim_signatures_have_defined_results(run: Any, signature: bytes, result: str) -> None:
    report = run(signature + b"From: a@sender.test\r\n" + BODY, mta_cn="out.other.test")
    assert report["dmarc"]["dkim"][0]["result"] == result
    assert report["dmarc"]["result"] == "fail"


def test_readable_output_explains_dmarc(
    capsys: pytest.CaptureFixture[str], pki: TestPki, dmarc_dns: TestDnsServer, tmp_path: Path
) -> None:
    eml = tmp_path / "m.eml"
    eml.write_bytes(b"From: a@sender.test\r\n" + BODY)
    argv = [
        "check", "--mail-from", "a@sender.test", "--mta-cn", "out.other.test",
        "--message", str(eml), "--trust", str(pki.root_path), "--no-system-trust",
        "--dns", dmarc_dns.nameserver, "--authserv-id", "mx.receiver.test",
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "dmarc:     fail for sender.test\n" in out
    assert "           policy reject, aligned nothing\n" in out
    assert "           no aligned authenticated identifier; action none\n" in out
