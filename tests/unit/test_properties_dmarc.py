"""Hypothesis properties of the DMARC record parser and the From-field author extraction."""

from __future__ import annotations

import authres
from hypothesis import given, settings
from hypothesis import strategies as st

from mtls_milter.core.author import MAX_DOMAINS, AuthorStatus, author_domains
from mtls_milter.core.dmarc import DmarcResult, Identifier, dmarc_method, identifier_method
from mtls_milter.core.dmarc_record import Policy, parse_record
from mtls_milter.core.header import MtlsField, render_value
from mtls_milter.core.trusted_results import MAX_TRUSTED_RESULTS, trusted_identifiers

POLICIES = [p.value for p in Policy]
TAGS = st.sampled_from(["p", "sp", "np", "psd", "t", "adkim", "aspf", "rua", "pct", "zz", "P"])
VALUES = st.one_of(
    st.sampled_from([*POLICIES, "y", "n", "u", "r", "s", "mailto:a@b", "", "bogus"]),
    st.text(max_size=20),
)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_parse_or_are_not_a_record(raw: bytes) -> None:
    record = parse_record(raw)
    if record is not None:
        assert record.p in Policy
        assert record.psd in {"y", "n", "u"}
        assert record.adkim in {"r", "s"} and record.aspf in {"r", "s"}
        assert all(len(w) <= 300 and w.isprintable() for w in record.warnings)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(TAGS, VALUES), max_size=12))
def test_tag_lists_give_a_record_with_valid_tags(tags: list[tuple[str, str]]) -> None:
    body = "; ".join(f"{name}={value}" for name, value in tags)
    record = parse_record(f"v=DMARC1; {body}".encode("utf-8", "surrogateescape"))
    assert record is not None
    first_p = next((v.strip().lower() for n, v in tags if n.lower() == "p"), "none")
    if first_p in POLICIES and ";" not in first_p and "=" not in first_p:
        assert record.p.value == first_p


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200))
def test_records_not_starting_with_the_version_are_discarded(text: str) -> None:
    raw = ("x" + text).encode("utf-8", "surrogateescape")
    assert parse_record(raw) is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=120), st.binary(max_size=120)), max_size=3))
def test_author_extraction_always_has_a_defined_result(fields: list[str | bytes]) -> None:
    author = author_domains(fields)
    assert author.status in AuthorStatus
    if author.status is AuthorStatus.OK:
        assert 1 <= len(author.domains) <= MAX_DOMAINS
        assert all(d == d.lower() and d.isascii() for d in author.domains)
    else:
        assert author.reason and not author.domains


LABEL = st.from_regex(r"[a-z][a-z0-9]{0,10}", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(LABEL, st.lists(LABEL, min_size=2, max_size=4)), min_size=1, max_size=5),
    st.sampled_from(["{a}", "Name <{a}>", '"Q, Name" <{a}>', "{a} (comment)"]),
)
def test_well_formed_addresses_give_their_domains(
    addresses: list[tuple[str, list[str]]], shape: str
) -> None:
    texts = [shape.format(a=f"{local}@{'.'.join(labels)}") for local, labels in addresses]
    author = author_domains([", ".join(texts)])
    expected = list(dict.fromkeys(".".join(labels) for _, labels in addresses))
    assert author.status is AuthorStatus.OK
    assert list(author.domains) == expected


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["pass", "fail", "none", "temperror", "permerror"]),
    st.text(max_size=80),
    st.text(max_size=80),
    st.lists(st.sampled_from(["mtls", "spf", "dkim"]), unique=True),
    st.text(max_size=40),
    st.text(max_size=40),
)
def test_our_field_with_dmarc_results_always_parses(
    result: str, reason: str, domain: str, aligned: list[str], dkim_d: str, dkim_s: str
) -> None:
    dmarc = DmarcResult(result, reason, domain, "reject", tuple(aligned))
    field = MtlsField(
        "mx.example.net",
        "fail",
        reason=reason,
        value=domain,
        more=(
            identifier_method(Identifier("spf", "softfail", domain)),
            identifier_method(Identifier("dkim", "fail", dkim_d, dkim_s)),
            dmarc_method(dmarc),
        ),
    )
    value = render_value(field)
    assert value.isascii() and "\n" not in value
    parsed = authres.AuthenticationResultsHeader.parse_value(value)
    assert [str(r.method) for r in parsed.results] == ["mtls", "spf", "dkim", "dmarc"]
    assert str(parsed.results[-1].result) == result


def test_an_empty_dkim_domain_is_left_out_of_our_field() -> None:
    """A signature whose d= is only blanks or control characters: authres could not parse
    ``header.d="" header.s=":"``, so an empty value is not written."""
    field = MtlsField(
        "mx.example.net", "fail", more=(identifier_method(Identifier("dkim", "fail", "\r", ":")),)
    )
    value = render_value(field)
    assert value == 'mx.example.net; mtls=fail; dkim=fail header.s=":"'
    authres.AuthenticationResultsHeader.parse_value(value)


# --- trusted-results: spf= and dkim= from other hosts' fields ----------------------------------

SPF_DKIM = frozenset({"spf", "dkim"})
LABELS = st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True)
HOSTS = st.builds(lambda a, b: f"{a}.{b}.test", LABELS, LABELS)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=300), max_size=5), st.lists(HOSTS, max_size=3))
def test_any_field_values_give_identifiers_or_nothing(
    values: list[str], trusted: list[str]
) -> None:
    found = trusted_identifiers(values, trusted, SPF_DKIM)
    assert len(found) <= MAX_TRUSTED_RESULTS
    assert all(ident.method in SPF_DKIM for ident in found)


@settings(max_examples=200, deadline=None)
@given(HOSTS, HOSTS, HOSTS, st.sampled_from(["pass", "fail", "neutral"]))
def test_only_trusted_ids_are_believed(ours: str, other: str, domain: str, result: str) -> None:
    """A field from an id not in the list is ignored whatever it claims; a trusted one counts."""
    field = f"{other}; dkim={result} header.d={domain} header.s=sel"
    claimed = trusted_identifiers([field], [ours], SPF_DKIM)
    if other == ours:
        assert claimed == (Identifier("dkim", result, domain, "sel"),)
    else:
        assert claimed == ()
    trusted = trusted_identifiers([field], [other.upper()], SPF_DKIM)
    assert trusted == (Identifier("dkim", result, domain, "sel"),)
