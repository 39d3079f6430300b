"""Properties of the Authentication-Results rendering and of the forged-field selection.

Rendering puts outside data (reasons quoting MAIL FROM, certificate names, DNS data) into a
header: whatever the parts, the field must be one printable-ASCII line (folded only with
CRLF-TAB), parse back with ``authres`` to the result we put in, and keep comments balanced.
The deletion of forged fields reads fields a client wrote: it must never touch another
authserv-id's field and always remove a field claiming our id with an ``mtls`` result.
"""

from __future__ import annotations

import re
from typing import Any

import authres
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mtls_milter.core import header as header_module
from mtls_milter.core.header import (
    COMMENT_TOTAL_MAX_LEN,
    PTYPE_PROPERTIES,
    REASON_MAX_LEN,
    RESULTS,
    MtlsField,
    fields_to_delete,
    render_field,
    render_folded,
    render_value,
    sanitize_authserv_id,
    sanitize_comment,
    sanitize_reason,
)

SETTINGS = settings(max_examples=120, deadline=None)
PRINTABLE = re.compile(r"[ -~]*")

hostile = st.one_of(
    st.text(max_size=120),
    st.text(alphabet=st.sampled_from('()"\\;=. \t\r\n\x00aZ@/é'), max_size=60),
    st.builds(
        lambda c, n: c * n, st.sampled_from(["a", "(", ")", "\\", '"', "é"]), st.integers(0, 3000)
    ),
)
host_id = st.from_regex(
    r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?){0,3}", fullmatch=True
)

fields = st.builds(
    MtlsField,
    authserv_id=st.one_of(host_id, hostile),
    result=st.sampled_from(sorted(RESULTS)),
    reason=hostile,
    comment=st.lists(hostile, max_size=4).map(tuple),
    ptype_property=st.sampled_from(sorted(PTYPE_PROPERTIES)),
    value=st.one_of(host_id, hostile),
)


def parse(value: str) -> Any:
    return authres.AuthenticationResultsHeader.parse_value(value)


def outside_quotes(value: str) -> str:
    """``value`` with the quoted strings removed (no escapes are ever rendered)."""
    return re.sub(r'"[^"]*"', '""', value)


def assert_balanced(value: str) -> None:
    depth = 0
    for char in outside_quotes(value):
        depth += {"(": 1, ")": -1}.get(char, 0)
        assert depth >= 0, value
    assert depth == 0, value


@SETTINGS
@given(fields)
@example(MtlsField("mx.example", "fail", reason="a\r\nX-Injected: 1", comment=("(",)))
@example(MtlsField("", "temperror", reason='"\\', comment=(")(", "\\"), value="@.x"))
@example(MtlsField("a/b", "none", value="\u00e9xample.org."))
def test_rendered_field_is_printable_one_line_and_parses_back(field: MtlsField) -> None:
    value = render_value(field)
    assert PRINTABLE.fullmatch(value), value
    assert render_field(field).startswith("Authentication-Results: ")
    assert_balanced(value)
    header = parse(value)
    assert header.authserv_id.lower() == sanitize_authserv_id(field.authserv_id).lower()
    results = [r for r in header.results if str(r.method).lower() == "mtls"]
    assert len(results) == 1
    assert str(results[0].result) == field.result


@SETTINGS
@given(fields)
def test_reason_and_comment_are_bounded_and_carried(field: MtlsField) -> None:
    value = render_value(field)
    result = parse(value).results[0]
    reason = sanitize_reason(field.reason)
    if field.result == "pass" or not reason:
        assert result.reason is None
    else:
        assert result.reason == reason
        assert len(reason) <= REASON_MAX_LEN
    comment = re.search(r"\(([^()]*)\)", outside_quotes(value))
    if comment is not None:
        assert len(comment.group(1)) <= COMMENT_TOTAL_MAX_LEN


@SETTINGS
@given(fields, st.integers(30, 120))
def test_folding_only_adds_crlf_tab_between_tokens(field: MtlsField, width: int) -> None:
    folded = render_folded(field, width)
    assert folded.replace("\n\t", " ") == render_value(field)
    lines = folded.split("\n\t")
    for number, line in enumerate(lines):
        assert PRINTABLE.fullmatch(line) and line == line.strip()
        prefix = len("Authentication-Results: ") if number == 0 else 1
        if len(line) + prefix > width:
            assert " " not in outside_quotes(line), line  # only a lone long token overflows
    # The wire form (CRLF folds) unfolds to a value authres still reads the same.
    assert str(parse(folded.replace("\n", "\r\n")).results[0].result) == field.result


