"""Tests for mtls_milter.core.header: rendering, sanitizing, forged-field removal."""

from __future__ import annotations

import re
import time
from typing import Any

import authres
import pytest

from mtls_milter.core import header as header_module
from mtls_milter.core.header import (
    HEADER_NAME,
    MAX_PARSED_FIELDS,
    MtlsField,
    fields_to_delete,
    render_field,
    render_folded,
    render_value,
    sanitize_authserv_id,
    sanitize_comment,
    sanitize_reason,
)

ID = "mx.example.net"
SAFE_LINE = re.compile(r"[\x20-\x7e]*")


def parse(value: str) -> Any:
    return authres.AuthenticationResultsHeader.parse_value(value)


# --- render_value ------------------------------------------------------------------------------

RENDER_CASES: list[tuple[str, MtlsField, str]] = [
    (
        "pass-matched",
        MtlsField(
            ID,
            "pass",
            comment=("evidence=chain", "matched out1.sender.example in client-mx"),
            value="sender.example",
        ),
        "mx.example.net; mtls=pass (evidence=chain; matched out1.sender.example in client-mx)"
        " smtp.mailfrom=sender.example",
    ),
    (
        "pass-reason-not-rendered",
        MtlsField(ID, "pass", reason="ignored", value="sender.example"),
        "mx.example.net; mtls=pass smtp.mailfrom=sender.example",
    ),
    (
        "fail-reason-names",
        MtlsField(
            ID,
            "fail",
            reason="no certificate name matches Client MX",
            comment=("evidence=mta", "names=out.other.example"),
            value="sender.example",
        ),
        'mx.example.net; mtls=fail reason="no certificate name matches Client MX"'
        " (evidence=mta; names=out.other.example) smtp.mailfrom=sender.example",
    ),
    (
        "none-reason",
        MtlsField(ID, "none", reason="no Client MX", value="sender.example"),
        'mx.example.net; mtls=none reason="no Client MX" smtp.mailfrom=sender.example',
    ),
    (
        "temperror",
        MtlsField(ID, "temperror", reason="DNS timeout for sender.example", value="sender.example"),
        'mx.example.net; mtls=temperror reason="DNS timeout for sender.example"'
        " smtp.mailfrom=sender.example",
    ),
    (
        "permerror",
        MtlsField(
            ID,
            "permerror",
            reason="more than 10 Client MX hosts",
            comment=("hosts=11",),
            value="sender.example",
        ),
        'mx.example.net; mtls=permerror reason="more than 10 Client MX hosts" (hosts=11)'
        " smtp.mailfrom=sender.example",
    ),
    (
        "helo",
        MtlsField(
            ID,
            "pass",
            comment=("evidence=chain",),
            ptype_property="helo",
            value="out1.sender.example",
        ),
        "mx.example.net; mtls=pass (evidence=chain) smtp.helo=out1.sender.example",
    ),
    (
        "null-sender",
        MtlsField(ID, "none", reason="null sender"),
        'mx.example.net; mtls=none reason="null sender"',
    ),
    (
        "empty-reason-and-comment-parts-omitted",
        MtlsField(ID, "fail", reason="  \r\n ", comment=("", " "), value="sender.example"),
        "mx.example.net; mtls=fail smtp.mailfrom=sender.example",
    ),
    (
        "authserv-id-sanitized",
        MtlsField(" MX.Example.NET. ", "pass", value="sender.example"),
        "mx.example.net; mtls=pass smtp.mailfrom=sender.example",
    ),
    (
        "authserv-id-idn",
        MtlsField("MX.Exämple.NET", "pass", value="sender.example"),
        "mx.xn--exmple-cua.net; mtls=pass smtp.mailfrom=sender.example",
    ),
    (
        "u-label-domain-idna-2008",
        MtlsField(ID, "pass", value="faß.example"),
        "mx.example.net; mtls=pass smtp.mailfrom=xn--fa-hia.example",
    ),
    (
        "u-label-domain",
        MtlsField(ID, "pass", value="bücher.example"),
        "mx.example.net; mtls=pass smtp.mailfrom=xn--bcher-kva.example",
    ),
    (
        "address-literal-quoted",
        MtlsField(ID, "none", ptype_property="helo", value="[192.0.2.1]"),
        'mx.example.net; mtls=none smtp.helo="[192.0.2.1]"',
    ),
    (
        "non-domain-value-quoted",
        MtlsField(ID, "none", value="@.x/1"),
        'mx.example.net; mtls=none smtp.mailfrom="@.x/1"',
    ),
]


