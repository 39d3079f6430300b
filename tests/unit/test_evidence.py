"""Decoding what Postfix and Sendmail tell a milter about the client's certificate."""

from __future__ import annotations

import pytest

from mtls_milter.core.evidence import (
    NO_TLS,
    CertPresence,
    TlsSession,
    session_from_macros,
    xtext_decode,
)

FP = "AB:" * 31 + "CD"
PRESENT = CertPresence.PRESENTED


@pytest.mark.parametrize(
    ("macros", "expected"),
    [
        # Postfix 3.7, measured by tests/e2e/test_mta_harness.py
        ({}, NO_TLS),
        ({"{tls_version}": "TLSv1.3"}, TlsSession(tls=True, version="TLSv1.3")),
        (
            {
                "{tls_version}": "TLSv1.3",
                "{cert_subject}": "out.sender.test",
                "{cert_issuer}": "Test Intermediate CA",
            },
            TlsSession(True, "TLSv1.3", PRESENT, mta_verified=True, mta_cn="out.sender.test"),
        ),
        (
            {"{tls_version}": "TLSv1.3", "{cert_subject}": "", "{cert_issuer}": "CA"},
            TlsSession(True, "TLSv1.3", PRESENT, mta_verified=True, mta_cn=""),
        ),
        (
            {
                "{tls_version}": "TLSv1.3",
                "{cert_subject}": "Out.Sender.Test.",
                "{cert_issuer}": "CA",
            },
            TlsSession(True, "TLSv1.3", PRESENT, mta_verified=True, mta_cn="out.sender.test"),
        ),
        (
            {"{tls_version}": "TLSv1.3", "{cert_subject}": "evil\nname", "{cert_issuer}": "CA"},
            TlsSession(
                True, "TLSv1.3", PRESENT, mta_verified=True, notes=("unusable CN 'evil\\nname'",)
            ),
        ),
        (
            {"{tls_version}": "TLSv1.3", "{cert_subject}": "x.test"},
            TlsSession(True, "TLSv1.3", notes=("{cert_subject} without {cert_issuer}",)),
        ),
        # Sendmail 8.17
        ({"{verify}": "NONE"}, NO_TLS),
        (
            {"{verify}": "NO", "{tls_version}": "TLSv1.3", "{cn_subject}": ""},
            TlsSession(True, "TLSv1.3", CertPresence.ABSENT),
        ),
        (
            {
                "{verify}": "OK",
                "{tls_version}": "TLSv1.3",
                "{cn_subject}": "out.sender.test",
                "{cert_fp}": FP.lower(),
            },
            TlsSession(True, "TLSv1.3", PRESENT, True, "out.sender.test", fingerprint=FP),
        ),
        (
            {
                "{verify}": "FAIL",
                "{tls_version}": "TLSv1.3",
                "{cn_subject}": "out.sender.test",
                "{cert_fp}": FP,
            },
            TlsSession(True, "TLSv1.3", PRESENT, False, "", fingerprint=FP),
        ),
        (
            {"{verify}": "OK", "{tls_version}": "TLSv1.3", "{cn_subject}": "BadCertificateUnknown"},
            TlsSession(
                True,
                "TLSv1.3",
                PRESENT,
                True,
                "",
                notes=("unusable {cn_subject} 'BadCertificateUnknown'",),
            ),
        ),
        (
            {
                "{verify}": "OK",
                "{tls_version}": "TLSv1.3",
                "{cn_subject}": "out+2Esender.test",
                "{cert_md5}": "00112233445566778899aabbccddeeff",
            },
            TlsSession(
                True,
                "TLSv1.3",
                PRESENT,
                True,
                "out.sender.test",
                fingerprint_md5="00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF",
            ),
        ),
        (
            {
                "{verify}": "OK",
                "{tls_version}": "TLSv1.3",
                "{cn_subject}": "a.test",
                "{cert_fp}": "zz:garbage",
                "{cert_md5}": "12",
            },
            TlsSession(
                True,
                "TLSv1.3",
                PRESENT,
                True,
                "a.test",
                notes=("unusable {cert_fp} 'zz:garbage'", "unusable {cert_md5} '12'"),
            ),
        ),
    ],
)
def test_session_from_macros(macros: dict[str, str | None], expected: TlsSession) -> None:
    assert session_from_macros(macros) == expected


def test_macros_sent_as_none_count_as_absent() -> None:
    assert session_from_macros({"{tls_version}": None, "{verify}": None}) == NO_TLS


def test_huge_macro_is_bounded() -> None:
    session = session_from_macros(
        {"{tls_version}": "TLSv1.3", "{cert_issuer}": "CA", "{cert_subject}": "a" * 100_000}
    )
    assert session.mta_cn == ""
    assert len(session.notes[0]) < 200


@pytest.mark.parametrize(
    ("text", "decoded"),
    [("a+20b", "a b"), ("+2B", "+"), ("plain", "plain"), ("bad+zz", "bad+zz"), ("", "")],
)
def test_xtext_decode(text: str, decoded: str) -> None:
    assert xtext_decode(text) == decoded


@pytest.mark.parametrize(
    ("macros", "cn"),
    [
        pytest.param(
            {"{tls_version}": "TLSv1.3", "{cert_subject}": "Out.Faß.Test", "{cert_issuer}": "CA"},
            "out.xn--fa-hia.test",
            id="postfix-utf8",
        ),
        pytest.param(
            {"{verify}": "OK", "{tls_version}": "TLSv1.3", "{cn_subject}": "out.fa+C3+9F.test"},
            "out.xn--fa-hia.test",
            id="sendmail-xtext-utf8",
        ),
        pytest.param(
            {"{verify}": "OK", "{tls_version}": "TLSv1.3", "{cn_subject}": "out.fa+FF.test"},
            "",
            id="sendmail-not-utf8",
        ),
    ],
)
def test_mta_cn_is_normalized_like_a_certificate_name(macros: dict[str, str], cn: str) -> None:
    # IDNA 2008, as for MAIL FROM and certificates (IDNA 2003 would give out.fass.test).
    assert session_from_macros(macros).mta_cn == cn