@SETTINGS
@given(hostile)
def test_sanitizers_are_idempotent_and_safe(text: str) -> None:
    for sanitize in (sanitize_comment, sanitize_reason):
        once = sanitize(text)
        assert PRINTABLE.fullmatch(once)
        assert "\\" not in once and '"' not in once
        assert sanitize(once) == once or once.endswith("...")
    assert "(" not in sanitize_comment(text) and ")" not in sanitize_comment(text)
    authserv = sanitize_authserv_id(text)
    assert 0 < len(authserv) <= 255 and PRINTABLE.fullmatch(authserv)
    assert sanitize_authserv_id(authserv) == authserv


# --- fields_to_delete -------------------------------------------------------------------------

field_tail = st.one_of(
    hostile,
    st.sampled_from(
        [
            " spf=pass smtp.mailfrom=a.example",
            " mtls=pass",
            ' mtls=fail reason="x" smtp.mailfrom=a.example',
            " dkim=pass header.d=a.example; mtls=none",
            " none",
            "",
        ]
    ),
)


@st.composite
def other_and_ours(draw: st.DrawFn) -> tuple[str, str]:
    ours = draw(host_id)
    other = draw(st.one_of(host_id, hostile))
    if ours in other.lower() or sanitize_authserv_id(other).lower() == ours:
        other = "x" + ours + ".other"
    return ours, other


@SETTINGS
@given(other_and_ours(), st.lists(field_tail, min_size=1, max_size=5), st.booleans())
def test_a_field_of_another_authserv_id_is_never_deleted(
    ids: tuple[str, str], tails: list[str], delete_all: bool
) -> None:
    ours, other = ids
    values = [f"{other};{tail}" for tail in tails]
    assert fields_to_delete(values, ours, delete_all_ours=delete_all) == []


@st.composite
def forged(draw: st.DrawFn) -> tuple[str, str]:
    """(our id, a field value claiming it and carrying an mtls result)."""
    ours = draw(host_id)
    spelled = "".join(c.upper() if draw(st.booleans()) else c for c in ours)
    spelled += draw(st.sampled_from(["", "/1234", "/x"]))
    lead = draw(st.sampled_from(["", " ", "\t", "(c) ", " (nested (c)) ", "\r\n "]))
    result = draw(st.sampled_from(sorted(RESULTS)))
    before = draw(st.sampled_from(["", " spf=pass smtp.mailfrom=a.example;", " dkim=fail;"]))
    after = draw(st.one_of(st.just(""), field_tail, hostile))
    return ours, f"{lead}{spelled};{before} mtls={result}{after}"


@SETTINGS
@given(forged(), st.lists(st.one_of(hostile, field_tail), max_size=3))
@example(("mx.example", "mx.example; mtls=pass"), [])
@example(("mx.example", "MX.Example/7; mtls=pass ((("), [])
def test_a_field_claiming_our_id_with_an_mtls_result_is_always_deleted(
    case: tuple[str, str], others: list[str]
) -> None:
    ours, value = case
    values = [*others, value]
    assert len(values) in fields_to_delete(values, ours)


@SETTINGS
@given(
    st.lists(st.one_of(hostile, field_tail, forged().map(lambda c: c[1])), max_size=8),
    st.one_of(host_id, hostile),
    st.booleans(),
)
def test_fields_to_delete_never_raises_and_gives_descending_indexes(
    values: list[str], ours: str, delete_all: bool
) -> None:
    indexes = fields_to_delete(values, ours, delete_all_ours=delete_all)
    assert indexes == sorted(set(indexes), reverse=True)
    assert all(1 <= index <= len(values) for index in indexes)
    if not delete_all:
        assert set(indexes) <= set(fields_to_delete(values, ours, delete_all_ours=True))


@SETTINGS
@given(fields, st.one_of(host_id, hostile))
def test_our_own_rendered_field_is_deleted_by_the_next_hop_with_our_id(
    field: MtlsField, authserv_id: str
) -> None:
    """A field we wrote is recognized as ours (a loop, or a forgery replaying our text)."""
    mine = MtlsField(
        authserv_id, field.result, field.reason, field.comment, field.ptype_property, field.value
    )
    for value in (render_value(mine), render_folded(mine).replace("\n", "\r\n")):
        assert fields_to_delete([value], authserv_id) == [1]


@SETTINGS
@given(
    host_id,
    st.sampled_from(["", " ", "(c) ", "\t(nested (c)) "]),
    st.sampled_from(["", "/job7", ";", "; mtls=pass", " (x); spf=fail"]),
    hostile,
    st.booleans(),
)
def test_the_cheap_precheck_never_skips_a_field_claiming_our_id(
    our_id: str, before: str, after: str, rest: str, upper: bool
) -> None:
    claimed = our_id.upper() if upper else our_id
    for value in (before + claimed + after + rest, rest):
        if header_module._claimed_authserv_id(value) == our_id:
            assert header_module._may_claim(value, our_id)
