"""MAIL FROM parsing and the one host-name normalization."""

from __future__ import annotations

import pytest

from mtls_milter.core.certs import name_matches
from mtls_milter.core.names import (
    Sender,
    SenderKind,
    normalize_domain,
    normalize_host,
    parse_mail_from,
)
from mtls_milter.errors import InputError

D = SenderKind.DOMAIN
U = SenderKind.UNUSABLE


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("<a@sender.test>", Sender(D, "sender.test")),
        ("a@sender.test", Sender(D, "sender.test")),
        ("<a@Sender.TEST>", Sender(D, "sender.test")),
        ("<a@sender.test.>", Sender(D, "sender.test")),
        ("  <a@sender.test>  ", Sender(D, "sender.test")),
        ('<"odd@local"@sender.test>', Sender(D, "sender.test")),
        ('<"a\\"@b"@sender.test>', Sender(D, "sender.test")),
        ("<@relay.test,@hop.test:a@sender.test>", Sender(D, "sender.test")),
        ("<üser@bücher.example>", Sender(D, "xn--bcher-kva.example")),
        ("<a@xn--bcher-kva.example>", Sender(D, "xn--bcher-kva.example")),
        ("<a@Faß.DE>", Sender(D, "xn--fa-hia.de")),
        ("<>", Sender(SenderKind.NULL)),
        ("", Sender(SenderKind.NULL)),
        ("< >", Sender(SenderKind.NULL)),
        ("<postmaster>", Sender(U, problem="MAIL FROM has no domain")),
        ('<"a@b">', Sender(U, problem="MAIL FROM has no domain")),
        ("<a@[192.0.2.1]>", Sender(U, problem="MAIL FROM domain is an address literal")),
        ("<a@[IPv6:2001:db8::1]>", Sender(U, problem="MAIL FROM domain is an address literal")),
    ],
)
def test_parse_mail_from(raw: str, expected: Sender) -> None:
    assert parse_mail_from(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "<a@>",
        "<a@sender..test>",
        "<a@-bad.test>",
        "<a@bad_label.test>",
        "<a@☃.net>",
        "<a@" + "x" * 64 + ".test>",
        "<a@" + "abcdefghi." * 26 + "test>",
        "<a@sen der.test>",
    ],
)
def test_unusable_domains_say_why(raw: str) -> None:
    sender = parse_mail_from(raw)
    assert sender.kind is SenderKind.UNUSABLE
    assert sender.problem.startswith("MAIL FROM domain is invalid")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("Out.Sender.Test.", "out.sender.test"), ("bücher.example", "xn--bcher-kva.example")],
)
def test_normalize_domain(text: str, expected: str) -> None:
    assert normalize_domain(text) == expected


@pytest.mark.parametrize("text", ["", ".", "a..b", "a b", "*.sender.test"])
def test_normalize_domain_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        normalize_domain(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("faß.de", "xn--fa-hia.de"),  # IDNA 2008; IDNA 2003 would give fass.de
        ("FASS.DE", "fass.de"),
        ("XN--FA-HIA.DE.", "xn--fa-hia.de"),
        ("MX.Exämple.NET", "mx.xn--exmple-cua.net"),
        ("ＭＸ。example。net", "mx.example.net"),  # UTS #46 maps full-width forms
        ("a\u00adb.example", "ab.example"),  # and drops soft hyphens
    ],
)
def test_normalize_host_is_uts46_then_idna_2008(text: str, expected: str) -> None:
    assert normalize_host(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("xn--zz.test", "invalid A-label 'xn--zz': "),
        ("a_b.test", "invalid label 'a_b'"),
        ("out.sender.test\x00.evil", "invalid label 'test\\x00'"),
        ("a" * 65_000, "name longer than 253 characters (65000)"),
        (" a.test", "invalid label ' a'"),
        (
            "\u00a1.test",
            "invalid internationalized name '\\xa1.test': Codepoint U+00A1 at position 1",
        ),
    ],
)
def test_normalize_host_refuses_with_a_bounded_reason(text: str, message: str) -> None:
    with pytest.raises(InputError) as caught:
        normalize_host(text)
    assert str(caught.value).startswith(message), str(caught.value)
    assert len(str(caught.value)) < 320 and str(caught.value).isascii()


def test_underscores_only_where_asked() -> None:
    assert normalize_host("_mta.sender.test", underscores=True) == "_mta.sender.test"
    with pytest.raises(InputError):
        normalize_host("_mta.sender.test")


@pytest.mark.parametrize(
    ("cert_name", "host"),
    [
        ("xn--fa-hia.de", "faß.de"),
        ("faß.de", "xn--fa-hia.de"),
        ("FAß.DE", "Faß.de."),
    ],
)
def test_certificate_and_published_names_agree_on_idna_2008(cert_name: str, host: str) -> None:
    assert name_matches(cert_name, host)
    assert not name_matches(cert_name, "fass.de")