@pytest.mark.parametrize(
    ("field", "expected"), [c[1:] for c in RENDER_CASES], ids=[c[0] for c in RENDER_CASES]
)
def test_render_value(field: MtlsField, expected: str) -> None:
    assert render_value(field) == expected
    assert render_field(field) == f"{HEADER_NAME}: {expected}"


@pytest.mark.parametrize("field", [c[1] for c in RENDER_CASES], ids=[c[0] for c in RENDER_CASES])
def test_render_round_trips_through_authres(field: MtlsField) -> None:
    for text in (render_value(field), render_folded(field), render_folded(field, width=20)):
        header = parse(text)
        assert header.authserv_id == sanitize_authserv_id(field.authserv_id).lower()
        assert len(header.results) == 1
        res = header.results[0]
        assert (res.method, res.result) == ("mtls", field.result)
        props = [(p.type, p.name) for p in res.properties]
        assert props == ([("smtp", field.ptype_property)] if field.value else [])
        if field.value.isascii() and field.value and "[" not in field.value:
            assert res.properties[0].value == field.value.strip()


def test_round_trip_reason() -> None:
    res = parse(render_value(MtlsField(ID, "fail", reason="chain invalid: expired (x)"))).results
    assert res[0].reason == "chain invalid: expired (x)"


@pytest.mark.parametrize(
    ("kwargs"), [{"result": "neutral"}, {"result": "PASS"}, {"ptype_property": "auth"}]
)
def test_invalid_field_rejected(kwargs: dict[str, str]) -> None:
    args: dict[str, Any] = {"authserv_id": ID, "result": "pass", **kwargs}
    with pytest.raises(ValueError):
        MtlsField(**args)


# --- hostile inputs ----------------------------------------------------------------------------

HOSTILE = [
    "x\r\nX-Evil: 1",
    "x\nX-Evil: 1\n\n",
    "a) (b",
    ")))(((",
    "back\\slash\\",
    'quo"te"',
    "nul\x00byte\x01\x7f",
    "utf-8: é ü 漢字 \U0001f600",
    "x" * 10_000,
    "(\\" * 5_000,
    "\r\n" * 5_000,
    "",
]


@pytest.mark.parametrize("text", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_comment_and_reason(text: str) -> None:
    for result in ("pass", "fail"):
        field = MtlsField(
            authserv_id=text or "x",
            result=result,
            reason=text,
            comment=(text, "ok", text),
            value=text,
        )
        value = render_value(field)
        assert SAFE_LINE.fullmatch(value), value
        assert len(value) < 1500
        folded = render_folded(field)
        assert folded.replace("\n\t", " ") == value
        header = parse(value)
        assert (header.results[0].method, header.results[0].result) == ("mtls", result)
        parse(folded)
        outside_quotes = re.sub(r'"[^"]*"', "", value)
        assert outside_quotes.count("(") == outside_quotes.count(")") <= 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("x\r\nX-Evil: 1", "x X-Evil: 1"),
        ("a) (b", "a] [b"),
        ("back\\slash", "back?slash"),
        ('say "hi"', "say 'hi'"),
        ("nul\x00é", "nul??"),
        ("  many \t\r\n  spaces  ", "many spaces"),
        ("x" * 250, "x" * 197 + "..."),
        (" " * 5000 + "tail", "..."),
    ],
)
def test_sanitize_comment(text: str, expected: str) -> None:
    assert sanitize_comment(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("x\r\nX-Evil: 1", "x X-Evil: 1"),
        ("a) (b", "a) (b"),
        ("back\\slash", "back?slash"),
        ('say "hi"', "say 'hi'"),
        ("nul\x00é", "nul??"),
        ("y" * 10_000, "y" * 197 + "..."),
    ],
)
def test_sanitize_reason(text: str, expected: str) -> None:
    assert sanitize_reason(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mx.example.net", "mx.example.net"),
        ("  MX.example.NET.\r\n", "mx.example.net"),
        ("MX.Exämple.NET", "mx.xn--exmple-cua.net"),
        ("MX.Exämple.NET.", "mx.xn--exmple-cua.net"),
        ("mx..example.net", "mx.example.net"),
        ("mx example;net", "mxexamplenet"),
        ("mx.example.net/1", "mx.example.net1"),
        ('"quoted"', "quoted"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("Bücher Example", "bcherexample"),
        ("", "localhost"),
        (' ;()/"\\ ', "localhost"),
        ("...", "localhost"),
        ("a" * 300, "a" * 255),
    ],
)
def test_sanitize_authserv_id(text: str, expected: str) -> None:
    assert sanitize_authserv_id(text) == expected


