"""DMARC evaluation (RFC 9989 tree walk, alignment, mtls as an authenticated identifier)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

import pytest

from mtls_milter.core.clock import FixedClock
from mtls_milter.core.dmarc import DmarcAction, DmarcResult, Identifier, decide, evaluate_dmarc
from mtls_milter.core.dmarc_walk import MAX_WALK_QUERIES, walk_targets
from mtls_milter.core.lookups import LookupStatus, TxtLookup

CLOCK = FixedClock(datetime(2026, 1, 1, tzinfo=UTC))


class FakeTxt:
    """TXT answers from a dict; names not in it are NXDOMAIN; records the queries."""

    def __init__(self, zone: Mapping[str, list[str] | str]) -> None:
        self.zone = zone
        self.queries: list[str] = []

    def txt(self, name: str, budget: float) -> TxtLookup:
        self.queries.append(name)
        value = self.zone.get(name)
        if value == "SERVFAIL":
            return TxtLookup(LookupStatus.TEMPFAIL, detail="SERVFAIL")
        if value is None:
            return TxtLookup(LookupStatus.NOT_FOUND, detail="NXDOMAIN")
        return TxtLookup(LookupStatus.OK, tuple(v.encode() for v in value))


def run(
    zone: Mapping[str, list[str] | str], from_field: str, *idents: Identifier
) -> tuple[DmarcResult, FakeTxt]:
    resolver = FakeTxt(zone)
    return evaluate_dmarc([from_field], idents, resolver, CLOCK, 5.0), resolver


MTLS = Identifier("mtls", "pass", "example.com")
REJECT = {"_dmarc.example.com": ["v=DMARC1; p=reject"]}


def test_mtls_only_pass_aligns_under_aspf() -> None:
    result, _ = run(REJECT, "A <a@example.com>", MTLS)
    assert (result.result, result.aligned, result.policy) == ("pass", ("mtls",), "reject")


def test_mtls_fail_gives_dmarc_fail() -> None:
    result, _ = run(REJECT, "a@example.com", Identifier("mtls", "fail", "example.com"))
    assert result.result == "fail"
    assert result.reason == "no aligned authenticated identifier"


@pytest.mark.parametrize(
    ("record", "ident", "expected"),
    [
        ("v=DMARC1; p=reject", Identifier("mtls", "pass", "mail.example.com"), ("mtls",)),
        ("v=DMARC1; p=reject; aspf=s", Identifier("mtls", "pass", "mail.example.com"), ()),
        ("v=DMARC1; p=reject; aspf=s", Identifier("spf", "pass", "example.com"), ("spf",)),
        ("v=DMARC1; p=reject", Identifier("dkim", "pass", "sub.example.com", "s1"), ("dkim",)),
        ("v=DMARC1; p=reject; adkim=s", Identifier("dkim", "pass", "sub.example.com"), ()),
        ("v=DMARC1; p=reject; aspf=s", Identifier("dkim", "pass", "sub.example.com"), ("dkim",)),
        ("v=DMARC1; p=reject", Identifier("spf", "pass", "example.org"), ()),
        ("v=DMARC1; p=reject", Identifier("spf", "softfail", "example.com"), ()),
        ("v=DMARC1; p=reject", Identifier("spf", "pass", "notexample.com"), ()),
    ],
)
def test_alignment_rows(record: str, ident: Identifier, expected: tuple[str, ...]) -> None:
    result, _ = run({"_dmarc.example.com": [record]}, "a@example.com", ident)
    assert result.aligned == expected
    assert result.result == ("pass" if expected else "fail")


def test_all_aligned_methods_are_named_in_order() -> None:
    idents = (
        Identifier("dkim", "pass", "example.com", "s"),
        Identifier("spf", "pass", "example.com"),
        MTLS,
    )
    result, _ = run(REJECT, "a@example.com", *idents)
    assert result.aligned == ("mtls", "spf", "dkim")


def test_subdomain_author_uses_sp_of_organizational_record() -> None:
    zone = {"_dmarc.example.com": ["v=DMARC1; p=reject; sp=quarantine"], "a.example.com": []}
    result, _ = run(zone, "x@a.example.com")
    assert (result.result, result.policy, result.record_domain) == (
        "fail",
        "quarantine",
        "example.com",
    )


def test_np_applies_to_a_nonexistent_subdomain() -> None:
    zone = {"_dmarc.example.com": ["v=DMARC1; p=none; sp=quarantine; np=reject"]}
    result, _ = run(zone, "x@ghost.example.com")
    assert result.policy == "reject"


def test_psd_record_makes_the_domain_below_it_organizational() -> None:
    # Only the public suffix domain publishes: mail.example.co.uk's org domain is example.co.uk,
    # so a MAIL FROM of bounce.example.co.uk aligns relaxed, other.co.uk does not.
    zone = {"_dmarc.co.uk": ["v=DMARC1; p=reject; psd=y"]}
    ok, _ = run(zone, "a@mail.example.co.uk", Identifier("mtls", "pass", "bounce.example.co.uk"))
    assert (ok.result, ok.policy, ok.record_domain) == ("pass", "reject", "co.uk")
    bad, _ = run(zone, "a@mail.example.co.uk", Identifier("mtls", "pass", "other.co.uk"))
    assert bad.result == "fail"


def test_psd_n_stops_the_walk() -> None:
    zone = {
        "_dmarc.dept.example.com": ["v=DMARC1; p=reject; psd=n"],
        "_dmarc.example.com": ["v=DMARC1; p=none"],
    }
    result, resolver = run(zone, "a@dept.example.com", Identifier("spf", "pass", "example.com"))
    assert result.result == "fail"  # example.com is another organization than dept.example.com
    assert "_dmarc.com" not in resolver.queries[:2]


def test_no_record_anywhere_is_none() -> None:
    result, resolver = run({}, "a@x.example.com", MTLS)
    assert (result.result, result.reason) == ("none", "no DMARC policy record")
    assert resolver.queries == ["_dmarc.x.example.com", "_dmarc.example.com", "_dmarc.com"]


def test_walk_is_bounded_by_the_rfc_9989_query_count() -> None:
    deep = ".".join(f"l{i}" for i in range(20)) + ".example.com"
    assert len(walk_targets(deep)) == MAX_WALK_QUERIES
    _, resolver = run({}, f"a@{deep}")
    assert len(resolver.queries) == MAX_WALK_QUERIES
    assert resolver.queries[1] == "_dmarc.l15.l16.l17.l18.l19.example.com"


@pytest.mark.parametrize("failing", ["_dmarc.a.example.com", "_dmarc.example.com", "_dmarc.com"])
def test_dns_failure_at_each_step_of_the_walk_is_temperror(failing: str) -> None:
    result, _ = run({failing: "SERVFAIL"}, "x@a.example.com", MTLS)
    assert result.result == "temperror"
    assert failing in result.reason


def test_dns_failure_aligning_a_subdomain_identifier_is_temperror() -> None:
    zone: dict[str, list[str] | str] = {**REJECT, "_dmarc.b.example.com": "SERVFAIL"}
    result, _ = run(zone, "a@example.com", Identifier("spf", "pass", "b.example.com"))
    assert (result.result, result.reason) == ("temperror", "DNS failure aligning spf")


def test_several_records_at_one_name_are_discarded() -> None:
    zone = {"_dmarc.example.com": ["v=DMARC1; p=reject", "v=DMARC1; p=none"]}
    assert run(zone, "a@example.com")[0].result == "none"


def test_non_dmarc_txt_records_are_ignored() -> None:
    zone = {"_dmarc.example.com": ["v=spf1 -all", "v=DMARC1; p=quarantine"]}
    assert run(zone, "a@example.com")[0].policy == "quarantine"


@pytest.mark.parametrize(
    ("from_field", "result", "reason"),
    [
        ("", "none", "From header field without an address"),
        ("undisclosed-recipients:;", "none", "From header field without an address"),
        ("a@=?utf-8?q?ex=C3=A4mple?=.com", "permerror", "invalid"),
        ("a@[192.0.2.1]", "permerror", "invalid"),
        ("a@example.com, b@example.org", "permerror", "different DMARC policies"),
        (", ".join(f"u{i}@example.com" for i in range(101)), "permerror", "more than 100"),
    ],
)
def test_from_field_cases(from_field: str, result: str, reason: str) -> None:
    zone = {**REJECT, "_dmarc.example.org": ["v=DMARC1; p=none"]}
    got, _ = run(zone, from_field, MTLS)
    assert got.result == result
    assert reason in got.reason


def test_no_from_field_is_none() -> None:
    result = evaluate_dmarc([], (MTLS,), FakeTxt(REJECT), CLOCK, 5.0)
    assert (result.result, result.reason) == ("none", "no From header field")


def test_group_members_and_100_addresses_of_one_domain_pass() -> None:
    many = ", ".join(f"u{i}@example.com" for i in range(100))
    assert run(REJECT, many, MTLS)[0].result == "pass"
    assert run(REJECT, "team: a@example.com, b@example.com;", MTLS)[0].result == "pass"


def test_several_domains_sharing_one_policy_are_evaluated_each() -> None:
    zone = {"_dmarc.example.com": ["v=DMARC1; p=reject"]}
    result, _ = run(zone, "a@a.example.com, b@b.example.com", MTLS)
    assert (result.result, result.aligned) == ("pass", ("mtls",))


def test_non_utf8_from_is_permerror() -> None:
    result = evaluate_dmarc([b"a@ex\xe4mple.com"], (MTLS,), FakeTxt(REJECT), CLOCK, 5.0)
    assert result.result == "permerror"


@pytest.mark.parametrize(
    ("result", "kwargs", "action"),
    [
        (DmarcResult("fail", domain="e.com", policy="reject"), {"enforce": True}, "reject"),
        (DmarcResult("fail", domain="e.com", policy="quarantine"), {"enforce": True}, "quarantine"),
        (DmarcResult("fail", domain="e.com", policy="none"), {"enforce": True}, "none"),
        (DmarcResult("fail", domain="e.com", policy="reject"), {"enforce": False}, "none"),
        (DmarcResult("fail", policy="reject", testing=True), {"enforce": True}, "none"),
        (DmarcResult("pass", policy="reject"), {"enforce": True}, "none"),
        (DmarcResult("temperror", policy="reject"), {"enforce": True}, "none"),
    ],
)
def test_policy_decision_rows(result: DmarcResult, kwargs: dict[str, bool], action: str) -> None:
    assert decide(result, dry_run=False, **kwargs).action == DmarcAction(action)


def test_reject_reply_names_the_author_domain_and_dry_run_does_nothing() -> None:
    failing = DmarcResult("fail", domain="example.com", policy="reject")
    code, status, text = decide(failing, enforce=True, dry_run=False).reply
    assert (code, status) == ("550", "5.7.1")
    assert "example.com" in text
    assert decide(failing, enforce=True, dry_run=True).action is DmarcAction.NONE
