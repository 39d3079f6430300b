"""Properties of the envelope-sender and domain-name parsers and of quoting outside data.

Inputs are hostile: arbitrary text (NUL, CR/LF, non-ASCII, surrogates, huge strings) must give a
defined result or the documented ValueError, and whatever reaches a reason or log line is a
bounded, printable quote of the data.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mtls_milter.core.lookups import query_name
from mtls_milter.core.names import SenderKind, normalize_domain, parse_mail_from
from mtls_milter.core.quote import MAX_QUOTE, clip, quote

SETTINGS = settings(max_examples=150, deadline=None)

LDH_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
PRINTABLE = re.compile(r"[ -~]*")
# The fixed words of a MAIL FROM problem text, around the quoted data.
PROBLEM_OVERHEAD = MAX_QUOTE  # the fixed words, and a clip of the IDNA library's message

# Hostile text: any code point (surrogates included), weighted towards the characters that
# matter to the parsers, sometimes huge.
hostile_text = st.one_of(
    st.text(max_size=300),
    st.text(alphabet=st.sampled_from('<>@."\\:[] \t\r\n\x00aZ9-_é\u00df\ud800'), max_size=80),
    st.builds(
        lambda c, n: c * n, st.sampled_from(["a", "é", "\x00", "a.", "@"]), st.integers(0, 5000)
    ),
)

label = st.from_regex(LDH_LABEL, fullmatch=True)
ascii_domain = st.lists(label, min_size=1, max_size=6).map(".".join).filter(lambda d: len(d) <= 253)


def random_case(draw: st.DrawFn, text: str) -> str:
    flips = draw(st.lists(st.booleans(), min_size=len(text), max_size=len(text)))
    return "".join(c.upper() if flip else c for c, flip in zip(text, flips, strict=True))


@st.composite
def spelled_domain(draw: st.DrawFn) -> tuple[str, str]:
    """(how a client may spell a domain, its normal form): any case, optional trailing dot."""
    domain = draw(ascii_domain)
    spelling = random_case(draw, domain) + draw(st.sampled_from(["", "."]))
    return spelling, domain


def assert_normal_domain(domain: str) -> None:
    assert domain.isascii()
    assert domain == domain.lower()
    assert not domain.endswith(".")
    assert 0 < len(domain) <= 253
    assert all(LDH_LABEL.fullmatch(part) for part in domain.split("."))


# --- normalize_domain ----------------------------------------------------------------------------


@SETTINGS
@given(hostile_text)
@example("a" * 64 + ".example")
@example("xn--a.example")
def test_normalize_domain_gives_an_a_label_name_or_value_error(text: str) -> None:
    try:
        domain = normalize_domain(text)
    except ValueError:
        return
    assert_normal_domain(domain)


@SETTINGS
@given(hostile_text)
def test_normalize_domain_is_idempotent(text: str) -> None:
    try:
        domain = normalize_domain(text)
    except ValueError:
        return
    assert normalize_domain(domain) == domain


@SETTINGS
@given(spelled_domain())
def test_normalize_domain_folds_case_and_trailing_dot(case: tuple[str, str]) -> None:
    spelling, domain = case
    assert normalize_domain(spelling) == domain


@SETTINGS
@given(hostile_text)
@example("\u00a1")
@example("\u00e9\x00" + "a" * 5000)
def test_normalize_domain_error_quotes_are_bounded(text: str) -> None:
    try:
        normalize_domain(text)
    except ValueError as exc:
        message = str(exc)
        assert len(message) <= PROBLEM_OVERHEAD + MAX_QUOTE, message[:300]
        assert PRINTABLE.fullmatch(message), message[:300]


# --- parse_mail_from -----------------------------------------------------------------------------


@SETTINGS
@given(hostile_text)
@example("<@relay.example:user@Sender.Example.>")
@example('<"a@b"@c.example>')
@example("<>")
def test_parse_mail_from_never_raises_and_a_domain_is_normal(raw: str) -> None:
    sender = parse_mail_from(raw)
    assert sender.kind in set(SenderKind)
    if sender.kind is SenderKind.DOMAIN:
        assert_normal_domain(sender.domain)
        assert sender.problem == ""
    else:
        assert sender.domain == ""
    if sender.kind is SenderKind.UNUSABLE:
        assert sender.problem


@SETTINGS
@given(
    local=st.text(
        alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters='@"\\<>'),
        min_size=1,
        max_size=64,
    ),
    case=spelled_domain(),
    brackets=st.booleans(),
    route=st.sampled_from(["", "@relay.example:", "@a.example,@b.example:"]),
)
def test_parse_mail_from_yields_the_normalized_domain(
    local: str, case: tuple[str, str], brackets: bool, route: str
) -> None:
    spelling, domain = case
    address = f"{route}{local}@{spelling}"
    raw = f"<{address}>" if brackets else address
    sender = parse_mail_from(raw)
    assert sender.kind is SenderKind.DOMAIN, sender.problem
    assert sender.domain == domain


@SETTINGS
@given(
    local=st.text(alphabet=st.sampled_from('@<>: ab.,;\\"'), max_size=40),
    case=spelled_domain(),
)
def test_parse_mail_from_ignores_at_signs_in_a_quoted_local_part(
    local: str, case: tuple[str, str]
) -> None:
    spelling, domain = case
    quoted = '"' + re.sub(r'(["\\])', r"\\\1", local) + '"'  # RFC 5321 quoted-string
    sender = parse_mail_from(f"<{quoted}@{spelling}>")
    assert sender.kind is SenderKind.DOMAIN, sender.problem
    assert sender.domain == domain


@SETTINGS
@given(hostile_text)
@example("@\u00a1")
@example("<a@" + "é\x00" * 3000 + ">")
@example("<a@" + "a" * 5000 + ".example>")
def test_parse_mail_from_problem_is_a_bounded_printable_quote(raw: str) -> None:
    problem = parse_mail_from(raw).problem
    assert len(problem) <= PROBLEM_OVERHEAD + MAX_QUOTE, problem[:300]
    assert PRINTABLE.fullmatch(problem), problem[:300]


# --- query_name (the resolver's own guard) -------------------------------------------------------


@SETTINGS
@given(hostile_text)
def test_query_name_gives_a_dns_name_or_value_error(text: str) -> None:
    try:
        name = query_name(text)
    except ValueError:
        return
    assert name.isascii() and name == name.lower()
    assert 0 < len(name) <= 253 and not name.endswith(".")
    assert all(0 < len(part) <= 63 for part in name.split("."))
    assert "\\" not in name and PRINTABLE.fullmatch(name) and " " not in name


@SETTINGS
@given(spelled_domain())
def test_query_name_agrees_with_normalize_domain_on_host_names(case: tuple[str, str]) -> None:
    spelling, domain = case
    assert query_name(spelling) == domain


# --- quote / clip --------------------------------------------------------------------------------


@SETTINGS
@given(st.one_of(hostile_text, st.binary(max_size=600)), st.integers(0, 400))
def test_clip_is_printable_and_bounded(value: str | bytes, limit: int) -> None:
    text = clip(value, limit)
    assert len(text) <= max(limit, 3)  # "..." marks a cut even below 3
    assert PRINTABLE.fullmatch(text)


@SETTINGS
@given(st.one_of(hostile_text, st.binary(max_size=600)))
@example("\\")  # was "'\\'": the closing quote looked escaped
@example("x\\' user=admin")  # was "'x\\\\' user=admin'": a forged field after a closed quote
def test_quote_is_one_bounded_quoted_token(value: str | bytes) -> None:
    text = quote(value)
    assert text.startswith("'") and text.endswith("'")
    assert PRINTABLE.fullmatch(text)
    # Every quote and backslash inside is escaped: the quote cannot be closed early.
    assert re.fullmatch(r"(?:[^'\\]|\\.)*", text[1:-1])
    assert len(text) <= MAX_QUOTE * 2 + 2


@SETTINGS
@given(st.text(max_size=MAX_QUOTE // 10))
def test_clip_is_unambiguous(value: str) -> None:
    """Short values are never cut, and different values give different quotes."""
    text = clip(value)
    decoded = text.encode("ascii").decode("unicode_escape")
    assert decoded == value


@SETTINGS
@given(st.binary(max_size=MAX_QUOTE // 4))
def test_clip_of_bytes_shows_invalid_utf8_as_escapes(value: bytes) -> None:
    decoded = clip(value).encode("ascii").decode("unicode_escape")
    assert decoded == value.decode("utf-8", "surrogateescape").translate(
        {code: code - 0xDC00 for code in range(0xDC80, 0xDD00)}
    )


@SETTINGS
@given(
    st.text(
        alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters="\\"),
        max_size=MAX_QUOTE,
    )
)
def test_clip_keeps_short_printable_text(text: str) -> None:
    assert clip(text) == text


@pytest.mark.parametrize("limit", [0, 1, 2, 3])
def test_clip_tiny_limits(limit: int) -> None:
    assert len(clip("x" * 10, limit)) <= 3
