"""MAIL FROM parsing and domain normalization."""

from __future__ import annotations

import pytest

from mtls_milter.core.names import Sender, SenderKind, normalize_domain, parse_mail_from

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