# --- render_folded -----------------------------------------------------------------------------


@pytest.mark.parametrize("field", [c[1] for c in RENDER_CASES], ids=[c[0] for c in RENDER_CASES])
def test_render_folded_unfolds_and_fits(field: MtlsField) -> None:
    folded = render_folded(field)
    assert folded.replace("\n\t", " ") == render_value(field)
    assert "\r" not in folded
    lines = folded.split("\n")
    assert all(line.startswith("\t") for line in lines[1:])
    assert len(f"{HEADER_NAME}: {lines[0]}") <= 78
    assert all(len(line) <= 78 for line in lines[1:])


def test_render_folded_exact() -> None:
    field = MtlsField(
        ID,
        "fail",
        reason="no certificate name matches Client MX",
        comment=("evidence=mta", "names=out.other.example"),
        value="sender.example",
    )
    assert render_folded(field) == (
        "mx.example.net; mtls=fail\n"
        '\treason="no certificate name matches Client MX" (evidence=mta;\n'
        "\tnames=out.other.example) smtp.mailfrom=sender.example"
    )
    assert render_folded(field, width=1000) == render_value(field)


def test_render_folded_long_token_unbroken() -> None:
    long_reason = "r" * 150
    field = MtlsField(ID, "fail", reason=long_reason, value="sender.example")
    folded = render_folded(field)
    expected = (
        f'mx.example.net; mtls=fail\n\treason="{long_reason}"\n\tsmtp.mailfrom=sender.example'
    )
    assert folded == expected


# --- fields_to_delete --------------------------------------------------------------------------

# (name, value, deleted by default, deleted with delete_all_ours)
DELETE_CASES: list[tuple[str, str, bool, bool]] = [
    ("ours-mtls", "mx.example.net; mtls=pass smtp.mailfrom=a.example", True, True),
    ("ours-upper", 'MX.EXAMPLE.NET; MTLS=fail reason="x" smtp.mailfrom=a', True, True),
    ("ours-jobid", "mx.example.net/12345; mtls=pass smtp.mailfrom=a.example", True, True),
    ("ours-comment-first", "(forged) mx.example.net; mtls=pass smtp.mailfrom=a", True, True),
    ("ours-version", "mx.example.net 1; mtls=pass smtp.mailfrom=a.example", True, True),
    ("ours-leading-ws", "  \r\n\tmx.example.net; mtls=none", True, True),
    ("ours-spf-only", "mx.example.net; spf=pass smtp.mailfrom=a.example", False, True),
    ("ours-mtls-in-comment", "mx.example.net; spf=pass (mtls=pass) smtp.mailfrom=a", False, True),
    ("ours-none", "mx.example.net; none", False, True),
    (
        "ours-multi",
        "mx.example.net; spf=pass smtp.mailfrom=a.example; dkim=pass header.d=a.example;"
        " mtls=pass smtp.mailfrom=a.example",
        True,
        True,
    ),
    (
        "ours-folded",
        "mx.example.net;\r\n\tspf=pass smtp.mailfrom=a.example;\r\n"
        ' mtls=fail reason="no client certificate"\n\t(evidence=none) smtp.mailfrom=a.example',
        True,
        True,
    ),
    ("ours-unknown-ptype", "mx.example.net; mtls=pass x-tls.name=a", True, True),
    ("ours-garbage", "mx.example.net; mtls=pass (((", True, True),
    ("ours-garbage-no-mtls", "mx.example.net; ===", True, True),
    ("ours-quoted-id", '"mx.example.net"; mtls=pass', True, True),
    ("ours-empty-reason", 'mx.example.net; mtls=fail reason=""', True, True),
    ("ours-deep-comment", "mx.example.net; mtls=pass " + "(" * 3000 + ")" * 3000, True, True),
    ("ours-huge", "mx.example.net; spf=pass" + " (x)" * 5000, True, True),
    ("other-mtls", "mx.other.net; mtls=pass smtp.mailfrom=a.example", False, False),
    ("suffix-evil", "mx.example.net.evil; mtls=pass smtp.mailfrom=a", False, False),
    ("prefix-evil", "evil-mx.example.net; mtls=pass smtp.mailfrom=a", False, False),
    ("sub-evil", "a.mx.example.net; mtls=pass", False, False),
    ("id-in-comment", "(mx.example.net) other.example; mtls=pass", False, False),
    ("other-garbage", "other.example; mtls=pass (((", False, False),
    ("garbage", ";;; (((", False, False),
    ("unbalanced-leading-comment", "(mx.example.net; mtls=pass", False, False),
    ("empty", "", False, False),
    ("whitespace", " \r\n\t", False, False),
    ("nul", "mx.example.net\x00; mtls=pass", False, False),
    ("non-ascii-id", "mx.exämple.net; mtls=pass", False, False),
    ("ours-non-ascii", "mx.example.net; mtls=pass (é)", True, True),
    ("ours-nul-after", "mx.example.net; mtls=pass\x00", True, True),
]


