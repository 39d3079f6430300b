"""DMARC inputs: DKIM (dkimpy) and SPF (pyspf) through an injected resolver; trusted results."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mtls_milter.core.clock import FixedClock
from mtls_milter.core.dkim_input import verify_dkim
from mtls_milter.core.dmarc import Identifier
from mtls_milter.core.dmarc_walk import Budget
from mtls_milter.core.lookups import AddressLookup, HostLookup, LookupStatus, TxtLookup
from mtls_milter.core.spf_input import verify_spf
from mtls_milter.core.trusted_results import trusted_identifiers

CLOCK = FixedClock(datetime(2026, 1, 1, tzinfo=UTC))
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
MESSAGE = b"From: A <a@example.com>\r\nTo: b@example.org\r\nSubject: hi\r\n\r\nHello.\r\n"


class Zone:
    """A fake resolver: TXT/A/MX from dicts; 'SERVFAIL' answers TEMPFAIL."""

    def __init__(self, txt: dict[str, str], addresses: dict[str, tuple[str, ...]] | None = None):
        self.txt_records = txt
        self.address_records = addresses or {}

    def txt(self, name: str, budget: float) -> TxtLookup:
        value = self.txt_records.get(name.rstrip(".").lower())
        if value == "SERVFAIL":
            return TxtLookup(LookupStatus.TEMPFAIL, detail="SERVFAIL")
        if value is None:
            return TxtLookup(LookupStatus.NOT_FOUND, detail="NXDOMAIN")
        return TxtLookup(LookupStatus.OK, (value.encode(),))

    def addresses(self, host: str, budget: float) -> AddressLookup:
        found = self.address_records.get(host)
        if found is None:
            return AddressLookup(LookupStatus.NOT_FOUND, detail="no A/AAAA record")
        return AddressLookup(LookupStatus.OK, found)

    def server_mx(self, domain: str, budget: float) -> HostLookup:
        return HostLookup(LookupStatus.NOT_FOUND, detail="NXDOMAIN")

    def client_mx(self, domain: str, budget: float) -> HostLookup:
        return HostLookup(LookupStatus.NOT_FOUND, detail="NXDOMAIN")

    def cached_client_mx(self, domain: str) -> HostLookup | None:
        return None


def signed(message: bytes = MESSAGE, domain: bytes = b"example.com") -> bytes:
    signature = dkim.sign(message, b"sel1", domain, PRIVATE_PEM, include_headers=[b"from", b"to"])
    return bytes(signature) + message


def dkim_results(message: bytes, zone: Zone) -> tuple[Identifier, ...]:
    return verify_dkim(message, zone, Budget(CLOCK, 5.0))


KEY_ZONE = {"sel1._domainkey.example.com": f"v=DKIM1; k=rsa; p={PUBLIC_B64}"}


def test_dkim_signature_passes() -> None:
    assert dkim_results(signed(), Zone(KEY_ZONE)) == (
        Identifier("dkim", "pass", "example.com", "sel1"),
    )


def test_dkim_tampered_body_fails() -> None:
    message = signed().replace(b"Hello.", b"Hellp.")
    assert dkim_results(message, Zone(KEY_ZONE))[0].result == "fail"


@pytest.mark.parametrize(
    ("record", "result"),
    [
        ("SERVFAIL", "temperror"),
        (None, "fail"),
        ("v=DKIM1; k=rsa; p=" + "A" * 20000, "fail"),  # huge key record
        ("v=DKIM1; k=rsa; p=!!notbase64", "fail"),
    ],
)
def test_dkim_key_problems(record: str | None, result: str) -> None:
    zone = {} if record is None else {"sel1._domainkey.example.com": record}
    assert dkim_results(signed(), Zone(zone))[0].result == result


def test_malformed_dkim_signature_is_permerror() -> None:
    message = b"DKIM-Signature: v=1; this is not; a=signature\r\n" + MESSAGE
    assert dkim_results(message, Zone(KEY_ZONE))[0].result == "permerror"


def test_message_without_signature_has_no_dkim_identifiers() -> None:
    assert dkim_results(MESSAGE, Zone(KEY_ZONE)) == ()


SPF_ZONE = Zone(
    {"example.com": "v=spf1 ip4:192.0.2.1 a:mail.example.com -all"},
    {"mail.example.com": ("192.0.2.7", "2001:db8::7")},
)


@pytest.mark.parametrize(
    ("ip", "mail_from", "result"),
    [
        ("192.0.2.1", "<a@example.com>", "pass"),
        ("192.0.2.7", "<a@example.com>", "pass"),
        ("2001:db8::7", "<a@example.com>", "pass"),
        ("198.51.100.9", "<a@example.com>", "fail"),
        ("198.51.100.9", "<a@example.org>", "none"),
        ("198.51.100.9", "<>", "none"),
    ],
)
def test_spf_rows(ip: str, mail_from: str, result: str) -> None:
    assert verify_spf(ip, mail_from, "helo.example", SPF_ZONE, Budget(CLOCK, 5.0)).result == result


def test_spf_dns_failure_is_temperror() -> None:
    zone = Zone({"example.com": "SERVFAIL"})
    got = verify_spf("192.0.2.1", "<a@example.com>", "h", zone, Budget(CLOCK, 5.0))
    assert (got.result, got.domain) == ("temperror", "example.com")


def test_trusted_results_only_from_trusted_ids() -> None:
    values = [
        "evil.example; spf=pass smtp.mailfrom=a@example.com; dkim=pass header.d=example.com",
        "opendkim.example.net; dkim=pass header.d=example.com header.s=sel1",
        "spf.example.net; spf=softfail smtp.mailfrom=bounce@example.org",
        "spf.example.net; this is not parseable",
    ]
    got = trusted_identifiers(
        values, ["opendkim.example.net", "SPF.example.net"], frozenset({"spf", "dkim"})
    )
    assert got == (
        Identifier("dkim", "pass", "example.com", "sel1"),
        Identifier("spf", "softfail", "example.org"),
    )
    assert trusted_identifiers(values, ["opendkim.example.net"], frozenset({"spf"})) == ()