@pytest.mark.parametrize(
    ("value", "default", "all_ours"),
    [c[1:] for c in DELETE_CASES],
    ids=[c[0] for c in DELETE_CASES],
)
def test_fields_to_delete_single(value: str, default: bool, all_ours: bool) -> None:
    assert fields_to_delete([value], ID) == ([1] if default else [])
    assert fields_to_delete([value], ID, delete_all_ours=True) == ([1] if all_ours else [])


def test_fields_to_delete_table_indexes() -> None:
    values = [c[1] for c in DELETE_CASES]
    expected = [i for i, c in enumerate(DELETE_CASES, start=1) if c[2]]
    assert fields_to_delete(values, ID) == sorted(expected, reverse=True)
    expected_all = [i for i, c in enumerate(DELETE_CASES, start=1) if c[3]]
    assert fields_to_delete(values, ID, delete_all_ours=True) == sorted(expected_all, reverse=True)


def test_fields_to_delete_our_id_normalized() -> None:
    value = "mx.example.net; mtls=pass"
    assert fields_to_delete([value], "MX.Example.Net") == [1]
    assert fields_to_delete([value], " mx.example.net. ") == [1]
    assert fields_to_delete([value], "other.example") == []


@pytest.mark.parametrize(
    "claimed",
    ["mx.exämple.net", "MX.EXÄMPLE.NET", "mx.xn--exmple-cua.net", "MX.XN--EXMPLE-CUA.NET."],
)
def test_forged_field_with_an_idn_authserv_id_in_any_spelling_is_deleted(claimed: str) -> None:
    assert fields_to_delete([f"{claimed}; mtls=pass"], "MX.Exämple.NET") == [1]
    assert fields_to_delete([f"{claimed}/1234; mtls=pass"], "mx.xn--exmple-cua.net") == [1]


def test_fields_to_delete_no_fields() -> None:
    assert fields_to_delete([], ID) == []


def test_fields_to_delete_never_raises_on_non_str() -> None:
    values: list[Any] = [None, b"mx.example.net; mtls=pass", 42, "mx.example.net; mtls=pass"]
    assert fields_to_delete(values, ID) == [4]


def test_fields_to_delete_many() -> None:
    ours = "mx.example.net; mtls=pass smtp.mailfrom=a.example"
    others = [
        "other.example; mtls=pass smtp.mailfrom=a.example",
        "mx.example.net; spf=pass smtp.mailfrom=a.example",
        "garbage (((",
    ]
    values = [ours if i % 7 == 3 else others[i % 3] for i in range(5000)]
    start = time.perf_counter()
    result = fields_to_delete(values, ID)
    elapsed = time.perf_counter() - start
    expected = [i + 1 for i in range(5000) if i % 7 == 3]
    assert result == expected[::-1]
    assert elapsed < 5


def test_fields_to_delete_huge_values_fast() -> None:
    values = [
        "mx.example.net; " + "; ".join(["spf=pass smtp.mailfrom=a"] * 20_000),
        "other.example; " + "; ".join(["spf=pass smtp.mailfrom=a"] * 20_000),
        "(" * 200_000,
        "x" * 1_000_000,
    ]
    start = time.perf_counter()
    assert fields_to_delete(values, ID) == [1]
    assert time.perf_counter() - start < 2


def test_fields_claiming_our_id_are_parsed_a_bounded_number_of_times(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past MAX_PARSED_FIELDS fields claiming our id, the rest are judged by ``method=``
    without authres: a message with thousands of them costs no more parses."""
    parses = 0
    real = header_module._carries_ours

    def counting(value: str, methods: frozenset[str]) -> bool:
        nonlocal parses
        parses += 1
        return real(value, methods)

    monkeypatch.setattr(header_module, "_carries_ours", counting)
    forged = f"{ID}; mtls=pass smtp.mailfrom=a.example"
    theirs = f"{ID}; spf=pass smtp.mailfrom=a.example"  # another filter on this host
    values = [forged, theirs] * 1000
    result = fields_to_delete(values, ID)
    assert parses == MAX_PARSED_FIELDS
    assert result == [i for i in range(2000, 0, -1) if i % 2 == 1]  # every forged one, no other
